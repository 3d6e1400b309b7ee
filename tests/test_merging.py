"""normkit.functional.merging: every merge equals the moments of the union, computed directly in
float64 on the concatenated data.

The reference is always ``torch.cat`` of the parts followed by ``mean`` / ``var(correction=0)``
(or the scatter ``Σ (x − μ)(x − μ)ᵀ``); the functions under test only see the parts' moments.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

from normkit.functional import statistics as S
from normkit.functional.merging import (
    MomentPool,
    merge_moments,
    mix_moments,
    pool_moments,
    scatter_about,
    weighted_mean,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _data(n: int, *rest: int, seed: int = 0, loc: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *rest, generator=g, dtype=F64) * 1.7 + loc


def _scatter(x: torch.Tensor) -> torch.Tensor:
    d = x - x.mean(0)
    return d.T @ d


@pytest.mark.parametrize("n_a,n_b,seed", [(1, 1, 0), (3, 7, 1), (10, 2, 2), (5, 5, 3)])
def test_mix_moments_of_two_sets_are_the_moments_of_their_union(n_a, n_b, seed):
    x = _data(n_a + n_b, 4, seed=seed, loc=2.0)
    a, b = x[:n_a], x[n_a:]
    mean, var = mix_moments(a.mean(0), a.var(0, correction=0), b.mean(0), b.var(0, correction=0),
                            n_a / (n_a + n_b))
    assert_close(mean, x.mean(0), **TIGHT)
    assert_close(var, x.var(0, correction=0), **TIGHT)


def test_mix_moments_endpoints_and_weights_broadcast():
    ma, va, mb, vb = (_data(3, seed=s) for s in range(4))
    va, vb = va.abs(), vb.abs()
    got = mix_moments(ma, va, mb, vb, 0.0)
    assert torch.equal(got[0], mb) and torch.equal(got[1], vb)
    got = mix_moments(ma, va, mb, vb, 1.0)  # μ_b + (μ_a − μ_b): μ_a to one rounding
    assert torch.equal(got[1], va)
    assert_close(got[0], ma, rtol=0, atol=4 * torch.finfo(F64).eps * float(ma.abs().max() + mb.abs().max()))
    w = torch.tensor([0.0, 0.5, 1.0], dtype=F64)  # a weight per feature
    mean, var = mix_moments(ma, va, mb, vb, w)
    assert mean[0] == mb[0] and var[0] == vb[0] and var[2] == va[2]
    assert_close(var[1], 0.5 * va[1] + 0.5 * vb[1] + 0.25 * (ma[1] - mb[1]) ** 2, **TIGHT)


def test_mix_moments_stays_accurate_under_an_offset_in_float32():
    x = _data(64, 3, seed=5, loc=1e4)
    a, b = x[:24].float(), x[24:].float()
    mean, var = mix_moments(a.mean(0), a.var(0, correction=0), b.mean(0), b.var(0, correction=0),
                            24 / 64)
    assert (var >= 0).all()
    # float32 statistics of a 1e4-offset set: the variance keeps ~4 significant digits
    assert_close(var.double(), x.var(0, correction=0), rtol=1e-3, atol=0)
    assert_close(mean.double(), x.mean(0), rtol=1e-6, atol=0)


def test_weighted_mean_is_the_mean_of_repeated_values():
    x = _data(4, 3, seed=6)
    counts = torch.tensor([1, 3, 2, 4])
    repeated = torch.repeat_interleave(x, counts, dim=0)
    got = weighted_mean(x, counts.to(F64).reshape(4, 1), (0,))
    assert got.shape == (1, 3)
    assert_close(got[0], repeated.mean(0), **TIGHT)


def test_weighted_mean_broadcasts_both_ways_and_is_finite_for_zero_weights():
    x = _data(1, 5, 3, seed=7)  # (1, N, C): N values per feature
    w = torch.tensor([[1.0] * 5, [0.0, 2.0, 0.0, 0.0, 1.0], [0.0] * 5], dtype=F64).unsqueeze(-1)
    got = weighted_mean(x, w, (1,))  # one mean per row of weights: (K, 1, C)
    assert got.shape == (3, 1, 3)
    assert_close(got[0, 0], x[0].mean(0), **TIGHT)
    assert_close(got[1, 0], (2 * x[0, 1] + x[0, 4]) / 3, **TIGHT)
    assert torch.equal(got[2], torch.zeros(1, 3, dtype=F64))  # no weight at all: 0, not 0/0


@pytest.mark.parametrize("sizes", [(4, 4, 4), (1, 5, 2, 7), (3,)])
def test_pool_moments_with_counts_are_the_moments_of_the_union(sizes):
    x = _data(sum(sizes), 2, 3, seed=len(sizes), loc=-4.0)
    parts = torch.split(x, list(sizes))
    means = torch.stack([p.mean(0) for p in parts])  # (K, 2, 3)
    variances = torch.stack([p.var(0, correction=0) for p in parts])
    counts = torch.tensor(sizes, dtype=F64).reshape(-1, 1, 1)
    mean, var = pool_moments(means, variances, (0,), counts)
    assert_close(mean[0], x.mean(0), **TIGHT)
    assert_close(var[0], x.var(0, correction=0), **TIGHT)
    if len(set(sizes)) == 1:  # equal cells: the unweighted form gives the same
        mean_eq, var_eq = pool_moments(means, variances, (0,))
        assert_close(mean_eq, mean, **TIGHT)
        assert_close(var_eq, var, **TIGHT)


def test_pool_moments_of_instances_over_several_dims_are_the_layer_moments():
    x = _data(3, 4, 5, 6, seed=9, loc=50.0)  # (N, C, H, W): instances (n, c) over H·W
    mean_i = x.mean((2, 3), keepdim=True)
    var_i = x.var((2, 3), correction=0, keepdim=True)
    mean, var = pool_moments(mean_i, var_i, (1,))  # pool the channels: LN's moments per sample
    assert_close(mean, x.mean((1, 2, 3), keepdim=True), **TIGHT)
    assert_close(var, x.var((1, 2, 3), correction=0, keepdim=True), **TIGHT)


def test_scatter_about_is_the_sum_of_squares_about_the_centre():
    x = _data(7, 3, seed=10)
    c = _data(3, seed=11)
    d = x - c
    own = ((x - x.mean(0)) ** 2).sum(0)
    assert_close(scatter_about(own, x.mean(0), 7, c), (d * d).sum(0), **TIGHT)
    assert_close(scatter_about(_scatter(x), x.mean(0), 7, c), d.T @ d, **TIGHT)


@pytest.mark.parametrize("cuts", [(3,), (1, 4), (2, 3, 8)])
def test_merge_moments_chained_equal_the_union(cuts):
    x = _data(10, 3, seed=len(cuts), loc=1e4)
    bounds = [0, *cuts, 10]
    n, mean, m2 = 0, None, None
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = x[lo:hi]
        n, mean, m2 = merge_moments(n, mean, m2, hi - lo, part.mean(0), _scatter(part))
    assert n == 10
    assert_close(mean, x.mean(0), **TIGHT)
    assert_close(m2, _scatter(x), rtol=1e-10, atol=1e-6)  # scatter ~ n·σ² with a 1e4 offset


def test_merge_moments_per_feature_and_empty_first_set():
    x = _data(9, 4, seed=12)
    a, b = x[:4], x[4:]
    per = lambda z: ((z - z.mean(0)) ** 2).sum(0)  # noqa: E731
    n, mean, m2 = merge_moments(4, a.mean(0), per(a), 5, b.mean(0), per(b))
    assert_close(m2 / n, x.var(0, correction=0), **TIGHT)
    assert_close(mean, x.mean(0), **TIGHT)
    got = merge_moments(0, None, None, 5, b.mean(0), per(b))
    assert got[0] == 5 and got[1] is not None and torch.equal(got[2], per(b))


def test_moment_pool_gives_the_unbiased_moments_of_all_batches():
    x = _data(17, 3, seed=13, loc=-7.0)
    pool = MomentPool()
    for part in torch.split(x, [5, 1, 8, 3]):
        cov = torch.cov(part.T) if part.shape[0] > 1 else torch.zeros(3, 3, dtype=F64)
        pool.add({"mean": part.mean(0), "var": part.var(0) if part.shape[0] > 1
                  else torch.zeros(3, dtype=F64),
                  "cov": cov.unsqueeze(0), "scale": part.abs().mean(0)}, part.shape[0])
    out = pool.result()
    assert_close(out["mean"], x.mean(0), **TIGHT)
    assert_close(out["var"], x.var(0), **TIGHT)
    assert_close(out["cov"][0], torch.cov(x.T), **TIGHT)
    # any other statistic: averaged with the batch sizes as weights
    assert_close(out["scale"], torch.stack([p.abs().mean(0) * p.shape[0] for p in
                                            torch.split(x, [5, 1, 8, 3])]).sum(0) / 17, **TIGHT)


def test_gradients_of_mix_and_pool_match_finite_differences():
    ma, mb = _data(3, seed=14).requires_grad_(), _data(3, seed=15).requires_grad_()
    va, vb = (_data(3, seed=s).abs().requires_grad_() for s in (16, 17))
    w = torch.tensor(0.3, dtype=F64, requires_grad=True)
    assert gradcheck(lambda *t: mix_moments(*t), (ma, va, mb, vb, w))
    means, variances = _data(4, 2, seed=18).requires_grad_(), _data(4, 2, seed=19).abs().requires_grad_()
    counts = torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=F64, requires_grad=True)
    assert gradcheck(lambda m, v, c: pool_moments(m, v, (0,), c), (means, variances, counts))


def test_old_names_in_statistics_are_deprecated_aliases():
    for name, obj in (("merge_moments", merge_moments), ("MomentPool", MomentPool)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(S, name) is obj
        assert any(issubclass(w.category, DeprecationWarning) and "functional.merging" in
                   str(w.message) for w in caught), name
    with pytest.raises(AttributeError):
        _ = S.no_such_name
