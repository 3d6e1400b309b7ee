r"""torch's kernels for the combination family: batch-channel normalization as BN's kernel
followed by GN's, and a standardization with a per-sample affine (conditional recoveries) as the
statistics-only kernel followed by one ``addcmul``.

A composition of separate torch ops pays one memory pass per op, forward and backward, and
autograd saves most intermediates. torch's normalization kernels compute the statistics, the
normalized output and the affine in one forward and the whole input gradient (through the
statistics) in one backward; their second derivatives are torch's own. Shapes are the canonical
view ``(N, C, 1, S)`` of ``Batch()``/``Instance()`` (one channel per group); per-channel
parameters are views ``(1, C, 1, 1)`` (or ``(C,)``). Everything runs in the dtype of the input
given (the callers pass at least float32).

Batch-channel normalization (Qiao et al. 2019), ``x̂_B = (x − μ_B)/√(σ_B² + ε)`` per channel:

.. math::
    h = \gamma_b \hat{x}_B + \beta_b,\qquad
    y = \gamma\,\frac{h - \mu_{ng}(h)}{\sqrt{\sigma^2_{ng}(h) + \epsilon}} + \beta
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["batch_standardize", "group_standardize"]


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
    var = (invstd.to(v.dtype).reshape(shape).pow(-2) - eps).clamp_min(0.0)
    return h.reshape(v.shape), mean.to(v.dtype).reshape(shape), var


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
