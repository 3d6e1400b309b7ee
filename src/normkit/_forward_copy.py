"""A class's own copy of an inherited ``forward``, for ``torch.compile``'s per-code-object cache.

``torch.compile`` caches compiled graphs per code object and recompiles at most
``torch._dynamo.config.recompile_limit`` (8) times per code object; past it, a ``fullgraph=True``
compile raises ``FailOnRecompileLimitHit`` and any other runs eagerly. Every preset of
:class:`~normkit.Normalization` (GhostBatchNorm, EvoNormS0, …) would otherwise share the base
``forward``'s code, so compiling a ninth different preset on its own (``torch.compile(layer)``)
in one process would fail, where torch's layers, each with its own ``forward``, do not. With a
copy per class the limit counts per class, as for torch's layers (same bytecode, behaviour and
traceback lines; only the qualified name differs). Compiling a whole model is not affected
either way (its layers are inlined into the model's frame).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ["copied", "forward_copy"]


def forward_copy(base: Callable[..., Any], cls: type) -> Callable[..., Any]:
    """``base`` (a function) with a code object of its own, named ``<cls>.forward``, marked
    :func:`copied` (a subclass of ``cls`` that inherits it gets a copy again).

    Example:
        >>> def forward(self, x):
        ...     return x
        >>> class A:
        ...     pass
        >>> f = forward_copy(forward, A)
        >>> f.__code__ is forward.__code__, f(None, 3), f.__qualname__, copied(f)
        (False, 3, 'A.forward', True)
    """
    code = base.__code__
    if hasattr(code, "co_qualname"):  # Python 3.11+
        code = code.replace(co_qualname=f"{cls.__qualname__}.forward")
    else:  # a fresh code object all the same
        code = code.replace(co_consts=tuple(code.co_consts))
    fn = types.FunctionType(code, base.__globals__, base.__name__,  # type: ignore[attr-defined]
                            base.__defaults__, base.__closure__)  # type: ignore[attr-defined]
    fn.__kwdefaults__ = base.__kwdefaults__  # type: ignore[attr-defined]
    fn.__doc__, fn.__module__ = base.__doc__, base.__module__
    fn.__qualname__ = f"{cls.__qualname__}.forward"
    fn.__annotations__ = dict(base.__annotations__)
    fn._normkit_copy = True  # type: ignore[attr-defined]
    return fn


def copied(fn: Any) -> bool:
    """Whether ``fn`` was made by :func:`forward_copy`."""
    return bool(getattr(fn, "_normkit_copy", False))
