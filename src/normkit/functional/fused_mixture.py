r"""Mixture normalization's training step with a hand-derived backward through the EM steps.

The plain composition (:func:`mixture_plain`, what ``Normalization(native=False)`` runs) unrolls
``T`` EM steps in autograd on ``K``-times-activation-sized tensors and saves them all. Here
:func:`mixture_fit` runs EM without a graph on the centred values ``z`` of each channel laid
out as ``(C, M)`` (``M = N·S``) and keeps the ``(C, K)`` statistics of every step (the
*trajectory*); :func:`mixture_affine` is an autograd Function that saves ``z`` and the
trajectory and, in the backward, recomputes each step's posteriors from them.

Every per-value quantity is a per-channel polynomial in ``z`` over the basis ``B = [1, z, z²]``:
the E-step logits are ``a_k = A_k·B`` with ``A_k = [log π_k − ½log s_k − μ_k²/2s_k, μ_k/s_k,
−1/2s_k]`` (``s = σ² + ε``), ``p = softmax_k(a)`` (two components: ``p_1 = sigmoid(d)``, ``p_0 =
sigmoid(−d)``, ``d = a_1 − a_0`` evaluated as ``α + z(β + γz)``; both exact in the EM fit, whose
counts need small posteriors to full precision; the output and the backward, where ``p_0``
enters linearly, write it as ``1 − p_1``: one sigmoid per step), and the M-step moments are one
contraction ``R = p·Bᵀ = [n_k, Σ p z, Σ p z²]``:

.. math::
    \mu'_k = \frac{R_{k1}}{n_k},\quad \sigma'^2_k = \frac{R_{k2}}{n_k} - \mu'^2_k,\quad
    \log\pi'_k = \log\frac{n_k}{M}

(the raw second moment; ``z`` is centred per channel, so the cancellation is that of ``σ'² ≪
μ'²`` only). The contractions run over pieces of at most ``RUN`` values (:func:`_chunk`), their
sums added in float64: one float32 dot product over all ``M`` values of a channel would lose
about ``√(M/RUN)`` times more. The output is ``y = Σ_k p_k·(z − μ_k)·r_k``, ``r = s^{-1/2}``,
then ``γ y + β``.

Reverse mode through a step, given ``∂L/∂R``: ``∂L/∂p = (∂L/∂R)·B``, the softmax's backward gives
``∂L/∂a``, ``∂L/∂A = (∂L/∂a)·Bᵀ`` and the values receive ``Σ_k p_k (∂_{R_{k1}} + 2z ∂_{R_{k2}})
+ Σ_k ∂_{a_k}(A_{k1} + 2 z A_{k2})``, accumulated over the steps as ``U₀ + U₁ z``. The start
(the batch's, through ``σ²_B``, or the running mixture's, through the shift) and the centring
``z = x − mean(x)`` close the chain. Saved: the centred input (``1×``) and ``(T + 1)·4·C·K``
statistics; a second derivative differentiates :func:`mixture_plain`. Compiled by inductor the
same math runs as traceable ops (:mod:`normkit.functional.fused_mixture_traced`); exported, as
three custom ops (fit, apply, its backward: one opaque node each, first order).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .fused import _plain_vjp
from .mixture import collapsed, gmm_em, gmm_posterior, gmm_start, mixture_output, normal_quantiles
from .partition import stats_dtype
from .standardize import affine_transform

__all__ = ["mixture_plain"]


# exp(t) = exp2(t·log₂e): exp2 measured ~3× faster than exp on this CPU (mixture_eval), and
# inductor recomputes it inline where it writes out an exp (fused_mixture_traced)
LOG2_E = 1 / math.log(2)

RUN = 1024  # the longest run: float32 error ~√RUN·ε per run; longer runs are a little faster


def _chunk(n: int, s: int) -> int:
    """The length ``L`` of the runs a channel's ``M = N·S`` values are split into: every
    contraction over them is a float32 sum over ``L`` values per run, the runs' sums added in
    float64 (a BLAS dot product over all ``M`` values loses ~``√M`` times more). ``L`` is a
    multiple of ``S`` dividing ``M`` (``S ≤ RUN``) or a divisor of ``S``, in ``[64, RUN]``;
    ``M`` where there is none."""
    best = 1
    if s <= RUN:
        for a in range(1, RUN // s + 1):
            if n % a == 0:
                best = a * s
    else:
        for size in range(RUN, 63, -1):
            if s % size == 0:
                best = size
                break
    return best if best >= 64 else n * s


def _rep(t: Tensor, j: int) -> Tensor:
    """Per-channel coefficients ``(C, …)`` for the ``(C·J, …)`` runs."""
    return t if j == 1 else t.repeat_interleave(j, 0)


def _reduce(a: Tensor, bt: Tensor, c: int) -> Tensor:
    """``Σ_m a·b`` per channel: runs ``(C·J, R, L)`` and ``(C·J, L, X)`` → ``(C, R, X)``."""
    r = torch.bmm(bt.transpose(1, 2), a.transpose(1, 2))  # (C·J, X, R): BLAS's faster side
    r = r.view(c, -1, r.shape[1], r.shape[2]).sum(1, dtype=torch.float64)
    return r.transpose(1, 2).to(a.dtype)


def _runs(t: Tensor, c: int, n: int, s: int, size: int) -> Tensor:
    """A ``(C, N, S)`` tensor (any strides) or the runs ``(C·J, L)`` of a channel-first plane as
    one 4-d view, so that either copies into the other."""
    if size % s == 0:
        return t.view(c, n * s // size, size // s, s)
    return t.view(c, n, s // size, size)


def _basis(z: Tensor) -> Tensor:
    """``[1, z, z²]`` per run: ``(C·J, L)`` → ``(C·J, 3, L)``."""
    out = torch.empty(z.shape[0], 3, z.shape[1], dtype=z.dtype, device=z.device)
    out[:, 1].copy_(z)
    out[:, 0].fill_(1)
    out[:, 2].copy_(z).mul_(z)  # in place: compile takes no strided `out=`
    return out


def _coef(mean: Tensor, var: Tensor, log_prior: Tensor, eps: float) -> Tensor:
    """The E-step logits' coefficients on the basis ``[1, z, z²]``: ``(C, K)`` → ``(C, K, 3)``."""
    s = var + eps
    return torch.stack((log_prior - 0.5 * torch.log(s) - 0.5 * mean * mean / s, mean / s,
                        -0.5 / s), -1)


def _coef_backward(g: Tensor, mean: Tensor, var: Tensor, eps: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``∂L/∂(μ, σ², log π)`` from ``∂L/∂A`` of :func:`_coef`."""
    s = var + eps
    ga, gb, gc = g.unbind(-1)
    g_mean = (gb - ga * mean) / s
    g_var = (-0.5 * ga + (0.5 * ga * mean * mean - gb * mean + 0.5 * gc) / s) / s
    return g_mean, g_var, ga


def _m_step_backward(step: Tensor, g_mean: Tensor, g_var: Tensor, g_log_prior: Tensor,
                     tiny: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse mode through one M-step: ``∂L/∂(n_k, Σ p z, Σ p z²)`` from ``∂L/∂(μ', σ'²,
    log π')``, given the step's results ``step`` = ``(μ', σ'², log π', n)`` (any layout, stacked
    on the first axis). A component whose count underflowed (floored at ``tiny``) passes no
    gradient through its count."""
    mean1, var1, count = step[0], step[1], step[3]
    n1 = count.clamp_min(tiny)
    g_m = g_mean - 2 * mean1 * g_var
    g_n = (g_log_prior - g_m * mean1 - g_var * (var1 + mean1 * mean1)) / n1
    return g_n * (count > tiny).to(g_n.dtype), g_m / n1, g_var / n1


def _posterior(coef: Tensor, basis: Tensor, j: int) -> Tensor:
    """``softmax_k(A·B)``: ``(C·J, K, L)`` (more than two components)."""
    return torch.softmax(torch.bmm(_rep(coef, j), basis), 1)


def _quad(coef: Tensor, zr: Tensor, out: Tensor | None = None) -> Tensor:
    """``a + z(b + c z)`` per run (coefficients ``(C·J, 3)``) into the contiguous ``out``: three
    passes, faster than a contraction over three basis rows (and than ``addcmul(b, c, z)``, whose
    two broadcast operands leave torch's vectorized loop). ``out=None``: a new tensor, through
    ops autograd differentiates."""
    t = torch.mul(zr, coef[:, 2:3], out=out).add_(coef[:, 1:2])
    return torch.addcmul(coef[:, 0:1], t, zr, out=out)


def _pair(coef: Tensor, zr: Tensor, j: int, out: Tensor) -> Tensor:
    """Two components' posteriors into the planes ``out`` ``(2, C·J, L)``: ``p_1 = sigmoid(d)``,
    ``p_0 = sigmoid(−d)``, ``d = a_1 − a_0`` (each side exact; a softmax over a middle axis of
    two is several times slower)."""
    _quad(_rep(coef[:, 1] - coef[:, 0], j), zr, out[1])
    torch.neg(out[1], out=out[0])
    return out.sigmoid_()


def _through_posterior(g_p_coef: Tensor, values: Tensor, p: Tensor, coef: Tensor, bt: Tensor,
                       j: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse mode through ``p = softmax_k(A·B)`` (more than two components) given ``∂L/∂p =
    G·X`` (``g_p_coef`` ``G`` ``(C, K, X)``, ``values`` ``X`` ``(C·J, X, L)``): ``∂L/∂A`` ``(C,
    K, 3)`` and the logits' share of ``∂L/∂z``, ``Σ_k ∂_{a_k}·[A_{k1}, 2A_{k2}]``, as
    coefficients ``(C, 2, K)`` on the rows ``∂L/∂a`` ``(C·J, K, L)``."""
    q = torch.stack((coef[..., 1], 2 * coef[..., 2]), 1)  # (C, 2, K): ∂a_k/∂z = q_k·[1, z]
    g_a = torch._softmax_backward_data(torch.bmm(_rep(g_p_coef, j), values), p, 1, p.dtype)
    return _reduce(g_a, bt, coef.shape[0]), q, g_a


def _second(coef: Tensor, zr: Tensor, j: int, out: Tensor) -> Tensor:
    """The second of two components' posteriors alone, ``p_1 = sigmoid(d)``, into ``out``
    ``(C·J, L)``: the backward writes ``p_0`` as ``1 − p_1`` wherever it enters linearly
    (:func:`_pair_through`), one sigmoid and one plane less than :func:`_pair`."""
    return _quad(_rep(coef[:, 1] - coef[:, 0], j), zr, out).sigmoid_()


def _pair_through(p1: Tensor, g_p: Tensor, coef: Tensor, bt: Tensor) -> tuple[Tensor, Tensor]:
    """Reverse mode through :func:`_pair` from ``p_1`` and ``g_p = ∂L/∂p_1 − ∂L/∂p_0``, which
    becomes ``∂L/∂d = p_0 p_1 g_p`` in place (``p_0 p_1 = p_1(1 − p_1)``: at most ~1e-7 off in
    absolute terms where ``p_0`` underflows, where the gradient through ``d`` is that small).
    Returns ``∂L/∂A`` ``(C, 2, 3)`` and the coefficients ``(C, 2)`` of ``∂L/∂d`` in ``∂L/∂z =
    ∂L/∂d·(q_0 + q_1 z)``."""
    g_d = g_p.mul_(p1)
    g_d.addcmul_(g_d, p1, value=-1)
    g1 = _reduce(g_d.unsqueeze(1), bt, coef.shape[0])
    q = torch.stack((coef[..., 1], 2 * coef[..., 2]), 1)  # (C, 2, K)
    return torch.cat((-g1, g1), 1), q[..., 1] - q[..., 0]


def _m_step(p: Tensor, basis: Tensor, m: int, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, variance, log weight and raw count ``Σ p`` per component, each ``(C, K)``."""
    r = _reduce(p, basis.transpose(1, 2), c)  # (C, K, 3)
    count = r[..., 0]
    n = count.clamp_min(torch.finfo(p.dtype).tiny)
    mean = r[..., 1] / n
    var = (r[..., 2] / n - mean * mean).clamp_min(0)
    return mean, var, torch.log(n / m), count


@torch.no_grad()
def _fit_eager(v: Tensor, k: int, iterations: int, eps: float,
               running: tuple[Tensor, Tensor, Tensor] | None) -> dict[str, Tensor]:
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    m = n * s
    size = _chunk(n, s)
    j = m // size
    z = torch.empty(c, m, dtype=stats_dtype(v), device=v.device)  # what the Function saves
    z.view(c, n, s).copy_(v.reshape(n, c, s).transpose(0, 1))  # one pass: channels first
    shift = z.mean(1)
    z.sub_(shift[:, None])
    basis = _basis(z.view(c * j, size))
    var_b = basis[:, 2].reshape(c, j, size).sum((1, 2)) / m
    mean, var, log_prior = (t.t() for t in gmm_start(var_b, shift, k, eps, running))
    steps = [torch.stack((mean, var, log_prior, torch.ones_like(mean)))]
    zr = z.view(c * j, size)
    buf = torch.empty(2, c * j, size, dtype=z.dtype, device=z.device) if k == 2 else None
    for _ in range(iterations):
        coef = _coef(mean, var, log_prior, eps)
        p = _posterior(coef, basis, j) if buf is None else _pair(coef, zr, j, buf).transpose(0, 1)
        mean, var, log_prior, count = _m_step(p, basis, m, c)
        steps.append(torch.stack((mean, var, log_prior, count)))
    same = torch.ones_like(var_b) if running is None else collapsed(running).to(var_b.dtype)
    out = {"mean": (mean + shift[:, None]).t(), "var": var.t(), "log_prior": log_prior.t(),
           "batch_trajectory": torch.stack(steps), "batch_centered": z, "batch_basis": basis,
           "batch_same": same, "batch_var": var_b}
    if buf is not None:
        out["batch_work"] = buf
    if running is not None:
        out["batch_running"] = torch.stack(running)
    return out


def mixture_plain(v: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running: Tensor | None, k: int, iterations: int, eps: float) -> Tensor:
    """The composition :class:`~normkit.nop.MixtureStandardize` runs with ``fused=False``:
    centring, start (:func:`gmm_start`; ``running`` ``(3, K, C)`` or ``None``), unrolled EM
    (:func:`gmm_em`), posteriors, :func:`mixture_output`, ``γ, β``. ``(N, C, 1, S)`` → same."""
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    x = v.reshape(n, c, s).to(stats_dtype(v))
    shift = x.mean((0, 2))
    z = x - shift[:, None]
    start = gmm_start(z.square().mean((0, 2)), shift, k, eps,
                      None if running is None else (running[0], running[1], running[2]))
    mean, var, log_prior = gmm_em(z, *start, iterations=iterations, eps=eps)
    post = gmm_posterior(z, mean, var, log_prior, eps)
    out = mixture_output(z, mean, var, post, eps).reshape(v.shape)
    return affine_transform(out, None, None, weight, bias)


def _forward(v: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor, basis: Tensor,
             traj: Tensor, work: Tensor | None, eps: float) -> Tensor:
    """The Function's output (spends ``basis`` and ``work``)."""
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    m = n * s
    size = _chunk(n, s)
    j = m // size
    zr = z.view(c * j, size)
    mean, var, log_prior = traj[-1, 0], traj[-1, 1], traj[-1, 2]
    coef = _coef(mean, var, log_prior, eps)
    r = torch.rsqrt(var + eps)
    scale, shift = r, -mean * r  # x̂_k = shift_k + scale_k·z
    if weight is not None:
        w = weight.reshape(c, 1).to(z.dtype)
        scale, shift = scale * w, shift * w
    if bias is not None:
        shift = shift + bias.reshape(c, 1).to(z.dtype)  # Σ_k p_k = 1
    # the spent basis's pages hold the result: fresh pages cost more than the arithmetic
    if work is not None:  # two components: y = p_0·x̂_0 + p_1·x̂_1 = x̂_0 + p_1·(x̂_1 − x̂_0)
        p1 = _second(coef, zr, j, work[0])
        sc, sh = _rep(scale, j), _rep(shift, j)
        y = basis.view(-1)[: c * m].view(c * j, size)
        torch.mul(zr, sc[:, 1:] - sc[:, :1], out=y).add_(sh[:, 1:] - sh[:, :1]).mul_(p1)
        y.add_(sh[:, :1]).addcmul_(zr, sc[:, :1])
    else:
        y2 = torch.bmm(_rep(torch.stack((shift, scale), 1), j), _posterior(coef, basis, j),
                       out=basis.view(-1)[: 2 * c * m].view(c * j, 2, size))
        y = y2[:, 0].addcmul_(y2[:, 1], zr)
    out = torch.empty(v.shape, dtype=z.dtype, device=z.device)  # not a view: in-place safe
    _runs(out.view(n, c, s).transpose(0, 1), c, n, s, size).copy_(_runs(y, c, n, s, size))
    return out


def _backward(g: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor,
              traj: Tensor, same: Tensor, var_b: Tensor, eps: float, need_weight: bool,
              need_bias: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``∂L/∂(v, γ, β)`` of the Function's output, first order."""
    k, iterations = traj.shape[-1], traj.shape[0] - 1
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    m = n * s
    size = _chunk(n, s)
    j = m // size
    dt = z.dtype
    zr = z.view(c * j, size)
    gb = torch.empty(2, c * j, size, dtype=dt, device=z.device)  # planes g, g·z
    _runs(gb[0], c, n, s, size).copy_(_runs(g.reshape(n, c, s).transpose(0, 1), c, n, s, size))
    torch.mul(gb[0], zr, out=gb[1])
    basis = _basis(zr)
    bt = basis.transpose(1, 2)
    w = None if weight is None else weight.reshape(c).to(dt)
    pair = k == 2
    # two components: one workspace of two planes, p_1 and ∂L/∂d of each step (p_0 = 1 − p_1
    # where it enters linearly)
    ws = torch.empty(2, c * j, size, dtype=dt, device=z.device) if pair else None

    # the output y = γ Σ_k p_k (z − μ_k) r_k + β of the fitted mixture
    mean, var, log_prior = traj[-1, 0], traj[-1, 1], traj[-1, 2]
    coef = _coef(mean, var, log_prior, eps)
    r = torch.rsqrt(var + eps)
    if ws is not None:  # Σ g p_0 [1, z] = Σ g [1, z] − Σ g p_1 [1, z]
        p1 = _second(coef, zr, j, ws[0])
        m1 = _reduce(p1.unsqueeze(1), gb.permute(1, 2, 0), c)  # (C, 1, 2)
        # float32 sums per run, added in float64 (as _reduce's)
        total = gb.sum(2).to(torch.float64).view(2, c, j).sum(2).t().to(dt)  # (C, 2)
        moments = torch.cat(((total[:, None] - m1), m1), 1)  # (C, K, 2): Σ g p_k [1, z]
    else:
        p = _posterior(coef, basis, j)
        moments = _reduce(p, gb.permute(1, 2, 0), c)
    o = torch.stack((-mean * r, r), -1)  # (C, K, 2): x̂_k = o_k·[1, z]
    g_weight = g_bias = None
    if weight is not None and need_weight:
        g_weight = (o * moments).sum((1, 2)).reshape(weight.shape).to(weight.dtype)
    if bias is not None and need_bias:
        g_bias = moments[:, :, 0].sum(1).reshape(bias.shape).to(bias.dtype)  # Σ_k p_k = 1
    rw = r if w is None else r * w[:, None]
    if w is not None:
        o, moments = o * w[:, None, None], moments * w[:, None, None]
    if ws is not None:
        rw = _rep(rw, j)  # g·(p_0 r_0 + p_1 r_1) = g·(r_0 + p_1 (r_1 − r_0))
        g_z = torch.mul(ws[0], rw[:, 1:] - rw[:, :1]).add_(rw[:, :1]).mul_(gb[0])
        od = _rep(o[:, 1] - o[:, 0], j)  # ∂L/∂p_1 − ∂L/∂p_0 = g·(od_0 + od_1 z)
        torch.mul(gb[0], od[:, :1], out=ws[1]).addcmul_(gb[1], od[:, 1:])
        g_coef, qd = _pair_through(ws[0], ws[1], coef, bt)
        u = gb  # ∂L/∂z = g_z + u_0 + u_1 z: the planes g, g·z are spent
        qd = _rep(qd, j)
        torch.mul(ws[1], qd[:, :1], out=u[0])
        torch.mul(ws[1], qd[:, 1:], out=u[1])
        # the p_0 rows' coefficients of the EM steps below: their constant part (p_0 = 1 − p_1)
        # is a per-channel constant of u_0 (removed by the centring's projection at the end)
        # and of u_1 (added with the start's term); the rest rides on p_1
        u1_const = torch.zeros(c, dtype=dt, device=z.device)
    else:
        g_z = torch.bmm(_rep(rw.unsqueeze(1), j), p).squeeze(1).mul_(gb[0])
        g_coef, q, rows = _through_posterior(o, gb.transpose(0, 1), p, coef, bt, j)
        u = gb.transpose(0, 1).zero_().baddbmm_(_rep(q, j), rows).transpose(0, 1)
    g_mean, g_var, g_log_prior = _coef_backward(g_coef, mean, var, eps)
    g_mean = g_mean - r * moments[..., 0]
    g_var = g_var - 0.5 * r * r * r * (moments[..., 1] - mean * moments[..., 0])

    # the EM steps, last first: step t maps the statistics of t to those of t + 1
    tiny = torch.finfo(dt).tiny
    for t in range(iterations - 1, -1, -1):
        g_n, g_s1, g_s2 = _m_step_backward(traj[t + 1], g_mean, g_var, g_log_prior, tiny)
        mean, var, log_prior = traj[t, 0], traj[t, 1], traj[t, 2]
        coef = _coef(mean, var, log_prior, eps)
        g_r = torch.stack((g_n, g_s1, g_s2), -1)  # ∂L/∂p_k = g_r,k·[1, z, z²]
        g_direct = torch.stack((g_s1, 2 * g_s2), 1)  # the M-step's own ∂/∂z: p_k·[1, z]
        if ws is not None:
            p1 = _second(coef, zr, j, ws[0])
            _quad(_rep(g_r[:, 1] - g_r[:, 0], j), zr, ws[1])
            g_coef, qd = _pair_through(p1, ws[1], coef, bt)
            # Σ_k p_k·g_direct_k + ∂L/∂d·qd with p_0 = 1 − p_1: the p_0 coefficients' constant
            # part apart (u1_const; u_0's cancels), p_1 carrying the difference
            u1_const += g_direct[:, 1, 0]
            coefs = _rep(torch.stack((g_direct[..., 1] - g_direct[..., 0], qd), 2), j)
            for row, plane in enumerate((p1, ws[1])):  # coefs (C·J, 2, 2)
                u[0].addcmul_(plane, coefs[:, 0, row:row + 1])
                u[1].addcmul_(plane, coefs[:, 1, row:row + 1])
        else:
            p = _posterior(coef, basis, j)
            g_coef, q, rows = _through_posterior(g_r, basis, p, coef, bt, j)
            ut = u.transpose(0, 1)
            ut.baddbmm_(_rep(q, j), rows).baddbmm_(_rep(g_direct, j), p)
        g_mean, g_var, g_log_prior = _coef_backward(g_coef, mean, var, eps)

    # the start: the batch's through σ²_B (where `same`), the running mixture's through the
    # shift (μ_0 = running mean − mean(x))
    q = normal_quantiles(k, dtype=dt, device=z.device)
    g_var_b = same * ((g_mean * q).sum(1) / (2 * torch.sqrt(var_b + eps))
                      + g_var.sum(1) * (1 - q.square().mean()))
    g_shift = (same - 1) * g_mean.sum(1)  # (C,)
    start = 2 * g_var_b / m + (u1_const if ws is not None else 0)
    g_z.add_(u[0]).addcmul_(u[1].add_(_rep(start[:, None], j)), zr)
    # z = x − mean(x): remove the mean of ∂L/∂z, add the running start's share
    g_z = g_z.view(c, m)
    g_z.sub_((g_z.mean(1) - g_shift / m)[:, None])
    gx = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    gx.view(n, c, s).transpose(0, 1).copy_(g_z.view(c, n, s))
    return gx, g_weight, g_bias


class _Mixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                z: Tensor, basis: Tensor, traj: Tensor, same: Tensor, var_b: Tensor,
                running: Tensor | None, work: Tensor | None, eps: float) -> Tensor:
        ctx.save_for_backward(v, weight, bias, z, traj, same, var_b, running)
        ctx.eps = eps
        return _forward(v, weight, bias, z, basis, traj, work, eps)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, weight, bias, z, traj, same, var_b, running = ctx.saved_tensors
        eps = ctx.eps
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            k, iterations = traj.shape[-1], traj.shape[0] - 1
            return (*_plain_vjp(mixture_plain, (v, weight, bias, running, k, iterations, eps),
                                g)[:3], None, None, None, None, None, None, None, None)
        gx, g_weight, g_bias = _backward(
            g, v, weight, bias, z, traj, same, var_b, eps,
            weight is not None and weight.requires_grad, bias is not None and bias.requires_grad)
        return gx, g_weight, g_bias, None, None, None, None, None, None, None, None
