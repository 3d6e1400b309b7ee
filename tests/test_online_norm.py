"""Reference, equivalence and property tests of ``online_norm`` (Online Normalization, book ch. 6),
and the streaming versions of the generic-table checks that assume a training forward without
state (Online Normalization normalizes with, and updates, its buffers). Helpers and tolerances:
``tests/online_util.py``; the other methods of the family: ``tests/test_online.py``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

import cases  # noqa: F401  (import the table first: it loads cases_online at its end)
import normkit as nk
from cases_online import online_step_ref
from normkit.nop._online import online_normalize
from online_util import (
    DT,
    TIGHT,
    _gen,
    _per_channel,
    _randomize,
    _x,
)


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
