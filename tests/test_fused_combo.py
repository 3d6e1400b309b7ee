"""The fast training paths of mode normalization, AdaIN and the EvoNorms as modules: the same
function as their plain compositions (``native=False``) — output, every gradient, running
estimates — in float64, and first and second derivatives by finite differences."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)

# method -> (constructor arguments, a condition for an input x or None)
METHODS: dict[str, tuple[dict[str, Any], Any]] = {
    "mode_norm": ({"num_modes": 3}, None),
    "adain": ({}, lambda x: 1 + 2 * torch.randn(x.shape, dtype=F64,
                                                 generator=torch.Generator().manual_seed(5))),
    "evonorm_b0": ({}, None),
    "evonorm_s0": ({"num_groups": 2}, None),
}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _pair(method: str, c: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    kw = METHODS[method][0]
    fused = nk.create(method, c, dtype=F64, **kw)
    plain = nk.create(method, c, dtype=F64, native=False, **kw)
    with torch.no_grad():  # parameters away from their initial values
        for i, p in enumerate(fused.parameters()):
            p.add_(0.3 * rand(*p.shape, seed=20 + i))
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _call(m: torch.nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    cond = METHODS[method][1]
    return m(x) if cond is None else m(x, cond(x))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("train", [True, False])
def test_equals_the_plain_composition(method: str, train: bool) -> None:
    fused, plain = _pair(method, 4)
    x = rand(3, 4, 3, 5, seed=0)
    for _ in range(2):  # running estimates move in both alike
        _call(fused, method, x), _call(plain, method, x)
    fused.train(train), plain.train(train)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ref = _call(fused, method, xa), _call(plain, method, xb)
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=9)
    grads = torch.autograd.grad(y, [xa, *fused.parameters()], cot)
    refs = torch.autograd.grad(ref, [xb, *plain.parameters()], cot)
    for a, b in zip(grads, refs, strict=True):
        assert_close(a, b, **TIGHT)
    for (name, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers(), strict=True):
        assert_close(a, b, **TIGHT, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradcheck_and_second_derivatives(method: str) -> None:
    """Training mode (batch statistics: the running estimates do not enter the output)."""
    fused, _ = _pair(method, 4)
    names = [n for n, _ in fused.named_parameters()]
    x = rand(3, 4, 2, 3, seed=0).requires_grad_()
    cond = METHODS[method][1]
    args = (x,) if cond is None else (x, cond(x))

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(fused, dict(zip(names, ps, strict=True)),
                                          (x, *args[1:]))

    ps = tuple(p.detach().clone().requires_grad_() for p in fused.parameters())
    assert gradcheck(f, (x, *ps))
    assert gradgradcheck(f, (x, *ps))
