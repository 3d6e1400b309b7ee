r"""Standardization with a per-position affine (SPADE's modulation, Park et al. 2019) as one
autograd Function with a hand-derived backward.

SPADE's recovery predicts ``A = 1 + γ(m)`` and ``B = β(m)`` for every position from a
segmentation map; the layer is BN's standardization followed by ``y = x̂ ⊙ A + B``. Autograd
through the composition saves ``x − μ``, ``x̂`` and ``A`` and makes about eight activation-sized
tensors per step. Here the forward writes ``y`` alone (``x̂`` recomputed in the backward) and saves
the input (already alive) and ``A`` (the recovery's output, which the input gradient needs); the
backward makes only its two results. With ``r = (σ² + ε)^{-1/2}`` over the ``M`` values of a
statistic (the reduced axes ``D``, positions included) and ``g' = A ⊙ g``:

.. math::
    \frac{\partial L}{\partial x} = r\Big(g' - \frac{1}{M}\sum_D g'
        - \hat{x}\,\frac{1}{M}\sum_D g'\hat{x}\Big),\qquad
    \frac{\partial L}{\partial A} = g \odot \hat{x},\qquad
    \frac{\partial L}{\partial B} = g

(``Σ_D g' x̂ = Σ_D A ⊙ ∂L/∂A``: one dot product). Second derivatives (``create_graph=True``)
differentiate the plain composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .fused import _plain_vjp, _reduced, _row_dot
from .partition import as_dtype

__all__ = ["modulated", "modulated_standardize", "modulated_standardize_plain"]


def modulated(v: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the recovery ``γ, β`` is per position: ``weight`` of ``v``'s shape (what
    :func:`modulated_standardize` takes), ``bias`` of that shape or ``None``."""
    return (weight is not None and weight.shape == v.shape
            and (bias is None or bias.shape == v.shape))


class _ModulatedStandardize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                eps: float, dims: tuple[int, ...], mean: Tensor, var: Tensor) -> Tensor:
        dt = mean.dtype
        x = as_dtype(v, dt)
        r = torch.rsqrt(var + eps)
        # x̂ = x r − μ r, then x̂ A + B: the roundings of the generic path (one FMA each)
        y = torch.addcmul(-mean * r, x, r)
        a = as_dtype(weight, dt)
        y = y.mul_(a) if bias is None else torch.addcmul(as_dtype(bias, dt), y, a, out=y)
        ctx.save_for_backward(v, weight, mean, r)  # not B: its gradient is g
        ctx.dims, ctx.eps = dims, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, weight, mean, r = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            g_bias = g.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
            g_x, g_w = _plain_vjp(modulated_standardize_plain, (v, weight, None, ctx.eps, dims),
                                  g)[:2]
            return g_x, g_w, g_bias, None, None, None, None
        dt = r.dtype
        x = as_dtype(v, dt)
        g = as_dtype(g, dt)
        a = as_dtype(weight, dt)
        need = ctx.needs_input_grad
        g_bias = g.to(ctx.bias_dtype) if need[2] else None
        g_a = torch.sub(x, mean).mul_(r).mul_(g)  # g x̂
        dx = None
        if need[0]:
            rest = tuple(d for d in dims if d != x.dim() - 1)
            gp = torch.mul(g, a)  # g' = A g
            s1 = gp.sum(-1, keepdim=True).sum(rest, keepdim=True)  # Σ_D g'
            s2 = _row_dot(g_a, a).sum(rest, keepdim=True)  # Σ_D g' x̂
            big = _reduced(x, dims)
            c1 = -r * r * s2 / big  # dx = r g' + c1 x + c0
            c0 = r * (r * s2 * mean - s1) / big
            dx = gp.mul_(r).addcmul_(x, c1).add_(c0).to(v.dtype)
        g_weight = as_dtype(g_a, weight.dtype) if need[1] else None
        return dx, g_weight, g_bias, None, None, None, None


def modulated_standardize(v: Tensor, dims: Sequence[int], *, weight: Tensor,
                          bias: Tensor | None, eps: float,
                          moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    r"""``y = A ⊙ (x − μ)/√(σ² + ε) + B`` with ``μ, σ²`` (biased) over ``dims`` and ``A, B`` one
    value per element (SPADE's ``1 + γ(m)``, ``β(m)``), with the hand-derived backward (see the
    module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)``.
        dims: the reduced axes of the statistics; they include the positions ``3``.
        weight, bias: ``A`` and ``B`` (or ``None``), shaped like ``v``.
        eps: the stability constant.
        moments: ``(μ, σ²)`` of ``v`` over ``dims`` if already computed (at least float32;
            their derivative is still taken), or ``None``.

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> a, b = torch.rand_like(x), torch.randn_like(x)
        >>> ref = (x - x.mean((0, 3), keepdim=True)) / (x.var((0, 3), correction=0,
        ...        keepdim=True) + 1e-5).sqrt() * a + b
        >>> torch.allclose(modulated_standardize(x, (0, 3), weight=a, bias=b, eps=1e-5), ref)
        True
    """
    dims = tuple(dims)
    dt = torch.promote_types(v.dtype, torch.float32)
    if moments is None:
        with torch.no_grad():
            mean = as_dtype(v, dt).mean(dims, keepdim=True)
            var = (as_dtype(v, dt) - mean).square().mean(dims, keepdim=True)
    else:
        mean, var = moments[0].detach().to(dt), moments[1].detach().to(dt)
    return _ModulatedStandardize.apply(v, weight, bias, eps, dims,  # type: ignore[no-any-return]
                                       mean, var)


def modulated_standardize_plain(v: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
                                dims: Sequence[int]) -> Tensor:
    """:func:`modulated_standardize` as the plain autograd composition of its formula."""
    x = v.to(torch.promote_types(v.dtype, torch.float32))
    dims = tuple(dims)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * weight
    return y if bias is None else y + bias
