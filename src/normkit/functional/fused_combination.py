r"""Faster training paths for the combination family: batch-channel normalization through
torch's BN and GN kernels; the per-row (instance) moments and the per-row affine ``x·A + B`` that
switchable and batch-instance normalization reduce to; standardization with a per-sample affine
(conditional recoveries) — each as one autograd Function with a one-pass backward.

A composition of separate torch ops pays one memory pass per op, forward and backward, and
autograd saves most intermediates. torch's normalization kernels compute the statistics, the
normalized output and the affine in one forward and the whole input gradient in one backward
(second derivatives: torch's own). The Functions here save the input (already alive) and
statistics; the small per-row coefficients between them (mixing, pooling, gating) stay plain
autograd; a second derivative (``create_graph=True``) differentiates the plain composition
(exact, at autograd's cost). Shapes are the canonical view ``(N, A, B, S)``; per-row tensors
``(N, A, B, 1)``; statistics in at least float32.

Batch-channel normalization (Qiao et al. 2019), ``x̂_B = (x − μ_B)/√(σ_B² + ε)`` per channel:

.. math::
    h = \gamma_b \hat{x}_B + \beta_b,\qquad
    y = \gamma\,\frac{h - \mu_{ng}(h)}{\sqrt{\sigma^2_{ng}(h) + \epsilon}} + \beta

Standardization with a per-sample affine (the conditional recoveries: IEBN's gate, attentive
normalization's mixture, ILM's meta affine) has no torch kernel; :func:`standardize_affine` is
one autograd Function with a hand-derived backward. With ``x̂ = (x − μ) r``, ``r = (σ² + ε)^{-1/2}``
over the ``M`` values of a statistic (the reduced axes ``D``, positions included), ``y = A x̂ + B``
(``A, B`` constant along the positions) and ``g' = A g``:

.. math::
    \frac{\partial L}{\partial x} = r\Big(g' - \frac{1}{M}\sum_D g'
        - \hat{x}\,\frac{1}{M}\sum_D g'\hat{x}\Big),\qquad
    \frac{\partial L}{\partial A} = \sum r\,(s_2 - \mu s_1),\quad
    \frac{\partial L}{\partial B} = \sum s_1

where ``s_1 = Σ_S g`` and ``s_2 = Σ_S g x`` per row of positions are the only full passes (every
other sum runs over those rows), so the backward reads ``g`` twice and ``x`` once and writes ``dx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .fused import _compute_dtype, _dot, _param_grad, _plain_vjp, _reduced
from .merging import pool_moments as _pool_moments
from .partition import as_dtype
from .statistics import moments as _moments

__all__ = ["OwnMoments", "OwnStats", "batch_channel_rows", "batch_standardize",
           "group_standardize", "row_affine", "row_moments", "standardize_affine",
           "standardize_affine_plain"]


class OwnStats(dict):  # type: ignore[type-arg]
    """Statistics an operation's ``fit`` computed from the view itself: :func:`is_own` tells
    whether they are still those (not replaced by a caller), so a Function may differentiate
    through them itself."""

    def __init__(self, **stats: Tensor) -> None:
        super().__init__(**stats)
        self.own = dict(stats)


class OwnMoments(OwnStats):
    """The moments ``{"mean": μ, "var": σ²}`` as :class:`OwnStats`."""

    def __init__(self, mean: Tensor, var: Tensor) -> None:
        super().__init__(mean=mean, var=var)


def is_own(stats: Any) -> bool:
    """Whether ``stats`` are an :class:`OwnStats` whose tensors are unchanged."""
    if not isinstance(stats, OwnStats):
        return False
    for k, t in stats.own.items():  # a loop, not a generator: traced by dynamo
        if stats.get(k) is not t:
            return False
    return True


def _flat(t: Tensor | None, c: int) -> Tensor | None:
    """A per-channel parameter view as ``(C,)`` (``None`` stays ``None``)."""
    return None if t is None else t.reshape(c)


def per_channel(t: Tensor | None, c: int) -> bool:
    """Whether ``t`` is one value per channel (``None`` counts): what torch's kernels take."""
    return t is None or t.numel() == c


def batch_standardize(v: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    r"""``h = γ_b (x − μ_B)/√(σ²_B + ε) + β_b`` per channel over the batch and positions, by
    torch's batch-norm kernel (its backward differentiates ``μ_B, σ²_B``).

    Args:
        v: the canonical view ``(N, C, 1, S)``.
        weight, bias: ``γ_b, β_b``, one per channel (any shape of ``C`` values), or ``None``.
        eps: the stability constant.

    Returns:
        ``(h, μ_B, σ²_B)``: ``h`` shaped like ``v``; the biased moments ``(1, C, 1, 1)``, for the
        running estimates (constants: no gradient flows through them).

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> h, mean, var = batch_standardize(x, None, None, 1e-5)
        >>> torch.allclose(var, x.var((0, 3), correction=0, keepdim=True))
        True
        >>> torch.allclose(h, (x - mean) / (var + 1e-5).sqrt())
        True
    """
    n, c = v.shape[0], v.shape[1]
    x = v.reshape(n, c, -1)
    h, mean, invstd = torch.ops.aten.native_batch_norm(
        x, _flat(weight, c), _flat(bias, c), None, None, True, 0.0, eps)
    shape = (1, c, 1, 1)
    # the kernel's 1/√(σ² + ε), inverted: σ² to rounding (a relative error of a few ulps of σ²+ε)
    var = (as_dtype(invstd, v.dtype).reshape(shape).pow(-2) - eps).clamp_min(0.0)
    return h.reshape(v.shape), as_dtype(mean, v.dtype).reshape(shape), var


def group_standardize(h: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> Tensor:
    r"""``y = γ (h − μ_ng)/√(σ²_ng + ε) + β`` per sample over each of ``num_groups`` groups of
    consecutive channels and the positions, by torch's group-norm kernel.

    Args:
        h: the canonical view ``(N, C, 1, S)``.
        num_groups: ``g``, dividing ``C``.
        weight, bias: ``γ, β``: one per channel (given to the kernel), per sample and channel
            (``(N, C, 1, 1)``: applied after it), or ``None``.
        eps: the stability constant.

    Example:
        >>> h = torch.randn(2, 4, 1, 5, dtype=torch.float64)
        >>> g = h.reshape(2, 2, 10)
        >>> ref = (g - g.mean(2, keepdim=True)) / (g.var(2, correction=0, keepdim=True) + 1e-5).sqrt()
        >>> torch.allclose(group_standardize(h, 2, None, None, 1e-5), ref.reshape(h.shape))
        True
    """
    n, c = h.shape[0], h.shape[1]
    kernel = per_channel(weight, c) and per_channel(bias, c)
    y = F.group_norm(h.reshape(n, c, -1), num_groups, _flat(weight, c) if kernel else None,
                     _flat(bias, c) if kernel else None, eps).reshape(h.shape)
    if kernel:
        return y
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def batch_channel_rows(row_mean: Tensor, row_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                       num_groups: int, bn_weight: Tensor | None, bn_bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
    r"""Batch-channel normalization as one affine map per row, ``x̂ = x·a + b``, from the rows'
    moments: with ``h = s x + t`` (BN and its affine, ``s = γ_b/√(σ²_B + ε)``, ``t = β_b − μ_B s``
    per channel), each row of ``h`` has the moments ``s μ_{nc} + t`` and ``s² σ²_{nc}``; pooled
    over the channels of a group (:func:`~normkit.functional.merging.pool_moments`, exact) they
    are GN's ``μ_{ng}, σ²_{ng}``, and ``x̂ = (h − μ_{ng}) r_{ng} = x·s r_{ng} + (t − μ_{ng})
    r_{ng}``, ``r_{ng} = (σ²_{ng} + ε)^{-1/2}``. Differentiable (autograd); what the compiled
    training path runs: the moments in one pass over ``x``, the output in one, and the backward
    in two (no intermediate ``h`` written).

    Args:
        row_mean, row_var: ``μ_{nc}, σ²_{nc}`` of ``x`` over the positions, ``(N, C, 1, 1)``.
        batch_mean, batch_var: ``μ_B, σ²_B`` per channel ``(1, C, 1, 1)`` (biased).
        num_groups: ``g``, dividing ``C``.
        bn_weight, bn_bias: ``γ_b, β_b`` broadcastable against ``(1, C, 1, 1)``, or ``None``.
        eps: the stability constant (both steps).

    Returns:
        ``(a, b)``, ``(N, C, 1, 1)`` each.

    Example:
        >>> x = torch.randn(4, 6, 1, 5, dtype=torch.float64)
        >>> mi, vi = x.mean(3, keepdim=True), x.var(3, correction=0, keepdim=True)
        >>> mb, vb = x.mean((0, 3), keepdim=True), x.var((0, 3), correction=0, keepdim=True)
        >>> a, b = batch_channel_rows(mi, vi, mb, vb, 2, None, None, 1e-5)
        >>> h = batch_standardize(x, None, None, 1e-5)[0]
        >>> torch.allclose(x * a + b, group_standardize(h, 2, None, None, 1e-5))
        True
    """
    s = torch.rsqrt(batch_var + eps)
    t = -batch_mean * s
    if bn_weight is not None:
        s, t = s * bn_weight, t * bn_weight
    if bn_bias is not None:
        t = t + bn_bias
    n, c = row_mean.shape[0], row_mean.shape[1]
    per_group = (n, num_groups, c // num_groups)
    mg, vg = _pool_moments((row_mean * s + t).reshape(per_group),
                           (row_var * (s * s)).reshape(per_group), (2,))
    r = torch.rsqrt(vg + eps)
    r = r.expand(per_group).reshape(row_mean.shape)
    mg = mg.expand(per_group).reshape(row_mean.shape)
    return s * r, (t - mg) * r


def per_sample(weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether a recovery ``γ, β`` (views against ``(N, A, B, S)``) is per sample, and constant
    along the positions (what :func:`standardize_affine` takes; not SPADE's maps)."""
    views = [t for t in (weight, bias) if t is not None]
    return (any(t.shape[0] > 1 for t in views)
            and all(t.dim() == 4 and t.shape[3] == 1 for t in views))


class _StandardizeAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                eps: float, dims: tuple[int, ...], mean: Tensor, var: Tensor) -> Tensor:
        x = as_dtype(v, mean.dtype)
        r = torch.rsqrt(var + eps)
        a = r if weight is None else r * as_dtype(weight, mean.dtype)
        shift = -mean * a
        y = torch.addcmul(shift if bias is None else shift + as_dtype(bias, mean.dtype), x, a)
        ctx.save_for_backward(v, mean, r, weight, bias)
        ctx.dims, ctx.eps = dims, eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, mean, r, weight, bias = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return (*_plain_vjp(standardize_affine_plain, (v, weight, bias, ctx.eps, dims), g),
                    None, None)
        dt = r.dtype
        x = as_dtype(v, dt)
        g = as_dtype(g, dt)
        last = (x.dim() - 1,)
        s1 = g.sum(last, keepdim=True)  # Σ_S g per row
        s2 = _dot(g, x, last)  # Σ_S g x per row
        gx_hat = r * (s2 - mean * s1)  # Σ_S g x̂ per row
        w = None if weight is None else as_dtype(weight, dt)
        g_weight = _param_grad(weight, gx_hat)
        g_bias = _param_grad(bias, s1)
        dx = None
        if ctx.needs_input_grad[0]:
            big = _reduced(x, dims)
            m1 = (s1 if w is None else w * s1).sum(dims, keepdim=True) / big  # mean_D g'
            m2 = (gx_hat if w is None else w * gx_hat).sum(dims, keepdim=True) / big  # g'x̂
            c1 = -r * r * m2  # dx = r A g + c1 x + c0
            c0 = r * (r * m2 * mean - m1)
            a = r if w is None else r * w
            dx = torch.addcmul(c0, x, c1).addcmul_(g, a).to(v.dtype)
        return dx, g_weight, g_bias, None, None, None, None


def standardize_affine(v: Tensor, dims: Sequence[int], *, weight: Tensor | None,
                       bias: Tensor | None, eps: float,
                       moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    r"""``y = γ (x − μ)/√(σ² + ε) + β`` with ``μ, σ²`` (biased) over ``dims`` and ``γ, β``
    constant along the positions (per channel or per sample and channel), with the
    hand-derived backward (see the module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)``.
        dims: the reduced axes of the statistics; they include the positions ``3``.
        weight, bias: ``γ, β`` broadcastable against ``v`` with size 1 along ``3``, or ``None``.
        eps: the stability constant.
        moments: ``(μ, σ²)`` of ``v`` over ``dims`` if already computed (at least float32;
            their derivative is still taken), or ``None``.

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> w = torch.rand(4, 3, 1, 1, dtype=torch.float64)
        >>> ref = (x - x.mean((0, 3), keepdim=True)) / (x.var((0, 3), correction=0,
        ...        keepdim=True) + 1e-5).sqrt() * w
        >>> torch.allclose(standardize_affine(x, (0, 3), weight=w, bias=None, eps=1e-5), ref)
        True
    """
    if moments is None:
        with torch.no_grad():
            mean, var = _moments(v, tuple(dims))
    else:
        mean, var = moments[0].detach(), moments[1].detach()
    dt = _compute_dtype(v)
    return _StandardizeAffine.apply(v, weight, bias, eps, tuple(dims),  # type: ignore[no-any-return]
                                    as_dtype(mean, dt), as_dtype(var, dt))


def standardize_affine_plain(v: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                             dims: Sequence[int]) -> Tensor:
    """:func:`standardize_affine` as the plain autograd composition of its formula."""
    mean, var = _moments(v, tuple(dims))
    y = (as_dtype(v, mean.dtype) - mean) * torch.rsqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


# ------------------------------------------------------------- per-row moments and affine
class _RowMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor) -> Tensor:  # type: ignore[override]
        x = as_dtype(v, _compute_dtype(v))
        last = (x.dim() - 1,)
        mean = x.mean(last, keepdim=True)
        var = torch.linalg.vector_norm(x - mean, 2, last, keepdim=True).square_() / x.shape[-1]
        ctx.save_for_backward(v, mean)
        return torch.stack((mean, var))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        v, mean = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return _plain_vjp(row_moments_plain, (v,), g)[0]  # type: ignore[return-value]
        s = v.shape[-1]
        c1 = g[1] * (2.0 / s)  # ∂σ²/∂x = 2(x − μ)/S, ∂μ/∂x = 1/S
        c0 = g[0] / s - c1 * mean
        return torch.addcmul(c0, as_dtype(v, mean.dtype), c1).to(v.dtype)


def row_moments(v: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and biased variance of each row ``(n, a, b)`` over the positions (the last axis),
    ``(N, A, B, 1)`` each, in at least float32, as one Function: the backward is one pass,
    ``∂L/∂x = g_μ/S + 2 g_{σ²}(x − μ)/S``.

    Example:
        >>> x = torch.randn(2, 3, 1, 5, dtype=torch.float64)
        >>> mean, var = row_moments(x)
        >>> torch.allclose(var, x.var(3, correction=0, keepdim=True))
        True
    """
    mv = _RowMoments.apply(v)
    return mv[0], mv[1]


def row_moments_plain(v: Tensor) -> Tensor:
    """:func:`row_moments` as the plain composition (stacked ``(μ, σ²)``)."""
    return torch.stack(_moments(v, (v.dim() - 1,)))


class _RowAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, scale: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, scale, shift)
        return torch.addcmul(shift, as_dtype(v, scale.dtype), scale)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, scale, shift = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return _plain_vjp(row_affine_plain, (v, scale, shift), g)
        x = as_dtype(v, scale.dtype)
        g = as_dtype(g, scale.dtype)
        last = (x.dim() - 1,)
        need = ctx.needs_input_grad
        dx = (g * scale).to(v.dtype) if need[0] else None
        d_scale = _dot(g, x, last).sum_to_size(scale.shape) if need[1] else None
        d_shift = g.sum(last, keepdim=True).sum_to_size(shift.shape) if need[2] else None
        return dx, d_scale, d_shift


def row_affine(v: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    r"""``y = x·scale + shift`` with ``scale, shift`` constant along the positions (per row
    ``(N, A, B, 1)`` or broadcastable to it), in their dtype, as one Function: ``Σ_S g x`` by a
    batched dot product, no broadcast product saved.

    Example:
        >>> x, a, b = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 1), torch.randn(1, 3, 1, 1)
        >>> torch.allclose(row_affine(x, a, b), x * a + b)
        True
    """
    return _RowAffine.apply(v, scale, shift)  # type: ignore[no-any-return]


def row_affine_plain(v: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """:func:`row_affine` as the plain composition."""
    return torch.addcmul(shift, as_dtype(v, scale.dtype), scale)
