"""The stability constant of a normalization: its default and its check.

The stateless composition that was here (``normalize``) drives a partition and an operation; it
is :func:`normkit.normalize` now (:mod:`normkit._pipeline`), with deprecated aliases here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["check_eps", "default_eps", "normalize"]


def default_eps(dtype: torch.dtype) -> float:
    """``eps=None``: the machine epsilon of the computation (opmath) type, as ``torch.nn.RMSNorm``
    — ``torch.finfo(torch.float32).eps`` for float16, bfloat16 and float32 inputs,
    ``torch.finfo(torch.float64).eps`` for float64 ones.

    Example:
        >>> default_eps(torch.float16) == torch.finfo(torch.float32).eps
        True
    """
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def check_eps(eps: float, nop: Any) -> None:
    """Raise :class:`ConfigError` unless ``eps`` is finite, ≥ 0, and > 0 where ``nop`` divides."""
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps == 0 and getattr(nop, "uses_eps", False):
        raise ConfigError(
            f"eps=0 with {nop!r} divides by zero on constant input; use a small eps such as 1e-5"
        )


def normalize(x: Tensor, **kw: Any) -> Tensor:
    """Deprecated alias of :func:`normkit.normalize` (the functional form moved up with the
    pipeline it runs, :mod:`normkit._pipeline`; ``functional`` is pure tensor math)."""
    import warnings

    from .._pipeline import normalize as moved

    warnings.warn("normkit.functional.normalize is deprecated; use normkit.normalize",
                  DeprecationWarning, stacklevel=2)
    return moved(x, **kw)
