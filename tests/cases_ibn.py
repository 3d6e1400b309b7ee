"""Generic-table rows of IBN (instance-batch normalization, IBN-Net); appended to cases.CASES by
``from cases_ibn import CASES_IBN``.

The float64 reference is written from the paper's definition with plain tensor operations on the
logical ``(N, C, *spatial)`` input: IN (per sample and channel over the positions) on the first
``⌊ratio·C⌋`` channels, BN with the running estimates on the rest, then ``γ, β``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import normkit.methods.ibn  # noqa: F401  (registers "ibn" until normkit.methods imports it)
from cases import SP4, Case, ErrorInput, _bn_stats, _common_errors
from normkit import ConfigError

__all__ = ["CASES_IBN"]


def _ibn_eval_ref(m: Any, x: Tensor) -> Tensor:
    """IN(x) on channels ``c < ⌊ratio·C⌋``, ``(x − running mean)/√(running var + ε)`` on the
    others, then the per-channel affine."""
    c = x.shape[1]
    k = math.floor(m.ratio * c)
    view = (1, c) + (1,) * (x.dim() - 2)
    dims = tuple(range(2, x.dim()))
    inn = (x - x.mean(dims, keepdim=True)) / torch.sqrt(
        x.var(dims, correction=0, keepdim=True) + m.eps)
    rm = m.running_mean.detach().double().view(view)
    rv = m.running_var.detach().double().view(view)
    bn = (x - rm) / torch.sqrt(rv + m.eps)
    y = torch.cat([inn[:, :k], bn[:, k:]], 1)
    if m.weight is not None:
        y = y * m.weight.detach().double().view(view) + m.bias.detach().double().view(view)
    return y


CASES_IBN: list[Case] = [
    Case(
        name="ibn", method="ibn", num_features=4, kwargs={}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)),  # IN channels: one position per statistic
        edge_shapes=((1, 4, 3),), batch_stats=_bn_stats, eval_ref=_ibn_eval_ref, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("ratio_above_1", ConfigError, r"ratio must be a number in \[0, 1\].*got 1\.5",
                       ctor={"ratio": 1.5}),
            ErrorInput("ratio_negative", ConfigError, r"ratio must be a number in \[0, 1\].*got -0\.5",
                       ctor={"ratio": -0.5}),
            ErrorInput("ratio_string", ConfigError, r"ratio must be a number in \[0, 1\].*got 'half'",
                       ctor={"ratio": "half"}),
        ),
    ),
    Case(
        name="ibn_quarter", method="ibn", num_features=4, kwargs={"ratio": 0.25, "momentum": None},
        shapes=SP4, grad_shape=(2, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1),), edge_shapes=((1, 4, 2),), batch_stats=_bn_stats,
        eval_ref=_ibn_eval_ref, foldable=False,
    ),
]
