"""Mixture normalization's fused training step (``normkit.functional.fused_mixture``) against
the plain composition (``native=False``: EM unrolled in autograd).

The Function (and, run eagerly, the traceable one ``torch.compile`` runs,
``normkit.functional.fused_mixture_traced``) must give the composition's output, every gradient (input, ``γ``, ``β``) and the
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
from mixture_util import EPS, F64, TIGHT, rand, running_mixture, two_modes
from normkit._bench.timing import saved_bytes
from normkit.functional import fused_mixture
from normkit.functional.fused_mixture import mixture_plain
from normkit.functional.fused_mixture_ops import mixture_affine, mixture_fit
from normkit.functional.fused_mixture_traced import mixture_affine_traced, mixture_fit_traced

# the eager Function and the traceable one torch.compile runs (fused_mixture_traced), run eagerly
FORMS = {"fused": (mixture_fit, mixture_affine), "traced": (mixture_fit_traced, mixture_affine_traced)}


def _fused(k: int, iterations: int, running: torch.Tensor | None, form: str = "fused") -> Any:
    fit, affine = FORMS[form]

    def f(v: torch.Tensor, w: Any, b: Any) -> torch.Tensor:
        stats = fit(v, k=k, iterations=iterations, eps=EPS,
                    running=None if running is None else tuple(running.unbind(0)))
        return affine(v, stats, w, b, eps=EPS)

    return f


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("start", ["batch", "running"])
@pytest.mark.parametrize("affine", [True, False])
def test_function_equals_the_composition(form: str, k: int, start: str, affine: bool) -> None:
    v = two_modes(6, 3, 7, seed=0).reshape(6, 3, 1, 7).requires_grad_()
    w, b = (rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)) if affine else (None, None)
    running = running_mixture(k, 3, seed=3) if start == "running" else None
    y = _fused(k, 3, running, form)(v, w, b)
    ref = mixture_plain(v, w, b, running, k, 3, EPS)
    assert_close(y, ref, **TIGHT)
    tensors = [t for t in (v, w, b) if t is not None]
    cot = rand(*y.shape, seed=9, grad=False)
    for u, r in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(u, r, **TIGHT)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("start", ["batch", "running"])
def test_function_gradcheck_and_second_derivatives(form: str, k: int, start: str) -> None:
    f = _fused(k, 2, running_mixture(k, 2, seed=4) if start == "running" else None, form)
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
        x = two_modes(6, 3, 8, seed=10 + step).reshape(6, 3, 2, 4).detach().requires_grad_()
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
    x = two_modes(16, 4, 64, seed=0).reshape(16, 4, 8, 8).float().detach().requires_grad_()
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
def test_exported_graph_runs_the_custom_ops(dynamo_reset: None) -> None:
    """``torch.export`` of a training step keeps the fit and the apply as one custom op each
    (``torch.compile`` runs the traceable form instead: tests/test_fused_mixture_traced.py), with
    the eager Function's output and running estimates."""
    eager, _ = _pair(num_components=2, iterations=2)
    target, _ = _pair(num_components=2, iterations=2)
    x = two_modes(4, 3, 16, seed=0).reshape(4, 3, 4, 4)
    program = torch.export.export(target, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "normkit.mixture_fit.default" in ops and "normkit.mixture_apply.default" in ops, ops
    exported = program.module()
    assert_close(exported(x), eager(x), **TIGHT)
    for (name, a), (_, b) in zip(exported.named_buffers(), eager.named_buffers(), strict=True):
        assert_close(a, b, **TIGHT, msg=lambda e, name=name: f"{name}: {e}")
