"""The hand-derived backwards of ``normkit.functional.fused`` against their plain compositions.

Each fused Function must give the plain autograd composition's output and every gradient (float64,
tight), pass ``gradcheck`` and ``gradgradcheck`` (second derivatives differentiate the composition),
accept a missing affine / threshold, compute in float32 for half inputs, and leave its output free
for an in-place op (nothing saved is the output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from normkit.functional.fused import evo_b0, evo_b0_plain, evo_s0, evo_s0_plain, frn, frn_plain

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def rand(*shape: int, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)


def _frn_args(affine: bool, tlu: bool, extra: bool, shape: tuple[int, ...] = (3, 4, 1, 5)
              ) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], list[Any]]:
    c = shape[1]
    args = [rand(*shape, seed=0),
            rand(1, c, 1, 1, seed=1) if affine else None,
            rand(1, c, 1, 1, seed=2) if affine else None,
            rand(1, c, 1, 1, seed=3, scale=0.3) if tlu else None,
            torch.full((1, 1, 1, 1), 1e-3, dtype=F64, requires_grad=True) if extra else None]

    def fused(x: Any, w: Any, b: Any, tau: Any, ex: Any) -> torch.Tensor:
        return frn(x, (3,), weight=w, bias=b, tau=tau, eps=1e-6, extra_eps=ex)

    def plain(x: Any, w: Any, b: Any, tau: Any, ex: Any) -> torch.Tensor:
        return frn_plain(x, w, b, tau, ex, 1e-6, (3,))

    return fused, plain, args


def _evo_args(affine: bool, shape: tuple[int, ...] = (3, 2, 3, 4)
              ) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], list[Any]]:
    g, b = shape[1], shape[2]
    args = [rand(*shape, seed=0), rand(1, g, b, 1, seed=1),
            rand(1, g, b, 1, seed=2) if affine else None,
            rand(1, g, b, 1, seed=3) if affine else None]

    def fused(x: Any, v: Any, w: Any, bias: Any) -> torch.Tensor:
        return evo_s0(x, (2, 3), vparam=v, weight=w, bias=bias, eps=1e-5)

    def plain(x: Any, v: Any, w: Any, bias: Any) -> torch.Tensor:
        return evo_s0_plain(x, v, w, bias, 1e-5, (2, 3))

    return fused, plain, args


def _evo_b0_args(affine: bool, running: bool, shape: tuple[int, ...] = (4, 3, 1, 5)
                 ) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], list[Any]]:
    c = shape[1]
    args = [rand(*shape, seed=0), rand(1, c, 1, 1, seed=1),
            rand(1, c, 1, 1, seed=2) if affine else None,
            rand(1, c, 1, 1, seed=3) if affine else None]
    batch_var = rand(1, c, 1, 1, seed=4, grad=False).abs() + 0.5 if running else None

    def fused(x: Any, v: Any, w: Any, bias: Any) -> torch.Tensor:
        return evo_b0(x, vparam=v, weight=w, bias=bias, eps=1e-5, batch_var=batch_var)

    def plain(x: Any, v: Any, w: Any, bias: Any) -> torch.Tensor:
        return evo_b0_plain(x, v, w, bias, batch_var, 1e-5)

    return fused, plain, args


CASES = {
    "frn": lambda: _frn_args(True, True, False),
    "frn_learned_eps": lambda: _frn_args(True, True, True),
    "frn_no_tlu": lambda: _frn_args(True, False, False),
    "frn_no_affine": lambda: _frn_args(False, True, False),
    "evo_s0": lambda: _evo_args(True),
    "evo_s0_no_affine": lambda: _evo_args(False),
    "evo_b0": lambda: _evo_b0_args(True, False),
    "evo_b0_running": lambda: _evo_b0_args(True, True),
    "evo_b0_no_affine": lambda: _evo_b0_args(False, False),
}


@pytest.mark.parametrize("running", [False, True])
def test_evo_b0_data_takes_both_branches(running: bool) -> None:
    """The equality tests above mean something only if both denominators occur."""
    _, _, args = _evo_b0_args(True, running)
    x, v = args[0].detach(), args[1].detach()
    vi = x.var(3, correction=0, keepdim=True)
    vb = x.var((0, 3), correction=0, keepdim=True)
    on_b = v * x + (vi + 1e-5).sqrt() > (vb + 1e-5).sqrt()
    assert 0.2 < on_b.double().mean() < 0.8


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_plain_composition(name: str) -> None:
    fused, plain, args = CASES[name]()
    tensors = [a for a in args if a is not None]
    y, ref = fused(*args), plain(*args)
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=9, grad=False)
    for a, b in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_and_second_derivatives(name: str) -> None:
    fused, _, args = CASES[name]()
    assert gradcheck(fused, tuple(args))
    assert gradgradcheck(fused, tuple(args))


def test_frn_threshold_gradient_is_where_the_threshold_holds() -> None:
    fused, _, args = CASES["frn"]()
    x, w, b, tau, _ = args
    y = fused(*args)
    (g_tau,) = torch.autograd.grad(y.sum(), tau)
    pre = w * x / (x.square().mean(3, keepdim=True) + 1e-6).sqrt() + b
    assert torch.equal(g_tau, (pre <= tau).to(F64).sum((0, 3), keepdim=True))


@pytest.mark.parametrize("name", ["frn", "evo_s0", "evo_b0"])
def test_half_input_computes_in_float32(name: str) -> None:
    fused, plain, args = CASES[name]()
    x = args[0].detach().to(torch.bfloat16).requires_grad_()
    params = [None if a is None else a.detach().float() for a in args[1:]]
    y = fused(x, *params)
    assert y.dtype == torch.float32
    assert_close(y, plain(x, *params))
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["frn", "evo_s0", "evo_b0"])
def test_an_inplace_op_may_follow(name: str) -> None:
    fused, plain, args = CASES[name]()
    y = fused(*args)
    assert y._base is None
    y.relu_()
    (gx,) = torch.autograd.grad(y.sum(), args[0])
    (ref,) = torch.autograd.grad(torch.relu(plain(*args)).sum(), args[0])
    assert_close(gx, ref, **TIGHT)


def test_precomputed_statistics_give_the_same_function() -> None:
    """The modules hand training's statistics to the Functions (computed once, without
    autograd); the Functions still differentiate through them."""
    x = rand(4, 3, 1, 5, seed=0)
    w, b = rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)
    cot = rand(4, 3, 1, 5, seed=9, grad=False)
    pairs = []
    with torch.no_grad():
        ms = x.square().mean(3, keepdim=True)
        mean, var = x.mean(3, keepdim=True), x.var(3, correction=0, keepdim=True)
        mb = x.mean((0, 3), keepdim=True)
        vb = x.var((0, 3), correction=0, keepdim=True)
    pairs.append((frn(x, (3,), weight=w, bias=b, tau=None, eps=1e-6, ms=ms),
                  frn(x, (3,), weight=w, bias=b, tau=None, eps=1e-6)))
    pairs.append((evo_s0(x, (3,), vparam=w, weight=None, bias=b, eps=1e-5, moments=(mean, var)),
                  evo_s0(x, (3,), vparam=w, weight=None, bias=b, eps=1e-5)))
    pairs.append((evo_b0(x, vparam=w, weight=None, bias=b, eps=1e-5,
                         moments=(mean, var, mb, vb)),
                  evo_b0(x, vparam=w, weight=None, bias=b, eps=1e-5)))
    for given, computed in pairs:
        assert_close(given, computed, **TIGHT)
        for u, v in zip(torch.autograd.grad(given, (x, w, b), cot),
                        torch.autograd.grad(computed, (x, w, b), cot), strict=True):
            assert_close(u, v, **TIGHT)


@pytest.mark.parametrize("method", ["frn", "evonorm_s0", "evonorm_b0"])
def test_modules_use_the_fused_backward_and_native_false_the_composition(method: str) -> None:
    import normkit as nk

    fused, plain = nk.create(method, 4, dtype=F64), nk.create(method, 4, dtype=F64, native=False)
    assert fused.nop.fused and not plain.nop.fused
    plain.load_state_dict(fused.state_dict())
    x = rand(3, 4, 5, 5, seed=0)
    def nodes(y: torch.Tensor) -> set[str]:
        seen, todo = set(), [y.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and type(fn).__name__ not in seen:
                seen.add(type(fn).__name__)
                todo.extend(f for f, _ in fn.next_functions)
        return seen

    fn = {"frn": "_FRNBackward", "evonorm_s0": "_EvoS0Backward", "evonorm_b0": "_EvoB0Backward"}
    x = x.requires_grad_()
    y, ref = fused(x), plain(x)
    assert fn[method] in nodes(y) and fn[method] not in nodes(ref)
    assert_close(y, ref, **TIGHT)
