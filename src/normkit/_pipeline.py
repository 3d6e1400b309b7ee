"""The forward pipeline of every normalization: one place for the steps a call goes through.

``input → (batch axis, padded channels) → canonical view (N, A, B, S) → statistics over the
partition → operation's transform with the recovery's γ, β → restored layout``.

:class:`normkit.Normalization` runs these steps with its state (running estimates, counter) and
the hooks presets override (:meth:`~normkit.Normalization._statistics`,
:meth:`~normkit.Normalization._transform`); :func:`normalize` runs them without state, on batch
statistics — the functional form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .errors import ShapeError
from .functional import statistics as S
from .functional.normalize import check_eps
from .functional.partition import (
    as_dtype,
    canonical_view,
    check_input,
    narrow_channels,
    pad_channels,
    restore_view,
)
from .functional.standardize import affine_transform
from .nap import Partition
from .nop import Operation, Stats

__all__ = ["Call", "check_batch", "check_spread", "empty_output", "finish", "normalize",
           "spatial_of", "transform", "view_of"]


@dataclass
class Call:
    """One forward call of a :class:`~normkit.Normalization`: what its steps read and produce.

    Attributes:
        x: the input with a batch axis, channels zero-padded to whole groups.
        v: its canonical view ``(N, A, B, S)``.
        spatial: the input's spatial sizes.
        m: values per statistic (``nap.count``).
        eps: the stability constant of this call (``default_eps`` of the input for ``eps=None``).
        nap: the partition statistics are fitted over (synchronized over ranks in training).
        use_batch: normalize with the batch's statistics (``False``: the running estimates).
        update: update the running estimates with this batch.
        running: the running estimates by statistic name, or ``None``.
        extra: a preset's own inputs of this call (e.g. KalmanNorm's previous-layer estimate).
        stats: the statistics the call normalized with, once computed.
    """

    x: Tensor
    v: Tensor
    spatial: tuple[int, ...]
    m: int
    eps: float
    nap: Partition
    use_batch: bool
    update: bool
    running: Stats | None
    extra: dict[str, Any] = field(default_factory=dict)
    stats: Stats | None = None


def spatial_of(x: Tensor, channel_axis: int) -> tuple[int, ...]:
    """The spatial sizes of ``x`` ``(N, C, *S)`` (``channel_axis=1``) or ``(N, *S, C)`` (``-1``)."""
    return tuple(x.shape[2:] if channel_axis == 1 else x.shape[1:-1])


def view_of(x: Tensor, groups: tuple[int, int], channel_axis: int, padded: int
            ) -> tuple[Tensor, Tensor]:
    """``(x, v)``: ``x`` with ``padded`` zero channels appended (a smaller last group) and its
    canonical view ``(N, A, B, S)``."""
    x = pad_channels(x, padded, channel_axis)
    return x, canonical_view(x, groups, channel_axis)


def check_spread(shape: Sequence[int], m: int, nap: Partition, nop: Operation) -> None:
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


def check_batch(x: Tensor, groups: tuple[int, int], channel_axis: int, padded: int,
                nap: Partition, nop: Operation, shape: Sequence[int] | None = None) -> None:
    """:func:`check_spread` for input ``x``, before any state changes (only the view's shape
    matters: a stride-0 stand-in of it is counted, so no padded copy, nor the copy a reshape of
    an input with odd strides would make, is made)."""
    spatial = spatial_of(x, channel_axis)
    v = x.new_empty(()).expand(x.shape[0], *groups, math.prod(spatial))
    check_spread(tuple(x.shape) if shape is None else shape, nop.count(v, nap, spatial), nap, nop)


def finish(out: Tensor, x: Tensor, num_features: int, channel_axis: int) -> Tensor:
    """The canonical-view output ``out`` back in ``x``'s layout and dtype, the padded channels
    removed."""
    y = restore_view(as_dtype(out, x.dtype), x.shape, channel_axis)
    return narrow_channels(y, num_features, channel_axis)


def transform(call: Call, stats: Stats, nop: Operation, weight: Tensor | None,
              bias: Tensor | None) -> Tensor:
    """The operation's transform of ``call.v`` with ``stats`` and the recovery's ``γ, β``."""
    return nop.transform(call.v, stats, nap=call.nap, eps=call.eps, m=call.m, weight=weight,
                         bias=bias)


def normalize(
    x: Tensor,
    *,
    nap: Partition,
    nop: Operation,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> Tensor:
    r"""Normalize ``x`` with batch statistics: ``y = nop(x over nap's area) · weight + bias``.

    The functional form of :class:`~normkit.Normalization` (training statistics, no running
    estimates, no state); works under ``torch.func`` transforms.

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
        >>> y = nk.normalize(x, nap=nk.nap.Group(num_groups=1), nop=nk.nop.Standardize())
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
    shape = (1, groups[0], groups[1], 1)
    w, b = (None if t is None else (pad_channels(t, padded, 0, value) if t.dim() == 1 else t)
            for t, value in ((weight, 1.0), (bias, 0.0)))
    w, b = (None if t is None else (t.reshape(shape) if t.dim() == 1 else t) for t in (w, b))
    xp, v = view_of(x, groups, channel_axis, padded)
    if x.numel() == 0:
        return finish(affine_transform(v, None, None, w, b), xp, num_features, channel_axis)
    check_batch(x, groups, channel_axis, padded, nap, nop)
    spatial = spatial_of(x, channel_axis)
    call = Call(x=xp, v=v, spatial=spatial, m=nap.count(v, spatial), eps=eps, nap=nap,
                use_batch=True, update=False, running=None)
    with S.autocast_off(x):
        stats = nop.fit(v, nap, spatial, eps=eps)
        out = transform(call, stats, nop, w, b)
    return finish(out, xp, num_features, channel_axis)


def empty_output(v: Tensor, xp: Tensor, num_features: int, channel_axis: int,
                 weight: Tensor | None, bias: Tensor | None, params: Sequence[Tensor]) -> Tensor:
    """The output of an empty batch: empty, connected to every parameter (each gets a zero
    gradient, as torch's kernels give)."""
    out = affine_transform(v, None, None, weight, bias)
    for p in params:
        out = out + 0 * p.sum()
    return finish(out, xp, num_features, channel_axis)

