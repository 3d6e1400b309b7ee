r"""Normalization-activation operations and BN followed by GN (book ch. 5): EvoNorm-B0/S0, FRN
with its TLU, batch-channel normalization.

==============================  ==========================================================  =========
operation                       x̂                                                          partition
==============================  ==========================================================  =========
``EvoB0()``                     ``x / max(√(σ²_B + ε), v·x + √(σ²_I + ε))``                   ``Batch()``
``EvoS0()``                     ``x·sigmoid(v·x) / √(σ²_G + ε)``                              ``Group(g)``
``FilterResponse()``            ``max(γ·x/√(ν² + ε) + β, τ)``, ``ν² = E_S[x²]``               ``Instance()``
``BatchChannelStandardize(g)``  ``GN_g(γ_b·x̂_BN + β_b)``                                      ``Batch()``
==============================  ==========================================================  =========

Like the operations of :mod:`._combination` they own learnable parameters (EvoNorm's ``v``,
FRN's threshold ``τ`` and learned ``ε``, BCN's intermediate affine), declared by
``create_parameters`` and passed to ``fit`` / ``eval_stats`` beside the statistics. Only
:class:`FilterResponse` is affine in ``x``; the others define ``transform``.

EvoNorm-B0/S0 and FRN run, by default (``fused=True``), as one autograd Function each with a
hand-derived backward (:mod:`normkit.functional.fused`): training's statistics are computed once,
without autograd (the Function differentiates through them), and handed to it under the
``batch_*`` keys; ``Normalization(native=False)`` (:meth:`unfused`) runs the plain composition.
Batch-channel normalization trains, by default, through torch's BN kernel (in ``fit``: its output
``batch_h`` and the batch moments) and GN kernel (in ``transform``;
:mod:`normkit.functional.fused_combination`); compiled for inductor, through the rows' moments
pooled into both steps' and one affine map per row
(:func:`~normkit.functional.fused_combination.batch_channel_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import fused as Ff
from ..functional import fused_combination as Fc
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.merging import pool_moments
from ..functional.partition import as_dtype, resolve_groups, stats_dtype
from ..nap import Batch, Partition
from ._base import Coefficients, Stats
from ._owned import _channel_view, _OwnsParameters, _per_channel_split, instance_moments
from ._standard import Scale

__all__ = ["EvoB0", "EvoS0", "FilterResponse", "BatchChannelStandardize"]


# ------------------------------------------------------------------------------- EvoNorm
class _NotAffine(_OwnsParameters):
    """Normalization-activation operations: ``x̂`` is not ``x·scale + shift``."""

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        raise ConfigError(f"{self!r} is not affine in x; use transform()")


class _EvoNorm(_NotAffine):
    """EvoNorm's per-channel parameter ``v`` (init 1), viewed against the canonical view; 1
    without the parameter (functional use). Subclasses have the dataclass field ``fused``."""

    fused: bool

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        return {"v": nn.Parameter(torch.ones(num_features, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        params["v"].fill_(1.0)

    @staticmethod
    def _v(v: Tensor, params: Stats | None) -> Tensor:
        p = (params or {}).get("v")
        return torch.ones((), dtype=stats_dtype(v), device=v.device) if p is None else _channel_view(p, v)


@dataclass(frozen=True, repr=False)
class EvoB0(_EvoNorm):
    r"""EvoNorm-B0's normalization-activation (Liu et al. 2020):

    .. math::
        \hat{x} = \frac{x}{\max\big(\sqrt{\sigma_B^2 + \epsilon},\
                  v \odot x + \sqrt{\sigma_I^2 + \epsilon}\big)}

    ``σ²_B`` per channel over the batch and positions (tracked: ``running_var``, unbiased),
    ``σ²_I`` per sample and channel over the positions (always from the input); ``v`` is a
    per-channel parameter of the module (init 1). No centering of the numerator. Use with
    ``Batch()``.
    """

    fused: bool = field(default=True, repr=False)

    stat_names = ("var",)

    def bind(self, nap: Partition, num_features: int) -> EvoB0:
        _per_channel_split(nap, num_features, "EvoNorm-B0")
        return self

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        return min(v.shape[0] * v.shape[3], v.shape[3])

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.fused:  # statistics once, without autograd: the Function differentiates them
            with torch.no_grad():
                mi, vi, mb, vb = Ff._instance_and_batch(as_dtype(v, stats_dtype(v)), True)
            return {"var": vb, "inst_var": vi, "inst_mean": mi, "batch_mean": mb,
                    "v": self._v(v, params)}
        mi, vi = instance_moments(v)
        _, vb = pool_moments(mi, vi, (0,))
        return {"var": vb, "inst_var": vi, "v": self._v(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        vb = self.from_running(running, nap, num_features)["var"].to(stats_dtype(v))
        return {"var": vb, "inst_var": instance_moments(v)[1], "v": self._v(v, params)}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if self.fused:
            batch = "batch_mean" in stats  # this batch's σ²_B (differentiated), else running
            moments = ((stats["inst_mean"], stats["inst_var"], stats["batch_mean"], stats["var"])
                       if batch else None)
            return Ff.evo_b0(v, vparam=stats["v"], weight=weight, bias=bias, eps=eps,
                             batch_var=None if batch else stats["var"], moments=moments)
        x = v.to(stats["inst_var"].dtype)
        den = torch.maximum(torch.sqrt(stats["var"] + eps),
                            stats["v"] * x + torch.sqrt(stats["inst_var"] + eps))
        return Fs.affine_transform(x / den, None, None, weight, bias)


@dataclass(frozen=True, repr=False)
class EvoS0(_EvoNorm):
    r"""EvoNorm-S0's normalization-activation (Liu et al. 2020):

    .. math::
        \hat{x} = \frac{x \odot \mathrm{sigmoid}(v \odot x)}{\sqrt{\sigma_G^2 + \epsilon}}

    ``σ²_G`` per sample over each group of channels and the positions (the partition's area:
    ``Group(g)``); ``v`` is a per-channel parameter of the module (init 1). No centering.
    """

    fused: bool = field(default=True, repr=False)

    stat_names = ("var",)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.fused:  # statistics once, without autograd: the Function differentiates them
            with torch.no_grad():  # the mean + vector-norm pass unless the area is special;
                # compiled for inductor, the shifted sums: one pass, not two
                if type(nap).moments is not Partition.moments:
                    var, mean = nap.moments(v, spatial)[::-1]
                elif S.compiling_kernels():
                    mean, var = S.shifted_moments(v, nap.dims)
                else:
                    var, mean = Ff._var_mean(as_dtype(v, stats_dtype(v)), nap.dims)
            return {"var": var, "batch_mean": mean, "v": self._v(v, params)}
        return {"var": nap.moments(v, spatial)[1], "v": self._v(v, params)}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        var = self.from_running(running, nap, num_features)["var"].to(stats_dtype(v))
        return {"var": var, "v": self._v(v, params)}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if self.fused and "batch_mean" in stats:
            return Ff.evo_s0(v, nap.dims, vparam=stats["v"], weight=weight, bias=bias, eps=eps,
                             moments=(stats["batch_mean"], stats["var"]))
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
    fused: bool = field(default=True, repr=False)

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
        if self.fused:  # ν² once, without autograd: the Function differentiates it
            with torch.no_grad():
                ms = nap.mean_square(v, spatial)
            return {"ms": ms, "batch_ms": ms, **self._extras(v, params)}
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
        if self.fused and "batch_ms" in stats:
            return Ff.frn(v, nap.dims, weight=weight, bias=bias, tau=stats.get("tau"), eps=eps,
                          extra_eps=stats.get("learned_eps"), ms=stats["batch_ms"])
        scale, _ = self.coefficients(stats, eps, m)
        out = Fs.affine_transform(v, scale, None, weight, bias)
        return torch.maximum(out, as_dtype(stats["tau"], out.dtype)) if self.tlu else out


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
    fused: bool = field(default=True, repr=False)

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
        aff = self._affine(v, params)
        # compiled for inductor: torch's BN and GN kernels decompose into 7 passes over the
        # activations forward and 12 backward (h written twice); the rows' moments pooled into
        # BN's (and, in transform, GN's) make it 4 and 5 (export keeps the faster eager kernels)
        if self.fused and type(nap) is Batch and S.compiling_kernels():
            row_mean, row_var = S.moments(v, (3,))
            mean, var = pool_moments(row_mean, row_var, (0,))
            return {"mean": mean, "var": var, "row_mean": row_mean, "row_var": row_var, **aff}
        if self.fused and type(nap) is Batch:  # BN's kernel: h, and μ_B, σ²_B for the running
            h, mean, var = Fc.batch_standardize(  # estimates (its backward differentiates them)
                as_dtype(v, stats_dtype(v)), aff.get("bn_weight"), aff.get("bn_bias"), eps)
            return {"mean": mean, "var": var, "batch_h": h}
        mean, var = nap.moments(v, spatial)
        return {"mean": mean, "var": var, **aff}

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        r = self.from_running(running, nap, num_features)
        dt = stats_dtype(v)
        return {"mean": as_dtype(r["mean"], dt), "var": as_dtype(r["var"], dt),
                **self._affine(v, params)}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        c = v.shape[1] * v.shape[2]
        if "row_mean" in stats:  # fused, compiled: one affine map per row
            scale, shift = Fc.batch_channel_rows(
                stats["row_mean"], stats["row_var"], stats["mean"], stats["var"], self._groups(c),
                stats.get("bn_weight"), stats.get("bn_bias"), eps)
            return Fs.affine_transform(as_dtype(v, scale.dtype), scale, shift, weight, bias)
        if "batch_h" in stats:  # fused: GN's kernel on BN's output
            return Fc.group_standardize(stats["batch_h"], self._groups(c), weight, bias, eps)
        scale, shift = Fs.standardize_coefficients(stats["mean"], stats["var"], eps)
        if "bn_weight" in stats:
            scale, shift = scale * stats["bn_weight"], shift * stats["bn_weight"] + stats["bn_bias"]
        h = torch.addcmul(shift, as_dtype(v, scale.dtype), scale)  # (N, C, 1, S)
        hg = h.reshape(h.shape[0], self._groups(c), -1)
        mg, vg = S.moments(hg, (2,))
        out = ((hg - mg) * torch.rsqrt(vg + eps)).reshape(h.shape)
        return Fs.affine_transform(out, None, None, weight, bias)
