r"""Batch-group normalization's training step (Summers & Dinneen 2020) as one standardization
Function with a hand-derived backward.

Groups of ``C/g`` consecutive channels are standardized over the batch, the channels of the group
and the positions; the recovery ``γ, β`` is per channel:

.. math::
    y = \gamma\,\frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta,\qquad
    \mu_g, \sigma_g^2 \text{ over } (N, C/g, S)

torch has no kernel for it: BN's kernel over the view ``(N, g, C/g·S)`` computes the
standardization but not the per-channel affine, so that composition writes ``x̂`` (saved for the
affine's backward), then ``y``, and its backward makes three activation-sized tensors (``g γ``,
``g x̂`` and BN's input gradient). Here the statistics are the per-row moments (one pass for the
mean, one over ``x − μ``) pooled exactly over the group (law of total variance), and
:func:`~normkit.functional.fused_combination.standardize_affine` writes ``y`` in one pass and
saves nothing activation-sized beyond the input; its backward reads ``g`` twice and ``x`` once
and writes ``dx``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import _var_mean
from .fused_combination import standardize_affine
from .merging import pool_moments
from .statistics import ema_update, unbiased_variance

__all__ = ["batch_group_moments", "batch_group_standardize"]


def batch_group_moments(v: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(μ_g, σ²_g)`` (biased, ``(1, g, 1, 1)``) of the view ``v`` ``(N, g, C/g, S)`` over the
    batch, the channels of each group and the positions: each row's moments over ``S`` (two
    passes around its mean), pooled over ``(N, C/g)``. Not differentiable by design (computed
    once; the Function differentiates them).

    Example:
        >>> v = torch.randn(4, 2, 3, 5, dtype=torch.float64) + 1e3
        >>> mean, var = batch_group_moments(v)
        >>> torch.allclose(var, v.var((0, 2, 3), correction=0, keepdim=True))
        True
    """
    with torch.no_grad():
        var, mean = _var_mean(v.to(torch.promote_types(v.dtype, torch.float32)), (3,))
        return pool_moments(mean, var, (0, 2))


def batch_group_standardize(x: Tensor, groups: tuple[int, int], weight: Tensor | None,
                            bias: Tensor | None, eps: float,
                            running: tuple[Tensor, Tensor] | None = None,
                            factor: float | Tensor = 0.0) -> Tensor:
    r"""Batch-group normalization of ``x`` ``(N, C, *)`` with this batch's statistics (see the
    module docstring), the running estimates ``(mean, var)`` ``(g,)`` updated in place when
    given (``running ← (1 − factor)·running + factor·batch``, the variance unbiased).

    Args:
        x: the input ``(N, C, *)``, ``C = g·(C/g)``.
        groups: ``(g, C/g)``.
        weight, bias: ``γ, β`` ``(C,)``, or ``None``.
        eps: added to ``σ²_g``.
        running: ``(running_mean, running_var)`` to update, or ``None``.
        factor: the weight of this batch in the running estimates (torch's ``momentum``).

    Shape:
        ``x``: ``(N, C, *)`` with ``N·(C/g)·Π* > 1``; ``y``: the same.

    Example:
        >>> x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
        >>> ref = torch.nn.functional.batch_norm(x.reshape(4, 2, -1), None, None, training=True)
        >>> y = batch_group_standardize(x, (2, 3), None, None, 1e-5)
        >>> torch.allclose(y, ref.reshape(x.shape))
        True
    """
    g, per = groups
    n = x.shape[0]
    v = x.reshape(n, g, per, -1)
    mean, var = batch_group_moments(v)
    if running is not None:
        m = n * per * v.shape[3]
        ema_update(running[0], mean.reshape(g), factor)
        ema_update(running[1], unbiased_variance(var, m).reshape(g), factor)
    shape = (1, g, per, 1)
    y = standardize_affine(v, (0, 2, 3), eps=eps, moments=(mean, var),
                           weight=None if weight is None else weight.reshape(shape),
                           bias=None if bias is None else bias.reshape(shape))
    return y.reshape(x.shape)
