"""Mixture normalization's compiled form (``normkit.functional.fused_mixture_traced``): the EM fit
and a hand-derived backward written as plain traceable ops, which ``torch.compile`` (inductor)
fuses into one loop per EM step; ``torch.export`` keeps the custom ops.

Run eagerly, the Function must give the plain composition's output and gradients in float64
(one, two — the sigmoid path with ``p_0 = 1 − p_1`` — and three components, batch and running
start with a collapsed channel, with and without ``γ, β``) and pass ``gradcheck`` and
``gradgradcheck``; compiled by inductor, a training step must equal eager's (output, gradients,
running estimates), also at an odd spatial size. Inductor compiles C++: few, tiny cases.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from generic_util import assert_same_step
from normkit.functional.fused_mixture import mixture_plain
from normkit.functional.fused_mixture_traced import mixture_affine_traced, mixture_fit_traced

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5


def rand(*shape: int, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)


def _two_modes(n: int, c: int, s: int, seed: int) -> torch.Tensor:
    """Each channel a mixture of two separated modes, as ``(N, C, 1, S)``."""
    x = rand(n, c, s, seed=seed, grad=False)
    sign = (torch.arange(n, dtype=F64)[:, None, None] % 2) * 5 - 2.5
    return (x + sign + torch.arange(c, dtype=F64)[None, :, None]).reshape(n, c, 1, s)


def _running(k: int, c: int, seed: int) -> torch.Tensor:
    """A running mixture ``(3, K, C)`` whose channel 0 is collapsed (starts from the batch)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(k, c, generator=g, dtype=F64) * 2
    var = torch.rand(k, c, generator=g, dtype=F64) + 0.5
    log_prior = torch.randn(k, c, generator=g, dtype=F64) * 0.3
    mean[:, 0], var[:, 0], log_prior[:, 0] = 0.0, 1.0, 0.0
    return torch.stack((mean, var, log_prior))


def _traced(k: int, iterations: int, running: torch.Tensor | None) -> Any:
    def f(v: torch.Tensor, w: Any, b: Any) -> torch.Tensor:
        stats = mixture_fit_traced(v, k=k, iterations=iterations, eps=EPS,
                                   running=None if running is None else tuple(running.unbind(0)))
        return mixture_affine_traced(v, stats, w, b, eps=EPS)

    return f


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("start", ["batch", "running"])
@pytest.mark.parametrize("affine", [True, False])
def test_traced_function_equals_the_composition(k: int, start: str, affine: bool) -> None:
    v = _two_modes(6, 3, 7, seed=0).requires_grad_()
    w, b = (rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)) if affine else (None, None)
    running = _running(k, 3, seed=3) if start == "running" else None
    y = _traced(k, 3, running)(v, w, b)
    ref = mixture_plain(v, w, b, running, k, 3, EPS)
    assert_close(y, ref, **TIGHT)
    tensors = [t for t in (v, w, b) if t is not None]
    cot = rand(*y.shape, seed=9, grad=False)
    for u, r in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(u, r, **TIGHT)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("start", ["batch", "running"])
def test_traced_gradcheck_and_second_derivatives(k: int, start: str) -> None:
    f = _traced(k, 2, _running(k, 2, seed=4) if start == "running" else None)
    args = (rand(4, 2, 1, 3, seed=0), rand(1, 2, 1, 1, seed=1), rand(1, 2, 1, 1, seed=2))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


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
        eager(_two_modes(shape[0], shape[1], shape[2] * shape[3], seed=5).reshape(shape))
    target = nk.create("mixture_norm", shape[1], dtype=F64, **kwargs).train()
    target.load_state_dict(eager.state_dict())
    compiled = torch.compile(target, fullgraph=True)
    x = _two_modes(shape[0], shape[1], shape[2] * shape[3], seed=1).reshape(shape)
    assert_same_step(eager, compiled, x, seed=2, **TIGHT)
