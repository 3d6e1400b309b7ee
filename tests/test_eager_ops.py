"""Eager calls of the whitening custom ops skip the dispatcher
(:mod:`normkit.functional._eager_ops`, normkit issue 20): the eager ``autograd.Function`` path
gives the op path's values and gradients bit for bit (the same implementation, setup and backward
run on the same values), the op is still what ``torch.compile`` and ``torch.export`` see (one
node), and every dispatch state that needs the dispatcher (autocast, meta tensors, modes,
subclasses, ``torch.func``, ``inference_mode``) keeps the op.

``force_ops()`` routes the calls through the ops themselves: the path of the code before this
change, the reference here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from generic_util import gen
from normkit.functional import fused_switch_whiten as FS
from normkit.functional import fused_whiten as FW
from normkit.functional import whiten as W
from normkit.functional import whiten_ops as WO
from normkit.functional._eager_ops import force_ops

F64 = torch.float64


def _rand(*shape: int, seed: int, grad: bool = True, offset: float = 0.0) -> Tensor:
    return (torch.randn(shape, generator=gen(seed), dtype=F64) + offset).requires_grad_(grad)


# Each case: (the ops it calls, a function of its differentiable inputs, the inputs).
def _moments_apply() -> tuple[tuple[str, ...], Callable[..., Tensor], tuple[Tensor, ...]]:
    roles = ("G", "D", "M", "M")

    def f(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        _, cov, centered = WO.whiten_moments(x, shared=False, roles=roles)
        w = W.whitening_matrix(cov.flatten(0, 1), "cholesky", eps=1e-3).reshape(cov.shape)
        return WO.whiten_with_gradient(x, centered, w, shared=False, roles=roles,
                                       weight=weight, bias=bias)

    return (("whiten_moments", "whiten_apply"),
            f, (_rand(2, 3, 2, 2, seed=1, offset=0.5), _rand(1, 1, 3, 1, seed=2, offset=2.0),
                _rand(1, 1, 3, 1, seed=3)))


def _sample_zca(post: bool) -> tuple[tuple[str, ...], Callable[..., Tensor], tuple[Tensor, ...]]:
    roles = ("G", "D", "M", "M") if post else ("G", "G", "D", "M")
    shape = (2, 3, 2, 2) if post else (3, 1, 2, 6)

    def f(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        with torch.no_grad():
            _, _, xc, fv, u, w = FW.sample_zca_fit(x, roles, 1e-3)
        kw = ({"post_weight": weight, "post_bias": bias} if post
              else {"weight": weight, "bias": bias})
        return FW.sample_zca_apply(x, (xc, fv, u, w), roles=roles, **kw)

    pshape = (1, 3, 2, 1) if post else (1, 1, 2, 1)
    return (("whiten_sample_fit", "whiten_sample_apply"),
            f, (_rand(*shape, seed=4), _rand(*pshape, seed=5, offset=2.0),
                _rand(*pshape, seed=6)))


def _switch() -> tuple[tuple[str, ...], Callable[..., Tensor], tuple[Tensor, ...]]:
    def f(x: Tensor, logits: Tensor, mean_coef: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        coef = torch.softmax(logits, 0)
        with torch.no_grad():
            xt, ci, delta, _, cb, fv, u, w = FS.switch_whiten_fit(x, coef, 1e-3)
        return FS.switch_whiten_apply(x, (xt, ci, delta, cb, fv, u, w), mean_coef, coef,
                                      weight=weight, bias=bias)

    return (("switch_whiten_fit", "switch_whiten_apply"),
            f, (_rand(4, 1, 2, 5, seed=7), _rand(4, seed=8),
                torch.tensor(0.3, dtype=F64, requires_grad=True),
                _rand(1, 1, 2, 1, seed=9, offset=2.0), _rand(1, 1, 2, 1, seed=10)))


CASES = {"moments_apply": _moments_apply, "sample_zca": lambda: _sample_zca(False),
         "sample_zca_post": lambda: _sample_zca(True), "switch": _switch}
cases = pytest.mark.parametrize("name", list(CASES))


def _run(f: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    y = f(*inputs)
    cot = torch.randn(y.shape, generator=gen(11), dtype=y.dtype)
    return (y.detach(), *torch.autograd.grad(y, inputs, cot))


@cases
def test_eager_path_equals_op_path(name: str) -> None:
    """The eager Function runs (its grad_fn, not torch.library's generated one) and gives the op
    path's output and input/parameter gradients bit for bit, in float64."""
    _, f, inputs = CASES[name]()
    y = f(*inputs)
    assert type(y.grad_fn).__name__.startswith("Eager_normkit_"), y.grad_fn
    assert not y._is_view()
    with force_ops():
        assert type(f(*inputs).grad_fn).__name__.startswith("GeneratedBackwardFor_normkit_")
        want = _run(f, inputs)
    got = _run(f, inputs)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@cases
def test_eager_path_gradcheck(name: str) -> None:
    """float64 gradcheck of the eager path w.r.t. every input and parameter."""
    _, f, inputs = CASES[name]()
    assert gradcheck(f, inputs)


@cases
def test_second_derivative_raises_on_both_paths(name: str) -> None:
    """The backwards are first order: ``create_graph=True`` raises the same error either way."""
    _, f, inputs = CASES[name]()
    for ctx in (contextlib.nullcontext(), force_ops()):
        with ctx:
            y = f(*inputs)
            with pytest.raises(RuntimeError, match="first-order only"):
                torch.autograd.grad(y.square().sum(), inputs[0], create_graph=True)


@cases
def test_no_grad_and_saved_input_versions(name: str) -> None:
    """Without a graph both paths give the same values and no grad_fn; an input modified in
    place after the forward makes the backward raise on both paths where the op saves it (not
    ``whiten_moments`` / ``whiten_apply``, which save ``x − μ``: the same gradients then)."""
    _, f, inputs = CASES[name]()
    with torch.no_grad():
        a = f(*inputs)
        with force_ops():
            b = f(*inputs)
    assert a.grad_fn is None and not a.requires_grad and torch.equal(a, b)
    outcomes = []
    for ctx in (contextlib.nullcontext(), force_ops()):
        with ctx:
            x = inputs[0] * 1.0  # a non-leaf
            y = f(x, *inputs[1:])
            x.add_(1.0)
            try:
                outcomes.append(torch.autograd.grad(y.sum(), inputs[0]))
            except RuntimeError as e:
                assert "modified by an inplace operation" in str(e)
                outcomes.append(None)
    if name == "moments_apply":
        assert torch.equal(outcomes[0][0], outcomes[1][0])
    else:
        assert outcomes == [None, None]


def test_fit_outputs_are_constants_on_both_paths() -> None:
    """The fit ops' outputs never require grad, even with grad mode on and a differentiable
    input (``mark_non_differentiable`` in their setup)."""
    x = _rand(3, 1, 2, 6, seed=12)
    coef = torch.full((4,), 0.25, dtype=F64, requires_grad=True)
    for ctx in (contextlib.nullcontext(), force_ops()):
        with ctx:
            outs = (*FW.sample_zca_fit(x, ("G", "G", "D", "M"), 1e-3),
                    *FS.switch_whiten_fit(x, coef, 1e-3), *WO.whiten_moments(x, shared=True)[::2])
        assert not any(t.requires_grad for t in outs)


# ------------------------------------------------------------- states that keep the op
class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


class _Sub(Tensor):
    """A ``__torch_function__`` subclass (inherits Tensor's)."""


def _node(y: Tensor) -> str:
    """The name of the autograd node that made ``y`` (behind a subclass's alias)."""
    fn = y.grad_fn
    while type(fn).__name__ == "AliasBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__


@cases
def test_dispatch_states_keep_the_op(name: str) -> None:
    """Autocast, a torch-function mode, a tensor subclass and meta tensors take the op (its
    generated autograd); a dispatch mode sees the op as one call."""
    ops, f, inputs = CASES[name]()
    generated = "GeneratedBackwardFor_normkit_"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _node(f(*inputs)).startswith(generated)
    with _Passthrough():
        assert _node(f(*inputs)).startswith(generated)
    sub = inputs[0].detach().as_subclass(_Sub).requires_grad_()
    assert _node(f(sub, *inputs[1:])).startswith(generated)
    meta = [t.detach().to("meta").requires_grad_() for t in inputs]
    if name != "moments_apply":  # W(Σ)'s Cholesky has no meta kernel; the ops do
        assert _node(f(*meta)).startswith(generated)
    with _Recorder() as rec:
        f(*inputs)
    assert all(f"normkit.{op}.default" in rec.seen for op in ops), rec.seen
    with torch.inference_mode():
        a = f(*inputs)
    assert torch.equal(a, f(*inputs).detach())


# -------------------------------------------------------------- compile / export / func
def _graph_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The normkit ops called in ``gm`` and its submodules (export puts a ``no_grad`` region in
    a submodule)."""
    return [str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("normkit.")]


@cases
def test_compile_and_export_see_one_op_node_each(name: str) -> None:
    """``torch.compile(fullgraph=True)``'s dynamo graph and ``torch.export``'s graph hold each op
    as one node (the eager Function never reaches a trace)."""
    ops, f, inputs = CASES[name]()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    assert torch.equal(compiled(*inputs).detach(), f(*inputs).detach())
    found = _graph_ops(graphs[0])
    assert sorted(found) == sorted(f"normkit.{op}.default" for op in ops), found

    class M(torch.nn.Module):
        def forward(self, *args: Tensor) -> Tensor:
            return f(*args)

    ep = torch.export.export(M(), tuple(t.detach() for t in inputs))
    found = _graph_ops(ep.graph_module)
    assert sorted(found) == sorted(f"normkit.{op}.default" for op in ops), found


@cases
def test_torch_func_behaves_as_the_op(name: str) -> None:
    """Under ``torch.func.grad`` the call goes to the op, as before: the same outcome (values
    or the same error) with and without ``force_ops``."""
    _, f, inputs = CASES[name]()

    def loss(x: Tensor) -> Tensor:
        return f(x, *(t.detach() for t in inputs[1:])).square().sum()

    outcomes = []
    for ctx in (contextlib.nullcontext(), force_ops()):
        with ctx:
            try:
                outcomes.append(torch.func.grad(loss)(inputs[0].detach()))
            except Exception as e:  # noqa: BLE001 (the outcome compared is the error itself)
                outcomes.append((type(e), str(e)))
    a, b = outcomes
    assert (torch.equal(a, b) if isinstance(a, Tensor) else a == b), outcomes
