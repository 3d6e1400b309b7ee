"""The stateless composition: normalize a tensor with a partition, an operation and an affine.

This is what :class:`normkit.Normalization` runs on batch statistics, exposed as a pure function
that works under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .partition import canonical_view, check_input, narrow_channels, pad_channels, restore_view
from .standardize import affine_transform

__all__ = ["normalize", "apply_normalization", "check_eps", "check_spread", "default_eps"]


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


def check_spread(shape: Sequence[int], m: int, nap: Any, nop: Any) -> None:
    """Raise :class:`ShapeError` when a variance-like statistic would be taken over one value
    (torch's rule for batch statistics, in training and in eval without running estimates)."""
    if m <= 1 and nop.needs_spread:
        where = "spatial element" if nap.roles[0] == "G" and nap.roles[1] == "G" else "value"
        raise ShapeError(
            f"Expected more than 1 {where} per statistic when using batch statistics, got input "
            f"of shape {tuple(shape)} ({m} sample per {type(nap).__name__} group for {nop!r}); "
            f"use a larger batch or spatial size, or running statistics (track_running_stats "
            f"and .eval())"
        )


def apply_normalization(
    x: Tensor,
    v: Tensor,
    stats: dict[str, Tensor],
    *,
    nop: Any,
    nap: Any,
    eps: float,
    m: int,
    weight: Tensor | None,
    bias: Tensor | None,
    channel_axis: int,
) -> Tensor:
    """Apply fitted (or running) ``stats`` and the recovery to the canonical view ``v`` of ``x``.

    ``weight``/``bias`` are already viewed against ``v`` (``(1, A, B, 1)`` or broadcastable).
    Returns a tensor shaped and typed like ``x``.
    """
    out = nop.transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
    return restore_view(out.to(x.dtype), x.shape, channel_axis)


def normalize(
    x: Tensor,
    *,
    nap: Any,
    nop: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> Tensor:
    r"""Normalize ``x`` with batch statistics: ``y = nop(x over nap's area) · weight + bias``.

    Args:
        x: input ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)`` (``-1``).
        nap: a :mod:`normkit.nap` partition (``Batch()``, ``Group(num_groups=8)``, ...).
        nop: a :mod:`normkit.nop` operation (``Standardize()``, ``Scale("rms")``, ...).
        weight, bias: optional per-channel ``(C,)`` affine recovery (or any shape broadcastable
            against the canonical ``(N, A, B, S)`` view).
        eps: added inside the square root (or to the scale) for stability.
        channel_axis: ``1`` or ``-1``.

    Shape:
        output has the shape, dtype and layout semantics of ``x``.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 6, 5, 5)
        >>> y = nk.functional.normalize(x, nap=nk.nap.Group(num_groups=1), nop=nk.nop.Standardize())
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5)
        True
    """
    check_eps(eps, nop)
    min_rank = 1 if channel_axis == -1 else 2
    num_features = x.shape[channel_axis] if x.dim() >= min_rank else -1
    check_input(x, num_features, channel_axis)
    if x.dim() == 1:  # a single (C,) vector with channel_axis=-1: one sample
        return normalize(x.unsqueeze(0), nap=nap, nop=nop, weight=weight, bias=bias, eps=eps,
                         channel_axis=channel_axis).squeeze(0)
    groups = nap.groups(num_features)
    nop = nop.bind(nap, num_features)  # refuses, or knows, a smaller last group
    padded = groups[0] * groups[1] - num_features
    x = pad_channels(x, padded, channel_axis)
    v = canonical_view(x, groups, channel_axis)
    spatial: Sequence[int] = tuple(x.shape[2:] if channel_axis == 1 else x.shape[1:-1])
    m = nap.count(v, spatial)
    if x.numel() > 0:
        check_spread(x.shape, nop.count(v, nap, spatial), nap, nop)
        stats = nop.fit(v, nap, spatial, eps=eps)
    else:
        stats = {}
    shape = (1, groups[0], groups[1], 1)
    w, b = (None if t is None else (pad_channels(t, padded, 0, value) if t.dim() == 1 else t)
            for t, value in ((weight, 1.0), (bias, 0.0)))
    w, b = (None if t is None else (t.reshape(shape) if t.dim() == 1 else t) for t in (w, b))
    if not stats:
        y = restore_view(affine_transform(v, None, None, w, b).to(x.dtype), x.shape, channel_axis)
    else:
        y = apply_normalization(
            x, v, stats, nop=nop, nap=nap, eps=eps, m=m, weight=w, bias=b, channel_axis=channel_axis
        )
    return narrow_channels(y, num_features, channel_axis)
