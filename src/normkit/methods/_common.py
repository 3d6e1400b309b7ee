"""Shared pieces of the presets: the common keyword arguments and small choices."""

from __future__ import annotations

import math
from typing import Any, Literal, TypedDict

import torch

from .. import nap, nrr
from ..errors import ConfigError

__all__ = ["NormKwargs", "affine_recovery", "layer_partition", "default_grouping", "GN_GROUPS",
           "WHITENING_GROUP"]


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


GN_GROUPS = 32  # GroupNorm's paper: 32 groups (the default of every standardization grouping)
WHITENING_GROUP = 16  # DBN's paper: groups of 16 channels (the default of every whitening grouping)


def default_grouping(num_features: int, paper: int, *, count: bool) -> int:
    """The default grouping of a grouped preset: the paper's value where it divides ``C``,
    else the largest valid value below it.

    One rule for every grouped method (applied only when the user gives neither ``num_groups``
    nor ``group_size``; an explicit value is used as given and raises if it does not divide):

    * a group **count** (``count=True``: GN, batch-group, ILM, EvoNorm-S0, BCN with
      ``paper=32``) is ``gcd(C, paper)`` — at most ``paper`` groups, and the groups stay the
      paper's (``C/32`` channels) wherever 32 divides ``C``, coarser otherwise (48 → 16,
      24 → 8, 7 → 1 group): rounding a count down merges groups, never splits a channel off
      into a group of its own (``g = C`` would be IN, not GN);
    * a group **size** (``count=False``: the batch whitenings, switchable whitening with
      ``paper=16``) is the largest divisor of ``C`` that is at most ``paper`` (48 → 16, 24 → 12,
      7 → 7); group whitening's count uses the same (``count=False, paper=16``) as its paper's
      groups are at most 16 as well.

    Example:
        >>> [default_grouping(c, 32, count=True) for c in (64, 48, 24, 7)]
        [32, 16, 8, 1]
        >>> [default_grouping(c, 16, count=False) for c in (64, 48, 24, 7)]
        [16, 16, 12, 7]

    Raises:
        ConfigError: if ``num_features`` is not a positive int.
    """
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
        raise ConfigError(f"num_features must be a positive int, got {num_features!r}")
    if count:
        return math.gcd(num_features, paper)
    return max(d for d in range(1, min(paper, num_features) + 1) if num_features % d == 0)


def group_partition(kind: type[nap.Group] | type[nap.BatchGroup], num_features: int,
                    num_groups: int | None, group_size: int | None) -> nap.Partition:
    """The partition of a grouped standardization preset: ``kind(num_groups=…, group_size=…)``
    as given, or — with neither — ``gcd(C, 32)`` groups (:func:`default_grouping`).

    Example:
        >>> group_partition(nap.Group, 48, None, None)
        Group(num_groups=16)
    """
    if num_groups is None and group_size is None:
        num_groups = default_grouping(num_features, GN_GROUPS, count=True)
    return kind(num_groups=num_groups, group_size=group_size)
