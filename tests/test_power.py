"""Tests of PowerNorm (Shen, Yao, Gholami, Mahoney & Keutzer 2020).

* Reference: several training steps against the paper's recursions written here in float64 with
  plain tensor operations (forward with ``ψ²_{t−1}``, the ``ψ²`` and ``ν`` updates, the
  approximate input gradient, the parameter gradients), warm-up and after, on a transformer's
  ``(B, T, D)`` input and on ``(N, C, L)``; evaluation with ``running_ms``.
* Equivalences: the warm-up (and training without running statistics) is RMS batch normalization
  ``Normalization(nap=Batch(), nop=Scale("rms"))``: outputs, gradients, ``running_ms``, eval;
  ``alpha_fwd`` is ``momentum = 1 − alpha_fwd``; with ``ν = 0`` the approximate backward equals
  plain autograd of ``x/√(ψ²_{t−1} + ε)`` (``alpha_bkw=1``).
* Gradients, exactly what is exact: gradcheck of the autograd Function in the warm-up phase (the
  exact RMS-BN gradient, ``ψ²`` the batch's, recomputed from the perturbed input) and past it with
  ``ν = 0`` (the exact derivative, ``ψ²`` a constant); gradcheck and gradgradcheck of the
  ``alpha_bkw=1`` configuration with its state frozen; the approximate backward (``ν ≠ 0``) is not
  a derivative and is tested against its formula only; it is first-order only and says so.
* The generic battery (``tests/test_generic*.py``) runs over the stateful configurations
  (``cases_power.STATEFUL``, ``Case.stateful``) too, minus the generic tests that assume a
  stateless training step, replaced here:
  ``test_case_matches_module`` (every buffer a running statistic: replaced by
  :func:`test_stateful_buffers`), ``test_gradcheck`` (hundreds of training forwards on one module:
  replaced as above), and, for configurations with ``grad_nu`` (``Case.backward_state``),
  ``test_two_forwards_one_backward``
  and ``test_low_precision`` (``ν`` is recorded by backward passes: replaced by
  :func:`test_two_forwards_one_backward_records_in_backward_order` and
  :func:`test_low_precision_with_backward`).
* Properties (hypothesis), faults, errors, registry.

Tolerances: two float64 computations of one formula agree to ``1e-10`` (eps64 = 2.2e-16; a few
hundred roundings of O(10) values).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import generic_util as G
import normkit as nk
from cases_power import STATE_BUFFERS, STATEFUL
from normkit import ConfigError
from normkit.functional.fused_running import power_scale
from normkit.methods.power import PowerNorm
from normkit.nop._power import PowerScale
from robust_util import EPS, F64, SETTINGS, TIGHT, gen, grads, rand, randomize


def rms_bn(c: int, **kw: Any) -> nk.Normalization:
    """RMS batch normalization: ``x/√(E_B[x²] + ε)`` per channel, then ``γ, β``."""
    return nk.Normalization(c, nap=nk.nap.Batch(), nop=nk.nop.Scale("rms"), **kw)


# ============================================================================ reference
@pytest.mark.parametrize("layout", ["transformer", "channels_first"])
def test_reference_recursions(layout: str) -> None:
    """Five steps (two of warm-up) with α_fwd = 0.7, α_bkw = 0.6 and batches of different sizes
    and scales, by hand: forward with the batch's E[x²] during the warm-up and ψ²_{t−1} after;
    ψ²_t = α_fwd ψ²_{t−1} + (1 − α_fwd) E_B[x²]; input gradient (g − c x̂)/√(ms + ε) with
    c = Λ (warm-up) or ν_{t−1}; ν_t = ν_{t−1}(1 − (1 − α_bkw)Γ) + (1 − α_bkw)Λ; parameter
    gradients Σ ∂L/∂y·x̂ and Σ ∂L/∂y. Then evaluation with ψ²."""
    d, af, ab, warm = 3, 0.7, 0.6, 2
    axis = -1 if layout == "transformer" else 1
    m = randomize(PowerNorm(d, alpha_fwd=af, alpha_bkw=ab, warmup_steps=warm, channel_axis=axis,
                            dtype=F64))
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    psi, nu = torch.ones(d, dtype=F64), torch.zeros(d, dtype=F64)
    used_nu = []
    for t in range(1, 6):
        shape = (2 + t % 3, 4, d) if axis == -1 else (2 + t % 3, d, 4)
        x = rand(*shape, seed=t, scale=0.5 + t, offset=0.3 * t)
        red, view = ((0, 1), (1, 1, d)) if axis == -1 else ((0, 2), (1, d, 1))
        batch = x.square().mean(red)
        ms = batch if t <= warm else psi
        xhat = x / (ms + EPS).sqrt().view(view)
        cot = torch.randn(shape, generator=gen(7), dtype=F64)
        g = cot * w.view(view)
        lam, gam = (g * xhat).mean(red), xhat.square().mean(red)
        coef = lam if t <= warm else nu
        used_nu.append(t > warm and bool((nu != 0).all()))
        want_gx = (g - coef.view(view) * xhat) / (ms + EPS).sqrt().view(view)
        y, gx, (gw, gb) = grads(m, x)
        assert_close(y, xhat * w.view(view) + b.view(view), **TIGHT)
        assert_close(gx, want_gx, **TIGHT)
        assert_close(gw, (cot * xhat).sum(red), **TIGHT)
        assert_close(gb, cot.sum(red), **TIGHT)
        psi = af * psi + (1 - af) * batch
        nu = nu * (1 - (1 - ab) * gam) + (1 - ab) * lam
        assert_close(m.running_ms, psi, **TIGHT)
        assert_close(m.grad_nu, nu, **TIGHT)
    assert used_nu == [False, False, True, True, True]  # ν ≠ 0 entered steps 3-5
    m.eval()
    x = rand(*((2, 5, d) if axis == -1 else (2, d, 5)), seed=9)
    view = (1, 1, d) if axis == -1 else (1, d, 1)
    assert_close(m(x), x / (psi + EPS).sqrt().view(view) * w.view(view) + b.view(view), **TIGHT)


def test_momentum_one_normalizes_with_the_previous_batch() -> None:
    """α_fwd = 0 (momentum 1): past the warm-up, step t divides by √(E[x_{t−1}²] + ε)."""
    m = PowerNorm(2, alpha_fwd=0.0, warmup_steps=0, affine=False, dtype=F64)
    prev = torch.ones(2, dtype=F64)  # ψ²_0
    for t in range(3):
        x = rand(3, 2, 4, seed=t, scale=1 + t)
        assert_close(m(x), x / (prev + EPS).sqrt().view(1, 2, 1), **TIGHT)
        prev = x.square().mean((0, 2))


# ========================================================================= equivalences
@pytest.mark.parametrize("alpha_bkw", [0.9, 1.0], ids=["function", "autograd"])
def test_warmup_is_rms_batch_norm(alpha_bkw: float) -> None:
    """During the warm-up PowerNorm is RMS batch normalization (through the autograd Function
    when ν is kept): outputs, input and parameter gradients, running_ms, over four steps of
    several ranks; then the same evaluation. The first step after the warm-up differs."""
    shapes = [(6, 4), (3, 4, 5), (2, 4, 3, 3), (4, 4, 2)]
    m = randomize(PowerNorm(4, warmup_steps=len(shapes), alpha_bkw=alpha_bkw, dtype=F64))
    ref = randomize(rms_bn(4, dtype=F64))
    for step, shape in enumerate(shapes):
        x = rand(*shape, seed=step)
        a, r = grads(m, x), grads(ref, x)
        for u, v in zip([a[0], a[1], *a[2]], [r[0], r[1], *r[2]], strict=True):
            assert_close(u, v, **TIGHT)
        assert_close(m.running_ms, ref.running_ms, **TIGHT)
    if alpha_bkw < 1:
        assert (m.grad_nu != 0).all()  # recorded during the warm-up
    x = rand(3, 4, 2, seed=50)
    assert (m(x) - ref(x)).abs().max() > 1e-3  # past the warm-up: ψ²_{t−1}
    m.eval()
    ref.eval()
    assert_close(m(x), ref(x), **TIGHT)


@pytest.mark.parametrize("toggled", [False, True], ids=["untracked", "toggled_off"])
def test_without_running_statistics_is_rms_batch_norm(toggled: bool) -> None:
    """No running statistics (or tracking switched off after construction, torch's rule):
    training uses batch statistics, past any warm-up, and leaves the state alone."""
    m = randomize(PowerNorm(4, warmup_steps=0, track_running_stats=toggled, dtype=F64))
    ref = randomize(rms_bn(4, track_running_stats=False, dtype=F64))
    if toggled:
        m(rand(3, 4, 2, seed=9))
        m.track_running_stats = False
        before = G.state(m)
    for step in range(3):
        x = rand(3, 4, 5, seed=step)
        a, r = grads(m, x), grads(ref, x)
        for u, v in zip([a[0], a[1], *a[2]], [r[0], r[1], *r[2]], strict=True):
            assert_close(u, v, **TIGHT)
    if toggled:
        G.assert_state_equal(G.state(m), before)


def test_operation_in_a_plain_normalization_is_power_norm() -> None:
    """The operation carries the method: a plain Normalization with PowerScale keeps its state
    (``grad_nu``) and gives it the call's State, so it is PowerNorm — outputs, every gradient,
    running estimates and state — and, untracked, RMS batch normalization."""
    for tracked in (True, False):
        m = randomize(nk.Normalization(3, nap=nk.nap.Batch(), nop=PowerScale(warmup_steps=1),
                                       track_running_stats=tracked, dtype=F64))
        ref = randomize(PowerNorm(3, warmup_steps=1, track_running_stats=tracked, dtype=F64)
                        if tracked else rms_bn(3, track_running_stats=False, dtype=F64))
        assert [n for n, _ in m.named_buffers()] == [n for n, _ in ref.named_buffers()]
        for step in range(3):  # the warm-up step, then ψ²_{t−1} and ν
            x = rand(4, 3, 2, seed=step)
            a, r = grads(m, x), grads(ref, x)
            for u, v in zip([a[0], a[1], *a[2]], [r[0], r[1], *r[2]], strict=True):
                assert_close(u, v, **TIGHT)
        G.assert_state_equal(G.state(m), G.state(ref))
        m.eval()
        ref.eval()
        assert_close(m(x), ref(x), **TIGHT)


def test_alpha_fwd_is_one_minus_momentum() -> None:
    a = PowerNorm(3, alpha_fwd=0.75, dtype=F64)
    b = PowerNorm(3, momentum=0.25, dtype=F64)
    assert a.momentum == 0.25 and a.alpha_fwd == 0.75 and b.alpha_fwd == 0.75
    assert PowerNorm(3).alpha_fwd == pytest.approx(0.9) and PowerNorm(3).momentum == 0.1
    assert PowerNorm(3, momentum=None).alpha_fwd is None  # cumulative average
    for step in range(3):
        x = rand(4, 3, 2, seed=step)
        assert_close(a(x), b(x), **TIGHT)
    assert_close(a.running_ms, b.running_ms, **TIGHT)


def test_zero_nu_backward_equals_plain_autograd() -> None:
    """With ν = 0 the approximate backward is the exact derivative of x/√(ψ²_{t−1} + ε): the
    Function (α_bkw = 0.8, ν zeroed after training) equals plain autograd (α_bkw = 1) from the
    same state, outputs and gradients."""
    m = randomize(PowerNorm(4, warmup_steps=1, alpha_bkw=0.8, dtype=F64))
    for step in range(3):
        grads(m, rand(3, 4, 2, seed=step))
    exact = randomize(PowerNorm(4, warmup_steps=1, alpha_bkw=1.0, dtype=F64))
    exact.load_state_dict({k: v for k, v in m.state_dict().items() if k != "grad_nu"})
    m.grad_nu.zero_()
    x = rand(5, 4, 3, seed=11)
    a, r = grads(m, x), grads(exact, x)
    for u, v in zip([a[0], a[1], *a[2]], [r[0], r[1], *r[2]], strict=True):
        assert_close(u, v, **TIGHT)
    assert (m.grad_nu != 0).all()  # and it recorded this step


# ============================================================================ gradients
@pytest.mark.parametrize("phase", ["warmup", "past_warmup_nu_0"])
def test_function_gradcheck_where_exact(phase: str) -> None:
    """gradcheck of the autograd Function (not recording) where its backward is a derivative:
    in the warm-up, ms = E_B[x²] recomputed from the perturbed input (RMS-BN's gradient through
    the Λ term); past it with ν = 0, ms a constant ψ² (the derivative of x/√(ψ² + ε))."""
    x = rand(3, 2, 1, 4, seed=1).requires_grad_()  # canonical (N, C, 1, S) view
    w = (torch.rand(1, 2, 1, 1, generator=gen(2), dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(1, 2, 1, 1, generator=gen(3), dtype=F64).requires_grad_()
    nu = torch.zeros(2, dtype=F64)
    psi = torch.tensor([0.7, 2.5], dtype=F64).view(1, 2, 1, 1)
    warm = phase == "warmup"

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # ms is a non-differentiable input of the Function; in the warm-up it is recomputed
        # here from the (perturbed) input, so the numerical Jacobian sees its dependence on x
        ms = x.detach().square().mean((0, 3), keepdim=True) if warm else psi
        return power_scale(x, ms, w, b, EPS, (0, 3), nu=nu, gate=torch.tensor(not warm),
                           alpha=0.9, record=False)

    assert gradcheck(f, (x, w, b))
    assert torch.equal(nu, torch.zeros(2, dtype=F64))  # not recording


def test_function_approximate_backward_is_not_a_derivative() -> None:
    """Past the warm-up with ν ≠ 0 the backward is the formula (g − νx̂)/ψ, not the derivative:
    gradcheck fails (the test above is not vacuous)."""
    x = rand(3, 2, 1, 4, seed=1).requires_grad_()
    nu = torch.tensor([0.3, -0.2], dtype=F64)
    psi = torch.tensor([0.7, 2.5], dtype=F64).view(1, 2, 1, 1)

    def f(x: Tensor) -> Tensor:
        return power_scale(x, psi, None, None, EPS, (0, 3), nu=nu, gate=torch.tensor(True),
                           alpha=0.9, record=False)

    assert not gradcheck(f, (x,), raise_exception=False)


@pytest.mark.parametrize("case", [c for c in STATEFUL if c.name == "power_norm_exact_backward"],
                         ids=lambda c: c.name)
def test_gradcheck_with_frozen_state(case: Any) -> None:
    """In place of ``test_gradcheck`` for α_bkw = 1 (plain autograd): after a few steps past
    the warm-up, gradcheck and gradgradcheck of the training forward with the state frozen
    (each evaluation on a copy of the module), and of the first (warm-up) step."""
    for steps in (3, 0):
        m = G.build(case, dtype=F64)
        for step in range(steps):
            m(G.layout_x(case, case.shapes[0], seed=step))
        names = [n for n, _ in m.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in m.parameters()]
        x = G.layout_x(case, case.grad_shape, seed=5).requires_grad_()

        def f(x: Tensor, *ps: Tensor, m: torch.nn.Module = m, names: list[str] = names) -> Tensor:
            return torch.func.functional_call(copy.deepcopy(m), dict(zip(names, ps, strict=True)),
                                              (x,))

        assert gradcheck(f, (x, *params))
        assert gradgradcheck(f, (x, *params))


def test_backward_is_first_order_only() -> None:
    m = PowerNorm(2, warmup_steps=0, dtype=F64)
    x = rand(3, 2, 2).requires_grad_()
    (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x)
    assert torch.isfinite(gx).all()
    with pytest.raises(RuntimeError, match="first-order only.*alpha_bkw=1"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)


def test_nu_recording() -> None:
    """Only training steps that update the running statistics record ν (in their backward);
    evaluation and training with the tracking off leave it alone. The backward is affine in the
    incoming gradient: a zero cotangent past the warm-up gives −ν x̂/ψ."""
    m = PowerNorm(2, warmup_steps=0, affine=False, dtype=F64)
    x = rand(4, 2, 3).requires_grad_()
    y = m(x)
    assert torch.equal(m.grad_nu, torch.zeros(2, dtype=F64))  # recorded by the backward ...
    y.backward(torch.randn(4, 2, 3, generator=gen(1), dtype=F64))
    assert (m.grad_nu != 0).all()  # ... not the forward
    recorded = m.grad_nu.clone()
    m.track_running_stats = False
    m(x).backward(torch.randn(4, 2, 3, generator=gen(2), dtype=F64))
    m.eval()
    m(x).backward(torch.randn(4, 2, 3, generator=gen(3), dtype=F64))
    assert torch.equal(m.grad_nu, recorded)
    m.train()
    m.track_running_stats = True
    psi = m.running_ms.clone()
    (gx,) = torch.autograd.grad(m(x), x, torch.zeros(4, 2, 3, dtype=F64))
    xhat = x.detach() / (psi + EPS).sqrt().view(1, 2, 1)
    assert_close(gx, -recorded.view(1, 2, 1) * xhat / (psi + EPS).sqrt().view(1, 2, 1), **TIGHT)
    assert (gx.abs() > 1e-4).all()


def test_two_forwards_one_backward_records_in_backward_order() -> None:
    """The generic pair omitted for ν configurations, as defined: one backward through two
    recorded forwards runs the later forward's backward first, which records ν before the
    earlier one reads it; separate backwards in forward order see each other the other way."""
    m = randomize(PowerNorm(2, warmup_steps=0, dtype=F64))
    x1, x2 = rand(3, 2, 2, seed=1).requires_grad_(), rand(4, 2, 2, seed=2).requires_grad_()
    c1, c2 = (torch.randn(x.shape, generator=gen(i), dtype=F64) for i, x in enumerate((x1, x2)))
    joint = copy.deepcopy(m)
    y1, y2 = joint(x1), joint(x2)
    g1, g2 = torch.autograd.grad((y1 * c1).sum() + (y2 * c2).sum(), [x1, x2])
    rev = copy.deepcopy(m)
    z1, z2 = rev(x1), rev(x2)
    (h2,) = torch.autograd.grad(z2, x2, c2)
    (h1,) = torch.autograd.grad(z1, x1, c1)
    assert_close(g1, h1, **TIGHT)
    assert_close(g2, h2, **TIGHT)
    assert_close(joint.grad_nu, rev.grad_nu, **TIGHT)
    fwd = copy.deepcopy(m)
    w1 = fwd(x1)
    torch.autograd.grad(w1, x1, c1)
    (f2,) = torch.autograd.grad(fwd(x2), x2, c2)
    assert (f2 - g2).abs().max() > 1e-6  # f2 reads the ν recorded by x1's backward, g2 does not


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_with_backward(dtype: torch.dtype) -> None:
    """Half/bfloat16 input on a float32 PowerNorm past the warm-up: output and input gradient in
    the input dtype, parameter gradients and buffers (ν included) in float32, close to the
    float32 run on the upcast input (both with backward passes)."""
    m = randomize(PowerNorm(4, warmup_steps=1, alpha_bkw=0.5))
    ref = copy.deepcopy(m)
    eps = torch.finfo(dtype).eps
    for step in range(3):
        x = rand(3, 4, 5, seed=step).to(dtype)
        y, gx, gp = grads(m, x)
        y_ref, gx_ref, _ = grads(ref, x.float())
        assert y.dtype == gx.dtype == dtype and all(g.dtype == torch.float32 for g in gp)
        # two roundings to `dtype` (output / incoming gradient) of O(max|·|) values
        assert_close(y.float(), y_ref, rtol=2 * eps, atol=2 * eps * y_ref.abs().max().item())
        assert_close(gx.float(), gx_ref, rtol=4 * eps, atol=4 * eps * gx_ref.abs().max().item())
    for name, buf in m.named_buffers():
        assert buf.dtype == (torch.long if name == "num_batches_tracked" else torch.float32)
        want = getattr(ref, name)
        if name == "grad_nu":  # means of g·x̂ with g rounded to `dtype` once
            assert_close(buf, want, rtol=2 * eps, atol=2 * eps * want.abs().max().item())
        else:  # float32 statistics of the same input values: summation order only
            assert_close(buf, want, rtol=1e-5, atol=1e-6)


# ============================================================= stateful configurations
@pytest.mark.parametrize("case", STATEFUL, ids=[c.name for c in STATEFUL])
def test_stateful_buffers(case: Any) -> None:
    """In place of ``test_case_matches_module``: running_ms, the counter and the declared state
    (float32, at its initial values), none without running statistics; reset restores them."""
    m = G.build(case, randomize=False)
    assert {n for n, _ in m.named_buffers()} == {"running_ms", "num_batches_tracked",
                                                 *STATE_BUFFERS[case.name]}
    assert m.channel_axis == case.channel_axis and m.nap.batch_dependent
    fresh = {n: b.clone() for n, b in m.named_buffers()}
    for n in STATE_BUFFERS[case.name]:
        assert getattr(m, n).dtype == torch.float32
        assert torch.equal(getattr(m, n), torch.zeros_like(getattr(m, n)))
    for step in range(3):
        G.fwd_bwd(m, G.layout_x(case, case.shapes[0], seed=step, dtype=torch.float32),
                  channel_axis=case.channel_axis)
    for n in STATE_BUFFERS[case.name]:
        assert not torch.equal(getattr(m, n), fresh[n]), f"{n} never changed"
    m.reset_running_stats()
    for n, b in m.named_buffers():
        assert torch.equal(b, fresh[n]), n
    assert list(G.build(case, track_running_stats=False).buffers()) == []


# ============================================================================ properties
@SETTINGS
@given(n=st.integers(2, 6), t=st.integers(1, 4), scale=st.floats(0.1, 10), seed=st.integers(0, 2**16))
def test_past_warmup_samples_are_independent(n: int, t: int, scale: float, seed: int) -> None:
    """Past the warm-up the training output of a token depends on that token and the state
    only (the batch enters through ψ² of later steps): y = x/√(ψ²_{t−1} + ε) per token, the same
    whatever the other tokens of the batch are."""
    m = PowerNorm(3, warmup_steps=0, channel_axis=-1, affine=False, dtype=F64)
    m.running_ms.copy_(torch.rand(3, generator=gen(seed), dtype=F64) * 4 + 0.1)
    x = rand(n, t, 3, seed=seed, scale=scale)
    z = x.clone()
    z[1:] = rand(n - 1, t, 3, seed=seed + 1, scale=3 * scale, offset=-2.0)
    y, yz = copy.deepcopy(m)(x), copy.deepcopy(m)(z)
    assert_close(y[0], yz[0], **TIGHT)
    assert_close(y, x / (m.running_ms + EPS).sqrt(), **TIGHT)


@SETTINGS
@given(shape=st.sampled_from([(2, 3, 4), (5, 3), (1, 3, 2, 2)]), seed=st.integers(0, 2**16),
       alpha_bkw=st.floats(0.0, 0.99))
def test_warmup_gradient_ignores_nu(shape: tuple[int, ...], seed: int, alpha_bkw: float) -> None:
    """Whatever ν holds, a warm-up step's input gradient is RMS-BN's exact one."""
    m = PowerNorm(3, alpha_bkw=alpha_bkw, dtype=F64)
    m.grad_nu.copy_(torch.randn(3, generator=gen(seed), dtype=F64))
    x = rand(*shape, seed=seed)
    a, r = grads(m, x), grads(rms_bn(3, dtype=F64), x)
    assert_close(a[1], r[1], **TIGHT)


# ================================================================================ faults
@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_input_past_warmup(value: float) -> None:
    """Constant (or zero: E[x²] = 0, scale 1/√ε) input over warm-up and later steps with
    backward passes: finite outputs, gradients and state; the output is x/√(ψ²_{t−1} + ε)."""
    m = PowerNorm(3, warmup_steps=1, affine=False)
    for _ in range(3):
        psi = m.running_ms.clone()
        x = torch.full((4, 3, 2), value, requires_grad=True)
        y = m(x)
        (gx,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=gen(0)))
        assert torch.isfinite(y).all() and torch.isfinite(gx).all()
        assert all(torch.isfinite(b).all() for b in m.buffers())
    assert_close(y, x.detach() / (psi + EPS).sqrt().view(1, 3, 1), rtol=1e-6, atol=1e-6)


def test_nan_input_enters_the_state_and_reset_recovers() -> None:
    """NaN input: NaN output in its channel (the whole channel in the warm-up: batch
    statistics), NaN in running_ms and ν of that channel only (as torch BN's running statistics,
    documented in Normalization); reset_running_stats recovers."""
    m = randomize(PowerNorm(3, warmup_steps=1))
    x = rand(4, 3, 2).float()
    x[0, 1, 0] = float("nan")
    x.requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    assert torch.isnan(m.running_ms[1]) and torch.isnan(m.grad_nu[1])
    assert torch.isfinite(m.running_ms[[0, 2]]).all() and torch.isfinite(m.grad_nu[[0, 2]]).all()
    m.reset_running_stats()
    fresh = randomize(PowerNorm(3, warmup_steps=1))
    z = rand(4, 3, 2, seed=3).float()
    assert_close(m(z), fresh(z), rtol=0, atol=0)


# ======================================================================= API and errors
def test_registry_and_defaults() -> None:
    """Registered in the robust family under its name and alias; the paper's (authors')
    defaults; the operation's repr shows them."""
    assert nk.info("power_norm").cls is PowerNorm and nk.info("power_norm").family == "robust"
    assert type(nk.create("PowerNorm", 4)) is PowerNorm
    assert type(nk.create("power-normalization", 4)) is PowerNorm
    m = PowerNorm(4)
    assert (m.alpha_bkw, m.warmup_steps, m.eps, m.affine) == (0.9, 10000, 1e-5, True)
    assert "PowerScale(alpha_bkw=0.9, warmup_steps=10000)" in repr(m)
    assert nk.partial("power_norm", warmup_steps=5)(4).warmup_steps == 5


def test_single_vector_channels_last_trains() -> None:
    """A single (D,) token with channel_axis=-1: E[x²] over one value per feature is defined
    (no spread needed, as mean-only BN): training works and equals a batch of one token."""
    a = randomize(PowerNorm(4, warmup_steps=1, channel_axis=-1, dtype=F64))
    b = copy.deepcopy(a)
    for step in range(2):
        v = rand(4, seed=step)
        assert_close(a(v), b(v[None])[0], **TIGHT)
    assert_close(a.running_ms, b.running_ms, **TIGHT)


def test_rms_batch_norm_checkpoint_loads() -> None:
    """An RMS-BN (Normalization(Batch, Scale("rms"))) state_dict loads strictly; ν starts at 0."""
    ref = rms_bn(4)
    ref(torch.randn(3, 4, 2))
    m = PowerNorm(4)
    m(torch.randn(3, 4, 2)).sum().backward()
    m.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(m.running_ms, ref.running_ms)
    assert torch.equal(m.grad_nu, torch.zeros(4))


def test_operation_validates_its_arguments() -> None:
    with pytest.raises(ConfigError, match=r"kind must be 'rms', got 'l2'"):
        PowerScale(kind="l2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"alpha_bkw must be a number in \[0, 1\] .*got 1\.5"):
        PowerScale(alpha_bkw=1.5)
    with pytest.raises(ConfigError, match=r"warmup_steps must be an int >= 0, got True"):
        PowerScale(warmup_steps=True)  # type: ignore[arg-type]
