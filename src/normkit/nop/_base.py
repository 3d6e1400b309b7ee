"""The base class of normalization operations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..nap import Partition

__all__ = ["Operation", "Stats", "Coefficients", "State", "Layout", "Kernel", "StateSpec"]

Stats = dict[str, Tensor]
Coefficients = tuple["Tensor | None", "Tensor | None"]
StateSpec = dict[str, tuple[tuple[int, ...], float]]
Kernel = Literal[
    "batch_norm", "batch_group_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm",
    "local_response_norm",
]


@dataclass(frozen=True)
class State:
    """What a stateful operation reads in one training call besides its learnable parameters.

    :class:`~normkit.Normalization` builds it for operations with ``reads_state = True`` when it
    tracks running estimates, and passes it to :meth:`Operation.fit` as ``state``.

    Attributes:
        running: the running estimates by statistic name (``"mean"``, ``"var"``, ``"ms"`` ...),
            as they are before this call updates them.
        step: ``num_batches_tracked``, this call counted (a 0-d long tensor).
        buffers: the operation's own state buffers by name (:meth:`Operation.state_buffers`).
    """

    running: Stats
    step: Tensor
    buffers: Stats


@dataclass(frozen=True)
class Layout:
    """What decides whether one of torch's kernels computes an operation (:meth:`Operation.native_kernel`).

    Attributes:
        nap: the partition.
        groups: ``nap.groups(C)``: ``(A, B)`` of the canonical view.
        channel_axis: ``1`` or ``-1``.
        tracking: whether the module keeps running estimates.
        recovery: the recovery's form: ``"none"``, ``"affine"`` (per-channel ``γ, β``),
            ``"weight"`` (per-channel ``γ`` only) or ``"other"``.
    """

    nap: Partition
    groups: tuple[int, int]
    channel_axis: int
    tracking: bool
    recovery: Literal["none", "affine", "weight", "other"]


class Operation(ABC):
    """Base class of normalization operations.

    Attributes:
        stat_names: names of the statistics; running buffers are ``running_<name>``.
        needs_spread: whether a statistic needs more than one sample (variance-like).
        uses_eps: whether ``eps`` enters the formula (then it must be > 0).
    """

    stat_names: tuple[str, ...] = ()
    needs_spread: bool = True
    uses_eps: bool = True
    #: :meth:`fit` takes the call's :class:`State` (running estimates, step, own buffers)
    reads_state: ClassVar[bool] = False
    #: state buffers the backward reads and records when it runs: passed live, never snapshotted
    backward_state: ClassVar[tuple[str, ...]] = ()
    #: evaluation is one block-diagonal matmul of :meth:`fold`'s ``(M, b)`` (batch whitening);
    #: not inherited, like :meth:`native_kernel`
    block_eval_fold: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # A subclass computes something else: it has neither its parent's torch kernel nor its
        # evaluation fold unless it declares them itself.
        if "native_kernel" not in cls.__dict__:
            cls.native_kernel = Operation.native_kernel  # type: ignore[method-assign]
        if "block_eval_fold" not in cls.__dict__:
            cls.block_eval_fold = False
        if "eval_moments" not in cls.__dict__:
            cls.eval_moments = Operation.eval_moments  # type: ignore[method-assign]

    def native_kernel(self, layout: Layout) -> Kernel | None:
        """The torch kernel that computes this operation (with the recovery) under ``layout``,
        or ``None``; :class:`~normkit.Normalization` (``native=True``) dispatches to it. Not
        inherited: a subclass declares its own."""
        return None

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        """Evaluation with the running estimates as BN's evaluation kernel: ``(μ, σ², ε')``,
        shaped like the running buffers, with ``x̂ = (x − μ)/√(σ² + ε')`` equal to this
        operation's evaluation transform; ``None`` where it has no such form (the default).
        :class:`~normkit.Normalization` then evaluates in one kernel call. Not inherited: a
        subclass computes something else unless it declares its own."""
        return None

    def native_applies(self, use_batch: bool) -> bool:
        """Whether :meth:`native_kernel` computes this call: ``use_batch`` is ``True`` when the
        call normalizes with batch statistics, ``False`` with the running estimates."""
        return True

    def state_buffers(self, nap: Partition, num_features: int) -> StateSpec:
        """State buffers the module keeps besides the running estimates (``reads_state``
        operations): name → (shape, initial value). Default: none."""
        return {}

    def update_state(self, state: Stats, stats: Stats) -> None:
        """Record a training step into the :meth:`state_buffers` (in place; called without grad,
        after :meth:`fit`, only where the module updates its running estimates)."""
        return None

    @abstractmethod
    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        """Statistics of the canonical view ``v`` over ``nap``'s area (≥ float32, kept dims).

        ``eps`` is given for operations whose statistics depend on it (whitening matrices);
        ``params`` holds the operation's own learnable parameters (:meth:`create_parameters`).
        Operations with ``reads_state = True`` also take ``state``, the call's :class:`State`
        (``None`` where the module keeps no running estimates: then they normalize with the
        batch's statistics).
        """

    @abstractmethod
    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        """``(scale, shift)`` of ``x̂ = x·scale + shift`` (either may be ``None``)."""

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Running buffers ``running_<name>``: name → (shape, initial value ``"0"``/``"1"``/``"eye"``).

        Raises:
            ConfigError: when the partition's statistics cannot be tracked (they vary with
                position).
        """
        size = nap.stat_size(num_features)
        return {s: ((size,), "1" if s in ("var", "ms", "scale") else "0") for s in self.stat_names}

    def running(self, stats: Stats, m: int) -> Stats:
        """Batch statistics as the values running buffers track, shaped like the buffers.

        The variance is unbiased (``× m/(m−1)``, as torch's BatchNorm); statistics kept per sample
        (``N`` a ``G`` axis, e.g. IN) are averaged over the batch, as torch's InstanceNorm.
        """
        out = {}
        for k, t in stats.items():
            t = S.unbiased_variance(t, m) if k == "var" else t
            # one sample: its reshape is the same values as indexing it, one call fewer
            out[k] = (t.mean(0) if t.shape[0] > 1 else t).reshape(-1)
        return out

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        """The fewest samples any statistic of this operation is taken over (checked > 1)."""
        return nap.count(v, spatial)

    def bind(self, nap: Partition, num_features: int) -> Operation:
        """This operation for ``num_features`` channels under ``nap`` (called once by the module).

        Operations that handle a ragged split (a smaller last group, ``A·B > C``) return a copy
        that knows the last group's size; the default refuses one.

        Raises:
            ConfigError: when ``nap`` splits the channels unevenly.
        """
        a, b = nap.groups(num_features)
        if a * b != num_features:
            raise ConfigError(
                f"{nap!r} does not divide num_features ({num_features}) evenly; only whitening "
                f"allows a smaller last group, {type(self).__name__} needs a group_size dividing "
                f"{num_features}"
            )
        return self

    def unfused(self) -> Operation:
        """This operation without fused autograd Functions: the plain autograd composition of
        its formula (``Normalization(native=False)`` uses it). Default: a copy with
        ``fused=False`` where the operation has that switch (a ``fused`` dataclass field),
        otherwise itself (nothing is fused); composite operations unfuse their parts too."""
        if "fused" in getattr(self, "__dataclass_fields__", ()):
            return replace(self, fused=False)  # type: ignore[type-var]
        return self

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        """Learnable parameters of the operation itself (e.g. mixing weights), registered on the
        module under these names and passed back to :meth:`fit` as ``params``. Default: none."""
        return {}

    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        """Initialize :meth:`create_parameters`' parameters in place (default: nothing to do)."""
        return None

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        """Statistics for evaluation: the running estimates (operations mixing in per-input
        statistics override this)."""
        return self.from_running(running, nap, num_features)

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        """Running buffers viewed as statistics against the canonical view (for evaluation)."""
        shape = nap.stat_view_shape(num_features)
        return {k: t.reshape(shape) for k, t in running.items()}

    def transform(
        self,
        v: Tensor,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        m: int,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        """``y = (v·scale + shift)·weight + bias`` on the canonical view (fused where smaller)."""
        scale, shift = self.coefficients(stats, eps, m)
        return Fs.affine_transform(v, scale, shift, weight, bias)

    def fold(
        self,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Statistics and recovery as one per-channel ``y = x·a + b``: ``(a, b)``, each ``(C,)``.

        Raises:
            ConfigError: when the statistics are not per channel (they depend on the input).
        """
        scale, shift = self.coefficients(stats, eps, 1)
        one = next(t for t in (scale, shift, weight, bias) if t is not None)
        a = torch.ones((), dtype=one.dtype, device=one.device) if scale is None else scale
        b = torch.zeros((), dtype=one.dtype, device=one.device) if shift is None else shift
        if weight is not None:
            a, b = a * weight, b * weight
        if bias is not None:
            b = b + bias
        shape = torch.broadcast_shapes(a.shape, b.shape, *(t.shape for t in (weight, bias) if t is not None))
        if shape[0] != 1 or shape[3] != 1:
            raise ConfigError("statistics vary with the sample or position; nothing to fold")
        return a.expand(shape).reshape(-1), b.expand(shape).reshape(-1)

    def __repr__(self) -> str:
        # fields declared with repr=False (implementation switches) show only when not default
        fields = getattr(self, "__dataclass_fields__", {}).values()
        shown = [f for f in fields if f.repr or getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"
