"""Shared pieces of the operations that own parameters and read per-channel statistics
(:mod:`._combination`, :mod:`._norm_act`): the instance moments of the canonical view, BN's
moments pooled from them, the per-channel layout of a parameter and the partition check."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import ConfigError
from ..functional import statistics as S
from ..functional.merging import pool_moments
from ..functional.partition import as_dtype, stats_dtype
from ..nap import Batch, Instance, Partition, Synced
from ._base import Operation, Stats

__all__ = ["instance_moments"]


def instance_moments(v: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of each instance ``(n, a, b)`` over the positions ``S`` of the
    canonical view, ``(N, A, B, 1)`` each, in at least float32."""
    return S.moments(v, (3,))


def _batch_moments(v: Tensor, nap: Partition, spatial: Sequence[int],
                   inst: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """BN's moments: pooled from the instance moments (exact, no second pass), or from the
    partition when it merges them across processes (:class:`normkit.nap.Synced`)."""
    if isinstance(nap, Synced):
        return nap.moments(v, spatial)
    return pool_moments(*inst, (0,))


def _channel_view(p: Tensor, v: Tensor) -> Tensor:
    """A per-channel parameter ``(C,)`` as ``(1, A, B, 1)`` against the view ``v``, in ≥ float32."""
    return as_dtype(p.reshape(1, v.shape[1], v.shape[2], 1), stats_dtype(v))


def _per_channel_split(nap: Partition, num_features: int, what: str) -> None:
    """Operations below read channels at ``(A, B) = (C, 1)``: BN/IN-shaped partitions only."""
    if type(nap) not in (Batch, Instance) or nap.groups(num_features) != (num_features, 1):
        raise ConfigError(
            f"{what} computes per-channel statistics itself and needs nap=Batch() or "
            f"nap=Instance() without channel groups, got {nap!r}"
        )


class _OwnsParameters(Operation):
    """Operations that carry their own parameters (and derived values) in the stats dict:
    only ``stat_names`` are tracked, and evaluation depends on each input (nothing to fold)."""

    foldable = False

    def running(self, stats: Stats, m: int) -> Stats:
        return super().running({k: stats[k] for k in self.stat_names}, m)

    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        raise ConfigError(
            f"{self!r} uses each input's own statistics or is not affine in x; nothing fixed "
            f"to fold"
        )
