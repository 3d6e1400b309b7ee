r"""Stochasticity of batch-dependent normalization (book ch. 9; Huang et al., CVPR 2019/2020).

A batch-dependent normalization maps one sample ``x_i`` differently depending on the other rows of
the mini-batch ``B`` it is drawn with, since the statistics ``Ω(B)`` (mean, variance, whitening
matrix) are estimated from ``B``. The *stochastic normalization disturbance* (SND) measures this:

.. math::

    \Delta(x_i) = \mathbb{E}_B \big\lVert F(x_i; \Omega(B)) - \mathbb{E}_B F(x_i; \Omega(B))
    \big\rVert_2, \qquad \mathrm{SND} = \frac{1}{K} \sum_{k=1}^{K} \Delta(x_{i_k})

where ``B`` ranges over random batches of ``m`` rows that contain ``x_i``. Both expectations are
replaced by averages over ``S`` random batches. A batch-independent method (LN, ...) has SND 0;
BN's falls as ``1/√m``; PCA whitening's is large (stochastic axis swapping) and IterNorm's grows
with its number of iterations ``T`` toward ZCA's.

References:
    Huang, Zhou, Zhu, Liu, Shao. *Iterative Normalization: Beyond Standardization towards
    Efficient Whitening*. CVPR 2019. https://arxiv.org/abs/1904.03441

    Huang, Zhao, Zhu, Liu, Shao. *An Investigation into the Stochasticity of Batch Whitening*.
    CVPR 2020. https://arxiv.org/abs/2003.12327
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..registry import create

__all__ = [
    "SNDResult",
    "gaussian_data",
    "snd",
    "snd_stats",
    "stochastic_normalization_disturbance",
    "whitening_error",
]

Method = str | Callable[[int], nn.Module]
Seed = torch.Generator | int | None


@dataclass(frozen=True)
class SNDResult:
    """SND estimate of one method at one batch size.

    Attributes:
        mean: SND, the mean of ``Δ(x_i)`` over the sampled ``x_i``.
        std: standard deviation of ``Δ(x_i)`` over the sampled ``x_i`` (biased).
        batch_size: ``m``.
        num_batches: batches ``S`` per sample.
        num_samples: sampled ``x_i``.
    """

    mean: float
    std: float
    batch_size: int
    num_batches: int
    num_samples: int


def _generator(generator: Seed) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    if generator is None:
        g.seed()
    else:
        g.manual_seed(int(generator))
    return g


def _build(method: Method, num_features: int, dtype: torch.dtype, **method_kw: Any) -> nn.Module:
    """A fresh module in training mode without affine parameters (``affine=False`` where the
    constructor takes it; otherwise every ``weight`` set to 1 and ``bias`` to 0)."""
    if isinstance(method, str):
        try:
            module = create(method, num_features, affine=False, **method_kw)
        except TypeError:  # a preset without an ``affine`` option
            module = create(method, num_features, **method_kw)
    elif callable(method):
        if method_kw:
            raise ConfigError(
                f"keyword arguments {sorted(method_kw)} are only used with a method name; bind "
                "them into the factory instead, e.g. functools.partial(factory, ...)"
            )
        module = method(num_features)
    else:
        raise ConfigError(
            "method must be a registry name or a factory f(C) -> module, "
            f"got {type(method).__name__}"
        )
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight":
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
    return module.to(dtype).train()


def _check(x: Tensor, batch_size: int, num_batches: int, num_samples: int | None = None) -> None:
    if x.dim() != 2:
        raise ShapeError(f"x must have shape (n, d), got {tuple(x.shape)}")
    n = x.shape[0]
    if not 2 <= batch_size <= n:
        raise ConfigError(f"batch_size must be in [2, n={n}], got {batch_size}")
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    if num_samples is not None and not 1 <= num_samples <= n:
        raise ConfigError(f"num_samples must be in [1, n={n}], got {num_samples}")


def _batches_with(i: int, n: int, batch_size: int, num_batches: int, g: torch.Generator) -> Tensor:
    """``(S, m)`` row indices: ``i`` first, then ``m − 1`` other rows without replacement."""
    others = torch.rand(num_batches, n - 1, generator=g).argsort(-1)[:, : batch_size - 1]
    others = others + (others >= i).long()  # skip row i
    return torch.cat([torch.full((num_batches, 1), i, dtype=torch.long), others], 1)


@torch.no_grad()
def snd_stats(
    method: Method,
    x: Tensor,
    *,
    batch_size: int,
    num_batches: int = 20,
    num_samples: int = 50,
    generator: Seed = None,
    **method_kw: Any,
) -> SNDResult:
    r"""SND of ``method`` on data ``x`` at batch size ``m`` with its spread over samples.

    .. math::

        \Delta(x_i) = \frac{1}{S}\sum_{s=1}^{S} \big\lVert F(x_i; \Omega(B_s))
        - \tfrac{1}{S}\textstyle\sum_{t} F(x_i; \Omega(B_t)) \big\rVert_2

    with ``B_s`` random batches of ``m`` rows containing ``x_i`` and ``F`` the module in training
    mode without affine parameters. Each batch is normalized by a copy of the freshly built module,
    so no running or online state carries over between batches.

    Args:
        method: registry name (``"bn"``, ``"dbn"``, ...) or a factory ``f(C) -> nn.Module``.
        x: data, shape ``(n, d)``.
        batch_size: ``m``, 2 to ``n``.
        num_batches: ``S``, batches per sample. Default ``20``.
        num_samples: ``K``, distinct rows ``x_i`` sampled. Default ``50``.
        generator: ``torch.Generator``, an ``int`` seed, or ``None`` (random).
        **method_kw: passed to ``normkit.create`` (e.g. ``group_size``, ``iterations``, ``eps``).

    Shape:
        ``x``: ``(n, d)``; the module is built as ``f(d)`` and applied to ``(m, d)`` batches.

    Example:
        >>> import torch
        >>> x = gaussian_data(64, 4, generator=0)
        >>> r = snd_stats("ln", x, batch_size=8, num_batches=3, num_samples=4, generator=0)
        >>> r.mean  # LN does not depend on the batch
        0.0
    """
    _check(x, batch_size, num_batches, num_samples)
    g = _generator(generator)
    n, d = x.shape
    proto = _build(method, d, x.dtype, **method_kw)
    deltas = torch.empty(num_samples, dtype=torch.float64)
    for k, i in enumerate(torch.randperm(n, generator=g)[:num_samples].tolist()):
        idx = _batches_with(i, n, batch_size, num_batches, g)
        outs = torch.stack([copy.deepcopy(proto)(x[b])[0] for b in idx])  # (S, d): F(x_i; Ω(B_s))
        outs = outs.double()
        deltas[k] = (outs - outs.mean(0)).norm(dim=1).mean()
    return SNDResult(
        mean=float(deltas.mean()),
        std=float(deltas.std(correction=0)),
        batch_size=batch_size,
        num_batches=num_batches,
        num_samples=num_samples,
    )


def stochastic_normalization_disturbance(
    method: Method,
    x: Tensor,
    *,
    batch_size: int,
    num_batches: int = 20,
    num_samples: int = 50,
    generator: Seed = None,
    **method_kw: Any,
) -> float:
    r"""Stochastic normalization disturbance (SND) of ``method`` on ``x`` at batch size ``m``.

    .. math::

        \mathrm{SND} = \frac{1}{K}\sum_{k} \mathbb{E}_B \big\lVert F(x_{i_k}; \Omega(B))
        - \mathbb{E}_B F(x_{i_k}; \Omega(B)) \big\rVert_2

    estimated with ``num_batches`` random batches (of ``batch_size`` rows containing
    ``x_i``) per sample, over ``num_samples`` samples. See :func:`snd_stats` for the arguments and
    the spread over samples. Also available as :func:`snd`.

    Shape:
        ``x``: ``(n, d)``.

    Example:
        >>> import torch
        >>> x = gaussian_data(256, 4, generator=0)
        >>> small = snd("bn", x, batch_size=8, num_batches=8, num_samples=8, generator=0)
        >>> large = snd("bn", x, batch_size=128, num_batches=8, num_samples=8, generator=0)
        >>> small > 2 * large > 0  # ~ 1/sqrt(m): larger batches, less noise
        True
    """
    return snd_stats(
        method,
        x,
        batch_size=batch_size,
        num_batches=num_batches,
        num_samples=num_samples,
        generator=generator,
        **method_kw,
    ).mean


snd = stochastic_normalization_disturbance


@torch.no_grad()
def whitening_error(
    method: Method,
    x: Tensor,
    *,
    batch_size: int,
    num_batches: int = 20,
    group: int | None = None,
    generator: Seed = None,
    **method_kw: Any,
) -> float:
    r"""How far the normalized batch is from white: mean of ``‖Cov(x̂_g) − I‖_F``.

    .. math::

        e = \frac{1}{S\,G}\sum_{s=1}^{S}\sum_{g=1}^{G} \Big\lVert \tfrac{1}{m}
        (\hat X_{g} - \bar{\hat X}_{g})^\top (\hat X_{g} - \bar{\hat X}_{g}) - I \Big\rVert_F,
        \qquad \hat X = F(X_{B_s}; \Omega(B_s))

    over ``S`` random batches of ``m`` rows and the ``G`` groups of ``group`` consecutive channels
    (the last one smaller when ``group`` does not divide ``d``); the covariance is biased, as the
    whitening methods estimate it. ZCA/PCA/CD whitening give ``e ≈ 0`` (up to ``ε``) at ``m > d``;
    IterNorm with few iterations under-whitens; BN only standardizes, so ``e`` is the norm of the
    off-diagonal correlations.

    Args:
        method, batch_size, num_batches, generator, method_kw: as :func:`snd_stats`.
        group: channels per whitening group to measure over. Default ``method_kw["group_size"]``
            when given, else ``d`` (one group).

    Shape:
        ``x``: ``(n, d)``.

    Example:
        >>> import torch
        >>> x = gaussian_data(512, 4, generator=0, dtype=torch.float64)
        >>> whitening_error("dbn", x, batch_size=256, num_batches=2, eps=1e-12, generator=0) < 1e-8
        True
    """
    _check(x, batch_size, num_batches)
    g = _generator(generator)
    n, d = x.shape
    group = (method_kw.get("group_size") or d) if group is None else group
    if group < 1:
        raise ConfigError(f"group must be positive, got {group}")
    proto = _build(method, d, x.dtype, **method_kw)
    total, count = 0.0, 0
    for _ in range(num_batches):
        y = copy.deepcopy(proto)(x[torch.randperm(n, generator=g)[:batch_size]]).double()
        y = y - y.mean(0)
        for start in range(0, d, group):
            yg = y[:, start : start + group]
            cov = yg.T @ yg / batch_size
            total += float((cov - torch.eye(cov.shape[0], dtype=cov.dtype)).norm())
            count += 1
    return total / count


def gaussian_data(
    n: int,
    d: int,
    *,
    condition: float = 100.0,
    generator: Seed = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""``n`` samples of a zero-mean Gaussian in ``d`` dimensions with a random non-isotropic
    covariance of condition number ``condition``: the synthetic setting of the SBW paper.

    .. math::

        x = z A^\top,\quad z \sim \mathcal N(0, I_d),\quad A = Q\,\mathrm{diag}(\sqrt{\lambda}),
        \quad \lambda_k = \kappa^{-k/(d-1)},\ k = 0..d-1

    so ``Cov(x) = Q diag(λ) Qᵀ`` with eigenvalues spread geometrically from 1 down to ``1/κ`` and
    ``Q`` a uniformly random orthogonal matrix (QR of a ``d×d`` standard normal matrix, with the
    signs of ``R``'s diagonal folded into ``Q``). Drawn in float64, returned in ``dtype``.

    Args:
        n: samples.
        d: dimension.
        condition: ``κ ≥ 1``, ratio of the largest to the smallest covariance eigenvalue.
            Default ``100``.
        generator: ``torch.Generator``, an ``int`` seed, or ``None``.
        dtype: of the result. Default ``torch.float32``.

    Shape:
        output: ``(n, d)``.

    Example:
        >>> import torch
        >>> x = gaussian_data(20000, 3, condition=4.0, generator=0, dtype=torch.float64)
        >>> lam = torch.linalg.eigvalsh(x.T.cov())
        >>> bool(abs(lam.max() / lam.min() - 4.0) < 0.3)
        True
    """
    if n < 1 or d < 1:
        raise ConfigError(f"n and d must be positive, got n={n}, d={d}")
    if not condition >= 1.0 or math.isinf(condition):
        raise ConfigError(f"condition must be a finite number >= 1, got {condition}")
    g = _generator(generator)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
    k = torch.arange(d, dtype=torch.float64)
    lam = condition ** (-k / max(d - 1, 1))
    a = q * lam.sqrt()
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z @ a.T).to(dtype)
