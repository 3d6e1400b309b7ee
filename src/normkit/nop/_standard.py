"""Standardization-family operations: every one is ``x̂ = x·scale + shift`` given its statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..functional import fused_combination as Fc
from ..functional import fused_local as Fl
from ..functional import fused_spade as Fsp
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.fused import _reduced
from ..functional.fused_robust import _last_first, constant_standardize, robust_scale
from ..functional.fused_robust import moments as fused_moments
from ..functional.fused_scale import channel_mean_square, rms_scale
from ..functional.partition import as_dtype, stats_dtype
from ..nap import Batch, BatchGroup, Group, Instance, Layer, Local, Partition, Position, Synced
from ._base import Coefficients, Kernel, Layout, Operation, Stats

__all__ = ["Standardize", "Center", "Scale", "L1", "Range", "Divisive"]

_L1_CONSTANT = math.sqrt(math.pi / 2)  # √(π/2)·E|x − μ| = σ for Gaussian x


def _constant_scale(fused: bool, v: Tensor, stats: Stats, weight: Tensor | None,
                    bias: Tensor | None, eps: float) -> Tensor | None:
    """Evaluation (constant per-channel ``μ``, ``s``): ``(x − μ)/(s + ε)`` through BN's
    evaluation kernel with ``σ² = (s + ε)²`` and no ``ε`` of its own; ``None`` otherwise."""
    mean, scale = stats["mean"], stats["scale"]
    if not fused or mean.requires_grad or scale.requires_grad:
        return None
    return constant_standardize(v, mean, (scale + eps).square(), weight, bias, 0.0)


def _fusable(fused: bool, v: Tensor, stats: Stats, nap: Partition, weight: Tensor | None,
             bias: Tensor | None) -> bool:
    """Whether L1/range standardization runs its Function: statistics fitted on ``v`` that carry
    its gradient (training; the running estimates at evaluation carry none), a partition that
    ``Synced`` does not wrap, and ``γ, β`` constant along the reduced axes."""
    if not (fused and stats["mean"].requires_grad and not isinstance(nap, Synced)):
        return False
    return all(t is None or all(t.shape[d] == 1 for d in nap.dims) for t in (weight, bias))


#: partitions whose moments :meth:`Standardize.fit` computes from the view alone (never merged
#: over processes), over axes that include the positions
_OWN_NAPS = (Batch, Group, Layer, Instance)


def _local_moments(v: Tensor, nap: Local, spatial: Sequence[int], center: bool
                   ) -> Fl.LocalMoments:
    """A local partition's moments (``mean, var`` or ``ms``) without a graph, for the Function
    of :func:`~normkit.functional.fused_local.local_divisive` (its backward differentiates them).
    Under ``torch.compile`` too: the composition's autograd graph compiles to slower code than
    the Function's (fwd+bwd vs compiled BN: lrn 5.6x against 1.2x, divisive_norm 8.7x against
    2.8x; 2.0–2.1x since divisive_norm's compiled Function takes centred 3×3 moments itself,
    :mod:`~normkit.functional.local_windows`, and inductor drops these)."""
    full, dims, windows = nap.window_axes(spatial)
    window = Fl.Window(tuple(spatial), full, dims, windows, nap.include_pad)
    with torch.no_grad():
        if center:
            mean, var = nap.moments(v, spatial)
            return Fl.LocalMoments(window, mean=mean, var=var)
        return Fl.LocalMoments(window, ms=nap.mean_square(v, spatial))


@dataclass(frozen=True, repr=False)
class Standardize(Operation):
    """Standardization ``x̂ = (x − μ)/√(σ² + ε)`` (biased batch variance).

    With a per-sample recovery (conditional ``γ, β``, which no torch kernel takes) training runs,
    by default, as one autograd Function with a hand-derived backward
    (:func:`~normkit.functional.fused_combination.standardize_affine`) on the moments ``fit``
    computed (while they are unchanged); ``Normalization(native=False)`` runs the composition.
    Under ``torch.compile`` (not ``torch.export``) the moments over ``Batch``, ``Group`` and
    ``Layer`` come from the moments Function
    (:func:`~normkit.functional.fused_robust.moments`: a reduction per row of positions that
    inductor fuses with other reductions of the same rows, a one-pass backward).
    """

    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var")

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.fused and type(nap) is Local:
            return _local_moments(v, nap, spatial, center=True)
        if self.fused and type(nap) in (Batch, Group, Layer) and S.compiling_kernels():
            # compiled: the moments Function — one reduction per row of positions, which
            # inductor fuses with a conditional recovery's pooled mean, pooled over the rows,
            # and a one-pass backward (fwd+bwd vs compiled BN: dynamic LN 1.2x → 0.9x, cbn
            # 1.0x → 0.85x); exported graphs keep the eager composition
            mean, var = fused_moments(v, nap.dims)
        else:
            mean, var = nap.moments(v, spatial)
        if self.fused and type(nap) in _OWN_NAPS and not torch.compiler.is_compiling():
            return Fc.OwnMoments(mean, var)  # this view's own moments: see transform
        return {"mean": mean, "var": var}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mean"], stats["var"], eps)

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        return running["mean"], running["var"], eps  # BN's evaluation

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if Fl.is_own(stats):  # local windows (LCN): x̂ = (x − μ)(σ² + ε)^(−½)
            return Fl.local_divisive(v, stats, weight=weight, bias=bias, k=eps, alpha=1.0,
                                     beta=0.5)
        if Fc.per_sample(weight, bias) and Fc.is_own(stats) and 3 in nap.dims:
            return Fc.standardize_affine(v, nap.dims, weight=weight, bias=bias, eps=eps,
                                         moments=(stats["mean"], stats["var"]))
        if (weight is not None and Fsp.modulated(v, weight, bias) and Fc.is_own(stats)
                and 3 in nap.dims):  # per-position γ, β (SPADE)
            return Fsp.modulated_standardize(v, nap.dims, weight=weight, bias=bias, eps=eps,
                                             moments=(stats["mean"], stats["var"]))
        return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)

    def native_kernel(self, layout: Layout) -> Kernel | None:
        """BN over ``Batch()`` (one channel per group), the BN kernel per group over
        ``BatchGroup`` (then the affine), IN over ``Instance()``, and — without running
        estimates — GN over ``Group``/``Layer`` and LN over ``Position``; torch's kernels take
        ``γ, β`` per channel (``bias=None`` allowed, except for the batch-group form)."""
        nap, rec, cl = layout.nap, layout.recovery, layout.channel_axis == 1
        if rec not in ("none", "affine", "weight"):
            return None
        if type(nap) is Batch and layout.groups[1] == 1:
            return "batch_norm"
        if type(nap) is BatchGroup and cl and rec != "weight":
            return "batch_group_norm"  # BN kernel over (N, g, C/g·S), then the affine
        if type(nap) is Instance and cl:
            return "instance_norm"
        if not layout.tracking:
            if type(nap) in (Group, Layer) and cl:
                return "group_norm"
            if type(nap) is Position:
                return "layer_norm"
        return None


@dataclass(frozen=True, repr=False)
class Center(Operation):
    """Centering only ``x̂ = x − μ`` (mean-only BN, Salimans & Kingma 2016)."""

    stat_names = ("mean",)
    needs_spread = False
    uses_eps = False

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        return {"mean": nap.mean(v, spatial)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.center_coefficients(stats["mean"])

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        mean = running["mean"]  # x − μ = (x − μ)/√(1 + 0)
        return mean, torch.ones_like(mean), 0.0


@dataclass(frozen=True, repr=False)
class Scale(Operation):
    """Scaling only by the quadratic mean: ``"rms"`` ``x/√(E[x²] + ε)`` (RMSNorm) or ``"l2"``
    ``x/√(Σx² + ε)`` (ScaleNorm's ``x/‖x‖``)."""

    kind: Literal["rms", "l2"] = "rms"
    #: RMS over the channels of each position (``Position``) runs one Function with the
    #: hand-derived backward (:func:`~normkit.functional.fused_scale.rms_scale`) on the ``E[x²]``
    #: ``fit`` computed; otherwise, and with ``native=False``, the composition
    fused: bool = field(default=True, repr=False)

    stat_names = ("ms",)
    needs_spread = False

    def __post_init__(self) -> None:
        if self.kind not in ("rms", "l2"):
            raise ConfigError(f"Scale kind must be 'rms' or 'l2', got {self.kind!r}")

    def _fuses(self, nap: Partition) -> bool:
        return (self.fused and self.kind == "rms" and type(nap) is Position
                and not torch.compiler.is_compiling())

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self._fuses(nap):  # the channels of each position: see transform
            return Fc.OwnStats(ms=channel_mean_square(v))
        return {"ms": nap.mean_square(v, spatial)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        ms = stats["ms"] if self.kind == "rms" else stats["ms"] * m
        return Fs.rms_coefficients(ms, eps)

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if self._fuses(nap) and Fc.is_own(stats) and _channel_views(v, weight, bias):
            return rms_scale(v, weight=weight, bias=bias, eps=eps, ms=stats["ms"])
        return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)

    def native_kernel(self, layout: Layout) -> Kernel | None:
        """torch's ``rms_norm`` over the channels of a channels-last input (``γ`` only)."""
        if (self.kind == "rms" and type(layout.nap) is Position and not layout.tracking
                and layout.channel_axis == -1 and layout.recovery in ("none", "weight")):
            return "rms_norm"
        return None


def _channel_views(v: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether ``γ, β`` are ``None`` or one value per channel of ``v`` ``(N, A, B, S)``, shaped
    ``(1, A, B, 1)``."""
    shape = (1, v.shape[1], v.shape[2], 1)
    return all(t is None or tuple(t.shape) == shape for t in (weight, bias))


def _scale_moments(running: Stats, eps: float) -> tuple[Tensor, Tensor, float]:
    """``(x − μ)/(s + ε)`` as BN's ``(x − μ)/√(σ² + 0)`` with ``σ² = (s + ε)²`` (``√`` of a
    rounded square gives ``s + ε`` back exactly)."""
    return running["mean"], (running["scale"] + eps).square(), 0.0


class _ScaleStandardize(Operation):
    """L1 / range standardization's shared transform: while ``fused``, training (statistics of
    ``v`` that carry its gradient) runs one Function with the hand-derived backward
    (:func:`~normkit.functional.fused_robust.robust_scale`), evaluation with constant
    per-channel statistics BN's evaluation kernel; otherwise the composition."""

    fused: bool
    kind: ClassVar[Literal["l1", "range"]]

    def scale_constant(self, m: int) -> float:
        """``c`` of ``scale = c·(statistic)`` for ``m`` values per statistic."""
        raise NotImplementedError

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if not _fusable(self.fused, v, stats, nap, weight, bias):
            y = _constant_scale(self.fused, v, stats, weight, bias, eps)
            if y is not None:
                return y
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        return robust_scale(v, nap.dims, kind=self.kind, mean=stats["mean"],
                            scale=stats["scale"], c=self.scale_constant(m), weight=weight,
                            bias=bias, eps=eps)


@dataclass(frozen=True, repr=False)
class L1(_ScaleStandardize):
    """L1 standardization ``x̂ = (x − μ)/(√(π/2)·E|x − μ| + ε)`` (Wu et al. 2018).

    For Gaussian ``x``, ``√(π/2)·E|x − μ| = σ``, so it matches BN in distribution while avoiding
    squares (cheaper, more stable in low precision).
    """

    stat_names = ("mean", "scale")
    #: training runs one Function with the hand-derived backward (:meth:`transform`)
    fused: bool = field(default=True, repr=False)
    kind = "l1"

    def scale_constant(self, m: int) -> float:
        return _L1_CONSTANT

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.fused and not isinstance(nap, (Synced, Local)):  # reductions last axis first
            x, dims = as_dtype(v, stats_dtype(v)), nap.dims
            mean = _last_first(x, dims) / _reduced(x, dims)
            mad = _last_first((x - mean).abs(), dims) / _reduced(x, dims)
            return {"mean": mean, "scale": mad * _L1_CONSTANT}
        mean = nap.mean(v, spatial)
        mad = nap.mean_abs_deviation(v, mean, spatial)
        return {"mean": mean, "scale": mad * _L1_CONSTANT}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.inverse_scale_coefficients(stats["scale"], eps, stats["mean"])

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        return _scale_moments(running, eps)



@dataclass(frozen=True, repr=False)
class Range(_ScaleStandardize):
    """Range (L∞) standardization ``x̂ = (x − μ)/((max − min)·C(m) + ε)``, ``C(m) = 1/√(2 ln m)``
    (Hoffer et al. 2018)."""

    stat_names = ("mean", "scale")
    #: training runs one Function with the hand-derived backward (:meth:`transform`)
    fused: bool = field(default=True, repr=False)
    kind = "range"

    def scale_constant(self, m: int) -> float:
        return S.range_constant(m)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        c = S.range_constant(nap.count(v, spatial))
        if self.fused and not isinstance(nap, (Synced, Local)):  # reductions last axis first
            x, dims = as_dtype(v, stats_dtype(v)), nap.dims
            rng = _last_first(x, dims, torch.amax) - _last_first(x, dims, torch.amin)
            return {"mean": _last_first(x, dims) / _reduced(x, dims), "scale": rng * c}
        mean = nap.mean(v, spatial)
        return {"mean": mean, "scale": nap.value_range(v, spatial) * c}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.inverse_scale_coefficients(stats["scale"], eps, stats["mean"])

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        return _scale_moments(running, eps)



@dataclass(frozen=True, repr=False)
class Divisive(Operation):
    """Divisive normalization ``x̂ = (x − μ)/(k + α·σ²)^β`` over the area.

    With ``center=False`` the second moment is ``E[x²]`` and nothing is subtracted, which over a
    window of ``n`` neighbouring channels is Krizhevsky's local response normalization
    ``x/(k + α/n·Σx²)^β`` (torch's ``local_response_norm``). ``eps`` is unused: ``k`` plays its
    role and must be > 0 when ``β > 0``.
    """

    k: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    center: bool = True
    #: over :class:`~normkit.nap.Local` windows, one Function with the hand-derived backward
    #: (:func:`~normkit.functional.fused_local.local_divisive`)
    fused: bool = field(default=True, repr=False)

    uses_eps = False

    def __post_init__(self) -> None:
        if self.k < 0 or self.alpha < 0 or (self.k == 0 and self.beta > 0):
            raise ConfigError(
                f"Divisive needs k > 0 and alpha >= 0 (got k={self.k}, alpha={self.alpha}); "
                f"k is the constant that keeps the denominator away from 0"
            )

    @property
    def stat_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mean", "var") if self.center else ("ms",)

    @property
    def needs_spread(self) -> bool:  # type: ignore[override]
        return self.center

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.fused and type(nap) is Local:
            return _local_moments(v, nap, spatial, center=self.center)
        if self.center:
            mean, var = nap.moments(v, spatial)
            return {"mean": mean, "var": var}
        return {"ms": nap.mean_square(v, spatial)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        second = stats["var"] if self.center else stats["ms"]
        return Fs.divisive_coefficients(stats.get("mean"), second, self.k, self.alpha, self.beta)

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if Fl.is_own(stats):
            return Fl.local_divisive(v, stats, weight=weight, bias=bias, k=self.k,
                                     alpha=self.alpha, beta=self.beta)
        return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)

    def native_kernel(self, layout: Layout) -> Kernel | None:
        """torch's ``local_response_norm`` (uncentred, over a window of channels only, padded
        with zeros, no recovery) where the operation is not ``fused``: the Function of
        :func:`~normkit.functional.fused_local.local_divisive` takes about a fifth of the
        kernel's time (a 3-D pooling of ``x²`` and its backward, ``pow``) and saves a third of
        its memory (normkit bench --goals: lrn)."""
        nap = layout.nap
        if (not self.fused and not self.center and type(nap) is Local
                and nap.channel_window is not None and nap.include_pad and nap.window in (1, (1,), (1, 1), (1, 1, 1))
                and layout.recovery == "none" and layout.channel_axis == 1):
            return "local_response_norm"
        return None
