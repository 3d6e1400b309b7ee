"""The fast training paths of mode normalization, AdaIN, SPADE and the EvoNorms as modules: the same
function as their plain compositions (``native=False``) — output, every gradient, running
estimates — in float64, and first and second derivatives by finite differences. Online
Normalization's recursions as scans against the loops (its control-process backward is not a
derivative: no gradcheck)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.functional.fused_online import linear_scan, stream_moments_scan
from normkit.functional.fused_spade import modulated_standardize, modulated_standardize_plain
from normkit.functional.online import stream_moments

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)

# method -> (constructor arguments, a condition for an input x or None)
METHODS: dict[str, tuple[dict[str, Any], Any]] = {
    "mode_norm": ({"num_modes": 3}, None),
    "adain": ({}, lambda x: 1 + 2 * torch.randn(x.shape, dtype=F64,
                                                 generator=torch.Generator().manual_seed(5))),
    "evonorm_b0": ({}, None),
    "evonorm_s0": ({"num_groups": 2}, None),
    "spade": ({"label_channels": 2, "hidden": 3},
              lambda x: torch.rand(x.shape[0], 2, *x.shape[2:], dtype=F64,
                                   generator=torch.Generator().manual_seed(6))),
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


# ------------------------------------------------------------------ Online Normalization's scans
@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_linear_scan_equals_the_loop(n: int) -> None:
    """Any factor sign, exact zeros (a reset), ``N`` not a power of two."""
    a = rand(n, 3, 2, seed=1) * 1.5
    if n > 2:
        a[2, 1] = 0.0
    b, s0 = rand(n, 3, 2, seed=2), rand(3, 2, seed=3)
    s, ref = s0, []
    for t in range(n):
        ref.append(s)
        s = a[t] * s + b[t]
    before, after = linear_scan(a, b, s0)
    assert_close(before, torch.stack(ref), **TIGHT)
    assert_close(after, s, **TIGHT)


@pytest.mark.parametrize("cumulative", [False, True])
def test_stream_moments_scan_equals_the_loop(cumulative: bool) -> None:
    m, v = rand(7, 4, 1, 1, seed=1), rand(7, 4, 1, 1, seed=2).abs()
    mu, var = rand(4, 1, 1, seed=3), rand(4, 1, 1, seed=4).abs()
    factors: list[Any] = ([torch.tensor(1.0 / (t + 1), dtype=F64) for t in range(7)] if cumulative
                          else [0.3] * 7)  # cumulative: the first weight is 1 (a reset)
    for a, b in zip(stream_moments_scan(m, v, mu, var, factors),
                    stream_moments(m, v, mu, var, factors), strict=True):
        assert_close(a, b, **TIGHT)


def test_online_norm_equals_its_plain_composition() -> None:
    """Outputs, gradients, streaming estimates and the control buffers over several steps."""
    fused = nk.create("online_norm", 4, dtype=F64, momentum=0.2, backward_momentum=0.3)
    plain = nk.create("online_norm", 4, dtype=F64, momentum=0.2, backward_momentum=0.3,
                      native=False)
    plain.load_state_dict(fused.state_dict())
    for step in range(3):
        x = rand(6, 4, 3, 3, seed=step) * (1 + step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, ref = fused(xa), plain(xb)
        assert_close(y, ref, **TIGHT)
        cot = rand(*y.shape, seed=10 + step)
        for a, b in zip(torch.autograd.grad(y, [xa, *fused.parameters()], cot),
                        torch.autograd.grad(ref, [xb, *plain.parameters()], cot), strict=True):
            assert_close(a, b, **TIGHT)
        for (name, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers(), strict=True):
            assert_close(a, b, **TIGHT, msg=name)


# ------------------------------------------------------- SPADE's per-position modulation
@pytest.mark.parametrize("bias", [True, False])
def test_modulated_standardize_equals_the_composition(bias: bool) -> None:
    x = rand(3, 2, 1, 4, seed=0).requires_grad_()
    a = (1 + 0.5 * rand(3, 2, 1, 4, seed=1)).requires_grad_()
    b = rand(3, 2, 1, 4, seed=2).requires_grad_() if bias else None
    args = [t for t in (x, a, b) if t is not None]
    y = modulated_standardize(x, (0, 3), weight=a, bias=b, eps=1e-5)
    ref = modulated_standardize_plain(x, a, b, 1e-5, (0, 3))
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=9)
    for p, q in zip(torch.autograd.grad(y, args, cot), torch.autograd.grad(ref, args, cot),
                    strict=True):
        assert_close(p, q, **TIGHT)

    def f(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return modulated_standardize(x, (0, 3), weight=a, bias=b, eps=1e-5)

    assert gradcheck(f, tuple(args))
    assert gradgradcheck(f, tuple(args))
