"""Statistics over a partition: the numerics policy, written once.

Policy (every normkit method follows it):

* Statistics accumulate in at least float32 (float64 stays float64); half and bfloat16 inputs are
  upcast for the reduction only.
* Variance is computed in two passes (the mean, then the mean of squared deviations: stable under
  a mean offset of 1e4 in float32) and is never negative.
* Batch statistics use the **biased** variance (``correction=0``) for normalizing; running
  estimates of the variance store the **unbiased** one (``× m/(m−1)``), as torch's BatchNorm does.
* ``eps`` goes inside the square root: ``x̂ = (x − μ) / √(σ² + ε)``.
* Local (sliding-window) moments subtract a per-sample mean first, so ``E[x²] − E[x]²`` does not
  cancel catastrophically.
* Under ``torch.autocast`` statistics are fitted and applied with autocast off
  (:func:`autocast_off`): a matmul inside them (mode gates, Kalman transitions) would otherwise
  run in bfloat16 / float16. The output keeps the input's dtype, as torch's norm layers do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .partition import stats_dtype

__all__ = [
    "moments",
    "mean_square",
    "mean_abs_deviation",
    "value_range",
    "range_constant",
    "unbiased_variance",
    "ema_update",
    "autocast_off",
    "box_mean",
    "local_moments",
    "merge_moments",
    "MomentPool",
]


def _up(x: Tensor) -> Tensor:
    return x.to(stats_dtype(x))


def moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept as size-1 axes), in ≥ float32.

    Example:
        >>> x = torch.randn(8, 3, 5) + 1e4
        >>> mean, var = moments(x, (0, 2))
        >>> bool((var >= 0).all()), tuple(mean.shape)
        (True, (1, 3, 1))
    """
    # Two passes (mean, then the mean of squared deviations): as stable as Welford under large
    # offsets and, on CPU, several times faster than torch.var_mean over several dimensions.
    xf = _up(x)
    mean = xf.mean(dim=tuple(dims), keepdim=True)
    d = xf - mean
    return mean, (d * d).mean(dim=tuple(dims), keepdim=True)


def mean_square(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``E[x²]`` over ``dims`` (kept), in ≥ float32.

    Computed as ``‖x‖₂²/m`` with ``torch.linalg.vector_norm``: one fused reduction with a cheap
    backward (measured 0.55–0.87× the time of ``(x·x).mean()`` forward+backward on CPU).
    """
    xf = _up(x)
    m = 1
    for d in dims:
        m *= xf.shape[d]
    return torch.linalg.vector_norm(xf, 2, dim=tuple(dims), keepdim=True).square() / max(m, 1)


def mean_abs_deviation(x: Tensor, mean: Tensor, dims: Sequence[int]) -> Tensor:
    """``E|x − μ|`` over ``dims`` (kept), in ≥ float32."""
    return (_up(x) - mean).abs().mean(dim=tuple(dims), keepdim=True)


def value_range(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``max − min`` over ``dims`` (kept), in ≥ float32."""
    xf = _up(x)
    return xf.amax(dim=tuple(dims), keepdim=True) - xf.amin(dim=tuple(dims), keepdim=True)


def range_constant(m: int) -> float:
    """Range-BN's ``C(m) = 1/√(2 ln m)`` (Hoffer et al. 2018), for ``m ≥ 2`` samples."""
    return 1.0 / math.sqrt(2.0 * math.log(m)) if m > 1 else 1.0


def unbiased_variance(var: Tensor, m: int) -> Tensor:
    """``var · m/(m−1)``: the unbiased estimate stored in running buffers (``m`` samples)."""
    return var * (m / (m - 1)) if m > 1 else var


@torch.no_grad()
def ema_update(running: Tensor, batch: Tensor, factor: float | Tensor) -> None:
    """``running ← (1 − factor)·running + factor·batch`` in place (torch's momentum meaning).

    ``factor`` may be a 0-d tensor (the cumulative average's ``1/n`` under ``torch.compile``,
    where reading a buffer as a Python float would be data-dependent); it is rounded to the
    buffer's dtype as a Python float is.
    """
    if isinstance(factor, Tensor):
        factor = factor.to(running.dtype)
    running.lerp_(batch.to(running.dtype), factor)


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """A context with ``torch.autocast`` disabled on ``x``'s device where it is enabled (a no-op
    otherwise): statistics keep the dtypes of the numerics policy (at least float32) instead of
    the autocast dtype that matmul-like ops would take.

    Example:
        >>> import torch
        >>> from normkit.functional.statistics import autocast_off
        >>> a = torch.randn(3, 3)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with autocast_off(a):
        ...         (a @ a).dtype
        torch.float32
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def box_mean(x: Tensor, dims: Sequence[int], windows: Sequence[int], include_pad: bool) -> Tensor:
    """Sliding-window mean of ``x`` over each ``dims[i]`` with window ``windows[i]`` ("same" size).

    The window is centred (``w//2`` before, ``(w−1)//2`` after, like torch's
    ``local_response_norm``). With ``include_pad=True`` positions outside the tensor count as
    zeros (divide by ``w``); otherwise the mean is over the positions that exist. Separable, so it
    works for any number of dimensions; windows over up to three trailing dimensions, all odd,
    take one ``avg_pool`` kernel instead.
    """
    k = len(dims)
    trailing = tuple(dims) == tuple(range(x.dim() - k, x.dim()))
    fits = all(w % 2 == 1 and w <= x.shape[d] for d, w in zip(dims, windows, strict=True))
    if 0 < k <= 3 and trailing and fits:
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
        lead = x.shape[: x.dim() - k]
        flat = x.reshape(-1, 1, *x.shape[x.dim() - k:])
        out = pool(flat, tuple(windows), stride=1, padding=tuple(w // 2 for w in windows),
                   count_include_pad=include_pad)
        return out.reshape(*lead, *out.shape[2:])
    for dim, w in zip(dims, windows, strict=True):
        if w == 1:
            continue
        moved = x.movedim(dim, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        pooled = F.avg_pool1d(F.pad(flat, (w // 2, (w - 1) // 2)), w, stride=1)
        if not include_pad:
            ones = torch.ones(1, 1, shape[-1], dtype=x.dtype, device=x.device)
            pooled = pooled / F.avg_pool1d(F.pad(ones, (w // 2, (w - 1) // 2)), w, stride=1)
        x = pooled.reshape(shape).movedim(-1, dim)
    return x


def local_moments(
    x: Tensor,
    full_dims: Sequence[int],
    window_dims: Sequence[int],
    windows: Sequence[int],
    include_pad: bool,
    *,
    center: bool = True,
) -> tuple[Tensor, Tensor]:
    """Mean and variance (or ``E[x²]`` if ``center=False``) over a sliding window.

    Statistics are averaged fully over ``full_dims`` (kept as size 1) and over a centred window
    along ``window_dims``. ``x`` is shifted by its mean over ``full_dims`` and ``window_dims``
    first, so ``E[x²] − E[x]²`` stays accurate under large offsets; variance is clamped at 0.
    Returns ``(mean, var)``; with ``center=False`` returns ``(zeros, E[x²])``.
    """
    xf = _up(x)
    if center:
        shift = xf.mean(dim=tuple(full_dims) + tuple(window_dims), keepdim=True).detach()
        xs = xf - shift
    else:
        shift, xs = torch.zeros((), dtype=xf.dtype, device=xf.device), xf
    if full_dims:
        m1 = xs.mean(dim=tuple(full_dims), keepdim=True)
        m2 = (xs * xs).mean(dim=tuple(full_dims), keepdim=True)
    else:
        m1, m2 = xs, xs * xs
    m2 = box_mean(m2, window_dims, windows, include_pad)
    if not center:
        return torch.zeros_like(m2), m2
    m1 = box_mean(m1, window_dims, windows, include_pad)
    return m1 + shift, (m2 - m1 * m1).clamp_min(0)


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
    between = delta * delta if m2_b.dim() == delta.dim() else delta[..., :, None] * delta[..., None, :]
    return total, mean_a + delta * (count_b / total), m2_a + m2_b + between * (count_a * count_b / total)


class MomentPool:
    """Running pooled moments in float64 over batches of ``m_b`` values each (Chan et al.'s
    parallel merge, :func:`merge_moments`): means and unbiased variances / covariances combine
    exactly; any other statistic is averaged with weights ``m_b``.

    Used by :func:`normkit.apply.recalibrate`: ``add(stats, m)`` takes one batch's ``{"mean":
    (C,), "var": (C,) or "cov": (G, d, d), ...}`` (unbiased ``var``/``cov``, a smaller last
    covariance group zero-padded) and ``result()`` returns the pooled dict.
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
        out = dict(self.avg)
        if self.mean is not None:
            out["mean"] = self.mean
        for k, m2 in self.m2.items():
            out[k] = m2 / (self.n - 1) if self.n > 1 else m2
        return out
