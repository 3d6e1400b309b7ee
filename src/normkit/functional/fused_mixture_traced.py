r"""Mixture normalization's training step as plain traceable torch ops, for inductor.

Under ``torch.compile`` with a kernel-generating backend (:func:`~normkit.functional.statistics.
compiling_kernels`; an exported graph keeps the custom ops of
:mod:`normkit.functional.fused_mixture_ops`) the EM fit and the output are written here on the
canonical layout ``(N, C, S)`` itself (no channels-first copy) and AOTAutograd differentiates
them: each EM step is one reduction (the posteriors recomputed from ``z`` inside it) and inductor
fuses the output and the backward's pointwise work around the reductions.

The math is that of :mod:`normkit.functional.fused_mixture`: logits ``a_k = log π_k − ½log s_k −
(z − μ_k)²/2s_k`` (``s = σ² + ε``), ``p = softmax_k(a)``, raw M-step moments

.. math::
    n_k = \sum p_k,\quad \mu'_k = \frac{\sum p_k z}{n_k},\quad
    \sigma'^2_k = \frac{\sum p_k z^2}{n_k} - \mu'^2_k,\quad \log\pi'_k = \log\frac{n_k}{M}

on the centred ``z = x − mean(x)``, and each sum over a channel's ``M = N·S`` values is a float32
sum over the ``S`` positions of each sample added over the samples in float64 (:func:`_sum`),
the precision of the eager runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from typing import Any

from .fused import _plain_vjp
from .mixture import collapsed, gmm_start, normal_quantiles
from .partition import stats_dtype

__all__ = ["mixture_fit_traced", "mixture_affine_traced"]


def _sum(t: Tensor) -> Tensor:
    """``Σ`` over the samples and positions of ``t`` ``(…, N, C, S)`` → ``(…, C)``: a sum over
    the ``S`` positions in ``t``'s dtype, the samples' sums added in float64."""
    return t.sum(-1).to(torch.float64).sum(-2).to(t.dtype)


def _posterior(z: Tensor, mean: Tensor, var: Tensor, log_prior: Tensor, eps: float
               ) -> list[Tensor]:
    """``softmax_k`` of the logits as ``K`` pointwise expressions in ``z`` ``(N, C, S)``
    (statistics ``(K, C)``), each ``(N, C, S)``, so that inductor fuses them into the reduction
    that reads them (a softmax over a stacked axis is three passes over ``K`` planes): two
    components ``sigmoid(±(a_1 − a_0))``, more a max-shifted softmax written out."""
    k = mean.shape[0]
    if k == 1:
        return [torch.ones_like(z)]
    s = var + eps
    half = (-0.5 / s)[..., None]
    base = (log_prior - 0.5 * torch.log(s))[..., None]
    logits = [base[i] + half[i] * (z - mean[i, :, None]).square() for i in range(k)]
    if k == 2:
        d = logits[1] - logits[0]
        return [torch.sigmoid(-d), torch.sigmoid(d)]
    top = logits[0]
    for a in logits[1:]:
        top = torch.maximum(top, a)
    e = [torch.exp(a - top) for a in logits]
    total = e[0]
    for t in e[1:]:
        total = total + t
    inv = 1 / total
    return [t * inv for t in e]


def _plane(v: Tensor, dt: torch.dtype) -> Tensor:
    return v.reshape(v.shape[0], v.shape[1], v.shape[3]).to(dt)


@torch.no_grad()
def mixture_fit_traced(v: Tensor, *, k: int, iterations: int, eps: float,
                       running: tuple[Tensor, Tensor, Tensor] | None) -> dict[str, Tensor]:
    """EM on ``v`` ``(N, C, 1, S)`` without a graph, for :func:`mixture_affine_traced`.

    Returns ``mean`` (uncentred), ``var``, ``log_prior`` ``(K, C)`` and what the Function
    reads: ``traced_shift`` ``(C,)`` (the batch mean), ``traced_trajectory`` ``(T + 1, 4, K,
    C)`` (centred mean, variance, log weight and raw count of the start and of every step),
    ``traced_same`` (1 where a channel started from the batch) and ``traced_var`` (the batch
    variance, ``(C,)``).
    """
    n, s = v.shape[0], v.shape[3]
    m = n * s
    x = _plane(v, stats_dtype(v))
    shift = _sum(x) / m
    z = x - shift[:, None]
    var_b = _sum(z * z) / m
    mean, var, log_prior = gmm_start(var_b, shift, k, eps, running)
    steps = [torch.stack((mean, var, log_prior, torch.ones_like(mean)))]
    tiny = torch.finfo(z.dtype).tiny
    for _ in range(iterations):
        moments = []
        for p in _posterior(z, mean, var, log_prior, eps):
            pz = p * z
            moments.append(torch.stack((_sum(p), _sum(pz), _sum(pz * z))))
        count, s1, s2 = torch.stack(moments, 1).unbind(0)  # (K, C) each
        nk = count.clamp_min(tiny)
        mean = s1 / nk
        var = (s2 / nk - mean * mean).clamp_min(0)
        log_prior = torch.log(nk / m)
        steps.append(torch.stack((mean, var, log_prior, count)))
    same = torch.ones_like(var_b) if running is None else collapsed(running).to(var_b.dtype)
    out = {"mean": mean + shift, "var": var, "log_prior": log_prior, "traced_shift": shift,
           "traced_trajectory": torch.stack(steps), "traced_same": same, "traced_var": var_b}
    if running is not None:
        out["batch_running"] = torch.stack(running)
    return out


def _output(v: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor,
            traj: Tensor, eps: float) -> Tensor:
    """``γ Σ_k p_k·(z − μ_k)/√(σ²_k + ε) + β`` of the last step of ``traj``, shaped as ``v``."""
    z = _plane(v, shift.dtype) - shift[:, None]
    mean, var = traj[-1, 0], traj[-1, 1]
    r = torch.rsqrt(var + eps)
    y = None
    for i, p in enumerate(_posterior(z, mean, var, traj[-1, 2], eps)):
        term = p * ((z - mean[i, :, None]) * r[i, :, None])
        y = term if y is None else y + term
    if weight is not None:
        y = y * weight.reshape(-1, 1).to(y.dtype)
    if bias is not None:
        y = y + bias.reshape(-1, 1).to(y.dtype)
    return y.reshape(v.shape)


def _through_logits(z: Tensor, ps: list[Tensor], gp: list[Tensor], mean: Tensor, s: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse mode through ``p = softmax_k(a)``, ``a_k = log π_k − ½log s_k − (z − μ_k)²/2s_k``
    given ``∂L/∂p_k`` (``gp``): ``∂L/∂(μ, s, log π)`` ``(K, C)`` each (three sums per component
    in the reduction that reads the plane) and the logits' share of ``∂L/∂z``, pointwise."""
    dot = ps[0] * gp[0]
    for p, g in zip(ps[1:], gp[1:], strict=True):
        dot = dot + p * g
    sums, g_z = [], None
    for i, (p, g) in enumerate(zip(ps, gp, strict=True)):
        ga = p * (g - dot)  # ∂L/∂a_i
        d = z - mean[i, :, None]
        gad = ga * d
        sums.append(torch.stack((_sum(ga), _sum(gad), _sum(gad * d))))
        term = gad * (-1 / s[i, :, None])  # ∂a_i/∂z = −(z − μ_i)/s_i
        g_z = term if g_z is None else g_z + term
    a, b, c = torch.stack(sums, 1).unbind(0)  # (K, C): Σ ga, Σ ga·d, Σ ga·d²
    return b / s, (c / s - a) / (2 * s), a, g_z


def _backward(g: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor,
              traj: Tensor, same: Tensor, var_b: Tensor, eps: float
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``∂L/∂(v, γ, β)`` in traceable ops: one reduction per stage (the output, then each EM
    step, last first), each recomputing its posteriors and adding its share to ``∂L/∂z``."""
    k, iterations, c = traj.shape[2], traj.shape[0] - 1, traj.shape[3]
    dt = shift.dtype
    n, sp = v.shape[0], v.shape[3]
    m = n * sp
    z = _plane(v, dt) - shift[:, None]
    gy = _plane(g, dt)
    w = None if weight is None else weight.reshape(c).to(dt)
    # the output y = γ Σ_k p_k (z − μ_k) r_k + β
    mean, var, log_prior = traj[-1, 0], traj[-1, 1], traj[-1, 2]
    s = var + eps
    r = torch.rsqrt(s)
    ps = _posterior(z, mean, var, log_prior, eps)
    gw = gy if w is None else gy * w[:, None]
    xh = [(z - mean[i, :, None]) * r[i, :, None] for i in range(k)]
    moments = torch.stack([torch.stack((_sum(gy * p), _sum(gy * p * h)))
                           for p, h in zip(ps, xh, strict=True)], 1)  # (2, K, C)
    g_weight = None if weight is None else (moments[1].sum(0)).reshape(weight.shape)
    g_bias = None if bias is None else moments[0].sum(0).reshape(bias.shape)
    if w is not None:
        moments = moments * w
    g_mean, g_var, g_log_prior, g_z = _through_logits(z, ps, [gw * h for h in xh], mean, s)
    g_mean = g_mean - r * moments[0]
    g_var = g_var - 0.5 * r * r * moments[1]  # ∂r/∂s = −r³/2; moments[1] = r·Σ gw p (z − μ)
    rsum = ps[0] * r[0, :, None]
    for i in range(1, k):
        rsum = rsum + ps[i] * r[i, :, None]
    g_z = g_z + gw * rsum
    # the EM steps, last first: step t maps the statistics of t to those of t + 1
    tiny = torch.finfo(dt).tiny
    for t in range(iterations - 1, -1, -1):
        mean1, var1, count = traj[t + 1, 0], traj[t + 1, 1], traj[t + 1, 3]
        n1 = count.clamp_min(tiny)
        g_m = g_mean - 2 * mean1 * g_var
        g_s1, g_s2 = g_m / n1, g_var / n1
        g_n = (g_log_prior - g_m * mean1 - g_var * (var1 + mean1 * mean1)) / n1
        g_n = g_n * (count > tiny).to(dt)
        mean, var, log_prior = traj[t, 0], traj[t, 1], traj[t, 2]
        ps = _posterior(z, mean, var, log_prior, eps)
        gp = [g_n[i, :, None] + z * (g_s1[i, :, None] + z * g_s2[i, :, None]) for i in range(k)]
        g_mean, g_var, g_log_prior, g_zt = _through_logits(z, ps, gp, mean, var + eps)
        for i, p in enumerate(ps):  # the M-step's own ∂/∂z: p_k·(g_s1 + 2 g_s2 z)
            g_zt = g_zt + p * (g_s1[i, :, None] + 2 * g_s2[i, :, None] * z)
        g_z = g_z + g_zt
    # the start: the batch's through σ²_B (where `same`), the running mixture's through the
    # shift (μ_0 = running mean − mean(x)); then z = x − mean(x)
    q = normal_quantiles(k, dtype=dt, device=z.device)
    g_var_b = same * ((g_mean * q[:, None]).sum(0) / (2 * torch.sqrt(var_b + eps))
                      + g_var.sum(0) * (1 - q.square().mean()))
    g_shift = (same - 1) * g_mean.sum(0)  # (C,)
    gx = g_z + (2 * g_var_b / m)[:, None] * z
    gx = gx + ((g_shift - _sum(gx)) / m)[:, None]
    return gx.reshape(v.shape).to(v.dtype), g_weight, g_bias


def mixture_plain_args(v: Tensor, weight: Tensor | None, bias: Tensor | None,
                       running: Tensor | None, traj: Tensor, eps: float) -> tuple[Any, ...]:
    return (v, weight, bias, running, traj.shape[2], traj.shape[0] - 1, eps)


class _MixtureTraced(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                shift: Tensor, traj: Tensor, same: Tensor, var_b: Tensor,
                running: Tensor | None, eps: float) -> Tensor:
        ctx.save_for_backward(v, weight, bias, shift, traj, same, var_b, running)
        ctx.eps = eps
        return _output(v, weight, bias, shift, traj, eps)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, weight, bias, shift, traj, same, var_b, running = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            from .fused_mixture import mixture_plain

            return (*_plain_vjp(mixture_plain,
                                mixture_plain_args(v, weight, bias, running, traj, ctx.eps),
                                g)[:3], None, None, None, None, None, None)
        gx, g_weight, g_bias = _backward(g, v, weight, bias, shift, traj, same, var_b, ctx.eps)
        return gx, g_weight, g_bias, None, None, None, None, None, None


def mixture_affine_traced(v: Tensor, stats: dict[str, Tensor], weight: Tensor | None,
                          bias: Tensor | None, *, eps: float) -> Tensor:
    """``γ·Σ_k p(k | z)·(z − μ_k)/√(σ²_k + ε) + β`` of :func:`mixture_fit_traced`'s mixture
    (per-channel ``γ, β``) with the traceable backward of this module."""
    running = stats.get("batch_running")
    return _MixtureTraced.apply(v, weight, bias, stats["traced_shift"],
                                stats["traced_trajectory"], stats["traced_same"],
                                stats["traced_var"], running, eps)
