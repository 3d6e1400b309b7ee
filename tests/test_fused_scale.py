"""RMS scaling over the channels of each position as one Function with a hand-derived backward
(normkit/functional/fused_scale.py, ``Scale("rms")`` over ``Position()``): float64 gradcheck and
gradgradcheck, equality to the plain composition (``native=False``) forward and backward, with
and without ``γ``/``β`` and their gradients, channels-last, and the paths it must leave alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
import normkit.nop._standard as std
from normkit.functional.fused_scale import channel_mean_square, rms_scale, rms_scale_plain

F64 = torch.float64


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the fused Function by ``Scale``, recorded."""
    calls: list[int] = []
    orig = std.rms_scale

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return orig(*args, **kw)

    monkeypatch.setattr(std, "rms_scale", spy)
    return calls


def pair(weight: bool, bias: bool, channel_axis: int = 1) -> tuple[nk.Normalization, ...]:
    """The fused module and its ``native=False`` twin, random ``γ, β``."""
    kw: dict[str, Any] = {"nap": nk.nap.Position(), "nop": nk.nop.Scale("rms"), "eps": 1e-3,
                          "channel_axis": channel_axis,
                          "nrr": nk.nrr.Affine(weight=weight, bias=bias) if weight or bias
                          else None}
    fused = nk.Normalization(6, **kw).double()
    plain = nk.Normalization(6, native=False, **kw).double()
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize(("weight", "bias"), [(True, False), (True, True), (False, True),
                                              (False, False)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_matches_composition(weight: bool, bias: bool, layout: str,
                             fused_calls: list[int]) -> None:
    fused, plain = pair(weight, bias, -1 if layout == "rows" else 1)
    x = torch.randn(3, 6, 4, 5, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "rows":
        x = torch.randn(3, 7, 6, dtype=F64)
    x.requires_grad_()
    y, ref = fused(x), plain(x)
    assert fused_calls == [1]  # plain: none
    assert_close(y, ref)
    g = torch.randn_like(y)
    params = list(fused.parameters())
    mine = torch.autograd.grad(y, [x, *params], g)
    theirs = torch.autograd.grad(ref, [x, *plain.parameters()], g)
    assert_close(mine, theirs)


def test_gradcheck_and_gradgradcheck() -> None:
    x = torch.randn(2, 1, 4, 3, dtype=F64, requires_grad=True)
    w = torch.randn(1, 1, 4, 1, dtype=F64, requires_grad=True)
    b = torch.randn(1, 1, 4, 1, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return rms_scale(x, weight=w, bias=b, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    assert torch.autograd.gradcheck(lambda x: rms_scale(x, weight=None, bias=None, eps=1e-3), (x,))
    assert_close(f(x, w, b), rms_scale_plain(x, w, b, 1e-3))


def test_channel_mean_square() -> None:
    x = torch.randn(3, 2, 4, 5, dtype=F64).transpose(0, 3).contiguous().transpose(0, 3)
    assert_close(channel_mean_square(x), x.square().mean((1, 2), keepdim=True))
    assert channel_mean_square(x.half()).dtype == torch.float32


def test_input_without_grad_and_frozen_weight() -> None:
    fused, plain = pair(True, True)
    fused.weight.requires_grad_(False)
    plain.weight.requires_grad_(False)
    x = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    g = torch.randn(2, 6, 3, dtype=F64)
    assert_close(torch.autograd.grad(fused(x), [x, fused.bias], g),
                 torch.autograd.grad(plain(x), [x, plain.bias], g))
    xs = x.detach()
    y = fused(xs)
    (gb,) = torch.autograd.grad(y, [fused.bias], g)
    assert_close(gb, g.sum((0, 2)))


def test_other_scalings_keep_the_composition(fused_calls: list[int]) -> None:
    x = torch.randn(2, 6, 3)
    nk.create("rms_norm", 6, over="channels")(x)
    assert fused_calls == [1]
    nk.create("rms_norm", 6)(x)  # over C·H·W: the composition
    nk.create("scale_norm", 6)(x)
    nk.create("rms_norm", 6, over="channels", native=False)(x)
    torch._dynamo.reset()
    compiled = torch.compile(nk.create("rms_norm", 6, over="channels"), backend="eager",
                             fullgraph=True)
    assert_close(compiled(x), nk.create("rms_norm", 6, over="channels", native=False)(x))
    torch._dynamo.reset()
    assert fused_calls == [1]
