r"""Eager calls of normkit's custom ops without ``torch.library``'s per-call overhead.

A ``torch.library.custom_op`` with ``register_autograd`` is what ``torch.compile`` and
``torch.export`` must see: one node, a fake kernel, the registered autograd. Called eagerly it
costs, per call, the dispatcher's schema binding of every argument (``fill_defaults`` rebuilds the
argument list once per argument before ``setup_context``), a generated ``autograd.Function``
around a redispatch of the op, an aliasing check of its outputs, and in the backward a second
dispatcher round trip for the backward op: 0.1–0.4 ms of a ``(128, 64, 16, 16)`` training step.

:func:`eager_op` registers an op's autograd once and returns the callable the op's public function
calls instead of the op:

* the op itself wherever the dispatcher is needed: under ``torch.compile`` / ``torch.export``
  (dynamo, fake tensors), ``torch.jit`` tracing, ``torch.func`` transforms, any
  ``__torch_dispatch__`` or ``__torch_function__`` mode or tensor subclass, meta tensors,
  autocast, and any other non-default dispatch state (``inference_mode``, a region below
  autograd): exactly today's path, the op's registered autograd included;
* otherwise one ``autograd.Function`` per op whose ``forward`` runs the op's Python
  implementation below autograd, as the op's own autograd kernel does, then the op's
  ``setup_context``, and whose ``backward`` is the op's backward function with its backward op's
  implementation passed in (``backward=``: the function's default is the backward op, what the
  registered autograd calls);
* the implementation itself, below autograd, when no gradient is recorded (grad mode off, or no
  input requires grad): what the op's autograd kernel redispatches to.

The same implementation, setup and backward run in every case, so the outputs, gradients, saved
tensors (and so version-counter checks), ``requires_grad`` of the outputs and errors are the
op's; only the dispatcher's bookkeeping is skipped.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["eager_op", "force_ops"]

_C = torch._C
_PLAIN = (Tensor, torch.nn.Parameter)
_force_ops = False


@functools.cache
def _default_tls() -> tuple[int, int]:
    """The dispatcher's thread-local include and exclude key sets of a fresh thread (autocast off,
    no mode, no functorch layer, autograd on), as raw bits; read once, at the first eager call
    (not at import: no thread started by importing normkit)."""
    out: list[int] = []

    def read() -> None:
        out.extend((_C._dispatch_tls_local_include_set().raw_repr(),
                    _C._dispatch_tls_local_exclude_set().raw_repr()))

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    return out[0], out[1]


def _needs_dispatcher(args: tuple[Any, ...]) -> bool:
    """Whether a call with ``args`` must go through the op (see the module docstring)."""
    if (_force_ops or torch.compiler.is_compiling() or _C._is_tracing()
            or _C._are_functorch_transforms_active() or _C._len_torch_dispatch_stack() > 0
            or _C._has_torch_function(args)
            or (_C._dispatch_tls_local_include_set().raw_repr(),
                _C._dispatch_tls_local_exclude_set().raw_repr()) != _default_tls()):
        return True
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.is_meta):
            return True
    return False


class force_ops:  # noqa: N801 (a context manager used like a function)
    """Within this context every :func:`eager_op` callable calls its op, as compiled and exported
    code does (the reference path in tests and paired benchmarks). Not thread-safe: it sets a
    module flag.

    Example:
        >>> from normkit.functional.fused_whiten import sample_zca_apply, sample_zca_fit
        >>> x = torch.randn(3, 1, 2, 6, requires_grad=True)
        >>> stats = sample_zca_fit(x, ("G", "G", "D", "M"), 1e-5)[2:]
        >>> type(sample_zca_apply(x, stats, roles=("G", "G", "D", "M")).grad_fn).__name__
        'Eager_normkit_whiten_sample_applyBackward'
        >>> with force_ops():
        ...     y = sample_zca_apply(x, stats, roles=("G", "G", "D", "M"))
        >>> type(y.grad_fn).__name__
        'GeneratedBackwardFor_normkit_whiten_sample_apply_defaultBackward'
    """

    def __enter__(self) -> None:
        global _force_ops
        self._prev = _force_ops
        _force_ops = True

    def __exit__(self, *exc: object) -> None:
        global _force_ops
        _force_ops = self._prev


def eager_op(op: Any, impl: Callable[..., Any], *, setup_context: Callable[..., None],
             backward: Callable[..., Any], backward_impl: Callable[..., Any] | None = None
             ) -> Callable[..., Any]:
    """Register ``backward`` / ``setup_context`` as ``op``'s autograd and return the callable to
    use for ``op`` (see the module docstring).

    Args:
        op: a ``torch.library.custom_op`` (a ``CustomOpDef``) whose implementation is ``impl``.
        impl: the op's Python implementation (the function the op was defined from).
        setup_context, backward: as for ``op.register_autograd``; ``backward`` may take a keyword
            ``backward`` (default: the backward op) through which the eager path passes
            ``backward_impl``.
        backward_impl: the backward op's Python implementation, or ``None`` when ``backward``
            calls no op.

    Example (as :mod:`normkit.functional.fused_whiten` declares ``normkit::whiten_sample_apply``)::

        def _apply_impl(x, ...): ...            # the implementation
        _apply = torch.library.custom_op("normkit::whiten_sample_apply", _apply_impl,
                                         mutates_args=())
        def _apply_backward_impl(grad, ...): ...
        _apply_backward = torch.library.custom_op("normkit::whiten_sample_apply_backward",
                                                  _apply_backward_impl, mutates_args=())
        def _apply_grad(ctx, grad, backward=_apply_backward): ...  # calls backward(...)
        _apply_call = eager_op(_apply, _apply_impl, setup_context=_apply_setup,
                               backward=_apply_grad, backward_impl=_apply_backward_impl)

    (fake kernels registered on ``_apply`` and ``_apply_backward`` as usual); the public
    function calls ``_apply_call``. :func:`force_ops` shows both paths.
    """
    op.register_autograd(backward, setup_context=setup_context)
    extra = {} if backward_impl is None else {"backward": backward_impl}

    def forward(ctx, *args):  # type: ignore[no-untyped-def]
        with _C._AutoDispatchBelowAutograd():
            out = impl(*args)
            setup_context(ctx, args, out)
        return out

    def run_backward(ctx, *grads):  # type: ignore[no-untyped-def]
        return backward(ctx, *grads, **extra)

    name = "Eager_" + op._qualname.replace("::", "_")
    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(run_backward)})

    def call(*args: Any) -> Any:
        if _needs_dispatcher(args):
            return op(*args)
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return function.apply(*args)
        with _C._AutoDispatchBelowAutograd():
            return impl(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = (f"``{op._qualname}`` in eager mode without the dispatcher "
                    "(see normkit.functional._eager_ops).")
    return call
