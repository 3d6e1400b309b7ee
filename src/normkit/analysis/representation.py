"""Representation analysis: effective rank, feature correlation and collapse (book ch. 9).

All functions take a feature matrix ``features`` of shape ``(N, d)`` (``N`` samples, ``d``
features), centre each feature over the samples and compute in float64. Use
:func:`feature_hook` to collect such a matrix from any layer of a model.

With :math:`X_c` the centred matrix, :math:`s_1 \\ge \\dots \\ge s_k` its singular values
(:math:`k = \\min(N, d)`) and :math:`\\lambda_i = s_i^2` the variances along the principal
directions:

* effective rank (Roy & Vetterli 2007): :math:`\\exp(-\\sum_i p_i \\log p_i)`,
  :math:`p_i = s_i / \\sum_j s_j`; equal to ``r`` for ``r`` equal non-zero singular values.
* collapse indicator: the excess share of variance in the top principal direction,
  :math:`c = (m\\,\\lambda_1/\\sum_i \\lambda_i - 1)/(m - 1)` with :math:`m = \\min(N-1, d)` the
  largest rank a centred matrix can have; :math:`c = 0` iff the variance is spread equally over
  :math:`m` directions (isotropic features), :math:`c = 1` iff it lies in one direction (rank-1,
  collapsed features; also all-constant features, and whenever :math:`m = 1`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from .scale import submodule

__all__ = [
    "effective_rank",
    "correlation_matrix",
    "mean_abs_correlation",
    "collapse_indicator",
    "FeatureCapture",
    "feature_hook",
]


def _centred(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(getattr(features, "shape", ()))
        raise ShapeError(
            f"features must be a 2-D tensor (N samples, d features), got shape {shape}; "
            "flatten with feature_hook(..., flatten='sample' or 'channel')"
        )
    if features.shape[0] < 2 or features.shape[1] < 1:
        raise ShapeError(
            f"features need N ≥ 2 samples and d ≥ 1 features, got {tuple(features.shape)}"
        )
    x = features.detach().to(torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def _singular_values(features: Tensor) -> Tensor:
    return torch.linalg.svdvals(_centred(features))


def effective_rank(features: Tensor) -> float:
    """Effective rank of the centred features (Roy & Vetterli 2007).

    .. math::

        \\operatorname{erank}(X) = \\exp\\Big(-\\sum_i p_i \\log p_i\\Big), \\qquad
        p_i = \\frac{s_i}{\\sum_j s_j},

    with :math:`s_i` the singular values of the column-centred :math:`X` and :math:`0 \\log 0 = 0`.
    It lies in :math:`[1, \\operatorname{rank} X]` and equals ``r`` when ``r`` singular values are
    equal and the rest zero. All-constant features (no variance) give ``0.0``. Singular values
    below :math:`s_1 \\max(N, d)\\,\\varepsilon` (the input dtype's machine epsilon, the
    threshold of :func:`torch.linalg.matrix_rank`) are rounding noise and are dropped: in float32 a
    rank-1 matrix would otherwise have an effective rank of about ``1 + 1e-5``.

    Shape:
        ``features``: ``(N, d)``, ``N ≥ 2``.

    Example:
        >>> import torch
        >>> q, _ = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))
        >>> x = torch.cat([q, q], dim=1)    # 6 features spanning 3 directions
        >>> 2.5 < effective_rank(x) <= 3.0 + 1e-9
        True
        >>> round(effective_rank(torch.randn(50, 1) * torch.randn(1, 8)), 6)  # rank 1
        1.0
    """
    s = _singular_values(features)
    if s.numel() == 0 or s[0].item() == 0:
        return 0.0
    eps = torch.finfo(features.dtype).eps if features.is_floating_point() else 0.0
    s = s[s > s[0] * max(features.shape) * eps]  # rounding noise of the input, as matrix_rank
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def correlation_matrix(features: Tensor) -> Tensor:
    """Pearson correlation matrix of the features.

    .. math::

        \\rho_{ij} = \\frac{\\sum_n \\tilde x_{ni} \\tilde x_{nj}}
        {\\sqrt{\\sum_n \\tilde x_{ni}^2 \\sum_n \\tilde x_{nj}^2}}, \\qquad
        \\tilde x = x - \\bar x.

    A constant feature has no defined correlation; it is given :math:`\\rho_{ii} = 1` and
    :math:`\\rho_{ij} = 0` with every other feature (so it never counts as correlated).

    Shape:
        ``features``: ``(N, d)`` → ``(d, d)`` float64.

    Example:
        >>> import torch
        >>> z = torch.randn(100, 1, dtype=torch.float64)
        >>> c = correlation_matrix(torch.cat([z, -2 * z + 1], dim=1))
        >>> torch.allclose(c, torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
        True
    """
    x = _centred(features)
    std = x.norm(dim=0)
    scale = torch.where(std > 0, std, torch.ones_like(std))
    xn = x / scale
    corr = (xn.T @ xn).clamp(-1.0, 1.0)
    corr.fill_diagonal_(1.0)
    return corr


def mean_abs_correlation(features: Tensor) -> float:
    """Mean absolute off-diagonal correlation :math:`\\frac{1}{d(d-1)}\\sum_{i \\ne j}|\\rho_{ij}|`.

    About :math:`\\sqrt{2/(\\pi N)}` for ``N`` samples of independent features, ``1`` when every
    feature is an affine function of one. Requires ``d ≥ 2``.

    Shape:
        ``features``: ``(N, d)``, ``d ≥ 2``.

    Example:
        >>> import torch
        >>> z = torch.randn(100, 1)
        >>> round(mean_abs_correlation(torch.cat([z, 3 * z, -z], dim=1)), 6)
        1.0
    """
    corr = correlation_matrix(features)
    d = corr.shape[0]
    if d < 2:
        raise ShapeError(f"mean_abs_correlation needs d ≥ 2 features, got {d}")
    return ((corr.abs().sum() - corr.diagonal().abs().sum()) / (d * (d - 1))).item()


def collapse_indicator(features: Tensor) -> float:
    """Excess share of variance in the top principal direction, in ``[0, 1]``.

    .. math::

        c = \\frac{m\\,\\lambda_1 / \\sum_i \\lambda_i - 1}{m - 1}, \\qquad
        m = \\min(N - 1, d),

    with :math:`\\lambda_i = s_i^2` the squared singular values of the centred features. ``0`` for
    isotropic features (variance equal in ``m`` directions; about
    :math:`2\\sqrt{d/N}/(d-1)` for ``N`` Gaussian samples, from the Marchenko–Pastur edge),
    ``1`` for collapsed (rank ≤ 1 or constant) features and whenever ``m = 1``.

    Shape:
        ``features``: ``(N, d)``, ``N ≥ 2``.

    Example:
        >>> import torch
        >>> collapse_indicator(torch.randn(64, 1) * torch.randn(1, 8)) > 1 - 1e-6
        True
        >>> collapse_indicator(torch.randn(4000, 8)) < 0.05
        True
    """
    lam = _singular_values(features).square()
    m = min(features.shape[0] - 1, features.shape[1])
    total = lam.sum().item()
    if m == 1 or total == 0:
        return 1.0
    c = (m * lam[0].item() / total - 1.0) / (m - 1)
    return min(max(c, 0.0), 1.0)


@dataclass
class FeatureCapture:
    """Outputs of one layer collected by :func:`feature_hook`.

    Attributes:
        flatten: how :attr:`features` flattens each output (see :func:`feature_hook`).
        outputs: the detached raw outputs, one per forward call.
    """

    flatten: Literal["none", "sample", "channel"] = "sample"
    outputs: list[Tensor] = field(default_factory=list)

    @property
    def features(self) -> Tensor:
        """All captured outputs, flattened and concatenated along the sample axis."""
        if not self.outputs:
            raise ShapeError("no output captured yet: run the model inside the feature_hook block")
        return torch.cat([_flatten(o, self.flatten) for o in self.outputs], dim=0)


def _flatten(out: Tensor, how: str) -> Tensor:
    if how == "none":
        return out
    if out.dim() < 2:
        raise ShapeError(
            f"flatten={how!r} needs an output (N, C, *spatial), got {tuple(out.shape)}"
        )
    if how == "sample":
        return out.reshape(out.shape[0], -1)
    return out.movedim(1, -1).reshape(-1, out.shape[1])


@contextmanager
def feature_hook(
    model: nn.Module,
    layer: nn.Module | str,
    *,
    flatten: Literal["none", "sample", "channel"] = "sample",
) -> Iterator[FeatureCapture]:
    """Capture the outputs of ``layer`` while the block runs; the hook is removed on exit.

    Outputs are detached (no graph is kept). ``capture.features`` flattens an output of shape
    ``(N, C, *spatial)`` to:

    * ``"sample"`` (default): ``(N, C·∏spatial)``: one row per sample, every unit a feature;
    * ``"channel"``: ``(N·∏spatial, C)``: every sample and position a row, channels the features
      (the view BN normalizes over);
    * ``"none"``: unchanged (concatenated along dim 0).

    Args:
        model: the model containing ``layer``.
        layer: the module or its dotted name in ``model.named_modules()``.
        flatten: ``"sample"`` (default), ``"channel"`` or ``"none"``.

    Shape:
        Layer output ``(N, C, *spatial)`` → ``features`` as above.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
        >>> with feature_hook(model, "0", flatten="channel") as cap:
        ...     _ = model(torch.randn(2, 3, 5, 5))
        >>> cap.features.shape
        torch.Size([50, 4])
        >>> len(model[0]._forward_hooks)
        0
    """
    if flatten not in ("none", "sample", "channel"):
        raise ConfigError(f"flatten must be 'none', 'sample' or 'channel', got {flatten!r}")
    module = submodule(model, layer)
    capture = FeatureCapture(flatten=flatten)

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, Tensor):
            raise ConfigError(
                f"feature_hook captures tensor outputs; {type(module).__name__} returned "
                f"{type(output).__name__}"
            )
        capture.outputs.append(output.detach())

    handle = module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()
