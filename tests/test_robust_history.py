"""Robust family (see ``tests/test_robust.py``): the methods with a memory of past batches —
momentum BN, cross-iteration BN and moving-average BN (MABN): references, equivalences with BN,
MABN's backward against its formula and plain autograd.
Helpers and tolerances: ``tests/robust_util.py``; the family's other tests: ``tests/test_robust*.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import gradcheck
from torch.testing import assert_close

from normkit.methods.robust import (
    CrossIterationBatchNorm,
    MomentumBatchNorm,
    MovingAverageBatchNorm,
)
from normkit.nop._robust import MomentumStandardize
from robust_util import (
    BN_SHAPES,
    EPS,
    F64,
    TIGHT,
    affine,
    assert_same_as_bn,
    gen,
    grads,
    per_channel,
    rand,
    randomize,
    standardize,
)


# =========================================================================== momentum BN
def test_momentum_bn_reference() -> None:
    """Three steps with λ = 0.6 by hand: μ_M ← λμ_M + (1 − λ)μ_B from the second step (the first
    uses the batch's); running statistics are BN's."""
    m = randomize(MomentumBatchNorm(2, lambda_=0.6, momentum=0.5, dtype=F64))
    mm = mv = None
    rm, rv = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    for step in range(3):
        x = rand(3 + step, 2, 2, seed=step)
        xc = per_channel(x)
        mu, var = xc.mean(1), xc.var(1, correction=0)
        mm = mu if mm is None else 0.6 * mm + 0.4 * mu
        mv = var if mv is None else 0.6 * mv + 0.4 * var
        assert_close(m(x), affine(m, standardize(x, mm, mv)), **TIGHT)
        assert_close(m.momentum_mean, mm, **TIGHT)
        assert_close(m.momentum_var, mv, **TIGHT)
        rm, rv = 0.5 * rm + 0.5 * mu, 0.5 * rv + 0.5 * xc.var(1, correction=1)
        assert_close(m.running_mean, rm, **TIGHT)
        assert_close(m.running_var, rv, **TIGHT)
    m.eval()
    x = rand(2, 2, 2, seed=9)
    assert_close(m(x), affine(m, standardize(x, rm, rv)), **TIGHT)


def test_momentum_bn_lambda_rule() -> None:
    """λ(t) = ρ^{T/(T−1)·max(T−t,0)} − ρ^T, ρ = min(m/m₀, 1)^{1/T} (the paper's formula, written
    as such): 0 at t = 1, 1 − m/m₀ from T on, increasing; 1 − m/m₀ without T; 0 for m ≥ m₀."""
    op = MomentumStandardize(ideal_batch_size=32, total_steps=10)
    T, m0 = 10, 32
    for batch in (2, 8, 31):
        rho = min(batch / m0, 1) ** (1 / T)
        lams = []
        for t in range(1, 15):
            want = rho ** (T / (T - 1) * max(T - t, 0)) - rho**T
            got = float(op.momentum_weight(batch, torch.tensor(t), F64))
            assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)
            lams.append(got)
        assert lams[0] == 0 and math.isclose(lams[-1], 1 - batch / m0, rel_tol=1e-12)
        assert all(a <= b for a, b in zip(lams, lams[1:], strict=False))
    plain = MomentumStandardize(ideal_batch_size=32)
    assert float(plain.momentum_weight(8, torch.tensor(5), F64)) == 0.75
    assert float(plain.momentum_weight(8, torch.tensor(1), F64)) == 0.0  # first step: the batch
    assert float(plain.momentum_weight(40, torch.tensor(5), F64)) == 0.0


@pytest.mark.parametrize("kw", [{"lambda_": 0.0}, {"ideal_batch_size": 2}],
                         ids=["lambda_0", "batch_at_least_ideal"])
def test_momentum_bn_equals_bn(kw: dict[str, Any]) -> None:
    assert_same_as_bn(randomize(MomentumBatchNorm(4, dtype=F64, **kw)), BN_SHAPES)


# ===================================================================== cross-iteration BN
def _window_reference(batches: list[Tensor], window: int) -> tuple[Tensor, Tensor]:
    """μ̄ and σ̄² = mean over the window of E[x²] minus μ̄² (the paper's form)."""
    recent = batches[-window:]
    mu = torch.stack([per_channel(b).mean(1) for b in recent]).mean(0)
    nu = torch.stack([(per_channel(b) ** 2).mean(1) for b in recent]).mean(0)
    return mu, nu - mu**2


def test_cross_iteration_bn_reference() -> None:
    """Window 3 over five steps of different batch sizes (the history fills, then slides)."""
    m = randomize(CrossIterationBatchNorm(2, window=3, dtype=F64))
    batches = []
    for step in range(5):
        x = rand(2 + step % 3, 2, 3, seed=step, offset=step)
        batches.append(x)
        mu, var = _window_reference(batches, 3)
        assert_close(m(x), affine(m, standardize(x, mu, var)), **TIGHT)
        xc = per_channel(x)
        assert_close(m.history[0, 0], xc.mean(1), **TIGHT)
        assert_close(m.history[0, 1], xc.var(1, correction=0), **TIGHT)
    assert m.history_weight.tolist() == [1.0, 1.0]


def test_cross_iteration_bn_warmup_and_reset() -> None:
    """BN during the warm-up while the history fills, the window after; a reset empties the
    history (and the counter): the next step is BN again."""
    batches = [rand(3, 2, 2, seed=s, offset=s) for s in range(4)]
    for warmup in (0, 2):
        m = CrossIterationBatchNorm(2, window=3, warmup_steps=warmup, affine=False, dtype=F64)
        for step, x in enumerate(batches):
            xc = per_channel(x)
            want = (standardize(x, xc.mean(1), xc.var(1, correction=0)) if step < warmup
                    else standardize(x, *_window_reference(batches[: step + 1], 3)))
            assert_close(m(x), want, **TIGHT)
        m.reset_running_stats()
        assert m.history_weight.tolist() == [0.0, 0.0] and int(m.num_batches_tracked) == 0
        x = batches[1]
        xc = per_channel(x)
        assert_close(m(x), standardize(x, xc.mean(1), xc.var(1, correction=0)), **TIGHT)


def test_cross_iteration_bn_large_offset_float32() -> None:
    """The window variance is computed without E[x²] − μ² cancellation: correct under a 1e4
    offset in float32."""
    m = CrossIterationBatchNorm(2, window=2, affine=False)
    a, b = (rand(8, 2, 4, seed=s).float() + 1e4 for s in (0, 1))
    m(a)
    y = m(b)
    both = torch.cat([a, b]).double()
    want = F.batch_norm(both, None, None, training=True, eps=EPS)[8:]
    assert_close(y.double(), want, rtol=0, atol=2e-3)  # float32 rounding of 1e4: 1e-3 absolute


@pytest.mark.parametrize("cls", [CrossIterationBatchNorm, MovingAverageBatchNorm])
def test_window_one_equals_bn(cls: type) -> None:
    assert_same_as_bn(randomize(cls(4, window=1, dtype=F64)), BN_SHAPES)


@pytest.mark.parametrize("cls", [CrossIterationBatchNorm, MovingAverageBatchNorm])
def test_warmup_is_bn_while_the_history_fills(cls: type) -> None:
    """During the warm-up both are BN (MABN's backward too) and record their history; the first
    step after it uses the window."""
    m = randomize(cls(4, window=3, warmup_steps=len(BN_SHAPES), dtype=F64))
    assert_same_as_bn(m, BN_SHAPES)
    assert m.history_weight.tolist() == [1.0, 1.0]
    if cls is MovingAverageBatchNorm:
        assert m.grad_weight.tolist() == [1.0, 1.0]
    m.train()
    x = rand(3, 4, 2, seed=50)
    xc = per_channel(x)
    bn_out = affine(m, standardize(x, xc.mean(1), xc.var(1, correction=0)))
    assert (m(x) - bn_out).abs().max() > 1e-3


def test_repeated_batch_window_equals_bn() -> None:
    """The same batch in every slot of the window: the window statistics are the batch's."""
    m = randomize(CrossIterationBatchNorm(3, window=4, dtype=F64))
    x = rand(5, 3, 2)
    for _ in range(6):
        y = m(x)
    xc = per_channel(x)
    assert_close(y, affine(m, standardize(x, xc.mean(1), xc.var(1, correction=0))), **TIGHT)


# ================================================================= moving-average BN
def test_mabn_forward_equals_cross_iteration_forward() -> None:
    mabn = randomize(MovingAverageBatchNorm(3, window=3, dtype=F64))
    cbn = randomize(CrossIterationBatchNorm(3, window=3, dtype=F64))
    for step in range(5):
        x = rand(2 + step, 3, 2, seed=step)
        assert_close(mabn(x), cbn(x), **TIGHT)
    assert_close(mabn.history, cbn.history, **TIGHT)


def test_mabn_backward_reference() -> None:
    """After two recorded steps, the third step's input gradient is
    (g − ḡ − x̂ψ̄)/σ̄ with ḡ, ψ̄ the averages of E[g], E[g·x̂] over the three backward passes;
    weight and bias gradients are BN's (Σ ∂L/∂y·x̂, Σ ∂L/∂y)."""
    m = randomize(MovingAverageBatchNorm(2, window=3, dtype=F64))
    batches = [rand(3, 2, 4, seed=s, offset=s) for s in range(3)]
    g_stats: list[tuple[Tensor, Tensor]] = []
    for step, x in enumerate(batches):
        y, gx, gp = grads(m, x, seed=10 + step)
        cot = torch.randn(y.shape, generator=gen(10 + step), dtype=F64)
        mu, var = _window_reference(batches[: step + 1], 3)
        xhat = standardize(x, mu, var)
        g = cot * m.weight.detach().view(1, 2, 1)
        g_stats.append((per_channel(g).mean(1), per_channel(g * xhat).mean(1)))
        g_bar = torch.stack([s[0] for s in g_stats]).mean(0).view(1, 2, 1)
        psi_bar = torch.stack([s[1] for s in g_stats]).mean(0).view(1, 2, 1)
        want = (g - g_bar - xhat * psi_bar) / torch.sqrt(var.view(1, 2, 1) + EPS)
        assert_close(gx, want, **TIGHT)
        assert_close(gp[0], (cot * xhat).sum((0, 2)), **TIGHT)
        assert_close(gp[1], cot.sum((0, 2)), **TIGHT)
    assert m.grad_weight.tolist() == [1.0, 1.0]


def test_mabn_function_matches_plain_autograd() -> None:
    """MABN's autograd Function with one iteration (the first step, or window 1) against plain
    autograd of its formula (BN): gradcheck of the Function, and its gradients equal autograd's
    through ``F.batch_norm`` with the same input and parameters."""
    for window in (1, 4):
        m = randomize(MovingAverageBatchNorm(3, window=window, dtype=F64))
        names = [n for n, _ in m.named_parameters()]
        x = rand(3, 3, 2).requires_grad_()
        params = [p.detach().clone().requires_grad_() for p in m.parameters()]

        def f(x: Tensor, *ps: Tensor, m: torch.nn.Module = m, names: list[str] = names) -> Tensor:
            fresh = copy.deepcopy(m)  # every evaluation a first step: no history ...
            fresh.track_running_stats = False  # ... and none recorded by the backward passes
            return torch.func.functional_call(fresh, dict(zip(names, ps, strict=True)), (x,))

        assert gradcheck(f, (x, *params))
        cot = torch.randn(3, 3, 2, generator=gen(1), dtype=F64)
        ours = torch.autograd.grad(f(x, *params), [x, *params], cot)
        ref = torch.autograd.grad(
            F.batch_norm(x, None, None, params[0], params[1], training=True, eps=EPS),
            [x, *params], cot)
        for a, b in zip(ours, ref, strict=True):
            assert_close(a, b, **TIGHT)


def test_mabn_backward_is_first_order_only() -> None:
    m = MovingAverageBatchNorm(2, window=2, dtype=F64)
    x = rand(3, 2, 2).requires_grad_()
    (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=False)
    assert torch.isfinite(gx).all()
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)


def test_mabn_backward_history_recording() -> None:
    """Only steps that update the running statistics record their backward statistics; eval and
    training with the tracking switched off leave the history alone; zero cotangent still
    gives the moving-average part (the backward is affine in the incoming gradient)."""
    m = MovingAverageBatchNorm(2, window=3, affine=False, dtype=F64)
    x = rand(4, 2, 3).requires_grad_()
    m(x).sum().backward()
    assert m.grad_weight.tolist() == [1.0, 0.0]
    recorded = m.grad_history.clone()
    m.track_running_stats = False
    m(x).backward(torch.randn(4, 2, 3, generator=gen(1), dtype=F64))
    m.eval()
    m(x).backward(torch.randn(4, 2, 3, generator=gen(2), dtype=F64))
    assert torch.equal(m.grad_history, recorded) and m.grad_weight.tolist() == [1.0, 0.0]
    m.train()
    m.track_running_stats = True
    m.grad_history[0, 0].fill_(0.5)  # a past E[g] of 0.5 per channel
    psi_past = m.grad_history[0, 1].clone()
    (gx,) = torch.autograd.grad(m(x), x, torch.zeros(4, 2, 3, dtype=F64))
    # the window holds x twice (this step and the first): x̂ is BN's; ḡ = (0 + 0.5)/2 and
    # ψ̄ = (0 + ψ_past)/2, so ∂L/∂x = −(ḡ + x̂ψ̄)/σ with a zero incoming gradient
    xc = per_channel(x.detach())
    mean, var = xc.mean(1), xc.var(1, correction=0)
    xhat = standardize(x.detach(), mean, var)
    want = -(0.25 + xhat * (psi_past / 2).view(1, 2, 1)) / torch.sqrt(var.view(1, 2, 1) + EPS)
    assert_close(gx, want, **TIGHT)
    assert (gx.abs() > 0.01).all()
