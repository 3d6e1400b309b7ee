r"""Operations of the combinational methods (book ch. 5): learned mixtures of IN, LN and BN.

==============================  ==========================================================  =========
operation                       x̂                                                          partition
==============================  ==========================================================  =========
``SwitchableStandardize()``     ``(x − Σ_k w_k μ_k)/√(Σ_k w'_k σ²_k + ε)``, k ∈ {IN, LN, BN}  ``Batch()``
``BatchInstanceStandardize()``  ``ρ·x̂_BN + (1 − ρ)·x̂_IN``, ``ρ ∈ [0, 1]`` per channel         ``Batch()``
``InstanceLayerStandardize()``  ``ρ·x̂_IN + (1 − ρ)·x̂_LN``, ``ρ ∈ [0, 1]`` per channel         ``Instance()``
==============================  ==========================================================  =========

The normalization-activation operations of the same chapter (EvoNorm, FRN, BCN) are in
:mod:`._norm_act` (importable from here too). These operations own learnable parameters of their
own (mixing logits, gates), declared by
``create_parameters`` and registered on the module, exactly as :class:`~normkit.nop.SwitchableWhiten`.
They reach the operation through ``fit`` / ``eval_stats``, which put them (viewed against the
canonical ``(N, A, B, S)`` view) beside the statistics; only the statistics named in
``stat_names`` are tracked. Every statistic is computed in at least float32, variances biased
(two passes), ``ε`` inside the square root.

The per-sample statistics are computed once, per instance ``(n, c)`` over the positions, and
the layer and batch statistics are pooled from them with the law of total variance
(:func:`~normkit.functional.merging.pool_moments`: exact for cells of equal size, and without
the cancellation of ``E[x²] − μ²``), so a switchable mixture costs one pass over the input.
By default (``fused``) the instance moments and the final per-sample affine ``x·scale + shift``
are one autograd Function each, with one-pass backwards
(:mod:`normkit.functional.fused_combination`); ``Normalization(native=False)`` runs the plain
composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import fused_combination as Fc
from ..functional import standardize as Fs
from ..functional.merging import pool_moments
from ..functional.merging import pool_moments as pooled_moments  # noqa: F401 - the old name
from ..functional.partition import as_dtype, stats_dtype
from ..functional.simplex import sparsemax
from ..nap import Partition
from ._base import Coefficients, Stats
from ._norm_act import BatchChannelStandardize as BatchChannelStandardize
from ._norm_act import EvoB0 as EvoB0
from ._norm_act import EvoS0 as EvoS0
from ._norm_act import FilterResponse as FilterResponse
from ._owned import _batch_moments, _channel_view, _OwnsParameters, _per_channel_split
from ._owned import instance_moments as instance_moments

__all__ = [
    "SwitchableStandardize",
    "BatchInstanceStandardize",
    "InstanceLayerStandardize",
]


# ------------------------------------------------------------------------------- fused
class _RowFused(_OwnsParameters):
    """Mixtures whose ``x̂ = x·scale + shift`` has ``scale, shift`` per sample and channel, all
    from the instance moments: by default (``fused``) those moments and the affine are one
    Function each (:func:`~normkit.functional.fused_combination.row_moments`,
    :func:`~normkit.functional.fused_combination.row_affine`) — a one-pass backward each
    instead of autograd's several; ``Normalization(native=False)`` runs the composition."""

    fused: bool

    def _instance(self, v: Tensor) -> tuple[Tensor, Tensor]:
        return Fc.row_moments(v) if self.fused else instance_moments(v)

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        scale, shift = self.coefficients(stats, eps, m)
        rows = [t for t in (scale, shift, weight, bias) if t is not None]
        if not self.fused or any(t.dim() != 4 or t.shape[3] != 1 for t in rows):
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        if weight is not None:
            scale, shift = scale * weight, shift * weight
        if bias is not None:
            shift = shift + bias
        return Fc.row_affine(v, scale, shift)


# ---------------------------------------------------------------------------- switchable
_SN_MODES = ("in", "ln", "bn")


@dataclass(frozen=True, repr=False)
class SwitchableStandardize(_RowFused):
    r"""Switchable standardization: a learned mixture of IN, LN and BN statistics (Luo et al.).

    .. math::
        \hat{x} = \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma_k^2 + \epsilon}},
        \qquad w = \phi(\lambda),\ w' = \phi(\lambda'),\ k \in \text{modes}

    ``μ_in, σ²_in`` per sample and channel over the positions, ``μ_ln, σ²_ln`` per sample over
    channels and positions, ``μ_bn, σ²_bn`` per channel over the batch and positions (all
    biased, the paper's ``1/|I_k|``). ``φ`` is softmax, or :func:`sparsemax` with
    ``sparse=True``. The logits ``mean_weight`` (``λ``) and ``var_weight`` (``λ'``), one per
    mode, are parameters of the module (init 0: equal weights). BN's statistics are the tracked
    ones (``running_mean``, ``running_var``); evaluation mixes them with the input's own IN/LN
    statistics. Use with ``Batch()`` (``Instance()`` when ``"bn"`` is not a mode).
    """

    modes: tuple[str, ...] = _SN_MODES
    sparse: bool = False
    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var")

    def __post_init__(self) -> None:
        if (not isinstance(self.modes, tuple) or not self.modes
                or len(set(self.modes)) != len(self.modes) or not set(self.modes) <= set(_SN_MODES)):
            raise ConfigError(
                f"modes must be a non-empty tuple of distinct names from {_SN_MODES}, "
                f"got {self.modes!r}"
            )
        if not isinstance(self.sparse, bool):
            raise ConfigError(f"sparse must be a bool, got {self.sparse!r}")

    def bind(self, nap: Partition, num_features: int) -> SwitchableStandardize:
        _per_channel_split(nap, num_features, "switchable normalization")
        if nap.batch_dependent != ("bn" in self.modes):
            raise ConfigError(
                f"modes {self.modes} need nap={'Batch' if 'bn' in self.modes else 'Instance'}() "
                f"(batch statistics iff 'bn' is a mode), got {nap!r}"
            )
        return self

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        c, s = v.shape[1] * v.shape[2], v.shape[3]
        per = {"in": s, "ln": c * s}
        if "bn" in self.modes:  # the batch branch's count is global when synchronized
            per["bn"] = nap.count(v, spatial)
        return min(per[k] for k in self.modes)

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        k = len(self.modes)
        return {"mean_weight": nn.Parameter(torch.zeros(k, **factory)),
                "var_weight": nn.Parameter(torch.zeros(k, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        for p in params.values():
            p.zero_()

    def mixture(self, logits: Tensor) -> Tensor:
        """The mixing weights of ``logits``: softmax, or sparsemax when ``sparse``."""
        return sparsemax(logits) if self.sparse else torch.softmax(logits, 0)

    def _mix(self, inst: tuple[Tensor, Tensor], batch: tuple[Tensor, Tensor] | None,
             params: Stats) -> Stats:
        mi, vi = inst
        parts = {"in": inst, "bn": batch}
        if "ln" in self.modes:
            parts["ln"] = pool_moments(mi, vi, (1, 2))
        lm, lv = params.get("mean_weight"), params.get("var_weight")
        if lm is None or lv is None:  # no learned weights (functional use): uniform
            uniform = torch.zeros(len(self.modes), dtype=mi.dtype, device=mi.device)
            lm, lv = uniform if lm is None else lm, uniform if lv is None else lv
        wm = self.mixture(as_dtype(lm, mi.dtype))
        wv = self.mixture(as_dtype(lv, mi.dtype))
        # Σ w_k μ_k as μ_0 + Σ w_k (μ_k − μ_0): equal on the simplex (also its gradients, whose
        # Jacobian columns sum to 0), but weights summing to 1 only up to rounding no longer
        # shift a large common mean (constant input: every μ_k − μ_0 is exactly 0).
        ref = parts[self.modes[0]][0]
        mean = ref + sum(wm[i] * (parts[k][0] - ref) for i, k in enumerate(self.modes))
        var = sum(wv[i] * parts[k][1] for i, k in enumerate(self.modes))
        return {"mix_mean": mean, "mix_var": var}

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        inst = self._instance(v)
        if "bn" not in self.modes:
            return self._mix(inst, None, params or {})
        batch = _batch_moments(v, nap, spatial, inst)
        return {"mean": batch[0], "var": batch[1], **self._mix(inst, batch, params or {})}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        r = self.from_running(running, nap, num_features)
        batch = (as_dtype(r["mean"], stats_dtype(v)), as_dtype(r["var"], stats_dtype(v)))
        return self._mix(self._instance(v), batch, params or {})

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mix_mean"], stats["mix_var"], eps)


# ------------------------------------------------------------------------ batch-instance
@dataclass(frozen=True, repr=False)
class BatchInstanceStandardize(_RowFused):
    r"""Batch-instance standardization: a per-channel gate between BN and IN (Nam & Kim 2018).

    .. math::
        \hat{x} = \rho \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}
                + (1 - \rho) \frac{x - \mu_I}{\sqrt{\sigma_I^2 + \epsilon}},
        \qquad \rho = \mathrm{clamp}(\text{gate}, 0, 1)

    Affine in ``x`` for fixed statistics: ``scale = ρ·a_B + (1 − ρ)·a_I`` and the same for the
    shift. The gate (``(C,)``, init ``gate_init``) is a parameter of the module; BN's statistics
    are tracked, IN's come from each input (also in evaluation). Use with ``Batch()``.
    """

    gate_init: float = 1.0
    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var")

    def __post_init__(self) -> None:
        if (not isinstance(self.gate_init, (int, float)) or isinstance(self.gate_init, bool)
                or not 0.0 <= self.gate_init <= 1.0):
            raise ConfigError(
                f"gate_init must be a number in [0, 1] (1: BN, 0: IN), got {self.gate_init!r}"
            )

    def bind(self, nap: Partition, num_features: int) -> BatchInstanceStandardize:
        _per_channel_split(nap, num_features, "batch-instance normalization")
        return self

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        # IN needs more than one position; BN more than one value over the (global) batch
        return min(nap.count(v, spatial), v.shape[3])

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        return {"gate": nn.Parameter(torch.empty(num_features, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        params["gate"].fill_(self.gate_init)

    def _gate(self, v: Tensor, params: Stats | None) -> Tensor:
        gate = (params or {}).get("gate")
        if gate is None:
            return torch.full((), float(self.gate_init), dtype=stats_dtype(v), device=v.device)
        return _channel_view(gate, v).clamp(0.0, 1.0)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        mi, vi = self._instance(v)
        mb, vb = _batch_moments(v, nap, spatial, (mi, vi))
        return {"mean": mb, "var": vb, "inst_mean": mi, "inst_var": vi, "gate": self._gate(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        r = self.from_running(running, nap, num_features)
        mi, vi = self._instance(v)
        return {"mean": as_dtype(r["mean"], mi.dtype), "var": as_dtype(r["var"], mi.dtype),
                "inst_mean": mi, "inst_var": vi, "gate": self._gate(v, params)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        a_b, b_b = Fs.standardize_coefficients(stats["mean"], stats["var"], eps)
        a_i, b_i = Fs.standardize_coefficients(stats["inst_mean"], stats["inst_var"], eps)
        rho = stats["gate"]
        return rho * a_b + (1 - rho) * a_i, rho * b_b + (1 - rho) * b_i


@dataclass(frozen=True, repr=False)
class InstanceLayerStandardize(BatchInstanceStandardize):
    r"""Instance-layer standardization: a per-channel gate between IN and LN (AdaLIN's and LIN's
    operation, Kim et al. 2020, U-GAT-IT).

    .. math::
        \hat{x} = \rho \frac{x - \mu_I}{\sqrt{\sigma_I^2 + \epsilon}}
                + (1 - \rho) \frac{x - \mu_L}{\sqrt{\sigma_L^2 + \epsilon}},
        \qquad \rho = \mathrm{clamp}(\text{gate}, 0, 1)

    ``μ_L, σ²_L`` are the sample's moments over all channels and positions (pooled exactly from
    the instance moments). Per sample: no running statistics. Use with ``Instance()``.
    """

    stat_names = ()

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        return v.shape[3]

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        raise ConfigError("instance-layer normalization is per sample: it has no running "
                          "statistics (track_running_stats=False)")

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        mi, vi = self._instance(v)
        ml, vl = pool_moments(mi, vi, (1, 2))
        # BatchInstanceStandardize.coefficients mixes "mean"/"var" (here LN's) with the instance
        # moments by ρ: ρ → IN, 1 − ρ → LN
        return {"mean": ml, "var": vl, "inst_mean": mi, "inst_var": vi,
                "gate": 1 - self._gate(v, params)}
