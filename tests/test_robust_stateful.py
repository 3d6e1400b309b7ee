"""Robust family (see ``tests/test_robust.py``): the stateful configurations (``cases_robust.STATEFUL``)
in place of the generic tests they skip (buffers, gradcheck with the state frozen, MABN's defined
backward order and low precision), BN checkpoints, and faults (constant and NaN input).
Helpers and tolerances: ``tests/robust_util.py``; the family's other tests: ``tests/test_robust*.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import generic_util as G
from cases_robust import STATE_BUFFERS, STATEFUL
from normkit.methods.robust import (
    BatchRenorm,
    CrossIterationBatchNorm,
    GhostBatchNorm,
    MomentumBatchNorm,
    MovingAverageBatchNorm,
)
from robust_util import (
    F64,
    TIGHT,
    gen,
    grads,
    rand,
    randomize,
)


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
