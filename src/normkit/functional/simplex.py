"""Projections onto the probability simplex: the mixing weights of the switchable methods."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sparsemax"]


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    r"""Euclidean projection of ``z`` onto the probability simplex (Martins & Astudillo 2016).

    .. math::
        \mathrm{sparsemax}(z) = \arg\min_{p \in \Delta} \|p - z\|^2 = \max(z - \tau, 0),
        \qquad \sum_i \max(z_i - \tau, 0) = 1

    Unlike softmax it reaches exact zeros, and a one-hot vector when the largest entry exceeds
    the second by at least 1. Piecewise linear, differentiable almost everywhere (autograd
    through the sort).

    Shape:
        ``z``: any shape; the result has ``z``'s shape and sums to 1 along ``dim``.

    Example:
        >>> sparsemax(torch.tensor([0.0, 0.0, 2.0]))
        tensor([0., 0., 1.])
        >>> sparsemax(torch.tensor([1.0, 0.5, 0.0]))
        tensor([0.7500, 0.2500, 0.0000])
    """
    zs = torch.sort(z, dim=dim, descending=True).values
    n = z.shape[dim]
    shape = [1] * z.dim()
    shape[dim] = n
    k = torch.arange(1, n + 1, dtype=z.dtype, device=z.device).reshape(shape)
    # the support is the prefix of sorted entries with 1 + k·z_(k) > Σ_{j≤k} z_(j)
    support = (1 + k * zs > zs.cumsum(dim)).to(z.dtype)
    tau = ((zs * support).sum(dim, keepdim=True) - 1) / support.sum(dim, keepdim=True)
    return (z - tau).clamp_min(0)
