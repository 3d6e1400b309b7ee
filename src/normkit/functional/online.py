r"""The math of the estimate-based methods (book ch. 6): Kalman normalization's estimate, Online
Normalization's forward recursion and control-process backward, and its forward as a function.

Each combines two sets of moments — a sample's or a batch's own and an estimate from elsewhere
(the stream, the previous layer) — with :func:`~normkit.functional.merging.mix_moments`, the
moments of a two-component mixture. The operations that keep the state
(:class:`~normkit.nop.OnlineStandardize`, the presets of :mod:`normkit.methods.online`) call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from . import statistics as S
from .merging import mix_moments
from .partition import as_dtype, canonical_view, check_input, restore_view, stats_dtype

__all__ = [
    "check_weight",
    "kalman_estimate",
    "stream_moments",
    "online_control_backward",
    "online_normalize",
]


def check_weight(name: str, value: object, meaning: str, *, open_low: bool = False,
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
    momentum = check_weight("momentum", momentum, "weight of each new sample")
    check_input(x, mean.shape[0], channel_axis)
    c = mean.shape[0]
    v = canonical_view(x, (c, 1), channel_axis)
    vf = as_dtype(v, stats_dtype(v))
    sm, sv = S.moments(vf, (3,))
    mb, vb, mean_after, var_after = stream_moments(
        sm, sv, mean.reshape(c, 1, 1).to(vf.dtype), var.reshape(c, 1, 1).to(vf.dtype),
        [momentum] * x.shape[0])
    y = (vf - mb) * torch.rsqrt(vb + eps)
    return (restore_view(as_dtype(y, x.dtype), x.shape, channel_axis), mean_after.reshape(c),
            var_after.reshape(c))
