"""The EvoNorms' compiled-only forms (:mod:`normkit.functional.fused_inductor`): under
``torch.compile`` the hand-derived backwards take the forms inductor fuses (EvoNorm-S0's gate
saved by the forward through :func:`~normkit.functional.fused_inductor.apply_saving`, the sums
in one loop; EvoNorm-B0's one division per value), and the forward's moments the shifted
one-pass sums. Checked in float64 without code generation (AOTAutograd): gradcheck of the compiled
Functions, equality with the plain composition (``native=False``) with and without the affine
recovery; and in inductor's code for a training step of EvoNorm-S0, one exponential (the
gate, made in the forward and kept)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck

import normkit as nk
from generic_util import assert_same_step
from normkit.functional import fused as Ff
from normkit.functional.fused_inductor import apply_saving

_INDUCTOR = pytest.mark.filterwarnings(  # torch's own: inductor imports torch.utils.mkldnn
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _s0(x: torch.Tensor, v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return Ff.evo_s0(x, (2, 3), vparam=v, weight=w, bias=b, eps=1e-5)


def _b0(x: torch.Tensor, v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return Ff.evo_b0(x, vparam=v, weight=w, bias=b, eps=1e-5)


@pytest.mark.parametrize("fn", [_s0, _b0], ids=["evo_s0", "evo_b0"])
def test_compiled_functions_pass_gradcheck(fn: Any, dynamo_reset: None) -> None:
    """The compiled backward (its compiled-only branch) against finite differences."""
    x = (rand(3, 2, 2, 5, seed=0) * 2 + 0.5).requires_grad_()
    params = [(rand(1, 2, 2, 1, seed=i) * 0.5 + 1).requires_grad_() for i in (1, 2)]
    bias = rand(1, 2, 2, 1, seed=3).requires_grad_()
    if fn is _b0:  # the BN view (N, C, 1, S): both branches of the max
        x = x.detach().reshape(3, 4, 1, 5).requires_grad_()
        params = [p.detach().reshape(1, 4, 1, 1).requires_grad_() for p in params]
        bias = bias.detach().reshape(1, 4, 1, 1).requires_grad_()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert gradcheck(compiled, (x, *params, bias))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("method", ["evonorm_s0", "evonorm_b0"])
def test_compiled_equals_the_plain_composition(method: str, affine: bool,
                                               dynamo_reset: None) -> None:
    kw: dict[str, Any] = {"num_groups": 2} if method == "evonorm_s0" else {}
    plain = nk.create(method, 4, affine=affine, native=False, dtype=F64, **kw)
    with torch.no_grad():
        for i, p in enumerate(plain.parameters()):
            p.add_(0.5 * rand(*p.shape, seed=20 + i))
    fused = nk.create(method, 4, affine=affine, dtype=F64, **kw)
    fused.load_state_dict(plain.state_dict())
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = rand(3, 4, 3, 5, seed=4) * 2 + 0.5
    assert_same_step(plain, compiled, x, seed=5, **TIGHT)


@_INDUCTOR
def test_compiled_s0_computes_its_gate_once(dynamo_reset: None) -> None:
    """Inductor's code for a training step of EvoNorm-S0 evaluates one exponential (the gate,
    in the forward, saved): without the policy AOTAutograd's partitioner recomputes the gate in
    the backward."""
    from torch._inductor.utils import run_and_get_code

    m = nk.create("evonorm_s0", 4, num_groups=2)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(3, 4, 3, 5, generator=torch.Generator().manual_seed(6), requires_grad=True)
    _, code = run_and_get_code(lambda: compiled(x).sum().backward())
    text = "\n".join(code)
    assert text.count(".exp()") + text.count("std::exp(") == 1


def test_apply_saving_is_a_plain_call_outside_compile() -> None:
    x = rand(2, 3, seed=7).requires_grad_()
    y = apply_saving(torch.sigmoid, (torch.ops.aten.sigmoid.default,), x)
    assert torch.equal(y, torch.sigmoid(x))
    assert y.grad_fn is not None and "Checkpoint" not in type(y.grad_fn).__name__
