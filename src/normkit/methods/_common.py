"""Shared pieces of the presets: the common keyword arguments and small choices."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import torch

from .. import nap, nrr
from ..errors import ConfigError

__all__ = ["NormKwargs", "affine_recovery", "layer_partition"]


class NormKwargs(TypedDict, total=False):
    """Keyword arguments every preset forwards to :class:`normkit.Normalization`.

    ``eps`` (1e-5), ``momentum`` (0.1; ``None`` = cumulative average), ``track_running_stats``
    (``None`` = iff batch-dependent), ``channel_axis`` (1 or -1), ``native`` (dispatch to torch's
    kernel where equal), ``device``, ``dtype``. Unknown names raise ``TypeError``.
    """

    eps: float | None
    momentum: float | None
    track_running_stats: bool | None
    channel_axis: int
    native: bool
    process_group: Any
    device: torch.device | str | None
    dtype: torch.dtype | None


def affine_recovery(
    affine: bool, *, bias: bool = True, weight: bool = True, shape: tuple[int, ...] | None = None
) -> nrr.Recovery:
    """``Affine(weight, bias, shape=shape)`` when ``affine`` else ``Identity()`` (``bias`` is then
    ignored, as torch ignores ``bias=False`` without ``affine``)."""
    if not isinstance(affine, bool):
        raise ConfigError(f"affine must be a bool, got {affine!r}")
    if not isinstance(bias, bool):
        raise ConfigError(f"bias must be a bool, got {bias!r}")
    return nrr.Affine(weight=weight, bias=bias, shape=shape) if affine else nrr.Identity()


def layer_partition(
    over: Literal["all", "channels"] | None, channel_axis: int
) -> nap.Partition:
    """The partition of a per-sample layer method.

    ``"all"``: every channel and position of a sample (the book's LN); ``"channels"``: the
    channels of each position (torch's ``LayerNorm(C)`` on ``(…, C)``, "LayerNorm2d"). ``None``
    picks ``"all"`` for ``channel_axis=1`` and ``"channels"`` for ``channel_axis=-1``.
    """
    if over is None:
        over = "all" if channel_axis == 1 else "channels"
    if over == "all":
        return nap.Layer()
    if over == "channels":
        return nap.Position()
    raise ConfigError(f"over must be 'all', 'channels' or None, got {over!r}")
