"""Mixture normalization's compiled form (``normkit.functional.fused_mixture_traced``): the EM fit
and a hand-derived backward written as plain traceable ops, which ``torch.compile`` (inductor)
fuses into one loop per EM step; ``torch.export`` keeps the custom ops.

Compiled by inductor, a training step must equal eager's (output, gradients, running
estimates), also at an odd spatial size. Inductor compiles C++: few, tiny cases. Run eagerly,
the traceable Function is checked against the composition with the eager one
(tests/test_fused_mixture.py, ``form="traced"``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import normkit as nk
from generic_util import assert_same_step
from mixture_util import F64, TIGHT, rand, two_modes

# name -> (constructor arguments, input shape): the default (running start after a first
# step), three components (the softmax path), one, the batch start at an odd spatial size
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "default": ({}, (4, 3, 4, 4)),
    "k3": ({"num_components": 3, "iterations": 2}, (4, 3, 4, 4)),
    "k1": ({"num_components": 1, "iterations": 1}, (4, 2, 3, 3)),
    "batch_odd": ({"init": "batch"}, (3, 2, 5, 7)),
}


@pytest.mark.filterwarnings(  # inductor imports torch's own deprecated jit.script_method
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_inductor_equals_eager(case: str, dynamo_reset: None) -> None:
    kwargs, shape = CASES[case]
    eager = nk.create("mixture_norm", shape[1], dtype=F64, **kwargs).train()
    with torch.no_grad():  # γ, β away from 1, 0; the running mixture after one step
        for i, p in enumerate(eager.parameters()):
            p.add_(0.5 * rand(*p.shape, seed=20 + i, grad=False))
        eager(two_modes(shape[0], shape[1], shape[2] * shape[3], seed=5).reshape(shape))
    target = nk.create("mixture_norm", shape[1], dtype=F64, **kwargs).train()
    target.load_state_dict(eager.state_dict())
    compiled = torch.compile(target, fullgraph=True)
    x = two_modes(shape[0], shape[1], shape[2] * shape[3], seed=1).reshape(shape)
    assert_same_step(eager, compiled, x, seed=2, **TIGHT)
