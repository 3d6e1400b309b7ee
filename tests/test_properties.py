"""Property tests (hypothesis): the invariants of TESTING.md "Properties", in float64.

Hypothesis draws shapes, groupings, ε, shifts, scales and a seed for the data; the settings below
(deadline off, derandomized, at most 20 examples) apply to the tests of this file only.

Tolerances: float64 reductions over ≤ a few hundred values have relative round-off ≲ 1e-14; the
exact identities below are checked to 1e-9. Invariances that only hold where σ² ≫ ε use
ε = 1e-14: the smallest groups (a local window of 2 values) can have σ² ~ 1e-7 with normal data,
so the ε-induced relative error ε/(2σ²) stays ≲ 1e-7 — checked to 1e-6. (With ε = 1e-5 a
2-value group with σ² ~ 1e-7 breaks scale invariance by 1e-4 for real: that is the caveat.)
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit as nk

DT = torch.float64
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
EXACT = dict(rtol=1e-9, atol=1e-9)


def _x(shape, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale + loc


seeds = st.integers(0, 2**31 - 1)


@st.composite
def inputs(draw, min_batch=2, channels=(2, 4, 6), min_positions=2, max_dims=2):
    n = draw(st.integers(min_batch, 5))
    c = draw(st.sampled_from(channels))
    spatial = draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_dims))
    if math.prod(spatial) < min_positions:
        spatial[0] = min_positions
    return (n, c, *spatial)


def _divisors(c):
    return [d for d in range(1, c + 1) if c % d == 0]


# group view: reshape x (N, C, *S) so that each row is one statistics group
def _rows(name, x, g=None):
    n, c = x.shape[:2]
    if name == "bn":
        return x.transpose(0, 1).reshape(c, -1)
    if name == "batch_group_norm":
        return x.reshape(n, g, -1).transpose(0, 1).reshape(g, -1)
    if name == "ln":
        return x.reshape(n, -1)
    if name == "in":
        return x.reshape(n * c, -1)
    if name == "gn":
        return x.reshape(n * g, -1)
    if name == "pn":
        return x.movedim(1, -1).reshape(-1, c)
    raise AssertionError(name)


def _make(name, c, g, **kw):
    if name in ("gn", "batch_group_norm"):
        kw["num_groups"] = g
    if name in ("gn", "ln", "bn", "batch_group_norm", "in", "pn"):
        kw["affine"] = False
    return nk.create(name, c, dtype=DT, **kw)


@SETTINGS
@given(name=st.sampled_from(["bn", "ln", "in", "gn", "pn", "batch_group_norm"]), shape=inputs(),
       data=st.data(), eps=st.sampled_from([1e-5, 0.1, 1.0, 3.0]), seed=seeds,
       loc=st.floats(-5, 5), scale=st.floats(0.1, 5))
def test_standardized_groups_have_mean_zero_and_shrunk_variance(name, shape, data, eps, seed, loc, scale):
    c = shape[1]
    g = data.draw(st.sampled_from(_divisors(c))) if name in ("gn", "batch_group_norm") else None
    x = _x(shape, seed, loc, scale)
    y = _make(name, c, g, eps=eps)(x)
    rx, ry = _rows(name, x, g), _rows(name, y, g)
    var_x = rx.var(1, unbiased=False)
    torch.testing.assert_close(ry.mean(1), torch.zeros_like(var_x), rtol=0, atol=1e-9)
    torch.testing.assert_close(ry.var(1, unbiased=False), 1 - eps / (var_x + eps), **EXACT)


CENTERED = ["bn", "ln", "in", "gn", "pn", "batch_group_norm", "l1_bn", "range_bn", "lcn",
            "mean_only_bn", "divisive_norm"]
SCALE_INVARIANT = ["bn", "ln", "in", "gn", "pn", "batch_group_norm", "l1_bn", "range_bn", "lcn",
                   "rms_norm", "scale_norm"]


def _module(name, c):
    kw = {}
    if name in ("gn", "batch_group_norm", "lcn"):
        kw["num_groups"] = 2
    if name in ("lcn", "divisive_norm"):
        kw["window"] = 3
    if name not in ("lrn", "divisive_norm", "mean_only_bn"):
        kw["eps"] = 1e-14
    m = nk.create(name, c, dtype=DT, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return m


@SETTINGS
@given(name=st.sampled_from(CENTERED), shape=inputs(channels=(2, 4)), seed=seeds,
       shift=st.floats(-100, 100))
def test_shift_invariance(name, shape, seed, shift):
    m = _module(name, shape[1])
    x = _x(shape, seed, scale=1.0)
    # round-off: the shift is removed by subtracting a mean of ~|shift| magnitude: ~|shift|·1e-15
    torch.testing.assert_close(m(x + shift), m(x), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(name=st.sampled_from(SCALE_INVARIANT), shape=inputs(channels=(2, 4)), seed=seeds,
       factor=st.floats(0.5, 20))
def test_scale_invariance(name, shape, seed, factor):
    m = _module(name, shape[1])
    x = _x(shape, seed, loc=0.3)
    # ε = 1e-14 against group variances ≳ 1e-7: the ε-induced difference is ≲ 1e-7 relative
    torch.testing.assert_close(m(x * factor), m(x), rtol=1e-6, atol=1e-6)


BATCH_METHODS = ["bn", "batch_group_norm", "mean_only_bn", "l1_bn", "range_bn"]


@SETTINGS
@given(name=st.sampled_from(BATCH_METHODS), shape=inputs(min_batch=2), seed=seeds, perm_seed=seeds)
def test_batch_methods_are_permutation_equivariant(name, shape, seed, perm_seed):
    c = shape[1]
    a, b = _module(name, c), _module(name, c)
    x = _x(shape, seed, loc=1.0, scale=2.0)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(perm_seed))
    torch.testing.assert_close(a(x[perm]), b(x)[perm], **EXACT)
    for (k, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(ba, bb, **EXACT, msg=lambda s, k=k: f"{k}: {s}")


PER_SAMPLE = ["ln", "gn", "in", "pn", "rms_norm", "scale_norm", "lcn", "lrn", "divisive_norm"]


@SETTINGS
@given(name=st.sampled_from(PER_SAMPLE), shape=inputs(min_batch=2, channels=(2, 4)), seed=seeds,
       data=st.data())
def test_sample_outputs_do_not_depend_on_other_samples(name, shape, seed, data):
    m = _module(name, shape[1])
    i, j = data.draw(st.permutations(range(shape[0])))[:2]
    x = _x(shape, seed)
    x2 = x.clone()
    x2[j] = _x(shape[1:], seed + 1, loc=50.0, scale=30.0)
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[i], y[i], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y2[j], y[j])


@SETTINGS
@given(name=st.sampled_from(BATCH_METHODS), shape=inputs(min_batch=2, channels=(2, 4)), seed=seeds)
def test_batch_methods_in_eval_are_per_sample(name, shape, seed):
    m = _module(name, shape[1])
    m(_x(shape, seed + 7, loc=2.0, scale=3.0))  # move the running estimates away from 0/1
    m.eval()
    x = _x(shape, seed)
    x2 = x.clone()
    x2[1] = x2[1] * 10 - 5
    torch.testing.assert_close(m(x2)[0], m(x)[0], rtol=0, atol=1e-12)


@SETTINGS
@given(shape=inputs(channels=(2, 4, 6)), seed=seeds, eps=st.sampled_from([1e-8, 1e-5, 1e-1]),
       over=st.sampled_from(["all", "channels"]), scale=st.floats(0.1, 10))
def test_rms_norm_output_has_unit_rms(shape, seed, eps, over, scale):
    x = _x(shape, seed, loc=0.5, scale=scale)
    y = nk.RMSNorm(shape[1], over=over, eps=eps, dtype=DT)(x)
    dims = tuple(range(1, x.dim())) if over == "all" else (1,)
    ms = x.pow(2).mean(dims)
    torch.testing.assert_close(y.pow(2).mean(dims).sqrt(), (ms / (ms + eps)).sqrt(), **EXACT)


@SETTINGS
@given(shape=inputs(channels=(2, 4, 6)), seed=seeds, eps=st.sampled_from([1e-8, 1e-5, 1e-1]),
       init=st.one_of(st.none(), st.floats(0.1, 10)), scale=st.floats(0.1, 10))
def test_scale_norm_output_norm_is_g(shape, seed, eps, init, scale):
    x = _x(shape, seed, loc=-0.5, scale=scale)
    m = nk.ScaleNorm(shape[1], init=init, eps=eps, dtype=DT)
    g = math.sqrt(shape[1]) if init is None else init
    y = m(x)
    ss = x.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), g * (ss / (ss + eps)).sqrt(), **EXACT)


@SETTINGS
@given(shape=inputs(channels=(2, 4)), seed=seeds, eps=st.sampled_from([1e-8, 1e-5, 1e-2]),
       loc=st.floats(-10, 10), scale=st.floats(0.1, 10))
def test_l1_bn_output_mean_abs_deviation(shape, seed, eps, loc, scale):
    x = _x(shape, seed, loc, scale)
    y = nk.L1BatchNorm(shape[1], affine=False, eps=eps, dtype=DT)(x)
    rows_x, rows_y = _rows("bn", x), _rows("bn", y)
    s = math.sqrt(math.pi / 2) * (rows_x - rows_x.mean(1, keepdim=True)).abs().mean(1)
    torch.testing.assert_close(rows_y.mean(1), torch.zeros_like(s), rtol=0, atol=1e-9)
    # E|ŷ| = √(2/π) · s/(s + ε): √(2/π) exactly when ε → 0
    torch.testing.assert_close(rows_y.abs().mean(1), math.sqrt(2 / math.pi) * s / (s + eps), **EXACT)
    if eps <= 1e-5:
        torch.testing.assert_close(rows_y.abs().mean(1), torch.full_like(s, math.sqrt(2 / math.pi)),
                                   rtol=1e-3, atol=0)


@SETTINGS
@given(shape=inputs(channels=(2, 4)), seed=seeds, eps=st.sampled_from([1e-8, 1e-5, 1e-2]),
       loc=st.floats(-10, 10), scale=st.floats(0.1, 10))
def test_range_bn_output_range(shape, seed, eps, loc, scale):
    x = _x(shape, seed, loc, scale)
    y = nk.RangeBatchNorm(shape[1], affine=False, eps=eps, dtype=DT)(x)
    rows_x, rows_y = _rows("bn", x), _rows("bn", y)
    cm = 1 / math.sqrt(2 * math.log(rows_x.shape[1]))
    r = (rows_x.amax(1) - rows_x.amin(1)) * cm
    out_range = rows_y.amax(1) - rows_y.amin(1)
    torch.testing.assert_close(out_range, (1 / cm) * r / (r + eps), **EXACT)
    if eps <= 1e-5:
        torch.testing.assert_close(out_range, torch.full_like(r, 1 / cm), rtol=1e-3, atol=0)
