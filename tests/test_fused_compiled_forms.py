"""The combination family's fast training paths where they take a compiled-only form
(``torch.compiler.is_compiling()``: the same formula written as expressions inductor fuses into
few passes — the EvoNorms' backward sums, batch-channel normalization as one affine map per row
from the rows' pooled moments), and batch-group normalization's standardization Function, which
compiled graphs now trace as well: under ``torch.compile(fullgraph=True)`` the output, every
gradient and the running estimates equal eager's in float64, in training (and in evaluation
where that runs such a form); and EvoNorm-B0 compiles with a channels-last input. Inductor
compiles C++: few, tiny cases."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)

# method -> (constructor arguments, whether evaluation runs a compiled-only form too, backend):
# inductor for the hand-derived backwards (their compiled forms use relu's and sigmoid's backward
# kernels, lowered by inductor); the others' compiled forms are plain autograd compositions,
# traced the same by AOTAutograd without inductor's C++ compile
METHODS: dict[str, tuple[dict[str, Any], bool, str]] = {
    "evonorm_b0": ({}, True, "inductor"),  # evaluation: the backward with the running σ²_B
    "evonorm_s0": ({"num_groups": 2}, False, "inductor"),
    "bcn": ({"num_groups": 2}, False, "aot_eager"),
    "batch_group_norm": ({"num_groups": 2}, False, "aot_eager"),
}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _pair(method: str, c: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    eager = nk.create(method, c, dtype=F64, **METHODS[method][0])
    with torch.no_grad():  # parameters away from their initial values: both branches of B0's max
        for i, p in enumerate(eager.parameters()):
            p.add_(0.5 * rand(*p.shape, seed=20 + i))
    target = nk.create(method, c, dtype=F64, **METHODS[method][0])
    target.load_state_dict(eager.state_dict())
    return eager, target


@pytest.mark.filterwarnings(  # inductor imports torch's own deprecated jit.script_method
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_equals_eager(method: str, dynamo_reset: None) -> None:
    eager, target = _pair(method, 4)
    compiled = torch.compile(target, fullgraph=True, backend=METHODS[method][2])
    for train, seed in ((True, 0), (False, 1))[: 2 if METHODS[method][1] else 1]:
        eager.train(train)
        target.train(train)
        x = (rand(3, 4, 3, 5, seed=seed) * 2 + 0.5).requires_grad_()
        x2 = x.detach().requires_grad_()
        y, ref = compiled(x), eager(x2)
        assert_close(y, ref, **TIGHT)
        cot = rand(*y.shape, seed=seed + 10)
        params = [p for p in target.parameters()]
        got = torch.autograd.grad(y, [x, *params], cot)
        want = torch.autograd.grad(ref, [x2, *eager.parameters()], cot)
        names = ["x", *(n for n, _ in target.named_parameters())]
        for name, u, r in zip(names, got, want, strict=True):
            assert_close(u, r, **TIGHT, msg=lambda e, name=name, train=train:
                         f"{name} (train={train}): {e}")
    for (name, a), (_, b) in zip(target.named_buffers(), eager.named_buffers(), strict=True):
        assert_close(a, b, **TIGHT, msg=lambda e, name=name: f"{name}: {e}")


def test_compiled_evonorm_b0_takes_channels_last(dynamo_reset: None) -> None:
    """EvoNorm-B0's forward divides into a fresh buffer with ``out=`` in eager only: dynamo
    traces no ``out=`` into a non-contiguous (channels-last) tensor, and fullgraph failed."""
    eager, target = _pair("evonorm_b0", 4)
    compiled = torch.compile(target, fullgraph=True, backend="aot_eager")
    x = rand(3, 4, 3, 5, seed=2).to(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().requires_grad_()
    y, ref = compiled(x), eager(x2)
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=3)
    assert_close(torch.autograd.grad(y, x, cot)[0], torch.autograd.grad(ref, x2, cot)[0], **TIGHT)
