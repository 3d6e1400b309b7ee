r"""Multi-mode operations (book ch. 5): standardize each value with a *mixture* of statistics.

All three use the batch partition ``nap.Batch()`` (per-channel statistics over the batch and the
positions, as BN) and keep per-channel running estimates for evaluation, but no single
``(μ, σ²)`` pair normalizes a channel:

========================  =========================================================  ==========
operation                 x̂                                                          mixing
========================  =========================================================  ==========
``ModeStandardize(K)``    Σ_k g_k(x_n)·(x − μ_k)/√(σ²_k + ε)                          per sample
``MixtureStandardize(K)`` Σ_k p(k | x)·(x − μ_k)/√(σ²_k + ε)  (GMM fitted by EM)      per value
``TaskStandardize()``     (x − μ)/√(σ² + ε), (μ, σ²) = α·BN moments ⊕ (1 − α)·IN moments  per sample
========================  =========================================================  ==========

The math is in pure functions of :mod:`normkit.functional.mixture` (:func:`mode_gates`,
:func:`mode_moments`, :func:`gmm_posterior`, :func:`gmm_m_step`, :func:`gmm_em`) and
:func:`normkit.functional.merging.mix_moments`; the operation classes only lay the canonical
view out for them and turn statistics into running estimates.

Numerics: every statistic is computed in at least float32 from the upcast input (two-pass,
variance never negative); the variance tracked by running estimates is multiplied by BN's Bessel
factor ``m/(m − 1)`` with ``m = N·S`` values per channel, for every mode and component (a
weighted "reliability" correction ``V₁²/(V₁² − V₂)`` blows up when a mode gets almost no weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.fused_mixture_ops import mixture_affine, mixture_fit
from ..functional.fused_robust import moments as fused_moments
from ..functional.merging import mix_moments
from ..functional.mixture import (
    gmm_em,
    gmm_posterior,
    gmm_start,
    mixture_output,
    mode_gates,
    mode_moments,
)
from ..functional.mixture_eval import mixture_eval
from ..functional.partition import as_dtype, stats_dtype
from ..nap import Partition
from ._base import Coefficients, Operation, State, Stats
from ._combination import _RowFused
from ._robust import fused_standardize

__all__ = [
    "ModeStandardize",
    "MixtureStandardize",
    "TaskStandardize",
]

MAX_EM_ITERATIONS = 100
GATE_SEED = 0  # fixed seed of the gate initialization: reset_parameters() reproduces construction


# ------------------------------------------------------------------------- shared helpers
def _samples(v: Tensor) -> Tensor:
    """The canonical ``(N, C, 1, S)`` view of a batch partition as ``(N, C, S)``, ≥ float32."""
    return v.reshape(v.shape[0], -1, v.shape[3]).to(stats_dtype(v))


def _check_batch(op: Operation, nap: Partition, num_features: int) -> None:
    if tuple(nap.roles) != ("M", "G", "D", "M") or nap.groups(num_features) != (num_features, 1):
        raise ConfigError(
            f"{type(op).__name__} keeps per-channel statistics over the batch: use "
            f"nap=normkit.nap.Batch() (no group_size), got {nap!r}"
        )


def _positive_int(name: str, value: Any, upper: int | None = None) -> None:
    bad = not isinstance(value, int) or isinstance(value, bool) or value < 1
    if bad or (upper is not None and value > upper):
        span = f"an int in [1, {upper}]" if upper is not None else "a positive int"
        raise ConfigError(f"{name} must be {span}, got {value!r}")


def _no_fold(op: Operation) -> ConfigError:
    return ConfigError(
        f"{type(op).__name__} mixes its statistics with weights computed from each input; "
        f"nothing fixed to fold"
    )


# ------------------------------------------------------------------------------ operations
@dataclass(frozen=True, repr=False)
class ModeStandardize(_RowFused):
    r"""Mode normalization: ``K`` modes, each sample softly assigned to them by a learned gate.

    .. math::
        g(x_n) = \mathrm{softmax}(W \bar{x}_n + b),\qquad
        \hat{x}_n = \sum_k g_k(x_n)\,\frac{x_n - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}}

    with ``x̄_n`` the sample's features averaged over its positions and ``μ_k, σ²_k`` the
    gate-weighted moments of the batch (:func:`mode_moments`). The gate ``W`` (``gate_weight``,
    ``(K, C)``) and ``b`` (``gate_bias``, ``(K,)``) are parameters of the module; ``W`` starts at
    ``U(−1/√C, 1/√C)`` drawn with a fixed seed (``reset_parameters()`` reproduces it; a zero
    gate would give every mode the same statistics and the same gradient forever), ``b`` at 0.
    Running estimates ``running_mean``, ``running_var`` have shape ``(K, C)``; evaluation still
    computes the gate from each input. ``K = 1`` is BN.

    By default (``fused``) each sample's moments and the per-sample affine ``x·scale + shift``
    it reduces to are one Function each (one-pass backwards, only the input saved);
    ``Normalization(native=False)`` runs the plain composition.
    """

    num_modes: int = 2
    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var")

    def __post_init__(self) -> None:
        _positive_int("num_modes", self.num_modes)

    def bind(self, nap: Partition, num_features: int) -> ModeStandardize:
        _check_batch(self, nap, num_features)
        return self

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        shape = (self.num_modes, num_features)
        return {"mean": (shape, "0"), "var": (shape, "1")}

    def create_parameters(self, num_features: int, nap: Partition, factory: dict[str, Any]
                          ) -> dict[str, nn.Parameter]:
        k = self.num_modes
        return {"gate_weight": nn.Parameter(torch.empty(k, num_features, **factory)),
                "gate_bias": nn.Parameter(torch.empty(k, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        w = params["gate_weight"]
        g = torch.Generator().manual_seed(GATE_SEED)
        bound = 1.0 / math.sqrt(w.shape[1])
        w.copy_((torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        params["gate_bias"].zero_()

    @staticmethod
    def _gates(pooled: Tensor, params: Stats | None) -> Tensor:
        if not params or "gate_weight" not in params:
            raise ConfigError(
                "ModeStandardize needs its gate parameters: use it in a normkit.Normalization, "
                "which creates them (gate_weight, gate_bias)"
            )
        return mode_gates(pooled, params["gate_weight"], params["gate_bias"])

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
            params: Stats | None = None) -> Stats:
        x = _samples(v)
        if self.fused:
            means, within = self._instance(x)
            means, within = means.squeeze(-1), within.squeeze(-1)
        else:
            means = x.mean(-1)
            within = (x - means.unsqueeze(-1)).square().mean(-1)
        gates = self._gates(means, params)
        mean, var = mode_moments(means, within, gates)
        return {"mean": mean, "var": var, "gate": gates}

    def running(self, stats: Stats, m: int) -> Stats:
        return {"mean": stats["mean"], "var": S.unbiased_variance(stats["var"], m)}

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        return dict(running)

    def eval_stats(self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
                   num_features: int, eps: float, params: Stats | None = None) -> Stats:
        return {**running, "gate": self._gates(_samples(v).mean(-1), params)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        gate = stats["gate"]  # (N, K)
        mean, var = (stats[k].to(gate.dtype) for k in ("mean", "var"))
        inv = torch.rsqrt(var + eps)  # (K, C)
        scale = gate @ inv
        shift = -(gate @ (mean * inv))
        n, c = scale.shape
        return scale.reshape(n, c, 1, 1), shift.reshape(n, c, 1, 1)

    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        raise _no_fold(self)


@dataclass(frozen=True, repr=False)
class MixtureStandardize(Operation):
    r"""Mixture normalization: a ``K``-component Gaussian mixture per channel, fitted by EM.

    .. math::
        \hat{x} = \sum_k p(k \mid x)\,\frac{x - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}},\qquad
        p(k \mid x) = \frac{\pi_k\,\mathcal{N}(x; \mu_k, \sigma_k^2 + \epsilon)}
                           {\sum_j \pi_j\,\mathcal{N}(x; \mu_j, \sigma_j^2 + \epsilon)}

    Training runs ``iterations`` EM steps (:func:`gmm_em`) on each channel's ``N·S`` values and
    normalizes with the posteriors of the fitted mixture. EM starts from

    * ``init="running"``: the running mixture (the module passes its running estimates to
      :meth:`fit` in its :class:`~normkit.nop.State` when it tracks them). Warm-starting keeps each component's identity
      from batch to batch, which the running averages of its moments need. Where the running
      components of a channel are all equal (at the start, after ``reset_running_stats()``) EM
      could never separate them, so that channel starts as with ``"batch"``.
    * ``init="batch"``: the batch alone (stateless): component ``k`` at ``μ_B + z_k·√(σ²_B + ε)``
      with ``z_k`` the normal quantiles :func:`normal_quantiles` (so components are ordered by
      mean), variance ``σ²_B·(1 − mean(z²))`` and equal weights.

    Gradients flow through every EM step (the loop is unrolled in autograd); the start is a
    constant (running buffers) or differentiated too (batch start). The output is then an exact
    smooth function of the batch, as BN's is of its batch moments; treating the fitted statistics
    as constants would give the gradient of a different function (Ioffe & Szegedy's argument for
    differentiating through BN's moments). Training runs EM without a graph and a hand-derived
    backward through the EM steps (:mod:`normkit.functional.fused_mixture`: it saves the centred
    input and ``(K, C)`` statistics, and recomputes each step's posteriors);
    ``Normalization(native=False)`` runs the unrolled autograd composition instead.

    Running estimates (all ``(K, C)``): ``running_mean``, ``running_var`` (unbiased with BN's
    factor) and ``running_log_prior``, the log mixing weights (initially 0: equal weights;
    averaged in the log domain and renormalized by a softmax at use). Evaluation computes the
    posteriors of each value under the running mixture, as per-channel quadratics of the value
    (:func:`~normkit.functional.mixture_eval.mixture_eval`: a sigmoid for two components, in
    place over cache-sized runs when no gradient is asked for; ``fused=False``: the plain
    :func:`gmm_posterior` and :func:`mixture_output`). ``K = 1`` is BN.
    """

    num_components: int = 2
    iterations: int = 3
    init: Literal["running", "batch"] = "running"
    #: training fits EM without a graph and runs the hand-derived backward of
    #: :mod:`normkit.functional.fused_mixture`; ``False``: the unrolled autograd composition
    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var", "log_prior")
    reads_state = True  # init="running": EM starts from the running mixture

    def __post_init__(self) -> None:
        _positive_int("num_components", self.num_components)
        _positive_int("iterations", self.iterations, MAX_EM_ITERATIONS)
        if self.init not in ("running", "batch"):
            raise ConfigError(f"init must be 'running' or 'batch', got {self.init!r}")

    def bind(self, nap: Partition, num_features: int) -> MixtureStandardize:
        _check_batch(self, nap, num_features)
        return self

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        shape = (self.num_components, num_features)
        return {"mean": (shape, "0"), "var": (shape, "1"), "log_prior": (shape, "0")}

    @staticmethod
    def _running(state: State | None, names: Sequence[str], dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor, Tensor] | None:
        if state is None:
            return None
        # clones: the buffers are updated in place after this forward and must not be saved
        rm, rv, rl = (state.running[k].detach().to(dtype).clone() for k in names)
        return rm, rv, rl

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
            params: Stats | None = None, state: State | None = None) -> Stats:
        running = None if self.init == "batch" else self._running(state, self.stat_names,
                                                                   stats_dtype(v))
        if self.fused:  # EM without a graph; transform() runs the hand-derived backward
            return mixture_fit(v, k=self.num_components, iterations=self.iterations, eps=eps,
                               running=running)
        x = _samples(v)
        shift = x.mean((0, 2))  # (C,): EM runs on centred values (exact under large offsets)
        z = x - shift[:, None]
        start = gmm_start(z.square().mean((0, 2)), shift, self.num_components, eps, running)
        mean, var, log_prior = gmm_em(z, *start, iterations=self.iterations, eps=eps)
        post = gmm_posterior(z, mean, var, log_prior, eps)
        return {"mean": mean + shift, "var": var, "log_prior": log_prior,
                "post": post, "centered_mean": mean, "centered": z}

    def running(self, stats: Stats, m: int) -> Stats:
        return {"mean": stats["mean"], "var": S.unbiased_variance(stats["var"], m),
                "log_prior": stats["log_prior"]}

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        return dict(running)

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        """One component: the posterior is 1 and evaluation is BN's with ``(μ_0, σ²_0)`` (one
        kernel call); more have no such form."""
        if self.num_components != 1 or not self.fused:
            return None
        return running["mean"][0], running["var"][0], eps

    def eval_stats(self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
                   num_features: int, eps: float, params: Stats | None = None) -> Stats:
        dt = stats_dtype(v)
        mean, var, log_prior = (running[k].to(dt) for k in self.stat_names)
        log_prior = torch.log_softmax(log_prior, 0)
        if self.fused:  # transform() runs mixture_eval: per-channel polynomials, no K-fold planes
            return {"mean": mean, "var": var, "log_prior": log_prior}
        x = _samples(v)
        post = gmm_posterior(x, mean, var, log_prior, eps)
        return {"mean": mean, "var": var, "log_prior": log_prior, "post": post,
                "centered_mean": mean, "centered": x}

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if "batch_trajectory" in stats or "traced_trajectory" in stats:  # fitted by mixture_fit
            return mixture_affine(v, stats, weight, bias, eps=eps)
        if "post" not in stats:  # evaluation under the running mixture (eval_stats, fused)
            return mixture_eval(v, stats["mean"], stats["var"], stats["log_prior"], weight, bias,
                                eps=eps)
        out = mixture_output(stats["centered"], stats["centered_mean"], stats["var"],
                             stats["post"], eps)
        return Fs.affine_transform(out.reshape(v.shape), None, None, weight, bias)

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        raise ConfigError("mixture normalization weighs each value by its own posterior; use transform()")

    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        raise _no_fold(self)


@dataclass(frozen=True, repr=False)
class TaskStandardize(Operation):
    r"""TaskNorm: standardize with a learned blend of batch and per-example moments.

    .. math::
        \alpha = \mathrm{sigmoid}(a\,m + b),\quad
        \mu = \alpha\mu_{BN} + (1-\alpha)\mu_{IN},\quad
        \sigma^2 = \alpha\sigma^2_{BN} + (1-\alpha)\sigma^2_{IN}
                 + \alpha(1-\alpha)(\mu_{BN}-\mu_{IN})^2

    (:func:`mix_moments`), ``x̂ = (x − μ)/√(σ² + ε)``. ``μ_BN, σ²_BN`` are the batch (context
    set) moments per channel, ``m`` the batch size ``N`` (the context-set size) and ``μ_IN,
    σ²_IN`` each example's own moments: per channel over its positions (``moments="instance"``,
    TaskNorm-I) or over all its channels and positions (``moments="layer"``, TaskNorm-L). ``a``
    (``alpha_scale``) and ``b`` (``alpha_offset``) are learned scalars, initially 0 (``α = ½``).
    Running estimates: ``running_mean``, ``running_var`` (BN's, unbiased) and ``running_size``,
    the average batch size; evaluation blends them with each input's own moments using
    ``m = running_size``. ``α → 1`` is BN, ``α → 0`` is IN (``"layer"``: LN).
    """

    moments: Literal["instance", "layer"] = "instance"
    #: training runs the moments and the standardization as Functions with hand-derived
    #: backwards (:mod:`normkit.functional.fused_robust`); the blend stays autograd's
    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var", "size")

    def __post_init__(self) -> None:
        if self.moments not in ("instance", "layer"):
            raise ConfigError(f"moments must be 'instance' or 'layer', got {self.moments!r}")

    def bind(self, nap: Partition, num_features: int) -> TaskStandardize:
        _check_batch(self, nap, num_features)
        return self

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"mean": ((num_features,), "0"), "var": ((num_features,), "1"), "size": ((1,), "0")}

    def create_parameters(self, num_features: int, nap: Partition, factory: dict[str, Any]
                          ) -> dict[str, nn.Parameter]:
        return {"alpha_scale": nn.Parameter(torch.zeros(1, **factory)),
                "alpha_offset": nn.Parameter(torch.zeros(1, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        for p in params.values():
            p.zero_()

    def _own_dims(self) -> tuple[int, ...]:
        return (3,) if self.moments == "instance" else (1, 2, 3)

    def _blend(self, v: Tensor, mean_bn: Tensor, var_bn: Tensor, size: Tensor | float,
               params: Stats | None, own: tuple[Tensor, Tensor] | None = None
               ) -> tuple[Tensor, Tensor]:
        # (N, C, 1, 1) or (N, 1, 1, 1)
        mean_in, var_in = S.moments(v, self._own_dims()) if own is None else own
        params = params or {}
        a = params.get("alpha_scale", torch.zeros(1)).to(mean_in)
        b = params.get("alpha_offset", torch.zeros(1)).to(mean_in)
        alpha = torch.sigmoid(a * size + b)
        return mix_moments(mean_bn.to(mean_in), var_bn.to(mean_in), mean_in, var_in, alpha)

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
            params: Stats | None = None) -> Stats:
        own = None
        if not self.fused:
            mean_bn, var_bn = nap.moments(v, spatial)  # (1, C, 1, 1)
        elif self.moments == "instance":  # BN's moments pooled from each example's
            own = fused_moments(v, (3,))
            mean_bn = own[0].mean(0, keepdim=True)
            var_bn = own[1].mean(0, keepdim=True) + (own[0] - mean_bn).square().mean(
                0, keepdim=True)
        else:
            mean_bn, var_bn = fused_moments(v, nap.dims)
            own = fused_moments(v, (1, 2, 3))
        mean, var = self._blend(v, mean_bn, var_bn, float(v.shape[0]), params, own)
        size = torch.full((1,), float(v.shape[0]), dtype=mean_bn.dtype, device=v.device)
        return {"mean": mean_bn, "var": var_bn, "size": size, "mix_mean": mean, "mix_var": var}

    def running(self, stats: Stats, m: int) -> Stats:
        return {"mean": stats["mean"].reshape(-1),
                "var": S.unbiased_variance(stats["var"], m).reshape(-1), "size": stats["size"]}

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        return {"mean": running["mean"].reshape(1, -1, 1, 1),
                "var": running["var"].reshape(1, -1, 1, 1), "size": running["size"]}

    def eval_stats(self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
                   num_features: int, eps: float, params: Stats | None = None) -> Stats:
        stats = self.from_running(running, nap, num_features)
        size = as_dtype(stats["size"], stats_dtype(v))
        mean, var = self._blend(v, stats["mean"], stats["var"], size, params)
        return {**stats, "mix_mean": mean, "mix_var": var}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mix_mean"], stats["mix_var"], eps)

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        y = fused_standardize(self.fused, v, {"mean": stats["mix_mean"], "var": stats["mix_var"]},
                              weight, bias, eps)
        if y is None:
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        return y

    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        raise _no_fold(self)
