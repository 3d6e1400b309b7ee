"""Every registered method compiles in one graph (``torch.compile(fullgraph=True)``) on a
channels-last input and gives the eager output and input gradient, in training.

Dynamo cannot trace an ``out=`` into a non-contiguous tensor, which a fused path may write for a
channels-last input (EvoNorm-B0 failed so, found by hand): this sweep runs each method's compiled
forms once on such an input. ``backend="eager"`` traces without generating code (the numerics of
the compiled backends are the generic table's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from normkit._bench.conditioned import build_method


@pytest.mark.parametrize("method", nk.list_methods())
def test_compiles_on_channels_last_input(method: str, dynamo_reset: None) -> None:
    x = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    eager = build_method(method, x.detach(), torch.Generator().manual_seed(1)).train()
    compiled = torch.compile(copy.deepcopy(eager), backend="eager", fullgraph=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y_c = compiled(x)
    (gx_c,) = torch.autograd.grad(y_c, x, g)
    y_e = eager(x)
    (gx_e,) = torch.autograd.grad(y_e, x, g)
    assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
