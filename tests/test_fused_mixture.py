"""Mixture normalization's fused training step (``normkit.functional.fused_mixture``) against
the plain composition (``native=False``: EM unrolled in autograd).

The Function must give the composition's output, every gradient (input, ``γ``, ``β``) and the
same running estimates (float64, tight) for one, two (the sigmoid path) and three components,
from the batch start and from a running start with a collapsed channel; pass ``gradcheck`` and
``gradgradcheck``; leave evaluation as it was; and save no more than the input's size beyond the
input (the unrolled composition saves ``(iterations + 1)·K`` times it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit._bench.timing import saved_bytes
from normkit.functional import fused_mixture
from normkit.functional.fused_mixture import mixture_plain
from normkit.functional.fused_mixture_ops import mixture_affine, mixture_fit

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5


def rand(*shape: int, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)


def _two_modes(n: int, c: int, s: int, seed: int) -> torch.Tensor:
    """Each channel a mixture of two well separated modes (EM has something to fit)."""
    x = rand(n, c, s, seed=seed, grad=False)
    sign = torch.where(torch.arange(n)[:, None, None] % 2 == 0, -1.0, 1.0).to(F64)
    return (x + 3 * sign + torch.arange(c, dtype=F64)[None, :, None]).requires_grad_()


def _running(k: int, c: int, seed: int) -> torch.Tensor:
    """A running mixture ``(3, K, C)`` whose channel 0 is collapsed (starts from the batch)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(k, c, generator=g, dtype=F64) * 2
    var = torch.rand(k, c, generator=g, dtype=F64) + 0.5
    log_prior = torch.randn(k, c, generator=g, dtype=F64) * 0.3
    mean[:, 0], var[:, 0], log_prior[:, 0] = 0.0, 1.0, 0.0
    return torch.stack((mean, var, log_prior))


def _fused(k: int, iterations: int, running: torch.Tensor | None) -> Any:
    def f(v: torch.Tensor, w: Any, b: Any) -> torch.Tensor:
        stats = mixture_fit(v, k=k, iterations=iterations, eps=EPS,
                            running=None if running is None else tuple(running.unbind(0)))
        return mixture_affine(v, stats, w, b, eps=EPS)

    return f


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("start", ["batch", "running"])
@pytest.mark.parametrize("affine", [True, False])
def test_function_equals_the_composition(k: int, start: str, affine: bool) -> None:
    v = _two_modes(6, 3, 5, seed=0).reshape(6, 3, 1, 5).detach().requires_grad_()
    w, b = (rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)) if affine else (None, None)
    running = _running(k, 3, seed=3) if start == "running" else None
    y = _fused(k, 3, running)(v, w, b)
    ref = mixture_plain(v, w, b, running, k, 3, EPS)
    assert_close(y, ref, **TIGHT)
    tensors = [t for t in (v, w, b) if t is not None]
    cot = rand(*y.shape, seed=9, grad=False)
    for u, r in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(u, r, **TIGHT)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("start", ["batch", "running"])
def test_function_gradcheck_and_second_derivatives(k: int, start: str) -> None:
    f = _fused(k, 2, _running(k, 2, seed=4) if start == "running" else None)
    args = (rand(4, 2, 1, 3, seed=0), rand(1, 2, 1, 1, seed=1), rand(1, 2, 1, 1, seed=2))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def test_per_value_affine_is_applied_after_the_function() -> None:
    v = rand(4, 3, 1, 5, seed=0)
    w, b = rand(4, 3, 1, 5, seed=1), rand(1, 3, 1, 5, seed=2)  # not per channel
    y = _fused(2, 2, None)(v, w, b)
    ref = mixture_plain(v, w, b, None, 2, 2, EPS)
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=9, grad=False)
    for u, r in zip(torch.autograd.grad(y, (v, w, b), cot),
                    torch.autograd.grad(ref, (v, w, b), cot), strict=True):
        assert_close(u, r, **TIGHT)


def _nodes(y: torch.Tensor) -> set[str]:
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        todo.extend(f for f, _ in node.next_functions)
    return seen


def _pair(**kw: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    fused = nk.create("mixture_norm", 3, dtype=F64, **kw)
    with torch.no_grad():
        fused.weight.copy_(rand(3, seed=5, grad=False) * 0.5 + 1)
        fused.bias.copy_(rand(3, seed=6, grad=False) * 0.5)
    plain = nk.create("mixture_norm", 3, dtype=F64, native=False, **kw)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("k", [1, 2, 3])
def test_module_trains_through_the_function_as_the_composition(k: int) -> None:
    """Two training steps (the second warm-starts EM from the running mixture) and evaluation:
    outputs, gradients and running estimates equal the composition's."""
    fused, plain = _pair(num_components=k, iterations=3)
    for step in range(2):
        x = _two_modes(6, 3, 8, seed=10 + step).reshape(6, 3, 2, 4).detach().requires_grad_()
        x2 = x.detach().requires_grad_()
        y, ref = fused(x), plain(x2)
        if k > 1:
            assert "_MixtureBackward" in _nodes(y) and "_MixtureBackward" not in _nodes(ref)
        assert_close(y, ref, **TIGHT)
        cot = rand(*y.shape, seed=20 + step, grad=False)
        got = torch.autograd.grad(y, (x, fused.weight, fused.bias), cot)
        want = torch.autograd.grad(ref, (x2, plain.weight, plain.bias), cot)
        for u, r in zip(got, want, strict=True):
            assert_close(u, r, **TIGHT)
        for name, buf in plain.named_buffers():
            assert_close(dict(fused.named_buffers())[name], buf, **TIGHT)
    fused.eval()
    plain.eval()
    x = rand(5, 3, 2, 4, seed=30)
    assert_close(fused(x), plain(x), **TIGHT)


def test_float32_close_to_the_composition() -> None:
    """The Function's raw second moments (``Σpz²/n − μ²``) in float32 stay within float32's
    accumulation error of the composition's centred ones on two-mode data."""
    x = _two_modes(16, 4, 64, seed=0).reshape(16, 4, 8, 8).float().detach().requires_grad_()
    fused = nk.create("mixture_norm", 4)
    plain = nk.create("mixture_norm", 4, native=False)
    y, ref = fused(x), plain(x)
    assert_close(y, ref, rtol=1e-4, atol=1e-4)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    assert_close(torch.autograd.grad(y, x, cot)[0], torch.autograd.grad(ref, x, cot)[0],
                 rtol=1e-3, atol=1e-4)


def test_saves_at_most_the_input_size_beyond_the_input() -> None:
    """Beyond the input: the centred input and statistics (the trajectory, ``4·4·C·K`` values,
    no more than the ``N·C`` the benchmark counts as statistics)."""
    x = torch.randn(64, 4, 4, 4)
    fused = saved_bytes(nk.create("mixture_norm", 4), x, stats_numel=64 * 4)
    plain = saved_bytes(nk.create("mixture_norm", 4, native=False), x, stats_numel=64 * 4)
    assert fused["saved_extra_bytes"] - fused["saved_stats_bytes"] <= x.nbytes
    assert plain["saved_extra_bytes"] > 4 * x.nbytes  # what the Function avoids


@pytest.mark.parametrize("shape", [(8, 2, 4, 4), (2, 2, 40, 40), (130, 2), (6, 2, 40)],
                         ids=["runs_of_samples", "runs_within_a_sample", "one_run_2d", "one_run_3d"])
@pytest.mark.parametrize("k", [2, 3])
def test_contractions_in_runs_equal_the_composition(shape: tuple[int, ...], k: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Contractions over a channel's values run in pieces (runs of whole samples, runs within a
    sample, or one run where no divisor fits; runs of at most 64 values here, so that tiny
    shapes have several): the same output and gradients."""
    monkeypatch.setattr(fused_mixture, "RUN", 64)
    fused, plain = _pair(num_components=k, iterations=2)
    x = rand(*shape[:1], 3, *shape[2:], seed=0) if len(shape) > 2 else rand(shape[0], 3, seed=0)
    x2 = x.detach().requires_grad_()
    y, ref = fused(x), plain(x2)
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=1, grad=False)
    for u, r in zip(torch.autograd.grad(y, (x, fused.weight), cot),
                    torch.autograd.grad(ref, (x2, plain.weight), cot), strict=True):
        assert_close(u, r, **TIGHT)


@pytest.mark.filterwarnings(  # inductor imports torch's own deprecated jit.script_method
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
def test_compiled_runs_the_custom_ops_as_eager(dynamo_reset: None) -> None:
    """``torch.compile(fullgraph=True)`` runs the traceable form
    (:mod:`normkit.functional.fused_mixture_traced`): the same output, gradients and running
    estimates as the eager Function (inductor, float64)."""
    eager, _ = _pair(num_components=2, iterations=2)
    target, _ = _pair(num_components=2, iterations=2)
    compiled = torch.compile(target, fullgraph=True)
    x = _two_modes(4, 3, 16, seed=0).reshape(4, 3, 4, 4).detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    y, ref = compiled(x), eager(x2)
    assert_close(y, ref, **TIGHT)
    cot = rand(*y.shape, seed=1, grad=False)
    for u, r in zip(torch.autograd.grad(y, (x, target.weight, target.bias), cot),
                    torch.autograd.grad(ref, (x2, eager.weight, eager.bias), cot), strict=True):
        assert_close(u, r, **TIGHT)
    for (name, a), (_, b) in zip(target.named_buffers(), eager.named_buffers(), strict=True):
        assert_close(a, b, **TIGHT, msg=lambda e, name=name: f"{name}: {e}")
