"""NAP — normalization area partitioning: over which elements are statistics taken?

``D`` axes hold features normalized jointly: standardization keeps separate statistics per ``D``
feature (so ``Batch()`` is BN and ``Group(g)`` is GN), whitening decorrelates them (batch
whitening in groups of ``d``, group whitening of the ``g`` group-vectors). One partition, two
operations. ``Batch()`` and ``Instance()`` default to ``d = 1``.

A partition is a small immutable description. It says how the ``C`` channels split into ``(A, B)``
and which role each canonical axis ``(N, A, B, S)`` plays (see
:mod:`normkit.functional.partition`), and provides the reductions over its area that operations
(:mod:`normkit.nop`) use. It holds no state.

=====================  ======  ========  ========  ======
partition              N       A         B         S
=====================  ======  ========  ========  ======
``Batch(group_size=d)`` M     G (C/d)   D (d)     M
``BatchGroup(g)``      M       G (g)     M (C/g)   M
``Layer()``            G       M (1)     M (C)     M
``Instance(group_size=d)`` G   G (C/d)   D (d)     M
``Group(g)``           G       D (g)     M (C/g)   M
``Position()``         G       M (1)     M (C)     G
``Local(...)``         G       sliding windows over channels and space
=====================  ======  ========  ========  ======

Example:
    >>> import normkit as nk
    >>> nk.nap.Group(num_groups=4).roles
    ('G', 'D', 'M', 'M')
    >>> nk.nap.Batch().batch_dependent
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError
from .functional import statistics as S
from .functional.collectives import global_count, synced_moments
from .functional.partition import (
    Role,
    as_dtype,
    reduce_dims,
    resolve_groups,
    stat_count,
    stats_dtype,
)

__all__ = ["Partition", "Batch", "BatchGroup", "Layer", "Instance", "Group", "Position", "Local",
           "Synced"]


# ``roles -> reduce_dims(roles)``: the few role tuples of the partitions
_DIMS: dict[tuple[str, ...], tuple[int, ...]] = {}


class Partition:
    """Base class: a partition of ``(N, A, B, S)`` into roles, with its reductions.

    Subclasses set :attr:`roles` and :meth:`groups`; the default reductions take plain means over
    the ``M`` axes, so a new area needs nothing else.
    """

    roles: tuple[Role, Role, Role, Role] = ("G", "G", "G", "G")

    def groups(self, num_features: int) -> tuple[int, int]:
        """``(A, B)`` with ``A·B = num_features`` (``A·B > num_features`` for a ragged split whose
        last group is smaller, :func:`~normkit.functional.partition.resolve_groups`)."""
        return num_features, 1

    @property
    def batch_dependent(self) -> bool:
        """Whether statistics mix samples of the batch (then running estimates serve eval)."""
        return self.roles[0] == "M"

    @property
    def dims(self) -> tuple[int, ...]:
        """The reduced (``M``) axes of the canonical view."""
        roles = self.roles
        if type(roles) is not tuple or torch.compiler.is_compiling():  # traced: no Python state
            return reduce_dims(roles)
        dims = _DIMS.get(roles)  # eager: once per roles tuple (read on every call)
        if dims is None:
            dims = _DIMS.setdefault(roles, reduce_dims(roles))
        return dims

    def count(self, v: Tensor, spatial: Sequence[int]) -> int:
        """Samples per statistic for the canonical view ``v``."""
        return stat_count(v, self.dims)

    def stat_size(self, num_features: int) -> int:
        """Number of running statistics kept: the product of the non-``M`` channel axes."""
        a, b = self.groups(num_features)
        return (a if self.roles[1] != "M" else 1) * (b if self.roles[2] != "M" else 1)

    def stat_view_shape(self, num_features: int) -> tuple[int, int, int, int]:
        """Shape of a running buffer viewed against the canonical view: ``(1, A', B', 1)``."""
        a, b = self.groups(num_features)
        return 1, (a if self.roles[1] != "M" else 1), (b if self.roles[2] != "M" else 1), 1

    # -- reductions over the area (``spatial`` is the unflattened S, used by local windows) --
    def mean(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        """Mean over the area (≥ float32), kept broadcastable against ``v``."""
        return as_dtype(v, stats_dtype(v)).mean(dim=self.dims, keepdim=True)

    def moments(self, v: Tensor, spatial: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over the area, kept broadcastable against ``v``."""
        return S.moments(v, self.dims)

    def mean_square(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        """``E[x²]`` over the area."""
        return S.mean_square(v, self.dims)

    def mean_abs_deviation(self, v: Tensor, mean: Tensor, spatial: Sequence[int]) -> Tensor:
        """``E|x − μ|`` over the area."""
        return S.mean_abs_deviation(v, mean, self.dims)

    def value_range(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        """``max − min`` over the area."""
        return S.value_range(v, self.dims)

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in fields if getattr(self, k) is not None)
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True, repr=False)
class _Grouped(Partition):
    num_groups: int | None = None
    group_size: int | None = None

    def groups(self, num_features: int) -> tuple[int, int]:
        return resolve_groups(num_features, self.num_groups, self.group_size)


@dataclass(frozen=True, repr=False)
class Batch(_Grouped):
    """Batch: statistics over ``(N, spatial)`` per channel (BN). ``group_size`` > 1 makes ``D``
    groups of channels, which standardization treats separately and whitening jointly; for
    whitening the last group may be smaller when ``group_size`` does not divide ``C``."""

    roles = ("M", "G", "D", "M")

    def groups(self, num_features: int) -> tuple[int, int]:
        if self.num_groups is None and self.group_size is None:
            return num_features, 1
        return resolve_groups(num_features, self.num_groups, self.group_size, ragged=True)


@dataclass(frozen=True, repr=False)
class BatchGroup(_Grouped):
    """Batch-group: per group of ``C/g`` channels over ``(N, C/g, spatial)`` (Summers & Dinneen)."""

    roles = ("M", "G", "M", "M")

    def __post_init__(self) -> None:
        if self.num_groups is None and self.group_size is None:
            raise ConfigError("BatchGroup needs num_groups= or group_size=")


@dataclass(frozen=True, repr=False)
class Layer(Partition):
    """Layer: per sample over all channels and positions (LN)."""

    roles = ("G", "M", "M", "M")

    def groups(self, num_features: int) -> tuple[int, int]:
        return 1, num_features


@dataclass(frozen=True, repr=False)
class Instance(_Grouped):
    """Instance: per sample and channel over positions (IN). ``group_size`` > 1 makes ``D``
    groups of channels (instance whitening whitens each group over the positions; the last group
    may be smaller)."""

    roles = ("G", "G", "D", "M")

    def groups(self, num_features: int) -> tuple[int, int]:
        if self.num_groups is None and self.group_size is None:
            return num_features, 1
        return resolve_groups(num_features, self.num_groups, self.group_size, ragged=True)


@dataclass(frozen=True, repr=False)
class Group(_Grouped):
    """Group: per sample and group of ``C/g`` channels over ``(C/g, spatial)`` (GN; with
    whitening, group whitening of the ``g`` group-vectors)."""

    roles = ("G", "D", "M", "M")

    def __post_init__(self) -> None:
        if self.num_groups is None and self.group_size is None:
            raise ConfigError("Group needs num_groups= or group_size=")


@dataclass(frozen=True, repr=False)
class Position(Partition):
    """Position: per sample and position over channels (PN; channels-first "LayerNorm2d")."""

    roles = ("G", "M", "M", "G")

    def groups(self, num_features: int) -> tuple[int, int]:
        return 1, num_features


@dataclass(frozen=True, repr=False)
class Local(Partition):
    """Local windows: per sample, statistics over a neighbourhood of channels × positions.

    Either ``num_groups`` (each group of ``C/g`` channels is one channel neighbourhood — local
    context normalization) or ``channel_window`` (a centred sliding window of neighbouring
    channels — local response / divisive normalization). ``window`` is the spatial window (an int
    for every spatial dimension, or one per dimension). ``include_pad`` counts positions outside
    the input as zeros (torch's ``local_response_norm`` convention) instead of averaging over the
    positions that exist.
    """

    num_groups: int | None = None
    channel_window: int | None = None
    window: int | tuple[int, ...] = 1
    include_pad: bool = False

    roles = ("G", "G", "M", "G")

    def __post_init__(self) -> None:
        if (self.num_groups is None) == (self.channel_window is None):
            raise ConfigError(
                f"Local needs exactly one of num_groups ({self.num_groups}) or channel_window "
                f"({self.channel_window})"
            )
        windows = self.window if isinstance(self.window, tuple) else (self.window,)
        for w in (1 if self.channel_window is None else self.channel_window, *windows):
            if not isinstance(w, int) or w < 1:
                raise ConfigError(f"window sizes must be positive ints, got {w!r}")

    def groups(self, num_features: int) -> tuple[int, int]:
        if self.channel_window is not None:
            return 1, num_features
        return resolve_groups(num_features, self.num_groups, None)

    def stat_size(self, num_features: int) -> int:
        raise ConfigError("local-window statistics vary with position and cannot be tracked")

    def _windows(self, spatial: Sequence[int]) -> tuple[int, ...]:
        if isinstance(self.window, tuple):
            if len(self.window) != len(spatial):
                raise ConfigError(
                    f"window {self.window} has {len(self.window)} sizes but the input has "
                    f"{len(spatial)} spatial dimensions {tuple(spatial)}"
                )
            return self.window
        return (self.window,) * len(spatial)

    def window_axes(self, spatial: Sequence[int]
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(full, dims, windows)`` on the view ``(N, A, B, *spatial)``: the axes averaged whole
        (the channel group) and the sliding windows along ``dims``."""
        win_dims = tuple(range(3, 3 + len(spatial)))
        win = self._windows(spatial)
        if self.channel_window is not None:
            return (), (2, *win_dims), (self.channel_window, *win)
        return (2,), win_dims, win

    def _local(self, v: Tensor, spatial: Sequence[int], center: bool) -> tuple[Tensor, Tensor]:
        x = v.reshape(*v.shape[:3], *spatial)
        full, win_dims, win = self.window_axes(spatial)
        mean, second = S.local_moments(x, full, win_dims, win, self.include_pad, center=center)
        shape = (*mean.shape[:3], -1)
        return mean.reshape(shape), second.reshape(shape)

    def count(self, v: Tensor, spatial: Sequence[int]) -> int:
        m = min(self.channel_window or v.shape[2], v.shape[2])
        for w, s in zip(self._windows(spatial), spatial, strict=True):
            m *= min(w, s)
        return m

    def moments(self, v: Tensor, spatial: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self._local(v, spatial, center=True)

    def mean(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        return self._local(v, spatial, center=True)[0]

    def mean_square(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        return self._local(v, spatial, center=False)[1]

    def mean_abs_deviation(self, v: Tensor, mean: Tensor, spatial: Sequence[int]) -> Tensor:
        raise ConfigError("Local partitions support Standardize, Center, RMS and Divisive only")

    def value_range(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        raise ConfigError("Local partitions support Standardize, Center, RMS and Divisive only")


@dataclass(frozen=True, repr=False)
class Synced(Partition):
    """A batch-dependent partition whose statistics are merged over the ranks of ``group``.

    Delegates its shape (roles, groups) to ``inner``; ``mean`` / ``moments`` / ``mean_square``
    and ``count`` are global (:mod:`normkit.functional.collectives`). Used by
    :class:`normkit.Normalization` in training when a process group is set (:func:`normkit.sync`);
    also importable as ``normkit.distributed.Synced``.
    """

    inner: Partition = None  # type: ignore[assignment]
    group: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Partition) or not self.inner.batch_dependent:
            raise ConfigError(f"only batch-dependent partitions synchronize, got {self.inner!r}")

    @property
    def roles(self):  # type: ignore[override]
        return self.inner.roles

    def groups(self, num_features: int) -> tuple[int, int]:
        return self.inner.groups(num_features)

    def count(self, v: Tensor, spatial: Sequence[int]) -> int:
        return global_count(self.inner.count(v, spatial), self.group)

    def mean(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        return synced_moments(v, self.dims, self.group)[0]

    def moments(self, v: Tensor, spatial: Sequence[int]) -> tuple[Tensor, Tensor]:
        return synced_moments(v, self.dims, self.group)

    def mean_square(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        mean, var = synced_moments(v, self.dims, self.group)
        return var + mean * mean

    def mean_abs_deviation(self, v: Tensor, mean: Tensor, spatial: Sequence[int]) -> Tensor:
        raise ConfigError("L1 normalization is not synchronized; use Standardize")

    def value_range(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        raise ConfigError("range normalization is not synchronized; use Standardize")

    def __repr__(self) -> str:
        return f"Synced({self.inner!r})"
