"""The stability constant of a normalization: its default and its check.

The stateless composition that was here (``normalize``) drives a partition and an operation; it
is :func:`normkit.normalize` now (:mod:`normkit._pipeline`). ``normkit.functional.normalize``
stays as a deprecated alias, installed by the package (:mod:`normkit._deprecated`) so that
nothing here imports upward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["check_eps", "default_eps"]


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
