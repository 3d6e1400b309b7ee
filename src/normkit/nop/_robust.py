"""Operations of the robust-estimation family (book ch. 6): BN whose training statistics use more
than the current batch (running estimates, earlier iterations) or less (ghost batches).

Every operation here standardizes per channel, ``x̂ = (x − μ)/√(σ² + ε)``; they differ in the
``(μ, σ²)`` used in training:

==============================  ==========================================================
operation                       training statistics
==============================  ==========================================================
``Renormalize(...)``            batch ``(μ_B, σ_B²)``, then ``x̂·r + d`` toward the running ones
``Ghost(virtual_batch_size)``   each virtual sub-batch of the batch has its own
``MomentumStandardize(...)``    ``λ·(previous) + (1 − λ)·(batch)``, ``λ`` from the batch size
``WindowStandardize(window)``   average over the last ``window`` iterations (cross-iteration BN)
``MovingAverageStandardize``    the same forward, moving-average statistics in the backward too
==============================  ==========================================================

The last two, which average over iterations, are in :mod:`._window`.

Evaluation is BN's everywhere: the running mean and unbiased variance of the *batch*
statistics, updated with ``momentum`` as :class:`~normkit.Normalization` does.

The stateful ones (all but :class:`Ghost`, ``reads_state = True``) read the module's running
estimates, its step counter ``num_batches_tracked`` and their own buffers
(:meth:`~normkit.nop.Operation.state_buffers`) from the :class:`~normkit.nop.State` passed to
:meth:`~normkit.nop.Operation.fit` as ``state``, and record the step in
:meth:`~normkit.nop.Operation.update_state`. :class:`~normkit.Normalization` provides both
whenever it tracks running estimates; without them (``state=None``) these operations normalize
with the batch statistics (BN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.fused_robust import constant_standardize, standardize_affine
from ..functional.fused_robust import moments as fused_moments
from ..functional.partition import as_dtype
from ..nap import Batch, Local, Partition, Synced
from ._base import Coefficients, Operation, State, StateSpec, Stats
from ._standard import Standardize
from ._whiten import Whiten

__all__ = [
    "RobustStandardize",
    "Renormalize",
    "Ghost",
    "MomentumStandardize",
]



def _int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def batch_moments(fused: bool, v: Tensor, nap: Partition, spatial: Sequence[int]
                  ) -> tuple[Tensor, Tensor]:
    """``nap.moments`` — through :func:`~normkit.functional.fused_robust.moments` (a two-pass
    backward) when ``fused`` and the partition is a plain one (not synchronized, not local)."""
    if fused and not isinstance(nap, (Synced, Local)):
        return fused_moments(v, nap.dims)
    return nap.moments(v, spatial)


def fused_standardize(fused: bool, v: Tensor, stats: Stats, weight: Tensor | None,
                      bias: Tensor | None, eps: float) -> Tensor | None:
    """``γ (x − μ)/√(σ² + ε) + β`` of ``stats``'s ``mean, var`` through
    :func:`~normkit.functional.fused_robust.standardize_affine` when ``fused``, the statistics
    carry a gradient (training) and ``γ, β`` are constant along the axes they broadcast along;
    ``None`` otherwise (the caller runs the plain transform)."""
    if not fused:
        return None
    mean, var = stats["mean"], stats["var"]
    if not (mean.requires_grad or var.requires_grad):  # constants: the running estimates
        return constant_standardize(v, mean, var, weight, bias, eps)
    dims = [d for d in range(v.dim()) if mean.shape[d] == 1 and var.shape[d] == 1]
    if any(t is not None and any(t.shape[d] != 1 for d in dims) for t in (weight, bias)):
        return None
    return standardize_affine(v, mean, var, weight=weight, bias=bias, eps=eps)


def _number(name: str, value: Any, low: float, what: str) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < low):
        raise ConfigError(f"{name} must be a finite number >= {low} ({what}), got {value!r}")


@dataclass(frozen=True, repr=False)
class RobustStandardize(Standardize):
    """Standardization whose training statistics may differ from the batch's.

    :meth:`fit` returns the statistics to normalize with (``mean``, ``var``) and, where they
    differ, the batch's own (``batch_mean``, ``batch_var``, biased). Running estimates track the
    batch's, as BN's do, so evaluation is BN's. :meth:`fit` takes the call's
    :class:`~normkit.nop.State` (``reads_state``).
    """

    reads_state = True

    def running(self, stats: Stats, m: int) -> Stats:
        batch = {"mean": stats.get("batch_mean", stats["mean"]),
                 "var": stats.get("batch_var", stats["var"])}
        return super().running(batch, m)


@dataclass(frozen=True, repr=False)
class Renormalize(RobustStandardize):
    r"""Batch renormalization (Ioffe 2017): batch standardization corrected toward the running
    statistics,

    .. math::
        \hat{x} = \frac{x - \mu_B}{\sigma_B}\, r + d,\quad
        r = \mathrm{sg}\Big(\mathrm{clip}_{[1/r_{max},\, r_{max}]}\frac{\sigma_B}{\sigma}\Big),\quad
        d = \mathrm{sg}\Big(\mathrm{clip}_{[-d_{max},\, d_{max}]}\frac{\mu_B - \mu}{\sigma}\Big)

    with ``σ_B = √(σ_B² + ε)``, ``σ = √(running_var + ε)``, ``μ`` = ``running_mean`` and ``sg`` a
    stop-gradient. Unclipped, ``x̂ = (x − μ)/σ``: training then normalizes like evaluation. The
    limits follow the paper's schedule over the training step ``t`` (``num_batches_tracked``):
    ``r_max = 1, d_max = 0`` (BN) up to ``warmup_steps``, then linearly relaxed to reach
    ``r_max`` at ``r_max_steps`` and ``d_max`` at ``d_max_steps``. With all three steps ``0`` the
    limits are fixed from the first step.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5000
    r_max_steps: int = 40000
    d_max_steps: int = 25000
    #: training with r, d runs BN's kernel with γ·r, β + γ·d (:meth:`transform`)
    fused: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        _number("r_max", self.r_max, 1, "r is clipped to [1/r_max, r_max]")
        _number("d_max", self.d_max, 0, "d is clipped to [-d_max, d_max]")
        for name in ("warmup_steps", "r_max_steps", "d_max_steps"):
            _int(name, getattr(self, name), 0)
        for name in ("r_max_steps", "d_max_steps"):
            if getattr(self, name) < self.warmup_steps:
                raise ConfigError(
                    f"{name} ({getattr(self, name)}) must be >= warmup_steps "
                    f"({self.warmup_steps}): the limits relax from the end of the warm-up until "
                    f"{name}; use 0 for all three steps for fixed limits"
                )

    def _ramp(self, t: Tensor, end: int) -> Tensor:
        w = self.warmup_steps
        if end > w:
            return ((t - w) / (end - w)).clamp(0, 1)
        return (t > w).to(t.dtype)

    def limits(self, step: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(r_max(t), d_max(t))`` at training step ``t`` (a tensor, e.g. ``num_batches_tracked``)."""
        t = as_dtype(step, dtype)
        return (1 + (self.r_max - 1) * self._ramp(t, self.r_max_steps),
                self.d_max * self._ramp(t, self.d_max_steps))

    def _through_kernel(self, nap: Partition, v: Tensor) -> bool:
        """Training runs BN's kernel: fused, over a local ``Batch()`` of whole channels (a
        synchronized partition's statistics come from every rank, the kernel's would not)."""
        return self.fused and type(nap) is Batch and v.shape[2] == 1

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None, state: State | None = None,
    ) -> Stats:
        if self._through_kernel(nap, v) and state is not None:  # the kernel differentiates them
            with torch.no_grad():
                mean, var = nap.moments(v, spatial)
        else:
            mean, var = nap.moments(v, spatial)
        if state is None:  # no running estimates: r = 1, d = 0 (BN)
            return {"mean": mean, "var": var}
        mu_b, var_b = mean.detach(), var.detach()
        r_max, d_max = self.limits(state.step, mean.dtype)
        sigma = torch.sqrt(state.running["var"].to(mean.dtype).reshape(mean.shape) + eps)
        r = torch.clamp(torch.sqrt(var_b + eps) / sigma, 1 / r_max, r_max)
        d = torch.clamp((mu_b - state.running["mean"].to(mean.dtype).reshape(mean.shape)) / sigma,
                        -d_max, d_max)
        return {"mean": mean, "var": var, "r": r, "d": d}

    eval_moments = Standardize.eval_moments  # evaluation: BN's, with the running estimates

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        scale, shift = Fs.standardize_coefficients(stats["mean"], stats["var"], eps)
        if "r" in stats:
            scale, shift = scale * stats["r"], shift * stats["r"] + stats["d"]
        return scale, shift

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Training with ``r, d`` (constants to autograd) is BN with ``γ·r`` and ``β + γ·d``:
        torch's kernel computes it, with BN's backward through ``μ_B, σ_B`` (``fused``)."""
        if not ("r" in stats and self._through_kernel(nap, v)):
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        r, d = stats["r"].reshape(-1), stats["d"].reshape(-1)
        w = r if weight is None else weight.reshape(-1) * r
        b = d if weight is None else weight.reshape(-1) * d
        b = b if bias is None else b + bias.reshape(-1)
        y = F.batch_norm(v.reshape(v.shape[0], v.shape[1], -1), None, None, w, b, True, 0.0, eps)
        return y.reshape(v.shape)


@dataclass(frozen=True, repr=False)
class Ghost(Operation):
    """Ghost batches (Hoffer et al. 2017): ``inner``'s statistics over each virtual sub-batch of
    ``virtual_batch_size`` consecutive samples (``torch.split`` along ``N``: a last, smaller
    sub-batch when ``virtual_batch_size`` does not divide ``N``; it must still hold more than one
    value per statistic).

    Running estimates take one update per step from the ghost statistics of the step: the
    means averaged over the samples (= the batch mean) and, for ``var``, the pooled within-ghost
    variance ``Σ_k SS_k/(m − l)`` (``SS_k`` the squared deviations of ghost ``k`` from its own
    mean, ``m`` values in ``l`` ghosts): unbiased, and ``m/(m − 1)·σ_B²`` — BN's — for one
    ghost. Use with a batch partition; ``inner`` a standardization-family operation.
    """

    virtual_batch_size: int = 32
    inner: Operation = field(default_factory=Standardize)
    #: standardization (``inner`` a plain :class:`Standardize`) trains through the fused moments
    #: of every ghost at once and :func:`~normkit.functional.fused_robust.standardize_affine`
    fused: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        _int("virtual_batch_size", self.virtual_batch_size, 1)
        if not isinstance(self.inner, Operation) or isinstance(self.inner, (Whiten, Ghost)):
            raise ConfigError(
                f"Ghost needs a standardization-family inner operation (Standardize, Center, "
                f"Scale, L1, Range), got {self.inner!r}"
            )

    @property
    def stat_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.stat_names

    @property
    def needs_spread(self) -> bool:  # type: ignore[override]
        return self.inner.needs_spread

    @property
    def uses_eps(self) -> bool:  # type: ignore[override]
        return self.inner.uses_eps

    def bind(self, nap: Partition, num_features: int) -> Operation:
        if nap.roles[0] != "M":
            raise ConfigError(
                f"ghost batches split the batch axis, but {nap!r} takes statistics per sample; "
                f"use a batch partition such as nap.Batch()"
            )
        return replace(self, inner=self.inner.bind(nap, num_features))

    def unfused(self) -> Operation:
        return replace(self, inner=self.inner.unfused(), fused=False)

    def _fuses(self, nap: Partition) -> bool:
        return self.fused and type(self.inner) is Standardize and not isinstance(
            nap, (Synced, Local))

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        n = v.shape[0]
        last = n - (math.ceil(n / self.virtual_batch_size) - 1) * self.virtual_batch_size
        return self.inner.count(v[n - last:], nap, spatial)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        chunks = torch.split(v, self.virtual_batch_size, 0)
        if self._fuses(nap):
            if len(chunks) <= 1:
                mean, var = fused_moments(v, nap.dims)
                return {"mean": mean, "var": var}
            if v.shape[0] % self.virtual_batch_size == 0:  # every ghost at once: (k, vb, ...)
                k, vb = len(chunks), self.virtual_batch_size
                ghosts = v.reshape(k, vb, *v.shape[1:])
                pair = fused_moments(ghosts, tuple(d + 1 for d in nap.dims))
                return {name: t.expand(k, vb, *t.shape[2:]).reshape(v.shape[0], *t.shape[2:])
                        for name, t in zip(("mean", "var"), pair, strict=True)}
        if len(chunks) <= 1:
            return self.inner.fit(v, nap, spatial, eps=eps, params=params)
        parts = [self.inner.fit(c, nap, spatial, eps=eps, params=params) for c in chunks]
        # per-sample statistics: each sample carries its ghost batch's
        return {k: torch.cat([p[k].expand(c.shape[0], *p[k].shape[1:])
                              for p, c in zip(parts, chunks, strict=True)])
                for k in parts[0]}

    def running(self, stats: Stats, m: int) -> Stats:
        n = next(iter(stats.values())).shape[0]
        ghosts = math.ceil(n / self.virtual_batch_size)
        if n == 1 or ghosts <= 1:
            return self.inner.running(stats, m)
        out = {}
        for k, t in stats.items():
            t = t.mean(0)  # over samples: ghosts weighted by their sizes
            out[k] = (t * (m / (m - ghosts)) if k == "var" else t).reshape(-1)
        return out

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return self.inner.coefficients(stats, eps, m)

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        return self.inner.eval_moments(running, eps)  # evaluation: the inner operation's

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        y = fused_standardize(self._fuses(nap), v, stats, weight, bias, eps)
        if y is None:
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        return y

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return self.inner.buffers(nap, num_features)

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        return self.inner.create_parameters(num_features, nap, factory)

    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        self.inner.reset_parameters(params)


@dataclass(frozen=True, repr=False)
class _BlendedStandardize(RobustStandardize):
    """Standardization with statistics blended from the batch's and earlier ones (momentum,
    window): while ``fused``, training runs :func:`fused_standardize` (the batch moments'
    Function, the blend by autograd on per-channel tensors); otherwise the composition.
    ``unfused()`` is :class:`~normkit.nop.Standardize`'s."""

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        y = fused_standardize(self.fused, v, stats, weight, bias, eps)
        if y is None:
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        return y


@dataclass(frozen=True, repr=False)
class MomentumStandardize(_BlendedStandardize):
    r"""Momentum BN (Yong et al. 2020): normalize with momentum statistics
    ``μ_M ← λμ_M + (1 − λ)μ_B``, ``σ_M² ← λσ_M² + (1 − λ)σ_B²`` (biased batch variance; the
    gradient flows through the current batch's share).

    ``λ`` is ``lambda_`` when given, else the paper's rule from the batch size ``m`` (samples
    ``N``) and an ideal batch size ``m₀``: with ``q = min(m/m₀, 1)``,
    ``λ(t) = q^{max(T − t, 0)/(T − 1)} − q`` — the paper's
    ``ρ^{T/(T−1)·max(T−t, 0)} − ρ^T`` with ``ρ = q^{1/T}`` — over training steps ``t = 1 … T``
    (``total_steps``): ``0`` (BN) at the first step, ``1 − q`` from step ``T`` on; without
    ``total_steps``, ``λ = 1 − q`` throughout. A batch of ``m₀`` or more gives ``λ = 0`` (BN). The
    first step after a reset normalizes with the batch statistics (nothing to blend with yet).
    """

    lambda_: float | None = None
    ideal_batch_size: int = 32
    total_steps: int | None = None
    #: training runs the moments and the standardization as Functions with hand-derived
    #: backwards (:mod:`normkit.functional.fused_robust`); the blend stays autograd's
    fused: bool = field(default=True, repr=False)
    eval_moments = Standardize.eval_moments  # evaluation: BN's, with the running estimates

    def __post_init__(self) -> None:
        if self.lambda_ is not None and (
                not isinstance(self.lambda_, (int, float)) or isinstance(self.lambda_, bool)
                or not 0 <= self.lambda_ < 1):
            raise ConfigError(
                f"lambda_ must be a number in [0, 1) (the weight of the previous momentum "
                f"statistics; 1 would ignore every batch) or None for the paper's rule, "
                f"got {self.lambda_!r}"
            )
        _int("ideal_batch_size", self.ideal_batch_size, 1)
        if self.total_steps is not None:
            _int("total_steps", self.total_steps, 2)

    def state_buffers(self, nap: Partition, num_features: int) -> StateSpec:
        if self.lambda_ == 0:
            return {}
        size = nap.stat_size(num_features)
        return {"momentum_mean": ((size,), 0.0), "momentum_var": ((size,), 1.0)}

    def momentum_weight(self, batch_size: int, step: Tensor,
                        dtype: torch.dtype = torch.float32) -> Tensor:
        """``λ`` at training step ``step`` (a tensor) for a batch of ``batch_size`` samples."""
        t = as_dtype(step, dtype)
        if self.lambda_ is not None:
            lam = torch.full_like(t, float(self.lambda_))
        else:
            q = min(batch_size / self.ideal_batch_size, 1.0)
            if self.total_steps is None:
                lam = torch.full_like(t, 1.0 - q)
            else:
                e = (self.total_steps - t).clamp(min=0) / (self.total_steps - 1)
                lam = torch.pow(q, e) - q
        return lam * (t > 1).to(dtype)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None, state: State | None = None,
    ) -> Stats:
        mean, var = batch_moments(self.fused, v, nap, spatial)
        stats = {"mean": mean, "var": var, "batch_mean": mean, "batch_var": var}
        if state is None or "momentum_mean" not in state.buffers:
            return stats
        lam = self.momentum_weight(v.shape[0], state.step, mean.dtype)
        prev_mean = state.buffers["momentum_mean"].to(mean.dtype).reshape(mean.shape)
        prev_var = state.buffers["momentum_var"].to(mean.dtype).reshape(mean.shape)
        stats["mean"] = lam * prev_mean + (1 - lam) * mean
        stats["var"] = lam * prev_var + (1 - lam) * var
        return stats

    @S.no_grad
    def update_state(self, state: Stats, stats: Stats) -> None:
        if "momentum_mean" in state:
            state["momentum_mean"].copy_(stats["mean"].reshape(-1))
            state["momentum_var"].copy_(stats["var"].reshape(-1))
