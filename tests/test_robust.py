"""Tests of the robust-estimation family (book ch. 6): batch renormalization, ghost BN, momentum
BN, cross-iteration BN and moving-average BN.

* Reference tests: each method against its formula, written here in float64 with plain tensor
  operations on small inputs (several training steps where the method has memory).
* Equivalences: every identity with BN the docstrings claim, against ``torch.nn`` BN (outputs,
  input and parameter gradients, running statistics over several steps).
* Gradients: the autograd gradient is the exact derivative where the method says so (gradcheck
  with the training state frozen); batch renormalization's stop-gradient and MABN's
  moving-average backward against their formulas; MABN's autograd Function against plain
  autograd of the same formula (BN) where they coincide.
* The generic battery (``tests/test_generic*.py``) runs over the *stateful* configurations
  (``cases_robust.STATEFUL``, ``Case.stateful``) too, minus the generic tests that assume a
  training forward with no state, replaced here: ``test_case_matches_module`` (every buffer a
  running statistic) by :func:`test_stateful_buffers`, ``test_gradcheck`` (hundreds of training
  forwards on one module) by :func:`test_gradcheck_with_frozen_state` where the gradient is
  exact, and for MABN (``Case.backward_state``: its backward reads the backward history when it
  runs) ``test_two_forwards_one_backward`` by its defined order and ``test_low_precision`` (it
  compares buffers of a module that ran backward passes with one that did not) by
  :func:`test_mabn_low_precision`.
* Properties (hypothesis).

Tolerances: two float64 computations of one formula agree to ``1e-10`` (eps64 = 2.2e-16; a few
hundred roundings of O(10) values); torch's BN kernel vs ours in float64 likewise.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import generic_util as G
import normkit as nk
from cases_robust import STATE_BUFFERS, STATEFUL
from normkit import ConfigError, ShapeError
from normkit.methods.robust import (
    BatchRenorm,
    CrossIterationBatchNorm,
    GhostBatchNorm,
    MomentumBatchNorm,
    MovingAverageBatchNorm,
)
from normkit.nop._robust import Ghost, MomentumStandardize, Renormalize

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
EPS = 1e-5
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0, scale: float = 1.5, offset: float = 0.5) -> Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=F64) * scale + offset


def per_channel(x: Tensor) -> Tensor:
    """``(C, N·S)``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def view(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def standardize(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return (x - mean.view(view(x))) / torch.sqrt(var.view(view(x)) + EPS)


def randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed)) * 0.5 + (1.0 if name == "weight" else 0.0))
    return m


def affine(m: torch.nn.Module, y: Tensor) -> Tensor:
    return y * m.weight.detach().view(view(y)) + m.bias.detach().view(view(y))


def grads(m: torch.nn.Module, x: Tensor, seed: int = 7) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients for a fixed random cotangent (the same
    values, rounded to the output dtype, whatever that dtype)."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    cot = torch.randn(y.shape, generator=gen(seed), dtype=F64).to(y.dtype)
    out = torch.autograd.grad(y, [x, *m.parameters()], cot)
    return y.detach(), out[0], list(out[1:])


def assert_same_as_bn(m: torch.nn.Module, shapes: list[tuple[int, ...]], **tol: float) -> None:
    """``m`` equals ``torch.nn.BatchNorm`` over several training steps (outputs, gradients,
    running statistics), then in eval."""
    bn = torch.nn.BatchNorm1d(m.num_features, eps=m.eps, momentum=m.momentum).double()
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if k in bn.state_dict()})
    tol = tol or TIGHT
    for step, shape in enumerate(shapes):
        x = rand(*shape, seed=step)
        bn_in = x.reshape(shape[0], shape[1], -1) if x.dim() > 3 else x
        a, b = grads(m, x), grads(bn, bn_in)
        assert_close(a[0], b[0].reshape(x.shape), **tol)
        assert_close(a[1], b[1].reshape(x.shape), **tol)
        for ga, gb in zip(a[2], b[2], strict=True):
            assert_close(ga, gb, **tol)
        assert_close(m.running_mean, bn.running_mean, **tol)
        assert_close(m.running_var, bn.running_var, **tol)
    m.eval()
    bn.eval()
    x = rand(*shapes[0], seed=99)
    assert_close(m(x), bn(x.reshape(shapes[0][0], shapes[0][1], -1)).reshape(x.shape), **tol)


BN_SHAPES = [(6, 4), (3, 4, 5), (2, 4, 3, 3), (4, 4, 2)]


# ================================================================ batch renormalization
def test_batch_renorm_reference() -> None:
    """Two steps by hand: r, d from the running statistics before the step, clipped; the running
    statistics updated as BN's; eval with them."""
    m = randomize(BatchRenorm(2, r_max=1.5, d_max=0.3, warmup_steps=0, r_max_steps=0,
                              d_max_steps=0, momentum=0.25, dtype=F64))
    rm, rv = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([4.0, 0.25], dtype=F64)
    m.running_mean.copy_(rm)
    m.running_var.copy_(rv)
    clipped: list[Tensor] = []
    for step in range(2):
        x = rand(5, 2, 3, seed=step)
        xc = per_channel(x)
        mu_b, var_b = xc.mean(1), xc.var(1, correction=0)
        sigma_b, sigma = torch.sqrt(var_b + EPS), torch.sqrt(rv + EPS)
        r_raw, d_raw = sigma_b / sigma, (mu_b - rm) / sigma
        r, d = r_raw.clamp(1 / 1.5, 1.5), d_raw.clamp(-0.3, 0.3)
        clipped += [r != r_raw, d != d_raw]
        want = affine(m, standardize(x, mu_b, var_b) * r.view(1, 2, 1) + d.view(1, 2, 1))
        assert_close(m(x), want, **TIGHT)
        rm = 0.75 * rm + 0.25 * mu_b
        rv = 0.75 * rv + 0.25 * xc.var(1, correction=1)
        assert_close(m.running_mean, rm, **TIGHT)
        assert_close(m.running_var, rv, **TIGHT)
    flags = torch.stack(clipped)
    assert flags.any() and not flags.all()  # both clipped and free r, d occurred
    m.eval()
    x = rand(3, 2, 4, seed=5)
    assert_close(m(x), affine(m, standardize(x, rm, rv)), **TIGHT)


def test_batch_renorm_gradient_is_stop_gradient() -> None:
    """The gradient flows through μ_B and σ_B only: autograd of the formula with r and d
    constants (not the derivative of the output, which would include r's and d's)."""
    m = randomize(BatchRenorm(3, r_max=10.0, d_max=10.0, warmup_steps=0, r_max_steps=0,
                              d_max_steps=0, dtype=F64))
    m.running_mean.copy_(torch.tensor([0.2, -0.3, 1.0]))
    m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = rand(4, 3, 5, seed=3)
    y, gx, gp = grads(m, x)
    xr = x.clone().requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (m.weight, m.bias))
    xc = per_channel(xr)
    mu_b, var_b = xc.mean(1), xc.var(1, correction=0)
    sigma = torch.sqrt(rv + EPS)
    r = (torch.sqrt(var_b + EPS) / sigma).detach()
    d = ((mu_b - rm) / sigma).detach()
    assert ((r > 1 / 10) & (r < 10)).all() and (d.abs() < 10).all()  # unclipped: r, d matter
    ref = standardize(xr, mu_b, var_b) * r.view(1, 3, 1) + d.view(1, 3, 1)
    ref = ref * w.view(1, 3, 1) + b.view(1, 3, 1)
    cot = torch.randn(ref.shape, generator=gen(7), dtype=F64)
    want = torch.autograd.grad(ref, [xr, w, b], cot)
    assert_close(y, ref.detach(), **TIGHT)
    assert_close(gx, want[0], **TIGHT)
    assert_close(gp[0], want[1], **TIGHT)
    assert_close(gp[1], want[2], **TIGHT)


def test_batch_renorm_schedule() -> None:
    """The paper's schedule: BN for 5000 steps, r_max 1 → 3 at 40k, d_max 0 → 5 at 25k."""
    op = Renormalize()
    for t, r_max, d_max in ((1, 1.0, 0.0), (5000, 1.0, 0.0), (5001, 1 + 2 / 35000, 5 / 20000),
                            (22500, 2.0, 4.375), (25000, 1 + 2 * 20000 / 35000, 5.0),
                            (40000, 3.0, 5.0), (10**6, 3.0, 5.0)):
        got = op.limits(torch.tensor(t), F64)
        assert_close(got[0], torch.tensor(r_max, dtype=F64), **TIGHT)
        assert_close(got[1], torch.tensor(d_max, dtype=F64), **TIGHT)
    fixed = Renormalize(r_max=2.0, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    assert [float(v) for v in fixed.limits(torch.tensor(1))] == [2.0, 0.5]
    jump = Renormalize(r_max=2.0, d_max=0.5, warmup_steps=3, r_max_steps=3, d_max_steps=3)
    assert [float(v) for v in jump.limits(torch.tensor(3))] == [1.0, 0.0]
    assert [float(v) for v in jump.limits(torch.tensor(4))] == [2.0, 0.5]


def test_batch_renorm_schedule_follows_the_step_counter() -> None:
    """The module reads the schedule from ``num_batches_tracked`` (saved with the state): at step
    22500 a far-off running variance clips r at 2 and d at 4.375."""
    m = BatchRenorm(2, affine=False, dtype=F64)
    m.num_batches_tracked.fill_(22499)
    m.running_var.fill_(1e-4)  # σ_B/σ ≫ 2
    m.running_mean.fill_(-100.0)  # (μ_B − μ)/σ ≫ 4.375
    x = rand(4, 2, 3, seed=1)
    xc = per_channel(x)
    want = standardize(x, xc.mean(1), xc.var(1, correction=0)) * 2.0 + 4.375
    assert_close(m(x), want, **TIGHT)
    assert int(m.num_batches_tracked) == 22500
    sd = m.state_dict()
    fresh = BatchRenorm(2, affine=False, dtype=F64)
    fresh.load_state_dict(sd)
    assert int(fresh.num_batches_tracked) == 22500


@pytest.mark.parametrize("kw", [
    {"r_max": 1.0, "d_max": 0.0, "warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0},
    {},  # the default schedule: BN up to step 5000
], ids=["limits_1_0", "warmup"])
def test_batch_renorm_equals_bn(kw: dict[str, Any]) -> None:
    assert_same_as_bn(randomize(BatchRenorm(4, dtype=F64, **kw)), BN_SHAPES)


@SETTINGS
@given(n=st.integers(2, 6), s=st.integers(1, 4), offset=st.floats(-3, 3), scale=st.floats(0.2, 5),
       seed=st.integers(0, 2**16))
def test_batch_renorm_unclipped_trains_like_eval(n: int, s: int, offset: float, scale: float,
                                                 seed: int) -> None:
    """With limits never reached, x̂·r + d = (x − μ)/σ: the training output is the evaluation
    output with the running statistics of before the step."""
    m = BatchRenorm(3, r_max=1e6, d_max=1e6, warmup_steps=0, r_max_steps=0, d_max_steps=0,
                    affine=False, dtype=F64)
    m.running_mean.copy_(torch.randn(3, generator=gen(seed), dtype=F64))
    m.running_var.copy_(torch.rand(3, generator=gen(seed + 1), dtype=F64) + 0.1)
    x = rand(n, 3, s, seed=seed, scale=scale, offset=offset)
    want = standardize(x, m.running_mean.clone(), m.running_var.clone())
    assert_close(m(x), want, rtol=1e-9, atol=1e-9)


# ============================================================================== ghost BN
def test_ghost_bn_reference() -> None:
    """N = 5 in ghosts of 2: chunks [0, 1], [2, 3], [4]; each standardized over its own samples
    and positions (torch's BN kernel per chunk); running statistics: batch mean and pooled
    within-ghost variance."""
    m = randomize(GhostBatchNorm(3, virtual_batch_size=2, momentum=1.0, dtype=F64))
    x = rand(5, 3, 4, seed=2)
    y, gx, gp = grads(m, x)
    xr = x.clone().requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (m.weight, m.bias))
    ref = torch.cat([F.batch_norm(c, None, None, w, b, training=True, eps=EPS)
                     for c in xr.split(2)])
    cot = torch.randn(ref.shape, generator=gen(7), dtype=F64)
    want = torch.autograd.grad(ref, [xr, w, b], cot)
    assert_close(y, ref.detach(), **TIGHT)
    for got, exp in zip([gx, *gp], want, strict=True):
        assert_close(got, exp, **TIGHT)
    ss = sum(((c - c.mean((0, 2), keepdim=True)) ** 2).sum((0, 2)) for c in x.split(2))
    assert_close(m.running_mean, x.mean((0, 2)), **TIGHT)
    assert_close(m.running_var, ss / (5 * 4 - 3), **TIGHT)


@pytest.mark.parametrize("vbs", [6, 64])
def test_ghost_bn_one_ghost_batch_equals_bn(vbs: int) -> None:
    assert_same_as_bn(randomize(GhostBatchNorm(4, virtual_batch_size=vbs, dtype=F64)), BN_SHAPES)


def test_ghost_bn_ragged_last_ghost_batch() -> None:
    """A last ghost batch with one value per channel raises before any state changes; with one
    sample but several positions it is normalized over them."""
    m = GhostBatchNorm(2, virtual_batch_size=3, dtype=F64)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ShapeError, match=r"\(7, 2\)"):
        m(rand(7, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    x = rand(7, 2, 3)
    y = m(x)
    last = x[6:]
    assert_close(y[6:], standardize(last, last.mean((0, 2)), last.var((0, 2), correction=0)), **TIGHT)


def test_ghost_needs_a_batch_partition() -> None:
    with pytest.raises(ConfigError, match="ghost batches split the batch axis"):
        nk.Normalization(4, nap=nk.nap.Group(num_groups=2), nop=Ghost(2))
    with pytest.raises(ConfigError, match="standardization-family inner operation"):
        Ghost(2, inner=nk.nop.Whiten())


def test_ghost_wraps_other_operations() -> None:
    """Ghost batches of range BN: each ghost batch uses its own range statistics."""
    m = nk.Normalization(2, nap=nk.nap.Batch(), nop=Ghost(2, inner=nk.nop.Range()), nrr=None,
                         dtype=F64)
    x = rand(4, 2, 3)
    want = torch.cat([nk.functional.normalize(c, nap=nk.nap.Batch(), nop=nk.nop.Range())
                      for c in x.double().split(2)])
    assert_close(m(x), want, **TIGHT)


@SETTINGS
@given(n=st.integers(2, 9), vbs=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ghost_bn_ghosts_are_independent(n: int, vbs: int, seed: int) -> None:
    """The output of a ghost batch depends on its own samples only, and permuting samples
    inside a ghost batch permutes its outputs."""
    m = GhostBatchNorm(3, virtual_batch_size=vbs, affine=False, dtype=F64)
    x = rand(n, 3, 2, seed=seed)
    y = m(x)
    k = (n - 1) // vbs  # the last ghost batch
    start = k * vbs
    z = x.clone()
    z[:start] = rand(start, 3, 2, seed=seed + 1, scale=3.0, offset=-2.0)
    assert_close(m(z)[start:], y[start:], **TIGHT)
    perm = torch.randperm(n - start, generator=gen(seed)) + start
    zp = x.clone()
    zp[start:] = x[perm]
    assert_close(m(zp)[start:], y[perm], **TIGHT)


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


# ============================================================= stateful configurations
def _cases(names: tuple[str, ...] = ()) -> list[Any]:
    return [c for c in STATEFUL if not names or c.name in names]


@pytest.mark.parametrize("case", STATEFUL, ids=[c.name for c in STATEFUL])
def test_stateful_buffers(case: Any) -> None:
    """In place of ``test_case_matches_module``: BN's buffers plus the declared state (float, at
    its initial values), none without running statistics; reset restores them."""
    m = G.build(case, randomize=False)
    names = {n for n, _ in m.named_buffers()}
    assert names == {"running_mean", "running_var", "num_batches_tracked",
                     *STATE_BUFFERS[case.name]}
    fresh = {n: b.clone() for n, b in m.named_buffers()}
    for n in STATE_BUFFERS[case.name]:
        assert getattr(m, n).dtype == torch.float32
    for step in range(3):
        x = G.layout_x(case, case.shapes[0], seed=step, dtype=torch.float32)
        G.fwd_bwd(m, x)  # a backward too: MABN records its backward statistics there
    for n in STATE_BUFFERS[case.name]:
        assert not torch.equal(getattr(m, n), fresh[n]), f"{n} never changed"
    m.reset_running_stats()
    for n, b in m.named_buffers():
        assert torch.equal(b, fresh[n]), n
    assert list(G.build(case, track_running_stats=False).buffers()) == []


@pytest.mark.parametrize("case", _cases(("momentum_bn_fixed", "momentum_bn_dynamic",
                                         "cross_iteration_bn_window3")),
                         ids=lambda c: c.name)
def test_gradcheck_with_frozen_state(case: Any) -> None:
    """In place of ``test_gradcheck`` where the gradient is the exact derivative: after a few
    steps (state away from its initial values), gradcheck and gradgradcheck of the training
    forward with the state frozen (each evaluation on a copy of the module)."""
    m = G.build(case, dtype=F64)
    for step in range(3):
        m(G.layout_x(case, case.shapes[0], seed=step))
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = G.layout_x(case, case.grad_shape, seed=5).requires_grad_()

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(copy.deepcopy(m), dict(zip(names, ps, strict=True)),
                                          (x,))

    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))


def test_bn_checkpoint_loads_into_stateful_methods() -> None:
    """A torch BN state_dict loads strictly; the extra state starts empty."""
    bn = torch.nn.BatchNorm2d(4)
    bn(torch.randn(4, 4, 3, 3))
    for cls, kw in ((MomentumBatchNorm, {"lambda_": 0.5}), (CrossIterationBatchNorm, {}),
                    (MovingAverageBatchNorm, {})):
        m = cls(4, **kw)
        m(torch.randn(3, 4, 2))
        m.load_state_dict(bn.state_dict(), strict=True)
        assert torch.equal(m.running_var, bn.running_var)
        fresh = cls(4, **kw)
        for n, b in fresh.named_buffers():
            if n not in bn.state_dict():
                assert torch.equal(getattr(m, n), b), n


def test_mabn_two_forwards_one_backward_reads_history_at_backward() -> None:
    """The omitted generic pair, as defined: one backward through two recorded forwards runs
    the later forward's backward first, which records its statistics before the earlier one's
    reads them; separate backwards in forward order see each other the other way round."""
    m = randomize(MovingAverageBatchNorm(2, window=3, dtype=F64))
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
    fwd = copy.deepcopy(m)
    w1 = fwd(x1)
    (f1,) = torch.autograd.grad(w1, x1, c1)
    (f2,) = torch.autograd.grad(fwd(x2), x2, c2)
    assert (f2 - g2).abs().max() > 1e-6  # f2 averages x1's backward statistics, g2 does not


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_mabn_low_precision(dtype: torch.dtype) -> None:
    """Half/bfloat16 input on a float32 MABN: output and input gradient in the input dtype,
    parameter gradients and buffers in float32, close to the float32 run on the upcast input
    (both with backward passes, so both record the same backward statistics)."""
    m = randomize(MovingAverageBatchNorm(4, window=3))
    ref = copy.deepcopy(m)
    eps = torch.finfo(dtype).eps
    for step in range(3):
        x = rand(3, 4, 5, seed=step).to(dtype)
        y, gx, gp = grads(m, x)
        y_ref, gx_ref, gp_ref = grads(ref, x.float())
        assert y.dtype == gx.dtype == dtype and all(g.dtype == torch.float32 for g in gp)
        # two roundings to `dtype` (output / incoming gradient) of O(max|·|) values
        assert_close(y.float(), y_ref, rtol=2 * eps, atol=2 * eps * y_ref.abs().max().item())
        assert_close(gx.float(), gx_ref, rtol=4 * eps, atol=4 * eps * gx_ref.abs().max().item())
    for name, b in m.named_buffers():
        assert b.dtype == (torch.long if name == "num_batches_tracked" else torch.float32)
        want = getattr(ref, name)
        if name.startswith("grad_"):  # means of g·x̂ with g rounded to `dtype` (one rounding)
            assert_close(b, want, rtol=2 * eps, atol=2 * eps * want.abs().max().item())
        else:  # float32 statistics of the same input values: summation order only
            assert_close(b, want, rtol=1e-5, atol=1e-6)


_PRESETS = [
    (BatchRenorm, {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 0, "r_max_steps": 0,
                   "d_max_steps": 0}),
    (GhostBatchNorm, {"virtual_batch_size": 2}),
    (MomentumBatchNorm, {"lambda_": 0.5}),
    (CrossIterationBatchNorm, {"window": 3}),
    (MovingAverageBatchNorm, {"window": 3}),
]


@pytest.mark.parametrize(("cls", "kw"), _PRESETS, ids=[c.__name__ for c, _ in _PRESETS])
def test_faults_constant_and_nan_input(cls: type, kw: dict[str, Any]) -> None:
    """Constant input: finite output (β) and gradients, over several steps. NaN input
    propagates to the output and into the state (as torch BN's running statistics);
    ``reset_running_stats`` recovers."""
    m = randomize(cls(3, **kw))
    for _ in range(3):
        x = torch.full((4, 3, 2), 7.0, requires_grad=True)
        y = m(x)
        (gx,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=gen(0)))
        assert torch.isfinite(gx).all() and torch.isfinite(y).all()
        if cls is not BatchRenorm:  # (renorm adds d, clipped: (7 − μ)/σ of the running stats)
            # x − μ = 0 exactly, but x·scale + shift rounds 7·(1/√ε) ≈ 2.2e3 in float32: 3e-4
            assert_close(y, m.bias.detach().view(1, 3, 1).expand_as(y), rtol=0, atol=1e-3)
    bad = rand(4, 3, 2).float()
    bad[0, 1, 0] = float("nan")
    y = m(bad)
    assert torch.isnan(y[:2, 1]).all()  # its (ghost) batch's channel
    assert torch.isnan(y[:, 1]).all() == (cls is not GhostBatchNorm)
    assert torch.isnan(m.running_mean[1]) and not torch.isnan(m.running_mean[0])
    m.reset_running_stats()
    fresh = randomize(cls(3, **kw))
    x = rand(4, 3, 2, seed=3).float()
    assert_close(m(x), fresh(x), rtol=0, atol=0)
