r"""Moment merging, written once: the moments of a union or a mixture from those of its parts.

Every place in normkit that combines statistics of several sets uses these functions:

* :func:`mix_moments` — the two-component mixture ``w·A + (1 − w)·B`` (TaskNorm, inference
  example weighting, Kalman and Online Normalization);
* :func:`pool_moments` — ``K`` groups of equal or given counts, the law of total variance
  (IN → LN / BN pooling of the switchable and EvoNorm operations, Mode Normalization's
  gate-weighted modes, cross-iteration BN);
* :func:`weighted_mean` — ``Σ wᵢxᵢ / Σ wᵢ``, the first moment of :func:`pool_moments` (and
  moving-average BN's backward statistics);
* :func:`scatter_about` — a set's scatter about another centre, the parallel-axis theorem
  (:func:`merge_moments`, the collectives of :mod:`normkit.functional.collectives`);
* :func:`merge_moments` — Chan et al.'s merge of ``(count, mean, scatter)`` triples
  (:class:`MomentPool`, :class:`normkit.InputNormalizer`'s streaming fit);
* :class:`MomentPool` — a running merge over batches in float64 (recalibration, population
  whitening).

All of them keep every term a sum of squares around a mean (no ``E[x²] − μ²``), so a variance is
never negative and a mean offset of 1e4 in float32 costs nothing. They are plain autograd ops,
differentiable in every tensor argument; dtypes follow the arguments (callers upcast first, as
the numerics policy of :mod:`normkit.functional.statistics` says).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .partition import as_dtype

__all__ = [
    "mix_moments",
    "weighted_mean",
    "pool_moments",
    "scatter_about",
    "merge_moments",
    "MomentPool",
]


def mix_moments(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor,
                weight: float | Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and variance of the mixture ``w·A + (1 − w)·B`` of two distributions given by their
    moments (the law of total variance for two groups).

    .. math::
        \mu = w\mu_a + (1-w)\mu_b,\qquad
        \sigma^2 = w\sigma_a^2 + (1-w)\sigma_b^2 + w(1-w)(\mu_a-\mu_b)^2

    Every term is non-negative for ``w ∈ [0, 1]``. The mean is computed as ``μ_b + w(μ_a − μ_b)``
    (two operations, which matters in Online Normalization's per-sample loop): ``w = 0`` returns
    ``(μ_b, σ²_b)`` exactly, ``w = 1`` returns ``σ²_a`` exactly and ``μ_a`` to one rounding. With
    ``w = n_a/(n_a + n_b)`` and biased variances this is the moments of the union of the sets.

    Args:
        mean_a, var_a: the first component's mean and (biased) variance.
        mean_b, var_b: the second's.
        weight: ``w``, the first component's share (a float or a tensor that broadcasts).

    Shape:
        All arguments broadcast against each other; the two results have the broadcast shape.

    Example:
        >>> a, b = torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([4.0, 6.0])
        >>> mean, var = mix_moments(a.mean(), a.var(correction=0), b.mean(), b.var(correction=0), 4 / 6)
        >>> both = torch.cat([a, b])
        >>> bool(torch.allclose(mean, both.mean())), bool(torch.allclose(var, both.var(correction=0)))
        (True, True)
    """
    d = mean_a - mean_b
    mean = mean_b + weight * d
    var = weight * var_a + (1 - weight) * var_b + (weight * (1 - weight)) * d * d
    return mean, var


def weighted_mean(x: Tensor, weight: Tensor, dims: Sequence[int]) -> Tensor:
    r"""``Σᵢ wᵢxᵢ / Σᵢ wᵢ`` over ``dims`` (kept as size-1 axes).

    Weights summing to 0 (every weight underflowed) give 0, not ``0/0``: the sum is floored at
    the dtype's smallest normal number.

    Shape:
        ``weight`` and ``x`` broadcast against each other (e.g. ``(K, N, 1)`` against
        ``(1, N, C)``); the result has the broadcast shape with ``dims`` reduced to 1.

    Example:
        >>> weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]), (0,))
        tensor([1.5000])
    """
    dims = tuple(dims)
    return (_shares(weight, x, dims) * x).sum(dims, keepdim=True)


def _shares(weight: Tensor, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``w / Σw`` over ``dims`` in ``x``'s dtype, the sum over the extent ``w`` broadcasts to
    against ``x`` and floored at the smallest normal number (computed once per pooling, on the
    weights alone where they span ``dims`` themselves)."""
    w = as_dtype(weight, x.dtype)
    if w.dim() != x.dim() or any(w.shape[d] < x.shape[d] for d in dims):
        w = w.expand(torch.broadcast_shapes(w.shape, x.shape))
    return w / w.sum(dims, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def pool_moments(mean: Tensor, var: Tensor, dims: Sequence[int],
                 weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Moments of the union of ``K`` groups from the groups' moments (law of total variance).

    .. math::
        \mu = \frac{\sum_i n_i\mu_i}{\sum_i n_i},\qquad
        \sigma^2 = \frac{\sum_i n_i\big(\sigma_i^2 + (\mu_i - \mu)^2\big)}{\sum_i n_i}

    over the groups laid out along ``dims``, with ``n_i`` the counts (``weight``; any
    non-negative weights, broadcasting against ``mean``, see :func:`weighted_mean`) or all equal
    (``weight=None``: plain means over ``dims``).
    Exact, not an approximation, when the ``σ²_i`` are biased variances and ``n_i`` the true
    counts — e.g. the instances of a batch, all of the same size, pool into the batch's moments.
    Every term is non-negative.

    Args:
        mean, var: each group's mean and biased variance.
        dims: the axes that index the groups (reduced, kept as size 1).
        weight: the groups' counts or weights; ``None``: equal.

    Shape:
        ``mean``, ``var``: ``(*)``; results: ``(*)`` broadcast with ``weight``, ``dims`` of size 1.

    Example:
        >>> x = torch.randn(4, 3, 5, dtype=torch.float64) + 1e4
        >>> m, v = pool_moments(x.mean(2, keepdim=True), x.var(2, correction=0, keepdim=True), (0,))
        >>> torch.allclose(v, x.var((0, 2), correction=0, keepdim=True))
        True
    """
    dims = tuple(dims)
    if weight is None:
        mu = mean.mean(dims, keepdim=True)
        d = mean - mu
        return mu, (var + d * d).mean(dims, keepdim=True)
    p = _shares(weight, mean, dims)
    mu = (p * mean).sum(dims, keepdim=True)
    d = mean - mu
    return mu, (p * (var + d * d)).sum(dims, keepdim=True)


def _outer(delta: Tensor, like: Tensor) -> Tensor:
    """``δ²`` per feature where ``like`` has ``delta``'s rank, ``δδᵀ`` where it has one more."""
    if like.dim() == delta.dim():
        return delta * delta
    return delta[..., :, None] * delta[..., None, :]


def scatter_about(m2: Tensor, mean: Tensor, count: float | Tensor, center: Tensor) -> Tensor:
    r"""The scatter of a set about ``center`` from its own scatter about its mean (parallel-axis
    theorem).

    .. math::
        \sum_i (x_i - c)(x_i - c)^\top = M_2 + n\,(\mu - c)(\mu - c)^\top,\qquad
        M_2 = \sum_i (x_i - \mu)(x_i - \mu)^\top

    ``m2`` of ``mean``'s shape is a per-feature scatter (``(μ − c)²``); one more trailing
    dimension makes it a scatter matrix (``mean`` is then ``(..., D)``).

    Shape:
        ``mean``, ``center``: ``(..., D)``; ``m2``: ``(..., D)`` or ``(..., D, D)``.

    Example:
        >>> x = torch.randn(6, dtype=torch.float64)
        >>> m2 = ((x - x.mean()) ** 2).sum()
        >>> torch.allclose(scatter_about(m2, x.mean(), 6, torch.tensor(1.0, dtype=torch.float64)),
        ...                ((x - 1) ** 2).sum())
        True
    """
    return m2 + _outer(mean - center, m2) * count


def merge_moments(
    count_a: int, mean_a: Tensor | None, m2_a: Tensor | None,
    count_b: int, mean_b: Tensor, m2_b: Tensor,
) -> tuple[int, Tensor, Tensor]:
    r"""Merge the moments of two disjoint sample sets (Chan, Golub & LeVeque's parallel formula).

    .. math::

        n = n_a + n_b, \qquad \delta = \mu_b - \mu_a, \qquad
        \mu = \mu_a + \delta\, \frac{n_b}{n}, \qquad
        M_2 = M_{2,a} + M_{2,b} + \delta\delta^\top \frac{n_a n_b}{n}

    with ``M₂ = Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ`` the *centred scatter* (no division by the count). Exact
    in exact arithmetic and stable in floating point: no ``E[x²] − E[x]²`` cancellation, so a
    mean offset of 1e4 costs nothing. ``m2`` of the same shape as ``mean`` is a per-feature
    scatter (``δ²`` instead of ``δδᵀ``); one more trailing dimension makes it a scatter matrix.
    ``count_a = 0`` (``mean_a``/``m2_a`` may be ``None``) returns the second set unchanged.

    Args:
        count_a, mean_a, m2_a: count, mean ``(..., D)`` and scatter of the first set.
        count_b, mean_b, m2_b: the same for the second set.

    Returns:
        ``(n, mean, m2)`` of the union; the biased covariance is ``m2 / n``.

    Shape:
        ``mean``: ``(..., D)``; ``m2``: ``(..., D)`` or ``(..., D, D)``.

    Example:
        >>> x = torch.randn(10, 3, dtype=torch.float64) + 1e4
        >>> def scatter(z):
        ...     zc = z - z.mean(0)
        ...     return z.shape[0], z.mean(0), zc.T @ zc
        >>> n, mean, m2 = merge_moments(*scatter(x[:3]), *scatter(x[3:]))
        >>> n, torch.allclose(mean, x.mean(0)), torch.allclose(m2 / n, torch.cov(x.T, correction=0))
        (10, True, True)
    """
    if count_a == 0 or mean_a is None or m2_a is None:
        return count_b, mean_b, m2_b
    total = count_a + count_b
    delta = mean_b - mean_a
    m2 = scatter_about(m2_a + m2_b, mean_b, count_a * count_b / total, mean_a)
    return total, mean_a + delta * (count_b / total), m2


class MomentPool:
    """Running pooled moments in float64 over batches of ``m_b`` values each (Chan et al.'s
    parallel merge, :func:`merge_moments`): means and unbiased variances / covariances combine
    exactly; any other statistic is averaged with weights ``m_b``.

    Used by :func:`normkit.apply.recalibrate`: ``add(stats, m)`` takes one batch's ``{"mean":
    (C,), "var": (C,) or "cov": (G, d, d), ...}`` (unbiased ``var``/``cov``, a smaller last
    covariance group zero-padded) and ``result()`` returns the pooled dict.

    Example:
        >>> x = torch.randn(12, 3, dtype=torch.float64)
        >>> pool = MomentPool()
        >>> for part in (x[:5], x[5:]):
        ...     pool.add({"mean": part.mean(0), "var": part.var(0)}, part.shape[0])
        >>> torch.allclose(pool.result()["var"], x.var(0))
        True
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: dict[str, Tensor] = {}
        self.avg: dict[str, Tensor] = {}

    @staticmethod
    def _blocks(mean: Tensor, t: Tensor, key: str) -> Tensor:
        """``mean`` laid out like the statistic ``t``: ``t``'s shape for ``var``, zero-padded
        ``(G, d)`` rows for ``cov`` blocks ``(G, d, d)``."""
        if key == "var":
            return mean.reshape(t.shape)
        rows = t.shape[:-1].numel()
        return torch.nn.functional.pad(mean.reshape(-1), (0, rows - mean.numel())).reshape(t.shape[:-1])

    def add(self, stats: dict[str, Tensor], m: int) -> None:
        """Merge one batch of ``m`` values: its ``mean``, unbiased ``var``/``cov`` and any other
        statistic (averaged with weight ``m``)."""
        stats = {k: t.detach().to(torch.float64, copy=True) for k, t in stats.items()}  # not views
        n, total = self.n, self.n + m
        mean_b = stats.get("mean")
        for k, t in stats.items():
            if k == "mean":
                continue
            if k in ("var", "cov") and mean_b is not None:
                own = t * (m - 1) if m > 1 else torch.zeros_like(t)
                if self.mean is None:
                    self.m2[k] = own
                    continue
                _, _, self.m2[k] = merge_moments(n, self._blocks(self.mean, t, k), self.m2[k],
                                                 m, self._blocks(mean_b, t, k), own)
            else:
                prev = self.avg.get(k)
                self.avg[k] = t if prev is None else prev + (t - prev) * (m / total)
        if mean_b is not None:
            self.mean = mean_b if self.mean is None else self.mean + (mean_b - self.mean) * (m / total)
        self.n = total

    def result(self) -> dict[str, Tensor]:
        """The pooled statistics: the mean, unbiased ``var``/``cov`` and the averaged others."""
        out = dict(self.avg)
        if self.mean is not None:
            out["mean"] = self.mean
        for k, m2 in self.m2.items():
            out[k] = m2 / (self.n - 1) if self.n > 1 else m2
        return out
