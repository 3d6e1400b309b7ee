"""Multimode family (book ch. 5): mode, mixture and task normalization.

Reference tests from the formulas on hand-sized inputs (plain Python arithmetic), equivalences
(K = 1 is BN; TaskNorm's α → 1 is BN, α → 0 is IN / LN; hard gates are BN per group of samples),
properties (hypothesis: batch permutation equivariance, EM's monotone likelihood, affine
invariance, per-sample evaluation) and the warm start of mixture normalization's EM, which the
generic table (stateless batch statistics) cannot express.

This file: the references, equivalences and properties; ``tests/test_multimode_running.py``: the
mixture's warm start, TaskNorm's running context, compositions, functional forms, folding and
the registry. Helpers: ``tests/multimode_util.py``.

Tolerances: everything runs in float64. Two computations of the same formula in a different
order agree to ~1e-15 relative on O(1) values; we check 1e-10 (as tests/test_generic.py). Where a
property holds only up to ε (invariance to an affine change of the input), ε = 1e-12 and
σ² ≈ 1 make the ε-induced relative error ≲ 1e-12; checked to 1e-8.
"""

from __future__ import annotations

import copy
import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

import normkit as nk
from multimode_util import (
    F64,
    SETTINGS,
    TIGHT,
    _run,
    _sigmoid,
    _x,
    seeds,
)
from normkit.functional.mixture import gmm_em, normal_quantiles
from normkit.methods.multimode import MixtureNorm, ModeNorm, TaskNorm


# =================================================================== hand-computed references
def test_mode_norm_hand_computed():
    # C = 1, N = 2 samples of 2 positions: sample 0 = (1, 3), sample 1 = (2, 6); pooled 2 and 4.
    # Gate W = (1, −1)ᵀ, b = 0: logits (2, −2) and (4, −4).
    m = ModeNorm(1, num_modes=2, affine=False, momentum=0.1, dtype=F64)
    with torch.no_grad():
        m.gate_weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m.gate_bias.zero_()
    x = torch.tensor([[[1.0, 3.0]], [[2.0, 6.0]]], dtype=F64)
    y = m(x)
    samples, pooled, eps = [(1.0, 3.0), (2.0, 6.0)], [2.0, 4.0], 1e-5
    g = [[_sigmoid(2 * p), _sigmoid(-2 * p)] for p in pooled]  # softmax of (p, −p)
    mean, var = [], []
    for k in range(2):
        nk_ = g[0][k] + g[1][k]
        mu = (g[0][k] * pooled[0] + g[1][k] * pooled[1]) / nk_
        sq = [sum((v - mu) ** 2 for v in s) / 2 for s in samples]  # mean of (x − μ)² over positions
        mean.append(mu)
        var.append((g[0][k] * sq[0] + g[1][k] * sq[1]) / nk_)
    expected = [[sum(g[n][k] * (v - mean[k]) / math.sqrt(var[k] + eps) for k in range(2))
                 for v in samples[n]] for n in range(2)]
    assert_close(y[:, 0], torch.tensor(expected, dtype=F64), **TIGHT)
    # running: 0.9·init + 0.1·batch, the variance with BN's factor m/(m−1) = 4/3
    assert_close(m.running_mean[:, 0], 0.1 * torch.tensor(mean, dtype=F64), **TIGHT)
    assert_close(m.running_var[:, 0], 0.9 + 0.1 * torch.tensor(var, dtype=F64) * 4 / 3, **TIGHT)


def test_mixture_norm_hand_computed():
    # One channel with values (−2, −1, 1, 2): μ_B = 0, σ²_B = 2.5. K = 2 from the batch start
    # μ_k = ±z·√(σ²_B + ε) (z = Φ⁻¹(3/4)), σ²_k = σ²_B(1 − z²), π_k = ½; one EM step.
    eps = 1e-5
    m = MixtureNorm(1, num_components=2, iterations=1, init="batch", affine=False, eps=eps,
                    dtype=F64)
    vals = [-2.0, -1.0, 1.0, 2.0]
    y = m(torch.tensor(vals, dtype=F64).view(4, 1))
    z = NormalDist().inv_cdf(0.75)
    mean = [-z * math.sqrt(2.5 + eps), z * math.sqrt(2.5 + eps)]
    var = [2.5 * (1 - z * z)] * 2
    prior = [0.5, 0.5]

    def posterior(v):
        d = [prior[k] * math.exp(-((v - mean[k]) ** 2) / (2 * (var[k] + eps)))
             / math.sqrt(2 * math.pi * (var[k] + eps)) for k in range(2)]
        return [t / sum(d) for t in d]

    post = [posterior(v) for v in vals]  # E-step
    count = [sum(p[k] for p in post) for k in range(2)]  # M-step
    mean = [sum(p[k] * v for p, v in zip(post, vals, strict=True)) / count[k] for k in range(2)]
    var = [sum(p[k] * (v - mean[k]) ** 2 for p, v in zip(post, vals, strict=True)) / count[k]
           for k in range(2)]
    prior = [c / 4 for c in count]
    expected = []
    for v in vals:  # the output uses the posteriors of the fitted mixture
        p = posterior(v)
        expected.append(sum(p[k] * (v - mean[k]) / math.sqrt(var[k] + eps) for k in range(2)))
    assert_close(y[:, 0], torch.tensor(expected, dtype=F64), **TIGHT)
    assert_close(m.running_mean[:, 0], 0.1 * torch.tensor(mean, dtype=F64), **TIGHT)
    assert_close(m.running_var[:, 0], 0.9 + 0.1 * torch.tensor(var, dtype=F64) * 4 / 3, **TIGHT)
    assert_close(m.running_log_prior[:, 0], 0.1 * torch.log(torch.tensor(prior, dtype=F64)),
                 **TIGHT)
    # symmetric data, symmetric start: mirror-image components, output odd in x
    assert_close(torch.tensor(mean[0]), torch.tensor(-mean[1]), **TIGHT)
    assert_close(y.flip(0), -y, **TIGHT)


def test_task_norm_hand_computed():
    # C = 1, N = 2 samples of 2 positions, (1, 3) and (2, 6). a = ½, b = −1: α = sigmoid(½·2 − 1) = ½.
    # BN: μ = 3, σ² = (4 + 0 + 1 + 9)/4 = 3.5. IN: μ = (2, 4), σ² = (1, 4).
    # Blend: sample 0 μ = 2.5, σ² = ½(3.5 + 0.25) + ½(1 + 0.25) = 2.5;
    #        sample 1 μ = 3.5, σ² = ½(3.5 + 0.25) + ½(4 + 0.25) = 4.
    eps = 1e-5
    m = TaskNorm(1, affine=False, eps=eps, dtype=F64)
    with torch.no_grad():
        m.alpha_scale.fill_(0.5)
        m.alpha_offset.fill_(-1.0)
    y = m(torch.tensor([[[1.0, 3.0]], [[2.0, 6.0]]], dtype=F64))
    expected = [[(1 - 2.5) / math.sqrt(2.5 + eps), (3 - 2.5) / math.sqrt(2.5 + eps)],
                [(2 - 3.5) / math.sqrt(4 + eps), (6 - 3.5) / math.sqrt(4 + eps)]]
    assert_close(y[:, 0], torch.tensor(expected, dtype=F64), **TIGHT)
    assert_close(m.running_mean, torch.tensor([0.3], dtype=F64), **TIGHT)
    assert_close(m.running_var, torch.tensor([0.9 + 0.1 * 3.5 * 4 / 3], dtype=F64), **TIGHT)
    assert_close(m.running_size, torch.tensor([0.2], dtype=F64), **TIGHT)
    # eval on one sample (4, 0): m = running_size = 0.2, α = sigmoid(0.1 − 1); IN moments (2, 4)
    m.eval()
    alpha, mu_bn, var_bn = _sigmoid(0.5 * 0.2 - 1), 0.3, 0.9 + 0.1 * 3.5 * 4 / 3
    mu = alpha * mu_bn + (1 - alpha) * 2
    var = alpha * (var_bn + (mu_bn - mu) ** 2) + (1 - alpha) * (4 + (2 - mu) ** 2)
    y = m(torch.tensor([[[4.0, 0.0]]], dtype=F64))
    assert_close(y[0, 0], torch.tensor([(4 - mu), (0 - mu)], dtype=F64) / math.sqrt(var + eps),
                 **TIGHT)


# ============================================================================ equivalences
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("make", [
    lambda **kw: ModeNorm(4, num_modes=1, **kw),
    lambda **kw: MixtureNorm(4, num_components=1, iterations=2, **kw),
    lambda **kw: MixtureNorm(4, num_components=1, init="batch", **kw),
], ids=["mode_norm", "mixture_norm_running", "mixture_norm_batch"])
def test_one_mode_is_batch_norm(make, channel_axis):
    """K = 1: outputs, input and parameter gradients, running statistics and eval all equal BN's."""
    ours = make(channel_axis=channel_axis, momentum=0.3, dtype=F64)
    bn = nk.BatchNorm(4, channel_axis=channel_axis, momentum=0.3, dtype=F64)
    with torch.no_grad():
        for p in (bn.weight, ours.weight):
            p.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        for p in (bn.bias, ours.bias):
            p.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    for step, shape in enumerate([(5, 4, 3), (3, 4, 2, 2)]):
        x = _x(shape, step, loc=1.0, scale=2.0)
        x = x.movedim(1, -1) if channel_axis == -1 else x
        y, gx, gp = _run(ours, x)
        y_bn, gx_bn, gp_bn = _run(bn, x)
        assert_close(y, y_bn, **TIGHT)
        assert_close(gx, gx_bn, **TIGHT)
        for name, g in zip([n for n, _ in ours.named_parameters()], gp, strict=True):
            if name in ("weight", "bias"):
                assert_close(g, gp_bn[["weight", "bias"].index(name)], **TIGHT)
            else:  # a one-mode gate is constant (softmax of one logit): zero gradient
                assert torch.equal(g, torch.zeros_like(g))
        assert_close(ours.running_mean[0], bn.running_mean, **TIGHT)
        assert_close(ours.running_var[0], bn.running_var, **TIGHT)
    ours.eval()
    bn.eval()
    x = _x((2, 4, 3), 9)
    x = x.movedim(1, -1) if channel_axis == -1 else x
    assert_close(ours(x), bn(x), **TIGHT)


@pytest.mark.parametrize("moments,ref", [
    ("instance", lambda x: nk.InstanceNorm(4, dtype=F64)(x)),
    ("layer", lambda x: nk.GroupNorm(4, num_groups=1, affine=False, dtype=F64)(x)),
])
def test_task_norm_alpha_limits(moments, ref):
    """α = sigmoid(±50) is 1 / 0 in float64: TaskNorm is then exactly BN (outputs, gradients,
    running statistics) / IN or LN (outputs), its running estimates still BN's."""
    x = _x((5, 4, 3, 2), 0, loc=0.5, scale=1.5)
    tn, bn = TaskNorm(4, moments=moments, dtype=F64), nk.BatchNorm(4, dtype=F64)
    with torch.no_grad():
        tn.alpha_offset.fill_(50.0)
    y, gx, gp = _run(tn, x)
    y_bn, gx_bn, gp_bn = _run(bn, x)
    assert_close(y, y_bn, **TIGHT)
    assert_close(gx, gx_bn, **TIGHT)
    assert_close(gp[0], gp_bn[0], **TIGHT)
    assert_close(gp[1], gp_bn[1], **TIGHT)
    assert torch.equal(gp[2], torch.zeros(1, dtype=F64))  # dα/da = m·α(1 − α) = 0 at α = 1
    assert_close(tn.running_mean, bn.running_mean, **TIGHT)
    assert_close(tn.running_var, bn.running_var, **TIGHT)
    with torch.no_grad():
        tn.alpha_offset.fill_(-50.0)
    assert_close(tn(x), ref(x), **TIGHT)


def test_mode_norm_hard_gates_is_batch_norm_per_group():
    """Gates saturated to one-hot assignments (|logit| ≥ 5000: exp underflows to exactly 0)
    split the batch: each group of samples is batch-normalized with its own statistics, which the
    mode's running estimates track."""
    x = _x((6, 3, 4), 0)
    x[:, 0] += torch.tensor([5.0, 5.0, 5.0, -5.0, -5.0, -5.0])[:, None]  # channel 0 picks the mode
    m = ModeNorm(3, num_modes=2, affine=False, momentum=1.0, dtype=F64)
    with torch.no_grad():
        m.gate_weight.copy_(torch.tensor([[1e4, 0, 0], [-1e4, 0, 0]]))
        m.gate_bias.zero_()
    y = m(x)
    bn = nk.BatchNorm(3, affine=False, momentum=1.0, dtype=F64)
    assert_close(y[:3], bn(x[:3]), **TIGHT)
    assert_close(m.running_mean[0], bn.running_mean, **TIGHT)
    assert_close(m.running_var[0], bn.running_var * (12 - 1) / 12 * 24 / 23, **TIGHT)  # m = N·S = 24
    bn = nk.BatchNorm(3, affine=False, momentum=1.0, dtype=F64)
    assert_close(y[3:], bn(x[3:]), **TIGHT)
    assert_close(m.running_mean[1], bn.running_mean, **TIGHT)


def test_mixture_norm_separates_well_separated_modes():
    """Two clusters per channel 20σ apart: EM finds them and each value is standardized with
    its own cluster's moments (posteriors differ from 0/1 by < e^-50)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 3, 6, generator=g, dtype=F64) - 10
    b = torch.randn(8, 3, 6, generator=g, dtype=F64) * 2 + 10
    x = torch.cat([a, b])
    for init in ("batch", "running"):
        m = MixtureNorm(3, num_components=2, iterations=5, init=init, affine=False, dtype=F64)
        y = m(x)

        def std(t, eps=m.eps):
            mu = t.mean((0, 2), keepdim=True)
            return (t - mu) / torch.sqrt(((t - mu) ** 2).mean((0, 2), keepdim=True) + eps)

        assert_close(y, torch.cat([std(a), std(b)]), **TIGHT)
        prior = torch.softmax(m.running_log_prior / 0.1, 0)  # one step from 0: 0.1·log π
        assert_close(prior, torch.full((2, 3), 0.5, dtype=F64), **TIGHT)


def test_quantiles_match_the_normal_distribution():
    for k in (1, 2, 5):
        ref = [NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)]
        assert_close(normal_quantiles(k), torch.tensor(ref, dtype=F64), rtol=0, atol=1e-14)


# ============================================================================== properties
def _method(name, c, **kw):
    if name == "mixture_norm":
        kw.setdefault("iterations", 2)
    return nk.create(name, c, dtype=F64, **kw)


@SETTINGS
@given(name=st.sampled_from(["mode_norm", "mixture_norm", "task_norm"]),
       n=st.integers(2, 5), s=st.integers(1, 4), seed=seeds, perm_seed=seeds)
def test_training_is_batch_permutation_equivariant(name, n, s, seed, perm_seed):
    x = _x((n, 3, s), seed, loc=0.5, scale=1.5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    a, b = _method(name, 3), _method(name, 3)
    assert_close(a(x)[perm], b(x[perm]), **TIGHT)
    for (k, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert_close(ba, bb, **TIGHT, msg=lambda e, k=k: f"{k}: {e}")


@SETTINGS
@given(name=st.sampled_from(["mode_norm", "mixture_norm", "task_norm"]), seed=seeds)
def test_eval_normalizes_each_sample_on_its_own(name, seed):
    """Evaluation uses running estimates and the sample's own gate / posteriors / moments: a
    sample's output does not depend on the rest of the batch."""
    m = _method(name, 3)
    m(_x((4, 3, 5), seed))
    m.eval()
    x = _x((4, 3, 5), seed + 1)
    other = torch.cat([x[:1], _x((3, 3, 5), seed + 2) * 3])
    assert_close(m(x)[:1], m(other)[:1], **TIGHT)


@SETTINGS
@given(name=st.sampled_from(["mixture_norm", "task_norm"]), seed=seeds,
       scale=st.floats(0.1, 10), shift=st.floats(-10, 10))
def test_invariant_to_affine_change_of_the_input(name, seed, scale, shift):
    """x → a·x + b (a > 0) leaves the training output unchanged (EM's fit is equivariant, the
    blended moments are), up to ε = 1e-12 ≪ σ² ≈ 1."""
    kw = {"init": "batch", "iterations": 3} if name == "mixture_norm" else {}
    x = _x((4, 2, 6), seed)
    m = _method(name, 2, eps=1e-12, **kw)
    assert_close(m(x), copy.deepcopy(m)(scale * x + shift), rtol=1e-8, atol=1e-8)


def _log_likelihood(z, mean, var, log_prior):
    k, c = mean.shape
    view = (k, 1, c, 1)
    logp = (log_prior.reshape(view) - 0.5 * torch.log(2 * math.pi * var.reshape(view))
            - 0.5 * (z.unsqueeze(0) - mean.reshape(view)) ** 2 / var.reshape(view))
    return torch.logsumexp(logp, 0).sum()


@SETTINGS
@given(seed=seeds, k=st.integers(2, 4))
def test_em_never_decreases_the_likelihood(seed, k):
    """With ε = 0, :func:`gmm_em` is exact EM: the log-likelihood of each channel's values is
    non-decreasing over iterations (slack: float64 round-off of a sum of ~50 terms)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([torch.randn(4, 2, 6, generator=g, dtype=F64) - 2,
                   torch.randn(4, 2, 6, generator=g, dtype=F64) * 0.5 + 2])
    mean = normal_quantiles(k)[:, None].expand(k, 2) * z.std()
    var = torch.ones(k, 2, dtype=F64)
    log_prior = torch.full((k, 2), -math.log(k), dtype=F64)
    lls = []
    for _ in range(8):
        lls.append(_log_likelihood(z, mean, var, log_prior).item())
        mean, var, log_prior = gmm_em(z, mean, var, log_prior, iterations=1, eps=0.0)
    assert all(b >= a - 1e-10 * abs(a) for a, b in zip(lls, lls[1:], strict=False)), lls


def test_mode_gates_are_a_softmax_of_the_pooled_features():
    m = ModeNorm(3, num_modes=4, dtype=F64)
    x = _x((5, 3, 2, 2), 0)
    stats = m.nop.fit(x.reshape(5, 3, 1, 4), m.nap, (2, 2), params=m._nop_params())
    logits = x.mean((2, 3)) @ m.gate_weight.detach().t() + m.gate_bias.detach()
    assert_close(stats["gate"], torch.softmax(logits, 1), **TIGHT)
    assert_close(stats["gate"].sum(1), torch.ones(5, dtype=F64), **TIGHT)


def test_mode_gate_initialization_is_fixed_and_breaks_symmetry():
    a, b = ModeNorm(8, num_modes=3), ModeNorm(8, num_modes=3)
    assert torch.equal(a.gate_weight, b.gate_weight)  # reproducible (reset_parameters too)
    assert a.gate_weight.abs().max() <= 1 / math.sqrt(8)
    assert torch.equal(a.gate_bias, torch.zeros(3))
    assert (a.gate_weight[0] != a.gate_weight[1]).any() and (a.gate_weight[1] != a.gate_weight[2]).any()
    with torch.no_grad():
        a.gate_weight.zero_()
    a.reset_parameters()
    assert torch.equal(a.gate_weight, b.gate_weight)


def test_mode_norm_modes_learn_different_statistics():
    """With the default gate the modes see different weightings of the batch: their statistics
    differ and every parameter gets a non-zero gradient."""
    m = ModeNorm(4, num_modes=2, dtype=F64)
    x = _x((8, 4, 3), 0, scale=3.0)
    _, _, gp = _run(m, x)
    assert (m.running_mean[0] - m.running_mean[1]).abs().max() > 1e-4
    assert all(g.abs().max() > 0 for g in gp)
