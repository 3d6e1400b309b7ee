r"""Mixture normalization's training step as plain traceable torch ops, for inductor.

Under ``torch.compile`` (:func:`~normkit.functional.statistics.compiling_kernels`; an exported
graph keeps the custom ops of :mod:`normkit.functional.fused_mixture_ops`) :func:`mixture_fit_traced` runs EM without a graph
on the canonical layout ``(N, C, S)`` itself (no channels-first copy) and
:func:`mixture_affine_traced` applies an autograd Function whose backward is the hand-derived
one of :mod:`normkit.functional.fused_mixture` written out in traceable ops: inductor fuses each
EM step of the fit, the output, and each stage of the backward (the output's, then every EM
step's, last first) into one loop over the plane that recomputes its posteriors (about 18×
compiled BN before, 5–6× after, at ``(128, 64, 16, 16)``, one thread).

The math: logits ``a_k = A_k·[1, z, z²]`` with ``A_k = [log π_k − ½log s_k − μ_k²/2s_k,
μ_k/s_k, −1/2s_k]`` (``s = σ² + ε``), ``p = softmax_k(a)`` (two components: ``sigmoid(±d)``,
``d = a_1 − a_0``; the output and the backward write ``p_0 = 1 − p_1``), raw M-step moments

.. math::
    n_k = \sum p_k,\quad \mu'_k = \frac{\sum p_k z}{n_k},\quad
    \sigma'^2_k = \frac{\sum p_k z^2}{n_k} - \mu'^2_k,\quad \log\pi'_k = \log\frac{n_k}{M}

on the centred ``z = x − mean(x)``; each sum over a channel's ``M = N·S`` values is a float32
sum over the ``S`` positions of each sample, added over the samples in float64 (:func:`_sum`),
as precise as the eager runs.

What keeps inductor's CPU backend at one loop per pass: it writes out to memory every reused
value whose expression calls ``exp``/``sigmoid`` or loads more than four values, and reduces
it in a loop of its own over the flattened plane. So ``z`` and the per-channel coefficients of
each pass are buffers (two tiny opaque ops, ``normkit::mixture_centre`` and
``normkit::mixture_pack``), the sigmoid is written with ``exp2``, and every sum of the
backward reads a per-channel ``one`` that keeps it in the plane's loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .fused import _plain_vjp
from .fused_mixture import LOG2_E, _coef, _coef_backward, _m_step_backward, mixture_plain
from .mixture import collapsed, gmm_start, normal_quantiles
from .partition import stats_dtype

__all__ = ["mixture_fit_traced", "mixture_affine_traced"]


# z = x − shift as an opaque op: its result is a buffer, so that every per-value expression below
# reads at most four (z and three coefficients); inductor's CPU backend writes out to memory any
# reused expression that reads more (or that calls exp/sigmoid), and reduces it in a loop of
# its own, where reading it inline keeps an EM step one loop
_LIB = torch.library.Library("normkit", "FRAGMENT")
_LIB.define("mixture_centre(Tensor x, Tensor shift) -> Tensor",
            tags=(torch.Tag.pt2_compliant_tag,))
_LIB.impl("mixture_centre", lambda x, shift: x - shift[:, None], "CompositeExplicitAutograd")


@torch.library.register_fake("normkit::mixture_centre", lib=_LIB)
def _(x: Tensor, shift: Tensor) -> Tensor:
    return torch.empty_like(x)


# the per-channel coefficients of a pass, likewise a buffer: computed inline, each would load
# the several statistics it is made of
_LIB.define("mixture_pack(Tensor t) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.impl("mixture_pack", lambda t: t.clone(), "CompositeExplicitAutograd")


@torch.library.register_fake("normkit::mixture_pack", lib=_LIB)
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _pack(*rows: Tensor) -> list[Tensor]:
    """The ``(C,)`` rows as columns ``(C, 1)`` of one buffer."""
    t = torch.ops.normkit.mixture_pack(torch.stack(rows))
    return [t[i, :, None] for i in range(len(rows))]


def _sum(t: Tensor) -> Tensor:
    """``Σ`` over the samples and positions of ``t`` ``(N, C, S)`` → ``(C,)``: a sum over the
    ``S`` positions in ``t``'s dtype, the samples' sums added in float64 (the runs of the eager
    code; the loops keep the plane's order, so the E-step's values are computed once)."""
    return t.sum(-1).to(torch.float64).sum(0).to(t.dtype)




def _exp(t: Tensor) -> Tensor:
    """``exp`` as ``exp2(t·log₂e)``: inductor's CPU backend writes out to memory every reused
    value whose expression calls ``exp``/``sigmoid`` (and reduces it in a loop of its own), not
    one written with ``exp2``, which it recomputes in the fused loop instead (an E-step's six
    sums of ``p_0, p_1``: about 4× faster)."""
    return torch.exp2(t * LOG2_E)


def _sigmoid(t: Tensor) -> Tensor:
    """``1 / (1 + exp(−t))`` through :func:`_exp` (0 and 1 at the ends, small values to full
    relative precision, as ``torch.sigmoid``)."""
    return 1 / (1 + _exp(-t))


def _poly(c: list[Tensor], z: Tensor) -> Tensor:
    """``c_0 + z(c_1 + c_2 z)`` per channel: ``c`` three ``(C, 1)`` (:func:`_pack`), ``z``
    ``(N, C, S)``."""
    return c[0] + z * (c[1] + z * c[2])


def _posterior(z: Tensor, coef: Tensor) -> list[Tensor]:
    """``softmax_k(A_k·[1, z, z²])`` (``coef`` ``(K, C, 3)``, :func:`_coef`) as ``K``
    pointwise expressions ``(N, C, S)``: two components ``sigmoid(±d)``, ``d = a_1 − a_0``, from
    one exponential ``e = exp(−d)`` (``p_1 = 1/(1 + e)``, ``p_0 = e·p_1``, each to full relative
    precision; ``e`` capped below overflow, where ``p_1`` is under float32's smallest normal,
    the counts' floor anyway: a fused EM step ~9 % faster than two sigmoids), more a max-shifted
    softmax written out (a softmax over a stacked axis is three passes)."""
    k = coef.shape[0]
    if k == 1:
        return [torch.ones_like(z)]
    if k == 2:
        d = _poly(_pack(*(coef[1] - coef[0]).unbind(-1)), z)
        cap = math.floor(math.log2(torch.finfo(z.dtype).max)) - 1  # 126 in float32
        e = torch.exp2((d * -LOG2_E).clamp_max(cap))
        p1 = 1 / (1 + e)
        return [e * p1, p1]
    logits = [_poly(_pack(*coef[i].unbind(-1)), z) for i in range(k)]
    top = logits[0]
    for a in logits[1:]:
        top = torch.maximum(top, a)
    e = [_exp(a - top) for a in logits]
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
    reads: ``traced_centered`` ``(N, C, S)`` (``z``), ``traced_trajectory`` ``(T + 1, 4, K,
    C)`` (centred mean, variance, log weight and raw count of the start and of every step),
    ``traced_same`` (1 where a channel started from the batch) and ``traced_var`` (the batch
    variance and ``Σ z``, ``(2, C)``).
    """
    n, s = v.shape[0], v.shape[3]
    m = n * s
    x = _plane(v, stats_dtype(v))
    shift = _sum(x) / m
    z = torch.ops.normkit.mixture_centre(x, shift)
    var_b = _sum(z * z) / m
    z_sum = _sum(z)  # ≈ 0: for the backward's centring
    mean, var, log_prior = gmm_start(var_b, shift, k, eps, running)
    steps = [torch.stack((mean, var, log_prior, torch.ones_like(mean)))]
    tiny = torch.finfo(z.dtype).tiny
    for _ in range(iterations):
        moments = []
        for p in _posterior(z, _coef(mean, var, log_prior, eps)):
            pz = p * z
            moments.append(torch.stack((_sum(p), _sum(pz), _sum(pz * z))))
        count, s1, s2 = torch.stack(moments, 1).unbind(0)  # (K, C) each
        nk = count.clamp_min(tiny)
        mean = s1 / nk
        var = (s2 / nk - mean * mean).clamp_min(0)
        log_prior = torch.log(nk / m)
        steps.append(torch.stack((mean, var, log_prior, count)))
    same = torch.ones_like(var_b) if running is None else collapsed(running).to(var_b.dtype)
    out = {"mean": mean + shift, "var": var, "log_prior": log_prior, "traced_centered": z,
           "traced_trajectory": torch.stack(steps), "traced_same": same,
           "traced_var": torch.stack((var_b, z_sum))}
    if running is not None:
        out["batch_running"] = torch.stack(running)
    return out


def _output(v: Tensor, z: Tensor, weight: Tensor | None, bias: Tensor | None, traj: Tensor,
            eps: float) -> Tensor:
    """``γ Σ_k p_k·(z − μ_k)/√(σ²_k + ε) + β`` of the last step of ``traj``, shaped as ``v``."""
    mean, var = traj[-1, 0], traj[-1, 1]
    r = torch.rsqrt(var + eps)
    if weight is not None:
        r = r * weight.reshape(1, -1).to(r.dtype)
    lin = torch.stack((-mean * r, r), -1)  # (K, C, 2): γ x̂_k = lin_k·[1, z]
    if bias is not None:
        lin = lin + torch.stack((bias.reshape(-1).to(r.dtype), torch.zeros_like(r[0])), -1)
    ps = _posterior(z, _coef(mean, var, traj[-1, 2], eps))
    if len(ps) == 2:  # y = ŷ_0 + p_1·(ŷ_1 − ŷ_0): Σ_k p_k = 1
        d = lin[1] - lin[0]
        y = lin[0, :, 0, None] + lin[0, :, 1, None] * z + ps[1] * (d[:, 0, None] + d[:, 1, None] * z)
    else:
        y = None
        for i, p in enumerate(ps):
            term = p * (lin[i, :, 0, None] + lin[i, :, 1, None] * z)
            y = term if y is None else y + term
    return y.reshape(v.shape).to(z.dtype)


def _through_posterior(z: Tensor, ps: list[Tensor], gp: list[Tensor], coef: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """Reverse mode through ``p = softmax_k(A_k·[1, z, z²])`` given ``∂L/∂p_k`` (``gp``):
    ``∂L/∂A`` ``(K, C, 3)`` (three sums per component) and the logits' share of ``∂L/∂z``,
    ``Σ_k ∂L/∂a_k·(A_k1 + 2A_k2 z)``, pointwise."""
    dot = ps[0] * gp[0]
    for p, g in zip(ps[1:], gp[1:], strict=True):
        dot = dot + p * g
    sums, g_z = [], None
    for i, (p, g) in enumerate(zip(ps, gp, strict=True)):
        ga = p * (g - dot)  # ∂L/∂a_i
        gaz = ga * z
        sums.append(torch.stack((_sum(ga), _sum(gaz), _sum(gaz * z)), -1))
        term = ga * (coef[i, :, 1, None] + 2 * coef[i, :, 2, None] * z)
        g_z = term if g_z is None else g_z + term
    return torch.stack(sums), g_z


def _pair_output(gy: Tensor, z: Tensor, coef: Tensor, mean: Tensor, rw: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The output stage of two components (``p_0 = 1 − p_1``): ``Σ g p_k [1, z]`` ``(2, K,
    C)``, ``∂L/∂A`` ``(K, C, 3)`` of the logits and ``∂L/∂z``, in one loop over the plane.

    Every sum reads the per-channel ``one`` (1): a reused value inductor writes out (``∂L/∂d``
    here) is otherwise summed in a loop of its own over the flattened plane, a second pass."""
    ad = coef[1] - coef[0]  # d = a_1 − a_0
    dr = rw[1] - rw[0]
    # ∂L/∂p_1 − ∂L/∂p_0 = g·(e_0 + e_1 z), e = rw_1 [−μ_1, 1] − rw_0 [−μ_0, 1]
    d0, d1, d2, e0, e1, r0, r1, one = _pack(*ad.unbind(-1), rw[0] * mean[0] - rw[1] * mean[1],
                                            dr, rw[0], dr, torch.ones_like(dr))
    p1 = _sigmoid(d0 + z * (d1 + z * d2))
    ga = p1 * (1 - p1) * (gy * (e0 + e1 * z))  # ∂L/∂d
    gaz = ga * z
    s = torch.stack((_sum(ga * one), _sum(gaz * one), _sum(gaz * z * one)), -1)
    gp1 = gy * p1
    gz = gy * z
    total = torch.stack((_sum(gy * one), _sum(gz * one)))
    m1 = torch.stack((_sum(gp1 * one), _sum(gp1 * z * one)))
    moments = torch.stack((total - m1, m1), 1)
    g_z = ga * (d1 + 2 * d2 * z) + gy * (r0 + p1 * r1)
    return moments, torch.stack((-s, s)), g_z


def _pair_step(g_z: Tensor, z: Tensor, coef: Tensor, g_r: Tensor, last: bool
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """An EM step of two components in reverse, given ``∂L/∂p_k = g_r,k·[1, z, z²]``:
    ``∂L/∂A`` ``(K, C, 3)``, ``∂L/∂z`` with this step's share added and, for the ``last``
    (the first step), ``Σ ∂L/∂z``, in one loop over the plane."""
    ad = coef[1] - coef[0]
    dg = g_r[1] - g_r[0]
    d0, d1, d2, h0, h1, h2, e0, e1, f0, f1, one = _pack(
        *ad.unbind(-1), *dg.unbind(-1), g_r[0, :, 1], 2 * g_r[0, :, 2], dg[:, 1], 2 * dg[:, 2],
        torch.ones_like(dg[:, 0]))
    p1 = _sigmoid(d0 + z * (d1 + z * d2))
    ga = p1 * (1 - p1) * (h0 + z * (h1 + z * h2))  # ∂L/∂d
    gaz = ga * z
    s = torch.stack((_sum(ga * one), _sum(gaz * one), _sum(gaz * z * one)), -1)
    # the logits' share and the M-step's own Σ_k p_k (g_s1 + 2 g_s2 z), p_0 = 1 − p_1
    g_z = g_z + ga * (d1 + 2 * d2 * z) + (e0 + e1 * z) + p1 * (f0 + f1 * z)
    return torch.stack((-s, s)), g_z, _sum(g_z * one) if last else None


def _backward(g: Tensor, v: Tensor, z: Tensor, weight: Tensor | None, bias: Tensor | None,
              traj: Tensor, same: Tensor, var_b: Tensor, eps: float
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``∂L/∂(v, γ, β)`` in traceable ops: one reduction per stage (the output, then each EM
    step, last first), each recomputing its posteriors and adding its share to ``∂L/∂z``."""
    k, iterations, c = traj.shape[2], traj.shape[0] - 1, traj.shape[3]
    dt = z.dtype
    m = z.shape[0] * z.shape[2]
    gy = _plane(g, dt)
    w = None if weight is None else weight.reshape(c).to(dt)
    pair = k == 2
    # the output y = γ Σ_k p_k (z − μ_k) r_k + β
    mean, var, log_prior = traj[-1, 0], traj[-1, 1], traj[-1, 2]
    r = torch.rsqrt(var + eps)
    rw = r if w is None else r * w
    coef = _coef(mean, var, log_prior, eps)
    if pair:
        moments, g_coef, g_z = _pair_output(gy, z, coef, mean, rw)
    else:
        ps = _posterior(z, coef)
        moments = torch.stack([torch.stack((_sum(gy * p), _sum(gy * p * z))) for p in ps], 1)
        gp = [gy * (rw[i, :, None] * (z - mean[i, :, None])) for i in range(k)]  # ∂L/∂p_k
        g_coef, g_z = _through_posterior(z, ps, gp, coef)
        rsum = ps[0] * rw[0, :, None]
        for i in range(1, k):
            rsum = rsum + ps[i] * rw[i, :, None]
        g_z = g_z + gy * rsum
    moments = torch.stack((moments[0], moments[1] - mean * moments[0]))  # Σ g p_k [1, z − μ_k]
    g_weight = None if weight is None else (r * moments[1]).sum(0).reshape(weight.shape)
    g_bias = None if bias is None else moments[0].sum(0).reshape(bias.shape)
    if w is not None:
        moments = moments * w
    g_mean, g_var, g_log_prior = _coef_backward(g_coef, mean, var, eps)
    g_mean = g_mean - r * moments[0]
    g_var = g_var - 0.5 * r * r * r * moments[1]
    # the EM steps, last first: step t maps the statistics of t to those of t + 1
    tiny = torch.finfo(dt).tiny
    g_z_sum = None
    for t in range(iterations - 1, -1, -1):
        g_n, g_s1, g_s2 = _m_step_backward(traj[t + 1], g_mean, g_var, g_log_prior, tiny)
        mean, var, log_prior = traj[t, 0], traj[t, 1], traj[t, 2]
        coef = _coef(mean, var, log_prior, eps)
        g_r = torch.stack((g_n, g_s1, g_s2), -1)  # (K, C, 3): ∂L/∂p_k = g_r,k·[1, z, z²]
        if pair:
            g_coef, g_z, g_z_sum = _pair_step(g_z, z, coef, g_r, t == 0)
        else:
            ps = _posterior(z, coef)
            gp = [_poly(_pack(*g_r[i].unbind(-1)), z) for i in range(k)]
            g_coef, g_zt = _through_posterior(z, ps, gp, coef)
            for i, p in enumerate(ps):  # the M-step's own ∂/∂z: p_k·(g_s1 + 2 g_s2 z)
                g_zt = g_zt + p * (g_s1[i, :, None] + 2 * g_s2[i, :, None] * z)
            g_z = g_z + g_zt
        g_mean, g_var, g_log_prior = _coef_backward(g_coef, mean, var, eps)
    if g_z_sum is None:
        g_z_sum = _sum(g_z)
    # the start: the batch's through σ²_B (where `same`), the running mixture's through the
    # shift (μ_0 = running mean − mean(x)); then z = x − mean(x): ∂L/∂x = ∂L/∂z + a z + b
    q = normal_quantiles(k, dtype=dt, device=z.device)
    var_b, z_sum = var_b[0], var_b[1]
    g_var_b = same * ((g_mean * q[:, None]).sum(0) / (2 * torch.sqrt(var_b + eps))
                      + g_var.sum(0) * (1 - q.square().mean()))
    g_shift = (same - 1) * g_mean.sum(0)  # (C,)
    a = 2 * g_var_b / m
    b = (g_shift - g_z_sum - a * z_sum) / m
    a, b = _pack(a, b)
    return (g_z + (a * z + b)).reshape(v.shape).to(v.dtype), g_weight, g_bias


class _MixtureTraced(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                z: Tensor, traj: Tensor, same: Tensor, var_b: Tensor, running: Tensor | None,
                eps: float) -> Tensor:
        ctx.save_for_backward(v, z, weight, bias, traj, same, var_b, running)
        ctx.eps = eps
        return _output(v, z, weight, bias, traj, eps)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, z, weight, bias, traj, same, var_b, running = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            args = (v, weight, bias, running, traj.shape[2], traj.shape[0] - 1, ctx.eps)
            return (*_plain_vjp(mixture_plain, args, g)[:3], None, None, None, None, None, None)
        gx, g_weight, g_bias = _backward(g, v, z, weight, bias, traj, same, var_b, ctx.eps)
        return gx, g_weight, g_bias, None, None, None, None, None, None


def mixture_affine_traced(v: Tensor, stats: dict[str, Tensor], weight: Tensor | None,
                          bias: Tensor | None, *, eps: float) -> Tensor:
    r"""``γ·Σ_k p(k | z)·(z − μ_k)/√(σ²_k + ε) + β`` of :func:`mixture_fit_traced`'s mixture,
    differentiable through the EM steps by the traceable backward of this module (equal to
    :func:`~normkit.functional.fused_mixture.mixture_plain` and its gradients).

    Shape:
        v ``(N, C, 1, S)``; weight, bias ``C`` values or ``None`` → ``(N, C, 1, S)``.

    Example:
        >>> import torch
        >>> from normkit.functional.fused_mixture import mixture_plain
        >>> v = torch.randn(8, 3, 1, 16, dtype=torch.float64, requires_grad=True)
        >>> stats = mixture_fit_traced(v, k=2, iterations=3, eps=1e-5, running=None)
        >>> y = mixture_affine_traced(v, stats, None, None, eps=1e-5)
        >>> ref = mixture_plain(v, None, None, None, 2, 3, 1e-5)
        >>> bool(torch.allclose(y, ref))
        True
        >>> g, = torch.autograd.grad(y.square().sum(), v)
        >>> g_ref, = torch.autograd.grad(ref.square().sum(), v)
        >>> bool(torch.allclose(g, g_ref))
        True
    """
    return _MixtureTraced.apply(v, weight, bias, stats["traced_centered"],
                                stats["traced_trajectory"], stats["traced_same"],
                                stats["traced_var"], stats.get("batch_running"), eps)
