r"""RMS scaling over the channels of each position, with per-channel ``γ, β``, as one autograd
Function with a hand-derived backward (RMSNorm over ``C`` per position: timm's ``RmsNorm2d``,
normkit's ``rms_norm(over="channels")``).

On the canonical view ``(N, A, B, S)`` with ``r = 1/√(mean_c x² + ε)`` per ``(n, s)``
(``c`` over the ``A·B = C`` channels) and ``x̂ = x r``, ``y = γ x̂ + β``:

.. math::
    \frac{\partial L}{\partial x} = r\,\Big(\gamma g - x\,\frac{r^2}{C}\,\textstyle\sum_c \gamma g x\Big),
    \qquad \frac{\partial L}{\partial \gamma} = \sum_{n,s} g\,x\,r,
    \qquad \frac{\partial L}{\partial \beta} = \sum_{n,s} g.

Both sums over ``g x`` are one batched matrix product each on ``g·x`` viewed as ``(N, C, S)``,
whose buffer then becomes ``∂L/∂x`` (in place): one activation-sized allocation in the forward
(``y``) and one in the backward — each fresh one costs page faults on CPU — against about ten in
the autograd composition. Saved for backward: the input and ``r``
(``N·S`` values). A second derivative (``create_graph``) differentiates the composition
(:func:`rms_scale_plain`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .fused import _compute_dtype, _param_grad, _plain_vjp
from .partition import as_dtype

__all__ = ["channel_mean_square", "rms_scale", "rms_scale_plain"]

_DIMS = (1, 2)  # the channel axes of the canonical view


def channel_mean_square(v: Tensor) -> Tensor:
    """``mean_c x²`` over the channel axes ``(1, 2)`` of the canonical view ``(N, A, B, S)``, kept
    as ``(N, 1, 1, S)``, in at least float32: one batched dot product over the channels (5x
    faster on CPU than ``vector_norm`` over a strided axis, and no activation-sized temporary).

    Example:
        >>> x = torch.randn(2, 1, 6, 5)
        >>> torch.allclose(channel_mean_square(x), x.square().mean((1, 2), keepdim=True))
        True
    """
    x = as_dtype(v, _compute_dtype(v))
    n, a, b, s = x.shape
    x3 = x.reshape(n, a * b, s)
    return (torch.linalg.vecdot(x3, x3, dim=1) / (a * b)).reshape(n, 1, 1, s)


class _RmsScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                eps: float, ms: Tensor | None) -> Tensor:
        dt = _compute_dtype(v)
        x = as_dtype(v, dt)
        ms = channel_mean_square(x) if ms is None else as_dtype(ms, dt)
        r = torch.rsqrt(ms + eps)
        y = x * r  # the one activation-sized allocation of the forward; the rest in place
        if weight is not None:
            y = y.mul_(as_dtype(weight, dt))
        if bias is not None:
            y = y.add_(as_dtype(bias, dt))
        ctx.save_for_backward(v, r, weight, bias)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, r, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return (*_plain_vjp(rms_scale_plain, (v, weight, bias, ctx.eps), g), None)
        n, a, b, s = v.shape
        c = a * b
        x = as_dtype(v, r.dtype)
        g = as_dtype(g, r.dtype)
        w = None if weight is None else as_dtype(weight, r.dtype)
        g_weight = None
        if weight is not None and weight.requires_grad:
            # one buffer: g x for the sums, then ∂L/∂x in place
            buf = g * x
            gx = buf.reshape(n, c, s)
            # Σ_{n,s} g x r and Σ_c γ g x: batched matrix products on g x
            g_weight = torch.bmm(gx, r.reshape(n, s, 1)).sum(0).reshape(weight.shape)
            g_weight = as_dtype(g_weight, weight.dtype)
            acc = torch.bmm(w.reshape(1, 1, c).expand(n, 1, c), gx).reshape(n, 1, 1, s)
            buf = buf.copy_(g).mul_(w)
        else:
            buf = g.clone() if w is None else g * w  # γ g
            gw = buf.reshape(n, c, s)
            acc = torch.linalg.vecdot(gw, x.reshape(n, c, s), dim=1).reshape(n, 1, 1, s)
        g_bias = _param_grad(bias, g)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = buf.mul_(r).addcmul_(x, r * r * r * acc / c, value=-1).to(v.dtype)
        return dx, g_weight, g_bias, None, None


def rms_scale(v: Tensor, *, weight: Tensor | None, bias: Tensor | None, eps: float,
              ms: Tensor | None = None) -> Tensor:
    r"""``y = γ x/√(mean_c x² + ε) + β`` over the channel axes ``(1, 2)`` of the canonical view,
    with the hand-derived backward (see the module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)``.
        weight, bias: per-channel ``γ, β`` as ``(1, A, B, 1)`` views, or ``None``.
        eps: the stability constant.
        ms: ``mean_c x²`` of ``v`` (``(N, 1, 1, S)``) if already computed (its derivative is
            still taken), or ``None``.

    Shape:
        ``y`` has ``v``'s shape, in at least float32.

    Example:
        >>> x = torch.randn(2, 1, 6, 5, dtype=torch.float64)
        >>> ref = x / (x.square().mean((1, 2), keepdim=True) + 1e-6).sqrt()
        >>> torch.allclose(rms_scale(x, weight=None, bias=None, eps=1e-6), ref)
        True
    """
    return _RmsScale.apply(v, weight, bias, eps,  # type: ignore[no-any-return]
                           None if ms is None else ms.detach())


def rms_scale_plain(v: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """:func:`rms_scale` as the plain autograd composition."""
    x = as_dtype(v, _compute_dtype(v))
    y = x * torch.rsqrt(x.square().mean(_DIMS, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias
