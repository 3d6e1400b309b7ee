"""Divisive normalization's centred window moments in parts (``normkit.functional.local_windows``,
the compiled form of :func:`~normkit.functional.fused_local.local_divisive` for centred windows
summed from one padded copy).

The parts (run eagerly) must give the local moments of ``statistics.local_moments`` and the
flipped window sums of ``box_sum`` — planes padded as one row (windows along the positions of a
2-D input, clipped or counting the padding), one padded copy on the window view otherwise
(1-D and 3-D inputs, windows across channels) — and, under ``torch.compile(fullgraph=True)``,
the module's training step must equal eager's in float64 for the windows that take each form;
in float32 under a mean offset of 1e4 the compiled output stays as close to the float64
formula as eager's. Inductor compiles C++: few, tiny cases."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from generic_util import assert_same_step
from normkit.functional import statistics as S
from normkit.functional.local_windows import (
    _flipped_sum,
    _on_planes,
    window_parts,
    window_parts_apply,
)

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)


def rand(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


# (window view (N, A, B, *spatial), window axes, windows): 2-D planes (both axes, rows only,
# the innermost only, even sizes), a window across channels too (one copy on the window view),
# 1-D and 3-D inputs
WINDOWS = {
    "3x3": ((2, 1, 3, 5, 4), (2, 3, 4), (1, 3, 3)),
    "rows": ((2, 1, 3, 5, 4), (2, 3, 4), (1, 3, 1)),
    "innermost": ((2, 1, 3, 5, 4), (2, 3, 4), (1, 1, 3)),
    "even": ((2, 1, 3, 5, 4), (2, 3, 4), (1, 2, 4)),
    "channels": ((2, 1, 3, 5, 4), (2, 3, 4), (3, 3, 1)),
    "1d": ((2, 1, 3, 7), (2, 3), (1, 3)),
    "3d": ((2, 1, 2, 3, 4, 5), (2, 3, 4, 5), (1, 1, 3, 3)),
}


@pytest.mark.parametrize("include_pad", [False, True])
@pytest.mark.parametrize("name", list(WINDOWS))
def test_parts_are_the_local_moments(name: str, include_pad: bool) -> None:
    """``c + (μ − c)``, ``σ²`` and the centre window ``x − c`` on the canonical view equal
    ``local_moments`` (offset 100: the shift matters); the flipped sums of ``t · 1/n`` equal
    ``box_sum(flip=True)``."""
    shape, dims, windows = WINDOWS[name]
    x = rand(*shape, seed=1) + 100.0
    flat = x.reshape(*shape[:3], -1)
    assert window_parts_apply(shape, (), dims, windows)
    parts = window_parts(flat, shape, dims, windows, include_pad)
    assert parts is not None
    mean, var = S.local_moments(x, (), dims, windows, include_pad)
    assert_close((parts.centred + parts.shift).reshape(shape), mean, **TIGHT)
    assert_close(parts.var.reshape(shape), var, **TIGHT)
    assert_close(parts.centre, flat - parts.shift, **TIGHT)
    t = rand(*shape, seed=2)
    inv = S.inverse_count(shape, dims, windows, include_pad, t)
    got = _flipped_sum(t.reshape(flat.shape), shape, dims, windows, _on_planes(inv, shape))
    assert_close(got.reshape(shape), S.box_sum(t * inv, dims, windows, flip=True), **TIGHT)


def test_parts_only_for_one_copy() -> None:
    """Averaged axes (LCN's channel groups), windows of more terms than one copy sums at once
    and unit windows are not taken in parts."""
    shape = (2, 1, 4, 5, 6)
    assert not window_parts_apply(shape, (2,), (3, 4), (3, 3))
    assert not window_parts_apply(shape, (), (2, 3, 4), (3, 5, 3))
    assert not window_parts_apply(shape, (), (2, 3, 4), (1, 1, 1))
    assert window_parts(rand(*shape, seed=3).reshape(2, 1, 4, 30), shape, (2, 3, 4),
                        (3, 5, 3), False) is None


def _divisive(c: int, kwargs: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    if kwargs.pop("include_pad", False):
        nap = nk.nap.Local(channel_window=kwargs.pop("channel_window", 1),
                           window=kwargs.pop("window", 3), include_pad=True)
        return nk.Normalization(c, nap=nap, nop=nk.nop.Divisive(k=1.0, center=True),
                                nrr=nk.nrr.Affine(), dtype=dtype).train()
    return nk.create("divisive_norm", c, dtype=dtype, **kwargs).train()


# constructor arguments, input shape: each form of the parts (planes as one row, clipped and
# counting the padding; one copy on the window view) and a 1-D input
COMPILED = {
    "rows_3x1": ({"window": (3, 1), "sigma": 0.7}, (2, 3, 5, 6)),
    "include_pad": ({"include_pad": True}, (2, 3, 4, 5)),
    "channels_3x3x1": ({"channel_window": 3, "window": (3, 1)}, (2, 4, 5, 6)),
    "1d": ({"window": 3}, (2, 3, 7)),
}


@pytest.mark.filterwarnings(  # inductor imports torch's own deprecated jit.script_method
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", list(COMPILED))
def test_compiled_parts_equal_eager(case: str, dynamo_reset: None) -> None:
    kwargs, shape = COMPILED[case]
    eager = _divisive(shape[1], dict(kwargs), F64)
    with torch.no_grad():  # parameters away from γ = 1, β = 0
        for i, p in enumerate(eager.parameters()):
            p.add_(0.5 * rand(*p.shape, seed=20 + i))
    target = _divisive(shape[1], dict(kwargs), F64)
    target.load_state_dict(eager.state_dict())
    compiled = torch.compile(target, fullgraph=True)
    assert_same_step(eager, compiled, rand(*shape, seed=1) + 0.5, seed=2, **TIGHT)


@pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
def test_compiled_parts_keep_precision_under_an_offset(dynamo_reset: None) -> None:
    """float32 input ``1e4 + N(0, 1)``: the compiled output and input gradient stay as close to
    the float64 formula as eager's float32, or closer (the moments around the per-sample shift;
    without it ``E[x²] − μ²`` would lose every digit of ``σ² ≈ 1`` against ``μ² ≈ 1e8``)."""
    x32 = rand(2, 3, 6, 5, seed=5, dtype=torch.float32) + 1e4
    g = rand(2, 3, 6, 5, seed=6, dtype=torch.float32)
    ref = nk.create("divisive_norm", 3, dtype=F64).train()
    out = {}
    for name, m in (("eager", nk.create("divisive_norm", 3)),
                    ("compiled", torch.compile(nk.create("divisive_norm", 3), fullgraph=True)),
                    ("f64", ref)):
        xi = x32.to(F64 if name == "f64" else torch.float32, copy=True).requires_grad_()
        y = m(xi)
        y.backward(g.to(y.dtype))
        assert xi.grad is not None
        out[name] = (y.detach().double(), xi.grad.double())
    # eager subtracts μ ≈ 1e4 rounded to float32 (half an ulp: 4.9e-4, times s^(−½) ≤ 1); the
    # compiled parts subtract c (x − c exact: Sterbenz) and μ − c, O(1) values (a few eps32)
    assert_close(out["eager"][0], out["f64"][0], rtol=0, atol=1e-3)
    assert_close(out["compiled"][0], out["f64"][0], rtol=0, atol=1e-5)
    for name in ("eager", "compiled"):  # gradients of O(1) values, from x − c and μ − c
        assert_close(out[name][1], out["f64"][1], rtol=0, atol=1e-5)
