r"""Operations whose statistics are estimates rather than the batch's own (book ch. 6).

Three methods combine two sets of moments — the input's own and an estimate from elsewhere (the
population, the stream, the previous layer) — and all three do it with the same rule, the
moments of a two-component mixture with weight :math:`w` on the first component
(:func:`mix_moments`, the law of total variance):

.. math::
    \mu = w\,\mu_a + (1 - w)\,\mu_b, \qquad
    \sigma^2 = w\,\sigma_a^2 + (1 - w)\,\sigma_b^2 + w(1 - w)(\mu_a - \mu_b)^2

Every term is non-negative, so the variance never is, and no ``E[x²] − μ²`` cancellation occurs
(a mean offset of 1e4 in float32 is harmless).

* :class:`ExampleWeighted` — evaluation mixes each example's own statistics into the population
  ones (Summers & Dinneen's inference example weighting, ``eval_norm``).
* :func:`kalman_estimate` — a layer's batch moments mixed with a prediction from the previous
  layer's estimate through a learned transition (Kalman normalization, ``kalman_norm``).
* :class:`OnlineStandardize` — streaming estimates updated sample by sample, with the control
  process backward of Online Normalization (``online_norm``); :func:`online_normalize` is its
  forward as a plain differentiable function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.partition import canonical_view, check_input, restore_view, stats_dtype
from ..functional.snapshot import snapshot
from ..functional.whiten import _first_order
from ..nap import Partition
from ._base import Coefficients, Kernel, Layout, Operation, Stats
from ._standard import Standardize

__all__ = [
    "mix_moments",
    "sample_dims",
    "ExampleWeighted",
    "kalman_estimate",
    "OnlineStandardize",
    "stream_moments",
    "online_control_backward",
    "online_normalize",
]


def _check_weight(name: str, value: object, meaning: str, *, open_low: bool = False,
                  open_high: bool = False) -> float:
    """``value`` as a float in ``[0, 1]`` (ends open where asked), else :class:`ConfigError`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > 0 if open_low else v >= 0) and (v < 1 if open_high else v <= 1)
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ConfigError(f"{name} must be a number in {lo}0, 1{hi} ({meaning}), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def mix_moments(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor,
                weight: float | Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and variance of the mixture ``w·A + (1 − w)·B`` of two distributions given by their
    moments (shapes broadcast).

    .. math::
        \mu = w\mu_a + (1-w)\mu_b,\quad
        \sigma^2 = w\sigma_a^2 + (1-w)\sigma_b^2 + w(1-w)(\mu_a-\mu_b)^2

    Example:
        >>> a, b = torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([4.0, 6.0])
        >>> mean, var = mix_moments(a.mean(), a.var(correction=0), b.mean(), b.var(correction=0), 4 / 6)
        >>> both = torch.cat([a, b])
        >>> bool(torch.allclose(mean, both.mean())), bool(torch.allclose(var, both.var(correction=0)))
        (True, True)
    """
    d = mean_a - mean_b
    mean = mean_b + weight * d
    var = weight * var_a + (1 - weight) * var_b + (weight * (1 - weight)) * d * d
    return mean, var


def sample_dims(nap: Partition) -> tuple[int, ...]:
    """The axes of the canonical view a partition reduces over, less the batch axis: each
    example's own statistics over the same area (``(S,)`` for BN's partition)."""
    return tuple(d for d in nap.dims if d != 0)


# ------------------------------------------------------------------ inference example weighting
@dataclass(frozen=True, repr=False)
class ExampleWeighted(Standardize):
    r"""Standardization whose evaluation mixes each example's own moments into the running ones.

    Training is plain standardization over the partition (BN over ``Batch()``). At evaluation,
    with the example's moments ``μ_x, σ²_x`` over its own part of the area (its positions) and
    the running ``μ_pop, σ²_pop``, the statistics are those of the mixture
    ``α·(example) + (1 − α)·(population)`` (:func:`mix_moments`):

    .. math::
        \mu = \alpha\mu_x + (1-\alpha)\mu_{pop}, \quad
        \sigma^2 = \alpha\sigma_x^2 + (1-\alpha)\sigma^2_{pop} + \alpha(1-\alpha)(\mu_x-\mu_{pop})^2

    i.e. ``σ² = α E[x²] + (1 − α)(σ²_pop + μ²_pop) − μ²``. ``α = 0`` is the running statistics
    exactly; ``α = 1/B`` gives the example the share it had in a training batch of ``B``.
    """

    alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_weight("alpha", self.alpha, "the weight of each example's own statistics at "
                      "evaluation; 0 is plain BN evaluation")

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        pop = self.from_running(running, nap, num_features)
        if self.alpha == 0:
            return pop
        mean_x, var_x = S.moments(v, sample_dims(nap))
        mean, var = mix_moments(mean_x, var_x, pop["mean"], pop["var"], self.alpha)
        return {"mean": mean, "var": var}

    def native_kernel(self, layout: Layout) -> Kernel | None:
        """Training is BN: its kernel (per-channel ``γ, β`` or none)."""
        if layout.recovery == "weight":
            return None
        return "batch_norm" if Standardize.native_kernel(self, layout) == "batch_norm" else None

    def native_applies(self, use_batch: bool) -> bool:
        """The kernel computes training, and evaluation only at ``α = 0``."""
        return use_batch or self.alpha == 0

    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.alpha != 0:
            raise ConfigError(
                f"example weighting (alpha={self.alpha}) mixes in each input's own statistics at "
                f"evaluation; nothing fixed to fold (alpha=0 folds like BN)"
            )
        return super().fold(stats, nap=nap, eps=eps, weight=weight, bias=bias)


# -------------------------------------------------------------------------- Kalman normalization
def kalman_estimate(
    batch_mean: Tensor, batch_var: Tensor, prev_mean: Tensor, prev_var: Tensor,
    transition: Tensor, gain: Tensor,
) -> tuple[Tensor, Tensor]:
    r"""Kalman normalization's estimate of a layer's moments (all per channel, 1-D).

    Prediction from the previous layer's estimate ``(μ', σ'²)`` (``C'`` channels) through the
    transition ``A`` (``C × C'``), the variance propagated as for independent channels (the
    diagonal of ``A diag(σ'²) Aᵀ``), then the update with this layer's batch moments weighted by
    the gain ``p`` (the share of the observation, per channel):

    .. math::
        \mu_{pred} = A\mu', \quad \sigma^2_{pred} = (A \circ A)\,\sigma'^2, \quad
        (\hat\mu, \hat\sigma^2) = \mathrm{mix}\big((\mu_B, \sigma^2_B), (\mu_{pred}, \sigma^2_{pred}); p\big)

    ``p = 1`` is the batch moments (BN).

    Shape:
        batch_mean, batch_var, gain: ``(C,)``; prev_mean, prev_var: ``(C',)``; transition
        ``(C, C')``. Returns two ``(C,)`` tensors.
    """
    pred_mean = transition @ prev_mean
    pred_var = (transition * transition) @ prev_var
    return mix_moments(batch_mean, batch_var, pred_mean, pred_var, gain)


# ---------------------------------------------------------------------------- online normalization
def stream_moments(
    sample_mean: Tensor, sample_var: Tensor, mean: Tensor, var: Tensor, factors: Sequence[float | Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Online Normalization's forward recursion over the samples of a batch, in order.

    For sample ``t`` with its own moments ``(m_t, v_t)`` and weight ``w_t`` (``1 − α_f``, or
    ``1/t`` for a cumulative average):

    .. math::
        (\mu_t, \sigma^2_t) = \mathrm{mix}\big((m_t, v_t), (\mu_{t-1}, \sigma^2_{t-1}); w_t\big)
        = \big(\alpha\mu_{t-1} + (1-\alpha)m_t,\;
          \alpha\sigma^2_{t-1} + (1-\alpha)v_t + \alpha(1-\alpha)(m_t-\mu_{t-1})^2\big)

    Differentiable (plain autograd) in every input.

    Shape:
        sample_mean, sample_var: ``(N, *K)``; mean, var: ``(*K)`` (the estimates before the
        batch). Returns ``(mean_before, var_before, mean_after, var_after)``: the estimates each
        sample is normalized with, ``(N, *K)``, and the estimates after the last sample, ``(*K)``.
    """
    if len(factors) != sample_mean.shape[0]:
        raise ShapeError(f"{len(factors)} stream weights for {sample_mean.shape[0]} samples")
    before_m, before_v = [], []
    for t, w in enumerate(factors):
        before_m.append(mean)
        before_v.append(var)
        mean, var = mix_moments(sample_mean[t], sample_var[t], mean, var, w)
    return torch.stack(before_m), torch.stack(before_v), mean, var


def online_control_backward(
    grad: Tensor, y: Tensor, inv_std: Tensor, grad_mean: Tensor, grad_proj: Tensor, k: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Online Normalization's control-process backward over the samples of a batch, in order.

    With ``k = 1 − α_b``, ``y_t = x̂_t`` the normalized sample, ``s_t`` its ``1/√(σ²+ε)``, and
    ``⟨·⟩`` the mean over the sample's positions (per channel):

    .. math::
        \tilde g_t = g_t - k\,v_{t-1}\,y_t,\quad v_t = v_{t-1} + \langle\tilde g_t\, y_t\rangle,
        \qquad
        \partial x_t = s_t\tilde g_t - k\,u_{t-1},\quad u_t = u_{t-1} + \langle\partial x_t\rangle

    ``v`` and ``u`` accumulate the components of the gradient along ``x̂`` and along the constant
    that were not removed yet; feeding a fraction ``k`` back removes them on average, the online
    counterpart of BN's ``−mean(g) − x̂·mean(g x̂)``. Because ``Σ_t⟨∂x_t⟩ = u_T − u_0`` and
    ``Σ_t⟨g̃_t y_t⟩ = v_T − v_0`` exactly and both stay bounded for ``k > 0``, the time averages
    of the gradient's mean and of its projection on ``x̂`` go to 0 as ``O(1/T)``.

    Shape:
        grad, y: ``(N, *K, S)``; inv_std: ``(N, *K, 1)``; grad_mean (``u``), grad_proj (``v``):
        ``(*K, 1)``. Returns ``(∂x, u_T, v_T)``.
    """
    gy = (grad * y).mean(-1, keepdim=True)
    yy = (y * y).mean(-1, keepdim=True)
    v, vs = grad_proj, []
    for t in range(grad.shape[0]):  # v_t = v_{t−1} + ⟨g_t y_t⟩ − k v_{t−1} ⟨y_t²⟩
        vs.append(v)
        v = v + gy[t] - k * v * yy[t]
    h = (grad - k * torch.stack(vs) * y) * inv_std
    hm = h.mean(-1, keepdim=True)
    u, us = grad_mean, []
    for t in range(grad.shape[0]):  # u_t = u_{t−1} + ⟨h_t⟩ − k u_{t−1}
        us.append(u)
        u = u + hm[t] - k * u
    return h - k * torch.stack(us), u, v


class _OnlineControl(torch.autograd.Function):
    """``x̂ = (x − μ_before)·s`` per sample with the control-process backward
    (:func:`online_control_backward`), updating the control buffers ``u`` (``grad_mean``) and
    ``v`` (``grad_proj``) in place. The statistics are inputs without gradient: Online
    Normalization replaces differentiation through them by the control process."""

    @staticmethod
    def forward(ctx, v: Tensor, scale: Tensor, shift: Tensor, grad_mean: Tensor,  # type: ignore[override]
                grad_proj: Tensor, k: float) -> Tensor:
        y = torch.addcmul(shift, v, scale)
        ctx.save_for_backward(y, scale)
        ctx.buffers, ctx.k = (grad_mean, grad_proj), k
        return y

    @staticmethod
    @_first_order("Online Normalization's control-process backward",
                  "second derivatives through streaming statistics are not defined")
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        y, scale = ctx.saved_tensors
        grad_mean, grad_proj = ctx.buffers
        n, a, b, _ = y.shape
        shape = (a, b, 1)
        u, v = (t.reshape(shape).to(y.dtype) for t in (grad_mean, grad_proj))
        dx, u, v = online_control_backward(grad.to(y.dtype), y, scale, u, v, ctx.k)
        grad_mean.copy_(u.reshape(-1))
        grad_proj.copy_(v.reshape(-1))
        return dx, None, None, None, None, None


@dataclass(frozen=True, repr=False)
class OnlineStandardize(Operation):
    r"""Online Normalization (Chiley et al. 2019): standardize each sample with streaming
    estimates of the mean and variance that were updated by the samples before it, and
    backpropagate with the control process.

    ``fit`` returns each sample's own moments over its part of the area (the ``x_t``-statistics);
    :meth:`stream` runs the forward recursion (:func:`stream_moments`) and updates the buffers;
    :meth:`normalize` applies ``x̂`` with the control-process backward
    (:func:`online_control_backward`). ``backward_momentum`` is ``1 − α_b``; 0 turns the control
    off (the gradient with the statistics held constant, buffers ``grad_*`` untouched).

    Buffers: ``running_mean``, ``running_var`` (the streaming estimates, used in training and at
    evaluation) and ``running_grad_mean``, ``running_grad_proj`` (the control variables ``u``,
    ``v``, updated by the backward).
    """

    backward_momentum: float = 0.01

    stat_names = ("mean", "var", "grad_mean", "grad_proj")
    needs_spread = False

    def __post_init__(self) -> None:
        _check_weight("backward_momentum", self.backward_momentum,
                      "1 − alpha_bkw of the control process; 0 turns it off")

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        mean, var = S.moments(v, sample_dims(nap))
        return {"mean": mean, "var": var}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mean"], stats["var"], eps)

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        shape = nap.stat_view_shape(num_features)
        return {k: running[k].reshape(shape) for k in ("mean", "var")}

    @torch.no_grad()
    def stream(self, samples: Stats, running: Stats, nap: Partition, num_features: int,
               factors: Sequence[float | Tensor]) -> Stats:
        """Statistics each sample is normalized with (``(N, A, B, 1)``), updating ``running``'s
        ``mean`` and ``var`` in place to the estimates after the last sample."""
        shape = nap.stat_view_shape(num_features)[1:]
        dtype = torch.promote_types(samples["mean"].dtype, running["mean"].dtype)
        # the estimates before the batch, as they are before the in-place update below
        mean, var = (snapshot(running[k]).reshape(shape).to(dtype) for k in ("mean", "var"))
        m_before, v_before, mean, var = stream_moments(
            samples["mean"].to(dtype), samples["var"].to(dtype), mean, var, factors)
        running["mean"].copy_(mean.reshape(-1))
        running["var"].copy_(var.reshape(-1))
        return {"mean": m_before, "var": v_before}

    def normalize(self, v: Tensor, stats: Stats, running: Stats, eps: float) -> Tensor:
        """``x̂`` of the canonical view ``v`` (≥ float32) with the control-process backward."""
        scale, shift = self.coefficients(stats, eps, 1)
        vf = v.to(scale.dtype)
        if self.backward_momentum == 0:  # no control: the gradient with constant statistics
            return torch.addcmul(shift, vf, scale)
        return _OnlineControl.apply(vf, scale, shift, running["grad_mean"], running["grad_proj"],
                                    self.backward_momentum)


def online_normalize(
    x: Tensor, mean: Tensor, var: Tensor, *, momentum: float, eps: float = 1e-5,
    channel_axis: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Online Normalization's forward as a plain differentiable function (no state, no control).

    Each sample ``t`` of ``x`` (in batch order) is standardized per channel with the streaming
    estimates left by the samples before it, then the estimates are updated with its own moments
    over its positions (:func:`stream_moments`, weight ``momentum = 1 − α_f``):

    .. math::
        y_t = \frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1} + \epsilon}}

    Autograd differentiates through the recursion (sample ``t`` depends on the samples before
    it), which the module's control-process backward replaces.

    Args:
        x: ``(N, C, *)`` (``channel_axis=1``) or ``(N, *, C)`` (``-1``).
        mean, var: the estimates before the batch, ``(C,)``.
        momentum: weight of each new sample, in ``[0, 1]``.

    Returns:
        ``(y, mean_after, var_after)``.

    Example:
        >>> x = torch.randn(3, 2, 5)
        >>> y, m, v = online_normalize(x, torch.zeros(2), torch.ones(2), momentum=0.1, eps=0.0)
        >>> torch.equal(y[0], x[0])  # the first sample meets the initial estimates (0, 1)
        True
    """
    momentum = _check_weight("momentum", momentum, "weight of each new sample")
    check_input(x, mean.shape[0], channel_axis)
    c = mean.shape[0]
    v = canonical_view(x, (c, 1), channel_axis)
    vf = v.to(stats_dtype(v))
    sm, sv = S.moments(vf, (3,))
    mb, vb, mean_after, var_after = stream_moments(
        sm, sv, mean.reshape(c, 1, 1).to(vf.dtype), var.reshape(c, 1, 1).to(vf.dtype),
        [momentum] * x.shape[0])
    y = (vf - mb) * torch.rsqrt(vb + eps)
    return restore_view(y.to(x.dtype), x.shape, channel_axis), mean_after.reshape(c), var_after.reshape(c)

