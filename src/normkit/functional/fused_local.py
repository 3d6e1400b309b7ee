r"""Local (sliding-window) normalization with a hand-derived backward: local context
normalization, local response normalization and divisive normalization (book ch. 4.1).

One formula covers the three. With ``B`` the window mean over the window axes (the adjoint of a
window sum is the window sum flipped), ``M`` the mean over the fully reduced axes (LCN's channel
group; none otherwise), :math:`\mu = B M x`, :math:`v = B M x^2 - \mu^2` (centred) or
:math:`v = B M x^2` (uncentred) and :math:`s = k + \alpha v`:

.. math::
    y = \gamma\,(x - \mu)\,s^{-\beta} + \beta_0,\qquad
    \frac{\partial L}{\partial x} = t + M^\top B^\top b + 2\,x\,M^\top B^\top a,

where :math:`g = \gamma\,\partial L/\partial y`, :math:`t = g\,s^{-\beta}`,
:math:`a = -\beta\alpha\,s^{-\beta-1}\sum_M g\,(x - \mu)` (the gradient of ``v``) and, centred,
:math:`b = -\sum_M t - 2\mu a` (of ``μ``). LCN is ``k = ε, α = 1, β = ½``; Krizhevsky's LRN the
uncentred form over a channel window, padded with zeros. Centred statistics are taken around a
per-sample shift ``c`` (:func:`~normkit.functional.statistics.local_moments`); the backward uses
``x − c`` and ``μ − c`` too.

The forward takes the statistics ``fit`` computed (under ``torch.no_grad``); the Function saves
the input and ``s`` (and ``μ`` where it is smaller than the input: LCN, or where inductor
compiles it), recomputes ``μ`` and the shift otherwise — at most one tensor the size of the
input beyond it in eager mode — and its backward makes two window sums (three when ``μ`` is
recomputed) with
:func:`~normkit.functional.statistics.box_sum`, which is several times faster than the pooling
kernels on CPU (compiled by inductor, sums of shifted windows of a zero-padded copy that it fuses
with the work around them; exported, one custom op each). Statistics shared by a channel group
(LCN) make every term but ``Σ g``, ``Σ g x`` and ``∂x`` itself statistics-sized. Where ``v`` was
clamped at 0 (a constant window) ``x = μ``, so ``a = 0`` there as the clamp's own gradient gives.
A second derivative (``create_graph=True``) differentiates the plain composition
(:func:`local_divisive_plain`).

Compiled by inductor, for ``β = ½, ¾, 1`` the Function saves the root ``q`` of :func:`_root`
instead of ``s`` (kept by :func:`~normkit.functional.fused_inductor.apply_saving`) and makes
``s^(−β)`` and ``s^(−β−1)`` from it with products: a vectorized ``sqrt`` or division costs more
than a pass over memory on CPU. LRN's window sums (``E[x²]`` in the forward, ``Bᵀa`` in the
backward, ``a`` a few products of saved tensors) are then computed inline where they are read
(:func:`~normkit.functional.shifted.inlinable`): one pass over the activations forward, one
backward, besides the reads of the saved tensors; the backward's constants ``−2βα/n`` multiply
the sum once, not each of its terms. Kernel by kernel this matches compiled BN (fwd 1.4–1.5 ms
against 1.6–1.8, bwd 2.0–2.4 against 2.0–2.2 at ``(128, 64, 16, 16)``, 1 thread): the rest of
the gap is outside the kernels timed alone (dynamo's guard check, for one: about 0.18 ms a
call against BN's 0.06).

Compiled, centred windows without averaged axes that one padded copy sums at once (divisive
normalization's 3×3) take the moments in parts
(:mod:`~normkit.functional.local_windows`): the Function makes them itself from ``v`` — the
same formula as ``fit``'s, whose copies inductor then drops — so that AOTAutograd's partitioner
is told (:data:`_PARTS_OPS`) to keep the shift ``c`` and ``μ − c`` with the root, where it
would keep ``x − c`` and the padded copy. divisive_norm fwd+bwd against compiled BN at
``(128, 64, 16, 16)``, 1 thread (paired runs): 2.7–2.8x → 2.0–2.1x; its kernels 11 → 6.9 ms
(forward 2.8, backward 3.8–4.1, against BN's 1.25 and 1.35).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import statistics as S
from .fused import _compute_dtype, _plain_vjp, _reduced, _sum_to
from .fused_inductor import apply_saving
from .local_windows import window_parts, window_parts_apply, window_parts_backward
from .partition import as_dtype
from .shifted import inlinable, shifted_sum
from .standardize import affine_transform, divisive_coefficients

__all__ = ["LocalMoments", "Window", "is_own", "local_divisive", "local_divisive_plain"]


class Window(NamedTuple):
    """A local partition's window on the view ``(N, A, B, *spatial)``: ``full`` axes averaged
    whole, centred ``windows`` along ``dims``, ``include_pad`` (zeros outside count)."""

    spatial: tuple[int, ...]
    full: tuple[int, ...]
    dims: tuple[int, ...]
    windows: tuple[int, ...]
    include_pad: bool


class LocalMoments(dict):  # type: ignore[type-arg]
    """Statistics a local operation's ``fit`` computed from the view itself (without a graph),
    with their :class:`Window`: :func:`is_own` tells whether they are still those, so the
    Function may differentiate through them itself."""

    def __init__(self, window: Window, **stats: Tensor) -> None:
        super().__init__(**stats)
        self.window = window
        self.own = dict(stats)


def is_own(stats: Any) -> bool:
    """Whether ``stats`` are a :class:`LocalMoments` whose tensors are unchanged."""
    return (isinstance(stats, LocalMoments) and stats.keys() == stats.own.keys()
            and all(stats[k] is t for k, t in stats.own.items()))


def _neg_pow(s: Tensor, beta: float) -> Tensor:
    """``s^(−β)``: ``rsqrt`` and products for the usual exponents (``pow`` is several times
    slower on CPU)."""
    if beta == 0.5:
        return torch.rsqrt(s)
    if beta == 0.75:
        r = torch.rsqrt(s)
        return r.mul_(r.sqrt())
    if beta == 1.0:
        return torch.reciprocal(s)
    return torch.pow(s, -beta)


#: ``β: (m, n)`` with ``s^(−β) = q^m`` and ``s^(−β−1) = q^n`` for the root ``q`` of :func:`_root`
_ROOT_POWERS = {0.5: (1, 3), 0.75: (3, 7), 1.0: (1, 2)}


#: the ops that make :func:`_root`'s ``q`` (kept for the backward by
#: :func:`~normkit.functional.fused_inductor.apply_saving`: AOTAutograd's partitioner would save
#: ``s`` and recompute ``q`` in each loop that reads it, a ``sqrt`` and a division per value
#: where ``s`` is shared by a channel group — LCN's per-position ``s``)
_ROOT_OPS = (torch.ops.aten.rsqrt.default, torch.ops.aten.reciprocal.default)


#: with the parts of :mod:`~normkit.functional.local_windows`: ``c`` and ``μ − c`` saved too
#: (the partitioner would save ``x − c`` and the padded copy)
_PARTS_OPS = (*_ROOT_OPS, torch.ops.aten.mean.dim, torch.ops.aten.addcmul.default)


def _root(s: Tensor, beta: float) -> Tensor:
    """``q = s^(−1/2), s^(−1/4), s^(−1)`` for ``β = ½, ¾, 1`` (:data:`_ROOT_POWERS`): the
    compiled backward makes ``s^(−β)`` and ``s^(−β−1)`` from it with products, where ``rsqrt``,
    ``sqrt`` and a division cost more than a pass over memory each on CPU (vectorized
    ``sqrt``/division: local response normalization's backward made three and two)."""
    if beta == 0.5:
        return torch.rsqrt(s)
    if beta == 0.75:
        return torch.rsqrt(torch.sqrt(s))
    return torch.reciprocal(s)


def _int_pow(q: Tensor, m: int) -> Tensor:
    """``q^m`` by products, for the powers of :data:`_ROOT_POWERS` (``m = 1, 2, 3, 7``)."""
    if m == 1:
        return q
    q2 = q * q
    if m == 2:
        return q2
    if m == 3:
        return q2 * q
    return q2 * q2 * q2 * q


def _window_mean(t: Tensor, w: Window, owned: bool = False) -> Tensor:
    """``B t`` of a canonical ``(N, A, B', S)`` tensor (window axes on its spatial view);
    ``owned``: ``t`` may be overwritten."""
    u = t.reshape(*t.shape[:3], *w.spatial)
    inv = S.inverse_count(u.shape, w.dims, w.windows, w.include_pad, u)
    return S.box_sum(u, w.dims, w.windows, owned=owned).mul_(inv).reshape(t.shape)


def _window_mean_adjoint_(t: Tensor, w: Window, inline: bool = False) -> Tensor:
    """``Bᵀ t``: the flipped window sum of ``t`` over each position's count (overwrites ``t``);
    ``inline`` (compiled, ``t`` a few products of saved tensors): summed where it is read
    (:func:`~normkit.functional.shifted.shifted_sum` without a copy) where the windows allow."""
    u = t.reshape(*t.shape[:3], *w.spatial)
    inv = S.inverse_count(u.shape, w.dims, w.windows, w.include_pad, u)
    if inline and inlinable(u, w.dims, w.windows):
        return shifted_sum(u * inv, w.dims, w.windows, flip=True, copy=False).reshape(t.shape)
    return S.box_sum(u.mul_(inv), w.dims, w.windows, flip=True, owned=True).reshape(t.shape)


def _full_sum(t: Tensor, w: Window) -> Tensor:
    return t.sum(w.full, keepdim=True) if w.full else t


def _fits(p: Tensor, y: Tensor) -> bool:
    """Whether ``y op= p`` broadcasts ``p`` into ``y`` in place (no axis of ``p`` larger)."""
    return p.dim() == y.dim() and all(a == 1 or a == b for a, b in zip(p.shape, y.shape,
                                                                       strict=True))


#: the gradients of the Function's arguments after ``γ, β`` (``mean, second, w, k, alpha,
#: beta, parts``): none
_NONES = (None,) * 7


class _LocalDivisive(torch.autograd.Function):
    """On the canonical view ``(N, A, B, S)``; statistics ``(N, A, B or 1, S)``."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                mean: Tensor | None, second: Tensor, w: Window, k: float, alpha: float,
                beta: float, parts: bool = False) -> Tensor:
        dt = _compute_dtype(v)
        ctx.w, ctx.k, ctx.alpha, ctx.beta = w, k, alpha, beta
        ctx.center, ctx.in_dtype, ctx.root, ctx.parts = mean is not None, v.dtype, True, parts
        if parts:  # compiled centred windows: the moments in parts (local_windows), from v
            x = as_dtype(v, dt)
            p = window_parts(x, (*v.shape[:3], *w.spatial), w.dims, w.windows, w.include_pad)
            assert p is not None  # checked by local_divisive
            q = _root(p.var.mul(alpha).add(k), beta)
            y = (p.centre - p.centred) * _int_pow(q, _ROOT_POWERS[beta][0])
            y = y if weight is None else y * as_dtype(weight, dt)
            y = y if bias is None else y + as_dtype(bias, dt)
            ctx.save_for_backward(v, weight, bias, q, p.centred, p.shift)
            return y
        x = as_dtype(v, dt)
        s = as_dtype(second, dt).mul(alpha).add_(k)
        # compiled sliding windows: the root q of s^(−β) saved instead of s (the backward's
        # powers of s are products of it)
        root = beta in _ROOT_POWERS and S.compiling_kernels()
        if root:
            s = _root(s, beta)
            r = _int_pow(s, _ROOT_POWERS[beta][0])
        else:
            r = _neg_pow(s, beta)
        if mean is not None:
            mu = as_dtype(mean, dt)
            y = (x - mu).mul_(r)
        else:
            mu, y = None, x * r
        if weight is not None:
            wt = as_dtype(weight, dt)
            y = y.mul_(wt) if _fits(wt, y) else y * wt
        if bias is not None:
            bt = as_dtype(bias, dt)
            y = y.add_(bt) if _fits(bt, y) else y + bt
        # LCN's μ: a fraction of the input; compiled, every μ (inductor's recomputation of the
        # window mean in the backward costs more than reading it)
        keep_mu = mu is not None and (mu.numel() < x.numel() or S.compiling_kernels())
        ctx.save_for_backward(v, weight, bias, s, mu if keep_mu else None, None)
        ctx.root = root
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, weight, bias, s, mu, shift = ctx.saved_tensors
        w, beta, alpha = ctx.w, ctx.beta, ctx.alpha
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            args = (v, weight, bias, w, ctx.k, alpha, beta, ctx.center)
            return (*_plain_vjp(local_divisive_plain, args, gy)[:3], *_NONES)
        dt = s.dtype
        if ctx.parts:  # mu: μ − c, shift: c
            shape = (*v.shape[:3], *w.spatial)
            x, gy = as_dtype(v, dt), as_dtype(gy, dt)
            g = gy if weight is None else gy * as_dtype(weight, dt)
            m, n = _ROOT_POWERS[beta]
            r = _int_pow(s, m)
            dx = g_w = g_b = None
            if ctx.needs_input_grad[0]:
                dx = window_parts_backward(x, g, r, _int_pow(s, n), mu, shift, shape, w.dims,
                                           w.windows, w.include_pad,
                                           -beta * alpha).to(ctx.in_dtype)
            if weight is not None and ctx.needs_input_grad[1]:
                g_w = _param_grad(((x - shift) - mu) * r * gy, weight)
            if bias is not None and ctx.needs_input_grad[2]:
                g_b = _param_grad(gy, bias)
            return dx, g_w, g_b, *_NONES
        x = as_dtype(v, dt)
        gy = as_dtype(gy, dt)
        g = gy if weight is None else gy * as_dtype(weight, dt)
        if ctx.root:  # s: the root q (r = q^m, r/s = q^n)
            m, n = _ROOT_POWERS[beta]
            r, rs = _int_pow(s, m), _int_pow(s, n)
            if w.full:
                return _backward_whole_groups(ctx, x, gy, g, r, rs, mu, weight, bias)
            return _backward_compiled(ctx, x, gy, g, r, rs, mu, weight, bias)
        r = _neg_pow(s, beta)
        if w.full:
            return _backward_whole_groups(ctx, x, gy, g, r, r / s, mu, weight, bias)
        if S.compiling_kernels():
            return _backward_compiled(ctx, x, gy, g, r, r / s, mu, weight, bias)
        if ctx.center:  # around a shift, like the forward statistics (any constant is exact)
            shift = x.mean(dim=(2, 3), keepdim=True)
            xs = x - shift
            if mu is None:
                m1 = _window_mean(xs.mean(w.full, keepdim=True) if w.full else xs, w,
                                  owned=bool(w.full))
            else:
                m1 = mu - shift
            xhat = (xs - m1).mul_(r)  # (x − μ)·r
        else:
            xs, m1, xhat = x, None, x * r
        t = g * r
        a = _full_sum(g * xhat, w).div_(s).mul_(-beta * alpha)  # ∂L/∂v
        n_full = _reduced(x, w.full)
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.center:
                b = (m1 * a).mul_(-2.0).sub_(_full_sum(t, w))  # ∂L/∂μ (shifted)
                del m1
                t = t.add_(_window_mean_adjoint_(b, w), alpha=1.0 / n_full)
            dx = t.addcmul_(xs, _window_mean_adjoint_(a, w), value=2.0 / n_full).to(v.dtype)
        g_w = g_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            g_w = _sum_to(xhat.mul_(gy), weight.shape).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            g_b = _sum_to(gy, bias.shape).to(bias.dtype)
        return dx, g_w, g_b, *_NONES


def _param_grad(t: Tensor, param: Tensor) -> Tensor:
    """``t`` summed to the shape of ``param`` (``γ`` or ``β``), compiled: ``t`` times a 1 per
    channel made from ``param`` (finite), so the row sum runs in the loops (samples, channels |
    positions) of the backward's other row sums, not in a pass of its own (a row reduction of
    a different shape)."""
    if S.compiling_kernels():
        t = t * (as_dtype(param, t.dtype) * 0.0 + 1.0)
    return _sum_to(t, param.shape).to(param.dtype)


def _inline_uncentred(ctx: Any, x: Tensor, shift: Tensor | None) -> bool:
    """Whether the compiled backward sums ``Bᵀa`` inline (:func:`_window_mean_adjoint_`): the
    saved root, uncentred windows that count the padding (a constant ``1/n``), off the innermost
    axis (:func:`~normkit.functional.shifted.inlinable`) — local response normalization."""
    w = ctx.w
    return (ctx.root and shift is None and w.include_pad
            and inlinable(x.reshape(*x.shape[:3], *w.spatial), w.dims, w.windows))


def _backward_compiled(ctx: Any, x: Tensor, gy: Tensor, g: Tensor, r: Tensor, rs: Tensor,
                       mu: Tensor | None, weight: Tensor | None, bias: Tensor | None
                       ) -> tuple[Tensor | None, ...]:
    """The backward of windows without whole channel groups where inductor compiles it: the
    eager formula (``∂x = t + Bᵀb + 2(x − c)Bᵀa``) on the saved ``μ``, one out-of-place
    expression per term, which inductor fuses into the loops that read it instead of the eager
    in-place updates' extra passes (with the saved ``μ`` and the moments from one padded copy:
    divisive_norm fwd+bwd against compiled BN about 4.3x → 3.1x, paired runs)."""
    w, beta, alpha = ctx.w, ctx.beta, ctx.alpha
    if ctx.center:  # around the per-sample shift c, like the eager backward
        shift = x.mean(dim=(2, 3), keepdim=True)
        xs = x - shift
        # x − μ as (x − c) − (μ − c): not the forward's product, which AOTAutograd would merge
        # and save (one input-sized tensor fewer saved)
        d = xs - (mu - shift)
    else:
        shift, xs, d = None, x, x
    t = g * r
    dx = None
    if ctx.needs_input_grad[0] and _inline_uncentred(ctx, xs, shift):
        # LRN: Bᵀa = (−βα/n) Σ_flip g x r/s, the constants applied once to the sum, not to
        # each of its inlined terms
        u = (g * xs * rs).reshape(*xs.shape[:3], *w.spatial)
        scale = -2.0 * beta * alpha * S.inverse_count(u.shape, w.dims, w.windows, True, u)
        sa = shifted_sum(u, w.dims, w.windows, flip=True, copy=False).reshape(xs.shape)
        dx = (t + scale * xs * sa).to(ctx.in_dtype)
    elif ctx.needs_input_grad[0]:
        a = g * d * rs * (-beta * alpha)  # ∂L/∂v (rs = r/s)
        b = None if shift is None else -2.0 * (mu - shift) * a - t  # ∂L/∂μ (shifted)
        # Bᵀb + t first: a partial sum that reads at most 12 values, which inductor inlines
        # (one reading more is written to memory: a pass more for ∂x)
        dx = t if b is None else _window_mean_adjoint_(b, w) + t
        dx = dx + 2.0 * xs * _window_mean_adjoint_(a, w, inline=ctx.root and shift is None)
        dx = dx.to(ctx.in_dtype)
    g_w = g_b = None
    if weight is not None and ctx.needs_input_grad[1]:
        g_w = _param_grad(d * r * gy, weight)  # its row sum in the loops of ∂x's
    if bias is not None and ctx.needs_input_grad[2]:
        g_b = _param_grad(gy, bias)
    return dx, g_w, g_b, *_NONES


def _backward_whole_groups(ctx: Any, x: Tensor, gy: Tensor, g: Tensor, r: Tensor, rs: Tensor,
                           mu: Tensor | None, weight: Tensor | None, bias: Tensor | None
                           ) -> tuple[Tensor | None, ...]:
    """The backward when the statistics are shared by a whole channel group (LCN): everything
    but three passes over the input (``Σ g``, ``Σ g x`` per position, ``∂x``) is
    statistics-sized; the shift ``c`` of ``x − c`` is folded into the per-position terms."""
    w, beta, alpha = ctx.w, ctx.beta, ctx.alpha
    full, n_full = w.full, _reduced(x, w.full)
    sg = g.sum(full, keepdim=True)
    sgx = (g * x).sum(full, keepdim=True)  # Σ g x per position
    if ctx.center:
        if mu is None:  # one channel per group: μ was not saved (the size of the input)
            mu = _window_mean(x.mean(full, keepdim=True), w, owned=True)
        shift = mu.mean(dim=(2, 3), keepdim=True)  # any constant is exact: μ's, statistics-sized
        m1 = mu - shift  # μ − c
        sgd = sgx.sub_(shift * sg).sub_(m1 * sg)  # Σ g (x − μ)
    else:
        shift = m1 = None
        sgd = sgx
    a = sgd.mul_(rs).mul_(-beta * alpha)  # ∂L/∂v (rs = r/s)
    dx = None
    if ctx.needs_input_grad[0]:
        ua = _window_mean_adjoint_(a.clone() if ctx.center else a, w).mul_(2.0 / n_full)
        const = None
        if ctx.center:
            b = (r * sg).neg_().addcmul_(m1, a, value=-2.0)  # ∂L/∂μ (shifted)
            const = _window_mean_adjoint_(b, w).div_(n_full).addcmul_(shift, ua, value=-1.0)
        dx = g * r
        if const is not None:
            dx = dx.add_(const)
        dx = dx.addcmul_(x, ua).to(ctx.in_dtype)
    g_w = g_b = None
    if weight is not None and ctx.needs_input_grad[1]:
        if ctx.center and S.compiling_kernels():
            # Σ ∂y·(x − c)·r − Σ ∂y·(μ − c)·r: no product of the forward's (AOTAutograd would
            # merge it and save the input-sized (x − μ)·r: lcn fwd+bwd 1.31x → 1.17x
            # compiled BN)
            gr = r * gy
            g_w = _sum_to((x - shift) * gr, weight.shape) - _sum_to(m1 * gr, weight.shape)
        else:
            xhat = (x - mu).mul_(r) if ctx.center else x * r
            g_w = _sum_to(xhat.mul_(gy), weight.shape)
        g_w = as_dtype(g_w, weight.dtype)
    if bias is not None and ctx.needs_input_grad[2]:
        g_b = _param_grad(gy, bias)
    return dx, g_w, g_b, *_NONES


def local_divisive(v: Tensor, stats: LocalMoments, *, weight: Tensor | None,
                   bias: Tensor | None, k: float, alpha: float, beta: float) -> Tensor:
    r"""``y = γ (x − μ)/(k + α v)^β + β₀`` over local windows, with the hand-derived backward
    (see the module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)``.
        stats: its :class:`LocalMoments` — ``mean`` and ``var`` (centred) or ``ms`` (``E[x²]``,
            uncentred), ``(N, A, B or 1, S)`` — and their :class:`Window`.
        weight, bias: ``γ, β₀`` broadcastable against ``v`` (or ``None``).
        k, alpha, beta: the constants (LCN: ``ε, 1, ½``).

    Shape:
        ``(N, A, B, S)`` → same, in at least float32.

    Example:
        >>> import torch
        >>> from normkit.functional import statistics as S
        >>> x = torch.randn(2, 1, 4, 9, dtype=torch.float64)
        >>> w = Window((3, 3), (), (3, 4), (3, 3), False)
        >>> mean, var = S.local_moments(x.reshape(2, 1, 4, 3, 3), (), w.dims, w.windows, False)
        >>> stats = LocalMoments(w, mean=mean.reshape(2, 1, 4, 9), var=var.reshape(2, 1, 4, 9))
        >>> y = local_divisive(x, stats, weight=None, bias=None, k=1.0, alpha=1.0, beta=0.5)
        >>> torch.allclose(y, (x - stats["mean"]) / (1 + stats["var"]).sqrt())
        True
    """
    mean = stats.get("mean")
    second = stats["var"] if mean is not None else stats["ms"]
    if beta in _ROOT_POWERS:  # compiled for inductor: the root q saved, never recomputed
        w = stats.window
        parts = (mean is not None and S.compiling_kernels()
                 and window_parts_apply((*v.shape[:3], *w.spatial), w.full, w.dims, w.windows))
        return apply_saving(_LocalDivisive.apply, _PARTS_OPS if parts else _ROOT_OPS, v,
                            weight, bias, mean, second, stats.window, k, alpha, beta, parts)
    return _LocalDivisive.apply(v, weight, bias, mean, second, stats.window,  # type: ignore[no-any-return]
                                k, alpha, beta)


def local_divisive_plain(v: Tensor, weight: Tensor | None, bias: Tensor | None, w: Window,
                         k: float, alpha: float, beta: float, center: bool) -> Tensor:
    """The plain autograd composition :func:`local_divisive` computes (statistics included):
    :func:`~normkit.functional.statistics.local_moments`, then ``x·scale + shift`` and ``γ, β``."""
    x = v.reshape(*v.shape[:3], *w.spatial)
    mean, second = S.local_moments(x, w.full, w.dims, w.windows, w.include_pad, center=center)
    flat = (*mean.shape[:3], -1)
    scale, shift = divisive_coefficients(mean.reshape(flat) if center else None,
                                         second.reshape(flat), k, alpha, beta)
    return affine_transform(as_dtype(v, scale.dtype), scale, shift, weight, bias)

