"""Reference, equivalence and property tests of ``eval_norm``, ``kalman_norm`` and ``online_norm``
(book ch. 6), and the streaming versions of the generic-table checks that assume a training
forward without state (Online Normalization normalizes with, and updates, its buffers).

Tolerances: float64 computations of the same formula in a different order agree to ~1e-15
relative on O(10) values; ``TIGHT`` (1e-10) leaves a wide margin while any formula error (a
missing cross term, ε misplaced, biased/unbiased mix-up) changes results by ≥ 1e-4 here.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck
from torch.testing import assert_close

import cases  # noqa: F401  (import the table first: it loads cases_online at its end)
import normkit as nk
from cases_online import online_step_ref
from normkit.functional.merging import mix_moments
from normkit.functional.online import online_normalize

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, loc=0.5, scale=1.7):
    x = torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale + loc
    if len(shape) > 1:  # per-channel offsets
        x = x + 0.4 * torch.arange(shape[1], dtype=DT).view(1, -1, *([1] * (len(shape) - 2)))
    return x


def _randomize(m: torch.nn.Module, seed: int = 3) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("weight", "bias"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 if name == "weight"
                        else torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _per_channel(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)


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


# ================================================================================= online_norm
def _online(c=2, momentum=0.2, backward_momentum=0.1, **kw):
    return nk.create("online_norm", c, momentum=momentum, backward_momentum=backward_momentum,
                     dtype=DT, **kw)


def test_online_hand_computed():
    m = _online(1, momentum=0.5, affine=False, eps=1e-3)
    x1 = torch.tensor([[[1.0, 3.0]]], dtype=DT)  # mean 2, biased var 1
    assert_close(m(x1), x1 / math.sqrt(1 + 1e-3), **TIGHT)  # initial estimates (0, 1)
    # μ₁ = ½·0 + ½·2 = 1; σ²₁ = ½·1 + ½·1 + ¼·(2 − 0)² = 2
    assert_close(m.running_mean, torch.tensor([1.0], dtype=DT), **TIGHT)
    assert_close(m.running_var, torch.tensor([2.0], dtype=DT), **TIGHT)
    x2 = torch.tensor([[[0.0, 4.0]]], dtype=DT)  # mean 2, biased var 4
    assert_close(m(x2), (x2 - 1) / math.sqrt(2 + 1e-3), **TIGHT)
    # μ₂ = 1.5; σ²₂ = ½·2 + ½·4 + ¼·(2 − 1)² = 3.25
    assert_close(m.running_mean, torch.tensor([1.5], dtype=DT), **TIGHT)
    assert_close(m.running_var, torch.tensor([3.25], dtype=DT), **TIGHT)
    assert int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("shape", [(1, 3, 4), (3, 3, 2, 2), (2, 3)])
def test_online_running_recursion(momentum, shape):
    # The streaming version of the generic EMA / cumulative-average tests: the buffers follow
    # the float64 recursion of cases_online.online_step_ref, sample by sample.
    m = _online(3, momentum=momentum)
    state = {"mean": torch.zeros(3, dtype=DT), "var": torch.ones(3, dtype=DT)}
    seen = 0
    for step in range(3):
        x = _x(shape, step)
        m(x)
        if momentum is None:
            for xt in x:  # cumulative average: weight 1/t for the t-th sample overall
                seen += 1
                state = online_step_ref(state, xt[None], 1 / seen)
        else:
            state = online_step_ref(state, x, momentum)
        assert_close(m.running_mean, state["mean"], **TIGHT)
        assert_close(m.running_var, state["var"], **TIGHT)
    assert int(m.num_batches_tracked) == 3 * shape[0]


def test_online_cumulative_average_is_the_pooled_moments():
    # momentum=None: after T samples the estimates are exactly the pooled mean and biased
    # variance of all their values (equal positions per sample).
    m = _online(3, momentum=None)
    xs = [_x((2, 3, 4), s) for s in range(3)]
    for x in xs:
        m(x)
    allx = _per_channel(torch.cat(xs))
    assert_close(m.running_mean, allx.mean(1), **TIGHT)
    assert_close(m.running_var, allx.var(1, correction=0), **TIGHT)


def test_online_batch_equals_samples_one_by_one_including_backward():
    a, b = _online(3), _online(3)
    _randomize(a)
    b.load_state_dict(a.state_dict())
    x = _x((4, 3, 5), 1)
    cot = torch.randn(x.shape, generator=_gen(2), dtype=DT)
    xa = x.clone().requires_grad_()
    ya = a(xa)
    ya.backward(cot)
    grads_b, ys_b = [], []
    for i in range(4):
        xi = x[i:i + 1].clone().requires_grad_()
        yi = b(xi)
        yi.backward(cot[i:i + 1])
        ys_b.append(yi.detach())
        grads_b.append(xi.grad)
    assert_close(ya.detach(), torch.cat(ys_b), **TIGHT)
    assert_close(xa.grad, torch.cat(grads_b), **TIGHT)
    for (k, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert_close(ba, bb, **TIGHT, msg=lambda s, k=k: f"{k}: {s}")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert_close(pa.grad, pb.grad, **TIGHT)


def test_online_forward_equals_the_functional_forward_map_and_gradcheck():
    m = _online(3, affine=False, momentum=0.25)
    x = _x((3, 3, 4), 1)
    mean0, var0 = m.running_mean.clone(), m.running_var.clone()
    y, mean1, var1 = online_normalize(x, mean0, var0, momentum=0.25, eps=m.eps)
    assert_close(m(x), y, **TIGHT)
    assert_close(m.running_mean, mean1, **TIGHT)
    assert_close(m.running_var, var1, **TIGHT)
    # The forward map of a batch (sample t depends on the samples before it through the
    # streaming estimates) is differentiable for ε > 0: float64 gradcheck w.r.t. the input and
    # the initial estimates, through the whole recursion, channels first and last.
    xs = _x((3, 2, 3), 2).requires_grad_()
    m0, v0 = _x((2,), 3).requires_grad_(), (_x((2,), 4).abs() + 0.3).requires_grad_()
    assert gradcheck(lambda x, m, v: online_normalize(x, m, v, momentum=0.3, eps=1e-3), (xs, m0, v0))
    assert gradcheck(lambda x, m, v: online_normalize(x, m, v, momentum=0.3, eps=1e-3,
                                                      channel_axis=-1)[0],
                     (xs.detach().movedim(1, -1).clone().requires_grad_(), m0, v0))


def test_online_module_forward_map_gradcheck_without_control():
    # The module's training forward on one sample from a fixed state is affine in x (the
    # estimates come from earlier samples); with the control off its backward is the exact
    # gradient. Each call starts from a fresh copy, so the map is a function of its arguments.
    m0 = _online(3, backward_momentum=0.0)
    _randomize(m0)
    m0(_x((2, 3, 4), 9))  # estimates away from (0, 1)
    names = [n for n, _ in m0.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(copy.deepcopy(m0), dict(zip(names, ps, strict=True)), (x,))

    x = _x((1, 3, 4), 1).requires_grad_()
    assert gradcheck(f, (x, *(p.detach().clone().requires_grad_() for p in m0.parameters())))


def test_online_control_off_is_autograd_with_constant_statistics():
    # backward_momentum=0: the gradient of the forward with the estimates held constant (plain
    # autograd on the functional form with detached estimates); control buffers untouched.
    m = _online(3, backward_momentum=0.0, affine=False, momentum=0.3)
    x = _x((4, 3, 5), 1).requires_grad_()
    cot = torch.randn(x.shape, generator=_gen(1), dtype=DT)
    mean0, var0 = m.running_mean.clone(), m.running_var.clone()
    gx, = torch.autograd.grad(m(x), x, cot)
    xd = x.detach()
    _, mb, vb = (t for t in _stream_before(xd, mean0, var0, 0.3))
    y_ref = (x - mb) / torch.sqrt(vb + m.eps)
    g_ref, = torch.autograd.grad(y_ref, x, cot)
    assert_close(gx, g_ref, **TIGHT)
    assert torch.equal(m.running_grad_mean, torch.zeros(3, dtype=DT))
    assert torch.equal(m.running_grad_proj, torch.zeros(3, dtype=DT))


def _stream_before(x, mean, var, momentum):
    """Float64 estimates each sample of ``x`` meets (shaped to broadcast against it)."""
    before_m, before_v = [], []
    state = {"mean": mean.clone(), "var": var.clone()}
    for xt in x:
        before_m.append(state["mean"])
        before_v.append(state["var"])
        state = online_step_ref(state, xt[None], momentum)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    return state, torch.stack(before_m).view(view), torch.stack(before_v).view(view)


def _control_ref(g, y, s, u, v, k):
    """The paper's control process, float64, one sample after another (``⟨·⟩`` = mean over the
    sample's positions): g̃ = g − k v y, v ← v + ⟨g̃ y⟩, ∂x = s g̃ − k u, u ← u + ⟨∂x⟩."""
    dxs = []
    for gt, yt, s_t in zip(g, y, s, strict=True):
        gt, yt = gt.reshape(gt.shape[0], -1), yt.reshape(yt.shape[0], -1)
        gtil = gt - k * v[:, None] * yt
        v = v + (gtil * yt).mean(1)
        dx = s_t.reshape(-1, 1) * gtil - k * u[:, None]
        u = u + dx.mean(1)
        dxs.append(dx)
    return torch.stack(dxs).reshape(g.shape), u, v


def test_online_control_backward_reference():
    m = _online(3, affine=False, momentum=0.2, backward_momentum=0.25)
    with torch.no_grad():  # a control state away from 0
        m.running_grad_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        m.running_grad_proj.copy_(torch.tensor([-0.5, 0.4, 0.2]))
    u0, v0 = m.running_grad_mean.clone(), m.running_grad_proj.clone()
    x = _x((3, 3, 4), 1).requires_grad_()
    mean0, var0 = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    cot = torch.randn(x.shape, generator=_gen(4), dtype=DT)
    gx, = torch.autograd.grad(y, x, cot)
    _, mb, vb = _stream_before(x.detach(), mean0, var0, 0.2)
    dx, u, v = _control_ref(cot, y.detach(), torch.rsqrt(vb + m.eps), u0, v0, 0.25)
    assert_close(gx, dx, **TIGHT)
    assert_close(m.running_grad_mean, u, **TIGHT)
    assert_close(m.running_grad_proj, v, **TIGHT)


def test_online_control_property():
    """What the control process guarantees, tested on a stationary stream of single samples with
    gradients g_t = c + d·x̂_t + noise (a mean and a component along x̂ that BN's backward would
    project out):

    1. exactly, Σ_t ⟨∂x_t⟩ = u_T − u_0 and Σ_t ⟨g̃_t x̂_t⟩ = v_T − v_0 per channel, where
       g̃_t = (∂x_t + k u_{t−1})/s_t is recovered from the observed input gradient;
    2. u and v stay bounded, so the time averages of the gradient's mean and of its projection
       on x̂ vanish as O(1/T): after T = 400 samples both are < 5 % of what they are without
       control (backward_momentum=0), where they stay near c·s and d.
    """
    c, d, k, steps = 0.8, 1.5, 0.1, 400
    runs = {}
    for bm in (k, 0.0):
        m = _online(2, affine=False, momentum=0.05, backward_momentum=bm)
        g = _gen(0)
        sum_dx = torch.zeros(2, dtype=DT)
        sum_proj = torch.zeros(2, dtype=DT)
        for _ in range(steps):
            x = torch.randn(1, 2, 8, generator=g, dtype=DT) * 2 + 1
            u_prev, s = m.running_grad_mean.clone(), torch.rsqrt(m.running_var + m.eps)
            xr = x.requires_grad_()
            y = m(xr)
            grad = c + d * y.detach() + 0.5 * torch.randn(y.shape, generator=g, dtype=DT)
            gx, = torch.autograd.grad(y, xr, grad)
            sum_dx += gx[0].mean(-1)
            gtil = (gx[0] + bm * u_prev[:, None]) / s[:, None]
            sum_proj += (gtil * y.detach()[0]).mean(-1)
        runs[bm] = (sum_dx / steps, sum_proj / steps, m)
    mean_c, proj_c, mc = runs[k]
    mean_0, proj_0, _ = runs[0.0]
    assert_close(mean_c * steps, mc.running_grad_mean, **TIGHT)  # (1) exact identities, u_0 = 0
    assert_close(proj_c * steps, mc.running_grad_proj, **TIGHT)  #     and v_0 = 0
    assert (mean_0.abs() > 0.1).all() and (proj_0.abs() > 0.5).all()  # uncontrolled: c·s, ≈ d
    assert (mean_c.abs() < 0.05 * mean_0.abs()).all(), (mean_c, mean_0)  # (2)
    assert (proj_c.abs() < 0.05 * proj_0.abs()).all(), (proj_c, proj_0)


def test_online_first_backward_from_rest_is_the_exact_gradient():
    # From u = v = 0 the control feeds nothing back: one sample's gradient is the exact
    # gradient of its (affine in x) forward map, as autograd of the functional form gives.
    m = _online(3, affine=False, momentum=0.3, backward_momentum=0.5)
    m(_x((2, 3, 4), 3))  # estimates away from (0, 1), no backward
    mean0, var0 = m.running_mean.clone(), m.running_var.clone()
    x = _x((1, 3, 4), 1).requires_grad_()
    cot = torch.randn(x.shape, generator=_gen(5), dtype=DT)
    gx, = torch.autograd.grad(m(x), x, cot)
    g_ref, = torch.autograd.grad(online_normalize(x, mean0, var0, momentum=0.3, eps=m.eps)[0], x, cot)
    assert_close(gx, g_ref, **TIGHT)


def test_online_evaluation_and_folding():
    m = _online(3)
    _randomize(m)
    m(_x((3, 3, 4), 1))
    m.eval()
    before = {k: b.clone() for k, b in m.named_buffers()}
    x = _x((2, 3, 4), 2)
    view = (1, -1, 1)
    want = (x - m.running_mean.view(view)) / torch.sqrt(m.running_var.view(view) + m.eps)
    want = want * m.weight.view(view) + m.bias.view(view)
    assert_close(m(x), want, **TIGHT)
    a, b = m.folded()
    assert_close(m(x), x * a.view(view) + b.view(view), **TIGHT)
    for k, t in m.named_buffers():
        assert torch.equal(t, before[k]), k


def test_online_momentum_zero_freezes_and_toggled_tracking_uses_frozen_estimates():
    m = _online(3, momentum=0.0)
    m(_x((2, 3, 4), 1))
    assert torch.equal(m.running_mean, torch.zeros(3, dtype=DT))
    m = _online(3)
    m(_x((2, 3, 4), 1))
    m.track_running_stats = False  # after construction: the current estimates, not updated
    before = {k: b.clone() for k, b in m.named_buffers()}
    x = _x((2, 3, 4), 2).requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    for k, t in m.named_buffers():
        assert torch.equal(t, before[k]), k
    assert_close(y, m.eval()(x), **TIGHT)
    assert_close(x.grad, (m.weight * torch.rsqrt(m.running_var + m.eps)).view(1, -1, 1).expand_as(x),
                 **TIGHT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_online_low_precision(dtype):
    # The streaming version of the generic low-precision test: both runs do forward and backward
    # (the backward updates the control buffers). Inputs are exactly representable; only the
    # output rounding differs: 2 eps relative + 2 eps of the output range absolute.
    m = nk.create("online_norm", 4, momentum=0.2, backward_momentum=0.1)
    ref = copy.deepcopy(m)
    eps = torch.finfo(dtype).eps
    for step in range(2):
        x = (torch.randn(1, 4, 5, generator=_gen(step)) * 2 + 1).to(dtype)
        xl, xf = x.clone().requires_grad_(), x.float().requires_grad_()
        y, y_ref = m(xl), ref(xf)
        assert y.dtype == dtype
        assert_close(y.float(), y_ref, rtol=2 * eps, atol=2 * eps * max(1.0, y_ref.abs().max().item()))
        y.backward(torch.ones_like(y))
        y_ref.backward(torch.ones_like(y_ref))
        assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    for (k, b), (_, r) in zip(m.named_buffers(), ref.named_buffers(), strict=True):
        assert b.dtype == (torch.long if k == "num_batches_tracked" else torch.float32)
        assert_close(b, r, rtol=1e-5, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


def test_online_state_dict_round_trip_continues_identically():
    m = _online(3)
    _randomize(m)
    for step in range(2):
        x = _x((1, 3, 4), step).requires_grad_()
        m(x).sum().backward()
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                   "running_grad_mean", "running_grad_proj", "num_batches_tracked"}
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = _online(3)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = _x((2, 3, 4), 7)
    cot = torch.randn(x.shape, generator=_gen(7), dtype=DT)
    outs = []
    for mod in (m, fresh):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(cot)
        outs.append((y.detach(), xi.grad, dict(mod.named_buffers())))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for k in outs[0][2]:
        assert torch.equal(outs[0][2][k], outs[1][2][k]), k


def test_online_two_forwards_one_backward_without_control():
    # With the control off the backward has no state: one backward through two training
    # forwards is the sum of the separate gradients (the generic test, for a streaming module).
    m0 = _online(3, backward_momentum=0.0)
    _randomize(m0)
    x1, x2 = _x((1, 3, 4), 1).requires_grad_(), _x((2, 3, 4), 2).requires_grad_()
    m = copy.deepcopy(m0)
    g = torch.autograd.grad(m(x1).sum() + (m(x2) ** 2).sum(), [x1, x2, *m.parameters()])
    ma = copy.deepcopy(m0)
    ga = torch.autograd.grad(ma(x1).sum(), [x1, *ma.parameters()])
    gb = torch.autograd.grad((ma(x2) ** 2).sum(), [x2, *ma.parameters()])
    assert_close(g[0], ga[0], **TIGHT)
    assert_close(g[1], gb[0], **TIGHT)
    for gp, pa, pb in zip(g[2:], ga[1:], gb[1:], strict=True):
        assert_close(gp, pa + pb, **TIGHT)


def test_online_second_derivative_raises_and_nan_is_contained_to_later_samples():
    m = _online(2)
    x = _x((1, 2, 3), 1).requires_grad_()
    y = m(x)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)
    m = _online(2, momentum=0.5)
    x = _x((3, 2, 3), 2)
    x[1, 0, 1] = float("nan")
    y = m(x)
    assert torch.isfinite(y[0]).all()  # before the NaN sample
    assert torch.isnan(y[1, 0, 1]) and torch.isfinite(y[1, 1]).all()
    assert torch.isnan(y[2, 0]).all() and torch.isfinite(y[2, 1]).all()  # poisoned estimate


def test_online_errors():
    with pytest.raises(nk.ConfigError, match=r"track_running_stats=False is not available"):
        nk.create("online_norm", 3, track_running_stats=False)
    with pytest.raises(nk.ConfigError, match=r"backward_momentum must be a number in \[0, 1\].*-0\.5"):
        nk.create("online_norm", 3, backward_momentum=-0.5)
    with pytest.raises(nk.ConfigError, match=r"momentum must be a number in \[0, 1\].*got 2"):
        online_normalize(torch.zeros(1, 2, 3), torch.zeros(2), torch.ones(2), momentum=2)
    with pytest.raises(nk.ShapeError, match=r"expected 3 channels"):
        nk.create("online_norm", 3)(torch.zeros(1, 4, 2))
