"""``Function.apply`` without torch's per-call argument binding (eager per-call overhead).

``torch.autograd.Function.apply`` of a Function that defines ``setup_context`` binds its
arguments to ``forward``'s signature on every call (``inspect.signature(...).bind``, to fill
defaults): ~35 µs on this CPU, more than an eigendecomposition of a small covariance. When every
argument of ``forward`` is passed positionally that binding returns them unchanged, so
:func:`apply_bound` skips it and takes the rest of ``apply``'s eager path as is (dead functorch
wrappers unwrapped, then the C ``apply``). Under ``torch.compile`` / ``torch.export`` and inside
``torch.func`` transforms it calls ``fn.apply`` itself: traced graphs and functorch's
``custom_function_call`` route are unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch._functorch.utils import unwrap_dead_wrappers

__all__ = ["apply_bound"]

# Function class -> number of parameters of its ``forward`` (``None``: has *args / **kwargs)
_ARITY: dict[type, int | None] = {}


def _arity(fn: type[torch.autograd.Function]) -> int | None:
    n = _ARITY.get(fn, -1)
    if n == -1:
        params = inspect.signature(fn.forward).parameters.values()
        plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        n = _ARITY.setdefault(fn, len(params) if plain else None)
    return n


def apply_bound(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)``; eager, with every parameter of ``fn.forward`` given positionally, without
    re-binding the arguments to its signature (what ``apply`` does per call when ``fn`` defines
    ``setup_context``).

    Example:
        >>> class Double(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(x): return 2 * x
        ...     @staticmethod
        ...     def setup_context(ctx, inputs, output): pass
        ...     @staticmethod
        ...     def backward(ctx, g): return 2 * g
        >>> x = torch.ones(2, requires_grad=True)
        >>> apply_bound(Double, x).sum().backward(); x.grad
        tensor([2., 2.])
    """
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _arity(fn) != len(args)):
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*unwrap_dead_wrappers(args))  # type: ignore[misc]
