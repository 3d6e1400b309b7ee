"""Reference, equivalence and property tests of the moment mixture, ``eval_norm`` and
``kalman_norm`` (book ch. 6). ``tests/test_online_norm.py``: ``online_norm`` and the streaming
versions of the generic-table checks that assume a training forward without state (Online
Normalization normalizes with, and updates, its buffers). Helpers and tolerances:
``tests/online_util.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck
from torch.testing import assert_close

import cases  # noqa: F401  (import the table first: it loads cases_online at its end)
import normkit as nk
from normkit.functional.merging import mix_moments
from online_util import (
    DT,
    TIGHT,
    _gen,
    _per_channel,
    _randomize,
    _x,
)


# ============================================================================ mixture moments
def test_mix_moments_is_the_pooled_moments():
    # Two groups of values pooled: the mixture with weight n_a/(n_a + n_b) has exactly the pooled
    # mean and biased variance (the law of total variance).
    a, b = _x((7,), 1), _x((5,), 2, loc=3.0)
    w = 7 / 12
    mean, var = mix_moments(a.mean(), a.var(correction=0), b.mean(), b.var(correction=0), w)
    both = torch.cat([a, b])
    assert_close(mean, both.mean(), **TIGHT)
    assert_close(var, both.var(correction=0), **TIGHT)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(n_a=st.integers(1, 6), n_b=st.integers(1, 6), seed=st.integers(0, 2**16),
       offset=st.floats(-50, 50))
def test_mix_moments_pools_any_split(n_a, n_b, seed, offset):
    # Property: for any split of a sample into two groups, the mixture of the groups' moments
    # with weight n_a/(n_a + n_b) is the moments of the whole (groups of one value included:
    # their variance is 0, the spread comes from the cross term alone).
    vals = _x((n_a + n_b,), seed, loc=offset)
    a, b = vals[:n_a], vals[n_a:]
    mean, var = mix_moments(a.mean(), a.var(correction=0), b.mean(), b.var(correction=0),
                            n_a / (n_a + n_b))
    assert_close(mean, vals.mean(), **TIGHT)
    assert_close(var, vals.var(correction=0), **TIGHT)


def test_mix_moments_stable_under_offset_float32():
    # The deviation form has no E[x²] − μ² cancellation: an offset of 1e4 in float32 leaves the
    # variance within float32 rounding of 1e4-sized means (ulp 1e-3, squared difference of O(1)
    # values ⇒ relative error ≲ 1e-3), where E[x²] ≈ 1e8 (ulp 8) would lose it entirely.
    a = _x((64,), 3, loc=1e4, scale=1.0)
    b = _x((64,), 4, loc=1e4 + 1, scale=1.0)
    mean, var = mix_moments(a.float().mean(), a.float().var(correction=0), b.float().mean(),
                            b.float().var(correction=0), 0.5)
    ref = torch.cat([a, b]).var(correction=0)
    assert abs(var.double().item() - ref.item()) / ref.item() < 1e-3


# =================================================================================== eval_norm
def _eval_norm(c=2, alpha=0.5, **kw):
    return nk.create("eval_norm", c, alpha=alpha, dtype=DT, **kw)


def test_eval_norm_hand_computed():
    m = _eval_norm(1, alpha=0.5, eps=1e-3).eval()
    with torch.no_grad():
        m.running_mean.fill_(1.0)
        m.running_var.fill_(4.0)
    x = torch.tensor([[[0.0, 2.0]], [[3.0, 5.0]]], dtype=DT)  # two examples, two positions
    # example 0: μ_x = 1, σ²_x = 1 → μ = 1, σ² = ½·1 + ½·4 + ¼·0 = 2.5
    # example 1: μ_x = 4, σ²_x = 1 → μ = 2.5, σ² = ½·1 + ½·4 + ¼·(4 − 1)² = 4.75
    #            (raw moments: ½·E[x²] + ½·(4 + 1) − μ² = ½·17 + 2.5 − 6.25 = 4.75)
    want = torch.tensor([[[-1.0, 1.0]], [[0.5, 2.5]]], dtype=DT)
    want[0] /= math.sqrt(2.5 + 1e-3)
    want[1] /= math.sqrt(4.75 + 1e-3)
    assert_close(m(x), want, **TIGHT)


@pytest.mark.parametrize("native", [True, False])
def test_eval_norm_alpha0_is_bn_exactly(native):
    ew, bn = _eval_norm(3, alpha=0.0, native=native), nk.BatchNorm(3, native=native, dtype=DT)
    _randomize(ew)
    bn.load_state_dict(ew.state_dict())
    for step in range(2):
        x = _x((4, 3, 5), step).requires_grad_()
        ye, yb = ew(x), bn(x)
        assert torch.equal(ye, yb)
        assert torch.equal(torch.autograd.grad(ye.sum() * 0 + (ye * x).sum(), x)[0],
                           torch.autograd.grad((yb * x).sum(), x)[0])
    ew.eval(), bn.eval()
    x = _x((2, 3, 4), 5)
    assert torch.equal(ew(x), bn(x))  # evaluation: bitwise BN's
    for a, b in zip(ew.folded(), bn.folded(), strict=True):
        assert torch.equal(a, b)


def test_eval_norm_training_is_bn_for_any_alpha():
    ew, bn = _eval_norm(3, alpha=0.7), nk.BatchNorm(3, dtype=DT)
    _randomize(ew)
    bn.load_state_dict(ew.state_dict())
    x = _x((5, 3, 4), 1)
    assert torch.equal(ew(x), bn(x))
    assert torch.equal(ew.running_var, bn.running_var)


def test_eval_norm_alpha_one_is_instance_norm():
    m = _eval_norm(3, alpha=1.0, affine=False)
    m(_x((6, 3, 5), 1))
    x = _x((2, 3, 5), 2)
    assert_close(m.eval()(x), torch.nn.functional.instance_norm(x, eps=m.eps), **TIGHT)


def test_eval_norm_alpha_one_over_b_reproduces_the_training_batch():
    # The defining property of example weighting: if the population statistics are the pooled
    # statistics of the other B − 1 examples of a batch, evaluating one example with α = 1/B
    # gives exactly its BN training output (batch mean, biased batch variance). A blend of the
    # variances without the α(1 − α)(μ_x − μ_pop)² term would miss by O(1) here.
    b = 4
    x = _x((b, 3, 6), 7, scale=2.0)
    bn = nk.BatchNorm(3, affine=False, dtype=DT)
    y_train = bn(x)
    m = _eval_norm(3, alpha=1 / b, affine=False).eval()
    for i in range(b):
        rest = _per_channel(torch.cat([x[:i], x[i + 1:]]))
        with torch.no_grad():
            m.running_mean.copy_(rest.mean(1))
            m.running_var.copy_(rest.var(1, correction=0))
        assert_close(m(x[i:i + 1]), y_train[i:i + 1], **TIGHT)


def test_eval_norm_examples_are_independent_at_evaluation():
    m = _eval_norm(3, alpha=0.3)
    m(_x((5, 3, 4), 1))
    m.eval()
    x = _x((4, 3, 4), 2)
    y = m(x)
    for i in range(4):
        assert_close(m(x[i:i + 1]), y[i:i + 1], **TIGHT)
    perm = torch.tensor([2, 0, 3, 1])
    assert_close(m(x[perm]), y[perm], **TIGHT)


def test_eval_norm_alpha_setter_and_errors():
    m = _eval_norm(2, alpha=0.2)
    assert m.alpha == 0.2 and "alpha=0.2" in repr(m)
    m.alpha = 0.0
    assert m.alpha == 0.0
    m.folded()  # α = 0 folds
    m.alpha = 0.4
    with pytest.raises(nk.ConfigError, match=r"alpha=0\.4.*nothing fixed to fold"):
        m.folded()
    with pytest.raises(nk.ConfigError, match=r"alpha must be a number in \[0, 1\].*got 2"):
        m.alpha = 2
    with pytest.raises(nk.ConfigError, match=r"alpha must be a number in \[0, 1\].*got True"):
        _eval_norm(2, alpha=True)


def test_eval_norm_gradients_through_the_example_statistics():
    # At evaluation the statistics depend on the example: gradcheck covers that dependence.
    m = _eval_norm(2, alpha=0.35)
    m(_x((4, 2, 3), 1))
    m.eval()
    x = _x((2, 2, 3), 2).requires_grad_()
    assert gradcheck(m, (x,))


# ================================================================================= kalman_norm
def _kalman(c=3, prev=None, gain=0.5, **kw):
    return nk.create("kalman_norm", c, prev_features=prev, gain=gain, dtype=DT, **kw)


def _kalman_ref(x, prev_mean, prev_var, a, p, eps, w, b):
    """Float64 formula: prediction A μ', (A∘A) σ'²; update with gain p; standardize; affine."""
    xc = _per_channel(x)
    mb, vb = xc.mean(1), xc.var(1, correction=0)
    pm, pv = a @ prev_mean, (a ** 2) @ prev_var
    mean = p * mb + (1 - p) * pm
    var = p * vb + (1 - p) * pv + p * (1 - p) * (mb - pm) ** 2
    view = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - mean.view(view)) / torch.sqrt(var.view(view) + eps)) * w.view(view) + b.view(view)


def test_kalman_hand_computed():
    m = _kalman(1, prev=1, gain=0.5, affine=False, eps=1e-3)
    with torch.no_grad():
        m.transition.fill_(2.0)
    x = torch.tensor([[0.0], [2.0]], dtype=DT)  # μ_B = 1, σ²_B = 1
    prev = (torch.tensor([1.0], dtype=DT), torch.tensor([1.0], dtype=DT))
    # prediction: μ = 2·1 = 2, σ² = 4·1 = 4; update with p = ½:
    # μ̂ = 1.5, σ̂² = ½·1 + ½·4 + ¼·(1 − 2)² = 2.75
    y, (mean, var) = m(x, prev_stats=prev, return_stats=True)
    assert_close(mean, torch.tensor([1.5], dtype=DT), **TIGHT)
    assert_close(var, torch.tensor([2.75], dtype=DT), **TIGHT)
    assert_close(y, (x - 1.5) / math.sqrt(2.75 + 1e-3), **TIGHT)
    # running estimate: the batch variance unbiased (×2) before the update:
    # μ̂ = 1.5, σ̂² = ½·2 + ½·4 + ¼·1 = 3.25; EMA with momentum 0.1 from (0, 1)
    assert_close(m.running_mean, torch.tensor([0.15], dtype=DT), **TIGHT)
    assert_close(m.running_var, torch.tensor([0.9 + 0.1 * 3.25], dtype=DT), **TIGHT)


def test_kalman_random_reference_and_gradcheck():
    m = _kalman(3, prev=2, gain=0.3)
    _randomize(m)
    with torch.no_grad():
        m.transition.copy_(torch.randn(3, 2, generator=_gen(5), dtype=DT))
        m.gain_logit.copy_(torch.randn(3, generator=_gen(6), dtype=DT))
    x = _x((4, 3, 5), 1)
    pm, pv = _x((2,), 2), _x((2,), 3).abs() + 0.5
    ref = _kalman_ref(x, pm, pv, m.transition.detach(), torch.sigmoid(m.gain_logit.detach()),
                      m.eps, m.weight.detach(), m.bias.detach())
    assert_close(m(x, prev_stats=(pm, pv)), ref, **TIGHT)

    names = [n for n, _ in m.named_parameters()]

    def f(x, pm, pv, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,),
                                          {"prev_stats": (pm, pv)})

    args = (x[:, :, :2].clone().requires_grad_(), pm.clone().requires_grad_(),
            pv.clone().requires_grad_(), *(p.detach().clone().requires_grad_() for p in m.parameters()))
    assert gradcheck(f, args)


@pytest.mark.parametrize("prev_features", [None, 4])
def test_kalman_without_previous_term_is_bn(prev_features):
    # Both of kalman_norm's paths (the BN kernel, and the explicit one taken for return_stats)
    # equal normkit's and torch's BN: outputs, input gradients and buffers, train then eval.
    kn = _kalman(4, prev=prev_features)
    _randomize(kn)
    kn_stats = copy.deepcopy(kn)
    bn = nk.BatchNorm(4, dtype=DT)
    bn.load_state_dict(kn.state_dict(), strict=False)
    ref = torch.nn.BatchNorm2d(4, dtype=DT)
    ref.load_state_dict(bn.state_dict())
    mods = ((kn, {}), (kn_stats, {"return_stats": True}), (bn, {}), (ref, {}))
    for train in (True, False):
        for step in range(2):
            x = _x((3, 4, 2, 3), 10 * train + step).requires_grad_()
            cot = torch.randn(x.shape, generator=_gen(step), dtype=DT)
            outs = []
            for m, kw in mods:
                y = m.train(train)(x, **kw)
                y = y[0] if isinstance(y, tuple) else y
                gx, = torch.autograd.grad(y, x, cot)
                outs.append((y, gx))
            for y, gx in outs[1:]:
                assert_close(y, outs[0][0], **TIGHT)
                assert_close(gx, outs[0][1], **TIGHT)
    for m, _ in mods[1:]:
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(m, k), getattr(kn, k), **TIGHT)


def test_kalman_gain_one_is_bn_and_return_stats_are_the_batch_moments():
    kn = _kalman(3, prev=2)
    with torch.no_grad():
        kn.gain_logit.fill_(60.0)  # sigmoid(60) == 1.0 in float64: the prediction has weight 0
    bn = nk.BatchNorm(3, dtype=DT)
    x = _x((5, 3, 4), 2)
    prev = (_x((2,), 3), _x((2,), 4).abs())
    y, (mean, var) = kn(x, prev_stats=prev, return_stats=True)
    assert_close(y, bn(x), **TIGHT)
    assert_close(mean, _per_channel(x).mean(1), **TIGHT)
    assert_close(var, _per_channel(x).var(1, correction=0), **TIGHT)
    assert_close(kn.running_var, bn.running_var, **TIGHT)


def test_kalman_chain_and_evaluation_uses_running_estimates():
    kn1, kn2 = _kalman(3), _kalman(4, prev=3)
    conv = torch.nn.Conv1d(3, 4, 1).double()
    x = _x((2, 3, 5), 1).requires_grad_()
    h, stats = kn1(x, return_stats=True)
    y = kn2(conv(h), prev_stats=stats)
    y.sum().backward()
    assert kn2.transition.grad is not None and kn2.gain_logit.grad is not None
    assert x.grad is not None and torch.isfinite(x.grad).all()
    kn2.eval()
    z = conv(h).detach()
    y_eval, (rm, rv) = kn2(z, prev_stats=stats, return_stats=True)
    assert rm is kn2.running_mean and rv is kn2.running_var
    view = (1, -1, 1)
    want = (z - rm.view(view)) / torch.sqrt(rv.view(view) + kn2.eps) * kn2.weight.view(view) \
        + kn2.bias.view(view)
    assert_close(y_eval, want, **TIGHT)


def test_kalman_errors():
    x = _x((2, 3, 4), 1)
    with pytest.raises(nk.ConfigError, match=r"built without prev_features"):
        _kalman(3)(x, prev_stats=(torch.zeros(3), torch.ones(3)))
    m = _kalman(3, prev=2)
    with pytest.raises(nk.ShapeError, match=r"prev_stats mean must have shape \(2,\), got \(3,\)"):
        m(x, prev_stats=(torch.zeros(3), torch.ones(3)))
    with pytest.raises(nk.ConfigError, match=r"prev_stats must be a \(mean, var\) pair"):
        m(x, prev_stats=torch.zeros(2))
    with pytest.raises(nk.ConfigError, match=r"prev_features must be a positive int .*got 2\.0"):
        _kalman(3, prev=2.0)
    with pytest.raises(nk.ConfigError, match=r"gain must be a number in \(0, 1\) .*got 0"):
        _kalman(3, prev=2, gain=0)
    with pytest.raises(nk.ShapeError, match=r"Expected more than 1 value"):
        m(_x((1, 3), 1), prev_stats=(torch.zeros(2), torch.ones(2)))
