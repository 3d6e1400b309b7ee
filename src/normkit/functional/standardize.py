"""Normalization operations (NOP) and recovery as pure functions.

Every standardization-family operation is affine in ``x`` once its statistics are fixed:
``x̂ = x·scale + shift``. The functions here turn statistics into ``(scale, shift)`` and apply them
together with the affine recovery ``y = x̂·γ + β`` in one fused multiply-add when the folded
coefficients are smaller than the input (the eval-mode fold of DESIGN §5 comes for free).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "standardize_coefficients",
    "center_coefficients",
    "rms_coefficients",
    "inverse_scale_coefficients",
    "divisive_coefficients",
    "affine_transform",
    "recover",
    "recover_backward",
]


def standardize_coefficients(mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x̂ = (x − μ)/√(σ² + ε)`` as ``(scale, shift) = (1/√(σ²+ε), −μ/√(σ²+ε))``."""
    scale = torch.rsqrt(var + eps)
    return scale, -mean * scale


def center_coefficients(mean: Tensor) -> tuple[None, Tensor]:
    """``x̂ = x − μ`` as ``(None, −μ)``."""
    return None, -mean


def rms_coefficients(mean_square: Tensor, eps: float) -> tuple[Tensor, None]:
    """``x̂ = x/√(E[x²] + ε)`` as ``(1/√(E[x²]+ε), None)``."""
    return torch.rsqrt(mean_square + eps), None


def inverse_scale_coefficients(
    scale: Tensor, eps: float, mean: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``x̂ = (x − μ)/(s + ε)`` for a non-quadratic scale ``s`` (L1, range)."""
    inv = 1.0 / (scale + eps)
    return inv, (None if mean is None else -mean * inv)


def divisive_coefficients(
    mean: Tensor | None, second: Tensor, k: float, alpha: float, beta: float
) -> tuple[Tensor, Tensor | None]:
    """Divisive normalization ``x̂ = (x − μ)/(k + α·v)^β`` (``v`` a local second moment)."""
    scale = torch.pow(k + alpha * second, -beta)
    return scale, (None if mean is None else -mean * scale)


def _broadcast_numel(*tensors: Tensor | None) -> int:
    """Elements of the broadcast of coefficient tensors (axes of size 1 or equal sizes).

    A plain max over axes: ``torch.broadcast_shapes`` costs tens of µs per call on the hot path.
    """
    shapes = [tuple(t.shape) for t in tensors if t is not None]
    rank = max(len(sh) for sh in shapes)
    shapes = [(1,) * (rank - len(sh)) + sh for sh in shapes]
    n = 1
    for sizes in zip(*shapes, strict=True):
        n *= max(sizes)
    return n


def affine_transform(
    x: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``y = (x·scale + shift)·weight + bias``, every factor optional and broadcastable.

    When ``scale·weight`` is smaller than ``x`` (per-channel or per-group statistics) the two
    affine maps are folded into one ``addcmul``; otherwise (per-position statistics) they are
    applied one after the other. The result has the promoted dtype of the inputs.
    """
    if weight is not None or bias is not None:
        if _broadcast_numel(scale, shift, weight, bias) < x.numel():
            w = weight if weight is not None else None
            if w is not None:
                scale = w if scale is None else scale * w
                shift = None if shift is None else shift * w
            if bias is not None:
                shift = bias if shift is None else shift + bias
            return _scale_shift(x, scale, shift)
        x = _scale_shift(x, scale, shift)
        return _scale_shift(x, weight, bias)
    return _scale_shift(x, scale, shift)


def _scale_shift(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    if scale is not None and shift is not None:
        return torch.addcmul(shift, x, scale)
    if scale is not None:
        return x * scale
    if shift is not None:
        return x + shift
    return x


def recover(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The affine recovery ``y = x̂·γ + β`` as two plain ops (``γ``, ``β`` optional): the
    forward of the custom autograd Functions whose backward :func:`recover_backward` completes.

    Example:
        >>> x, w, b = torch.randn(2, 3, 4), torch.rand(1, 3, 1), torch.randn(1, 3, 1)
        >>> torch.equal(recover(x, w, b), x * w + b), torch.equal(recover(x, None, None), x)
        (True, True)
    """
    y = xhat if weight is None else xhat * weight
    return y if bias is None else y + bias


def recover_backward(
    grad: Tensor, xhat: Tensor, weight: Tensor | None,
    bias: tuple[torch.Size, torch.dtype] | None,
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of :func:`recover` with respect to ``γ`` and ``β``:
    ``∂γ = Σ grad·x̂``, ``∂β = Σ grad`` over the axes they broadcast along.

    Shape:
        ``grad``, ``xhat``: the output's; ``weight``: ``γ`` itself (or ``None``); ``bias``:
        ``β``'s ``(shape, dtype)`` (or ``None``). Returns ``(∂γ, ∂β)`` in those shapes and dtypes.
    """
    gw = None if weight is None else (grad * xhat).sum_to_size(weight.shape).to(weight.dtype)
    gb = None if bias is None else grad.sum_to_size(bias[0]).to(bias[1])
    return gw, gb
