r"""Operations of the multi-mode and combinational methods (book ch. 5).

==============================  ==========================================================  =========
operation                       x̂                                                          partition
==============================  ==========================================================  =========
``SwitchableStandardize()``     ``(x − Σ_k w_k μ_k)/√(Σ_k w'_k σ²_k + ε)``, k ∈ {IN, LN, BN}  ``Batch()``
``BatchInstanceStandardize()``  ``ρ·x̂_BN + (1 − ρ)·x̂_IN``, ``ρ ∈ [0, 1]`` per channel         ``Batch()``
``EvoB0()``                     ``x / max(√(σ²_B + ε), v·x + √(σ²_I + ε))``                   ``Batch()``
``EvoS0()``                     ``x·sigmoid(v·x) / √(σ²_G + ε)``                              ``Group(g)``
``FilterResponse()``            ``max(γ·x/√(ν² + ε) + β, τ)``, ``ν² = E_S[x²]``               ``Instance()``
``BatchChannelStandardize(g)``  ``GN_g(γ_b·x̂_BN + β_b)``                                      ``Batch()``
==============================  ==========================================================  =========

These operations own learnable parameters of their own (mixing logits, gates, the ``v`` of
EvoNorm, the threshold ``τ`` of FRN's TLU, BCN's intermediate affine), declared by
``create_parameters`` and registered on the module, exactly as :class:`~normkit.nop.SwitchableWhiten`.
They reach the operation through ``fit`` / ``eval_stats``, which put them (viewed against the
canonical ``(N, A, B, S)`` view) beside the statistics; only the statistics named in
``stat_names`` are tracked. Every statistic is computed in at least float32, variances biased
(two passes), ``ε`` inside the square root.

The per-sample statistics are computed once, per instance ``(n, c)`` over the positions, and
the layer and batch statistics are pooled from them with the law of total variance
(:func:`pooled_moments`: exact for cells of equal size, and without the cancellation of
``E[x²] − μ²``), so a switchable mixture costs one pass over the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.partition import resolve_groups, stats_dtype
from ..nap import Batch, Instance, Partition, Synced
from ._base import Coefficients, Operation, Stats
from ._standard import Scale

__all__ = [
    "sparsemax",
    "instance_moments",
    "pooled_moments",
    "SwitchableStandardize",
    "BatchInstanceStandardize",
    "EvoB0",
    "EvoS0",
    "FilterResponse",
    "BatchChannelStandardize",
]


# ------------------------------------------------------------------------------ helpers
def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    r"""Euclidean projection of ``z`` onto the probability simplex (Martins & Astudillo 2016).

    .. math::
        \mathrm{sparsemax}(z) = \arg\min_{p \in \Delta} \|p - z\|^2 = \max(z - \tau, 0),
        \qquad \sum_i \max(z_i - \tau, 0) = 1

    Unlike softmax it reaches exact zeros, and a one-hot vector when the largest entry exceeds
    the second by at least 1. Piecewise linear, differentiable almost everywhere (autograd
    through the sort).

    Example:
        >>> sparsemax(torch.tensor([0.0, 0.0, 2.0]))
        tensor([0., 0., 1.])
        >>> sparsemax(torch.tensor([1.0, 0.5, 0.0]))
        tensor([0.7500, 0.2500, 0.0000])
    """
    zs = torch.sort(z, dim=dim, descending=True).values
    n = z.shape[dim]
    shape = [1] * z.dim()
    shape[dim] = n
    k = torch.arange(1, n + 1, dtype=z.dtype, device=z.device).reshape(shape)
    # the support is the prefix of sorted entries with 1 + k·z_(k) > Σ_{j≤k} z_(j)
    support = (1 + k * zs > zs.cumsum(dim)).to(z.dtype)
    tau = ((zs * support).sum(dim, keepdim=True) - 1) / support.sum(dim, keepdim=True)
    return (z - tau).clamp_min(0)


def instance_moments(v: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of each instance ``(n, a, b)`` over the positions ``S`` of the
    canonical view, ``(N, A, B, 1)`` each, in at least float32."""
    return S.moments(v, (3,))


def pooled_moments(mean: Tensor, var: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    r"""Moments of the union of equal-size cells from the cells' moments (law of total variance):
    :math:`\mu = \bar{\mu_i}`, :math:`\sigma^2 = \overline{\sigma_i^2} + \overline{(\mu_i - \mu)^2}`.

    Exact (not an approximation) when every cell holds the same number of values, as the
    instances of a batch do; no ``E[x²] − μ²`` cancellation.
    """
    dims = tuple(dims)
    mu = mean.mean(dims, keepdim=True)
    d = mean - mu
    return mu, (var + d * d).mean(dims, keepdim=True)


def _batch_moments(v: Tensor, nap: Partition, spatial: Sequence[int],
                   inst: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """BN's moments: pooled from the instance moments (exact, no second pass), or from the
    partition when it merges them across processes (:class:`normkit.nap.Synced`)."""
    if isinstance(nap, Synced):
        return nap.moments(v, spatial)
    return pooled_moments(*inst, (0,))


def _channel_view(p: Tensor, v: Tensor) -> Tensor:
    """A per-channel parameter ``(C,)`` as ``(1, A, B, 1)`` against the view ``v``, in ≥ float32."""
    return p.reshape(1, v.shape[1], v.shape[2], 1).to(stats_dtype(v))


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


# ---------------------------------------------------------------------------- switchable
_SN_MODES = ("in", "ln", "bn")


@dataclass(frozen=True, repr=False)
class SwitchableStandardize(_OwnsParameters):
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
            parts["ln"] = pooled_moments(mi, vi, (1, 2))
        uniform = torch.zeros(len(self.modes), dtype=mi.dtype, device=mi.device)
        wm = self.mixture(params.get("mean_weight", uniform).to(mi.dtype))
        wv = self.mixture(params.get("var_weight", uniform).to(mi.dtype))
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
        inst = instance_moments(v)
        if "bn" not in self.modes:
            return self._mix(inst, None, params or {})
        batch = _batch_moments(v, nap, spatial, inst)
        return {"mean": batch[0], "var": batch[1], **self._mix(inst, batch, params or {})}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        r = self.from_running(running, nap, num_features)
        batch = (r["mean"].to(stats_dtype(v)), r["var"].to(stats_dtype(v)))
        return self._mix(instance_moments(v), batch, params or {})

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mix_mean"], stats["mix_var"], eps)


# ------------------------------------------------------------------------ batch-instance
@dataclass(frozen=True, repr=False)
class BatchInstanceStandardize(_OwnsParameters):
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
        mi, vi = instance_moments(v)
        mb, vb = _batch_moments(v, nap, spatial, (mi, vi))
        return {"mean": mb, "var": vb, "inst_mean": mi, "inst_var": vi, "gate": self._gate(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        r = self.from_running(running, nap, num_features)
        mi, vi = instance_moments(v)
        return {"mean": r["mean"].to(mi.dtype), "var": r["var"].to(mi.dtype), "inst_mean": mi,
                "inst_var": vi, "gate": self._gate(v, params)}

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
        mi, vi = instance_moments(v)
        ml, vl = pooled_moments(mi, vi, (1, 2))
        # BatchInstanceStandardize.coefficients mixes "mean"/"var" (here LN's) with the instance
        # moments by ρ: ρ → IN, 1 − ρ → LN
        return {"mean": ml, "var": vl, "inst_mean": mi, "inst_var": vi,
                "gate": 1 - self._gate(v, params)}


# ------------------------------------------------------------------------------- EvoNorm
class _NotAffine(_OwnsParameters):
    """Normalization-activation operations: ``x̂`` is not ``x·scale + shift``."""

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        raise ConfigError(f"{self!r} is not affine in x; use transform()")


def _ones(num_features: int, factory: dict[str, Any], name: str) -> dict[str, nn.Parameter]:
    return {name: nn.Parameter(torch.ones(num_features, **factory))}


@dataclass(frozen=True, repr=False)
class EvoB0(_NotAffine):
    r"""EvoNorm-B0's normalization-activation (Liu et al. 2020):

    .. math::
        \hat{x} = \frac{x}{\max\big(\sqrt{\sigma_B^2 + \epsilon},\
                  v \odot x + \sqrt{\sigma_I^2 + \epsilon}\big)}

    ``σ²_B`` per channel over the batch and positions (tracked: ``running_var``, unbiased),
    ``σ²_I`` per sample and channel over the positions (always from the input); ``v`` is a
    per-channel parameter of the module (init 1). No centering of the numerator. Use with
    ``Batch()``.
    """

    stat_names = ("var",)

    def bind(self, nap: Partition, num_features: int) -> EvoB0:
        _per_channel_split(nap, num_features, "EvoNorm-B0")
        return self

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        return min(v.shape[0] * v.shape[3], v.shape[3])

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        return _ones(num_features, factory, "v")

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        params["v"].fill_(1.0)

    @staticmethod
    def _v(v: Tensor, params: Stats | None) -> Tensor:
        p = (params or {}).get("v")
        return torch.ones((), dtype=stats_dtype(v), device=v.device) if p is None else _channel_view(p, v)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        mi, vi = instance_moments(v)
        _, vb = pooled_moments(mi, vi, (0,))
        return {"var": vb, "inst_var": vi, "v": self._v(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        vb = self.from_running(running, nap, num_features)["var"].to(stats_dtype(v))
        return {"var": vb, "inst_var": instance_moments(v)[1], "v": self._v(v, params)}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        x = v.to(stats["inst_var"].dtype)
        den = torch.maximum(torch.sqrt(stats["var"] + eps),
                            stats["v"] * x + torch.sqrt(stats["inst_var"] + eps))
        return Fs.affine_transform(x / den, None, None, weight, bias)


@dataclass(frozen=True, repr=False)
class EvoS0(_NotAffine):
    r"""EvoNorm-S0's normalization-activation (Liu et al. 2020):

    .. math::
        \hat{x} = \frac{x \odot \mathrm{sigmoid}(v \odot x)}{\sqrt{\sigma_G^2 + \epsilon}}

    ``σ²_G`` per sample over each group of channels and the positions (the partition's area:
    ``Group(g)``); ``v`` is a per-channel parameter of the module (init 1). No centering.
    """

    stat_names = ("var",)

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        return _ones(num_features, factory, "v")

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        params["v"].fill_(1.0)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        return {"var": nap.moments(v, spatial)[1], "v": EvoB0._v(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        var = self.from_running(running, nap, num_features)["var"].to(stats_dtype(v))
        return {"var": var, "v": EvoB0._v(v, params)}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        x = v.to(stats["var"].dtype)
        out = x * torch.sigmoid(stats["v"] * x) * torch.rsqrt(stats["var"] + eps)
        return Fs.affine_transform(out, None, None, weight, bias)


# --------------------------------------------------------------------- filter response
LEARNED_EPS_INIT = 1e-4


@dataclass(frozen=True, repr=False)
class FilterResponse(_OwnsParameters, Scale):
    r"""Filter response normalization with a thresholded linear unit (Singh & Krishnan 2020).

    .. math::
        \hat{x} = \frac{x}{\sqrt{\nu^2 + \epsilon + |\epsilon_l|}},\quad
        y = \max(\gamma \hat{x} + \beta,\ \tau),\qquad \nu^2 = \mathbb{E}_S[x^2]

    with ``Instance()`` (``ν²`` per sample and channel over the positions). The recovery's
    ``γ, β`` are applied inside (TLU acts after them). ``tlu``: learn the per-channel threshold
    ``tau`` (init 0, so TLU starts as a ReLU of the affine output). ``learned_eps``: add the
    paper's learned ``|ε_l|`` (one scalar ``learned_eps``, init 1e-4 — not 0, where ``|·|`` has
    a zero gradient). Without both this is ``Scale("rms")``.
    """

    kind: Literal["rms"] = field(default="rms", repr=False)
    tlu: bool = True
    learned_eps: bool = False

    def __post_init__(self) -> None:
        if self.kind != "rms":
            raise ConfigError(f"FilterResponse scales by the mean square only, got kind={self.kind!r}")
        for name in ("tlu", "learned_eps"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        out = {}
        if self.tlu:
            out["tau"] = nn.Parameter(torch.zeros(num_features, **factory))
        if self.learned_eps:
            out["learned_eps"] = nn.Parameter(torch.full((1,), LEARNED_EPS_INIT, **factory))
        return out

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        if "tau" in params:
            params["tau"].zero_()
        if "learned_eps" in params:
            params["learned_eps"].fill_(LEARNED_EPS_INIT)

    def _extras(self, v: Tensor, params: Stats | None) -> Stats:
        params = params or {}
        out = {}
        if self.tlu:  # without the parameter (functional use): τ = 0, a ReLU
            tau = params.get("tau")
            out["tau"] = (torch.zeros((), dtype=stats_dtype(v), device=v.device) if tau is None
                          else _channel_view(tau, v))
        if self.learned_eps and params.get("learned_eps") is not None:
            out["learned_eps"] = params["learned_eps"].abs().to(stats_dtype(v)).reshape(1, 1, 1, 1)
        return out

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        return {"ms": nap.mean_square(v, spatial), **self._extras(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        return {**self.from_running(running, nap, num_features), **self._extras(v, params)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        ms = stats["ms"] if "learned_eps" not in stats else stats["ms"] + stats["learned_eps"]
        return Fs.rms_coefficients(ms, eps)

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        scale, _ = self.coefficients(stats, eps, m)
        out = Fs.affine_transform(v, scale, None, weight, bias)
        return torch.maximum(out, stats["tau"].to(out.dtype)) if self.tlu else out


# ----------------------------------------------------------------------- batch-channel
@dataclass(frozen=True, repr=False)
class BatchChannelStandardize(_NotAffine):
    r"""Batch-channel normalization: BN, its own affine, then GN (Qiao et al. 2019).

    .. math::
        h = \gamma_b \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta_b,\qquad
        \hat{x} = \frac{h - \mu_{ng}(h)}{\sqrt{\sigma_{ng}^2(h) + \epsilon}}

    ``μ_B, σ²_B`` per channel over the batch and positions (tracked), ``μ_ng, σ²_ng`` per sample
    over each of the ``g`` groups of channels and the positions of ``h`` (always from the
    input). ``γ_b, β_b`` (``bn_weight``, ``bn_bias``, per channel, init 1 and 0) are parameters
    of the module when ``bn_affine``; the module's recovery (``weight``, ``bias``) acts after the
    GN step. Use with ``Batch()``. Not affine in ``x``: the GN step depends on ``h``.
    """

    num_groups: int | None = None
    group_size: int | None = None
    bn_affine: bool = True

    stat_names = ("mean", "var")

    def __post_init__(self) -> None:
        if not isinstance(self.bn_affine, bool):
            raise ConfigError(f"bn_affine must be a bool, got {self.bn_affine!r}")
        if self.num_groups is None and self.group_size is None:
            raise ConfigError("BatchChannelStandardize needs num_groups= or group_size=")

    def bind(self, nap: Partition, num_features: int) -> BatchChannelStandardize:
        _per_channel_split(nap, num_features, "batch-channel normalization")
        if not nap.batch_dependent:
            raise ConfigError(f"batch-channel normalization needs nap=Batch(), got {nap!r}")
        g, _ = resolve_groups(num_features, self.num_groups, self.group_size)
        return replace(self, num_groups=g, group_size=None)

    def _groups(self, c: int) -> int:
        return resolve_groups(c, self.num_groups, self.group_size)[0]

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        c = v.shape[1] * v.shape[2]
        return min(v.shape[0] * v.shape[3], c // self._groups(c) * v.shape[3])

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        if not self.bn_affine:
            return {}
        return {"bn_weight": nn.Parameter(torch.ones(num_features, **factory)),
                "bn_bias": nn.Parameter(torch.zeros(num_features, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        if "bn_weight" in params:
            params["bn_weight"].fill_(1.0)
            params["bn_bias"].zero_()

    @staticmethod
    def _affine(v: Tensor, params: Stats | None) -> Stats:
        params = params or {}
        return {k: _channel_view(params[k], v) for k in ("bn_weight", "bn_bias") if k in params}

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        mean, var = nap.moments(v, spatial)
        return {"mean": mean, "var": var, **self._affine(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        r = self.from_running(running, nap, num_features)
        dt = stats_dtype(v)
        return {"mean": r["mean"].to(dt), "var": r["var"].to(dt), **self._affine(v, params)}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        scale, shift = Fs.standardize_coefficients(stats["mean"], stats["var"], eps)
        if "bn_weight" in stats:
            scale, shift = scale * stats["bn_weight"], shift * stats["bn_weight"] + stats["bn_bias"]
        h = torch.addcmul(shift, v.to(scale.dtype), scale)  # (N, C, 1, S)
        n, c = h.shape[0], h.shape[1] * h.shape[2]
        hg = h.reshape(n, self._groups(c), -1)
        mg, vg = S.moments(hg, (2,))
        out = ((hg - mg) * torch.rsqrt(vg + eps)).reshape(h.shape)
        return Fs.affine_transform(out, None, None, weight, bias)
