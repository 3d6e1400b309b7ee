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

This file: batch renormalization and ghost BN. ``test_robust_history.py``: momentum BN,
cross-iteration BN, moving-average BN. ``test_robust_stateful.py``: the stateful configurations
and faults. Helpers and tolerances: ``tests/robust_util.py``; the family's other tests: ``tests/test_robust*.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.testing import assert_close

import normkit as nk
from normkit import ConfigError, ShapeError
from normkit.methods.robust import (
    BatchRenorm,
    GhostBatchNorm,
)
from normkit.nop._robust import Ghost, Renormalize
from robust_util import (
    BN_SHAPES,
    EPS,
    F64,
    SETTINGS,
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
    want = torch.cat([nk.normalize(c, nap=nk.nap.Batch(), nop=nk.nop.Range())
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
