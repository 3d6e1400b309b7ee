"""NOP — normalization operation: what is done with the statistics of an area?

Each operation splits into ``fit`` (statistics of the area a partition defines) and
``coefficients`` (statistics → ``(scale, shift)`` with ``x̂ = x·scale + shift``). Training fits on
the batch and may track running estimates; evaluation feeds the running estimates to the same
``coefficients``, so train and eval cannot drift apart.

===================  ===========================================  ==================
operation            x̂                                            statistics
===================  ===========================================  ==================
``Standardize()``    (x − μ)/√(σ² + ε)                            mean, var
``Center()``         x − μ                                        mean
``Scale("rms")``     x/√(E[x²] + ε)                               ms
``Scale("l2")``      x/√(Σx² + ε)                                 ms
``L1()``             (x − μ)/(√(π/2)·E|x − μ| + ε)                mean, scale
``Range()``          (x − μ)/((max − min)·C(m) + ε)               mean, scale
``Divisive(...)``    (x − μ)/(k + α·σ²)^β   (``center=False``: x/(k + α·E[x²])^β)  mean, var / ms
===================  ===========================================  ==================

Example:
    >>> import torch, normkit as nk
    >>> x = torch.randn(4, 3, 5)
    >>> y = nk.functional.normalize(x, nap=nk.nap.Layer(), nop=nk.nop.Scale("rms"), eps=1e-6)
    >>> torch.allclose(y, x / (x.pow(2).mean((1, 2), keepdim=True) + 1e-6).sqrt())
    True
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError
from .functional import standardize as Fs
from .functional import statistics as S
from .functional import whiten as W
from .functional.partition import matrix_sizes, matrix_view, unmatrix_view
from .nap import Partition

__all__ = ["Operation", "Standardize", "Center", "Scale", "L1", "Range", "Divisive", "Whiten"]

Stats = dict[str, Tensor]
Coefficients = tuple["Tensor | None", "Tensor | None"]


class Operation(ABC):
    """Base class of normalization operations.

    Attributes:
        stat_names: names of the statistics; running buffers are ``running_<name>``.
        needs_spread: whether a statistic needs more than one sample (variance-like).
        uses_eps: whether ``eps`` enters the formula (then it must be > 0).
    """

    stat_names: tuple[str, ...] = ()
    needs_spread: bool = True
    uses_eps: bool = True

    @abstractmethod
    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        """Statistics of the canonical view ``v`` over ``nap``'s area (≥ float32, kept dims).

        ``eps`` is given for operations whose statistics depend on it (whitening matrices).
        """

    @abstractmethod
    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        """``(scale, shift)`` of ``x̂ = x·scale + shift`` (either may be ``None``)."""

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Running buffers ``running_<name>``: name → (shape, initial value ``"0"``/``"1"``/``"eye"``).

        Raises:
            ConfigError: when the partition's statistics cannot be tracked (they vary with
                position).
        """
        size = nap.stat_size(num_features)
        return {s: ((size,), "1" if s in ("var", "ms", "scale") else "0") for s in self.stat_names}

    def running(self, stats: Stats, m: int) -> Stats:
        """Batch statistics as the values running buffers track, shaped like the buffers.

        The variance is unbiased (``× m/(m−1)``, as torch's BatchNorm); statistics kept per sample
        (``N`` a ``G`` axis, e.g. IN) are averaged over the batch, as torch's InstanceNorm.
        """
        out = {}
        for k, t in stats.items():
            t = S.unbiased_variance(t, m) if k == "var" else t
            out[k] = (t.mean(0) if t.shape[0] > 1 else t[0]).reshape(-1)
        return out

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        """Running buffers viewed as statistics against the canonical view (for evaluation)."""
        shape = nap.stat_view_shape(num_features)
        return {k: t.reshape(shape) for k, t in running.items()}

    def transform(
        self,
        v: Tensor,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        m: int,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        """``y = (v·scale + shift)·weight + bias`` on the canonical view (fused where smaller)."""
        scale, shift = self.coefficients(stats, eps, m)
        return Fs.affine_transform(v, scale, shift, weight, bias)

    def fold(
        self,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Statistics and recovery as one per-channel ``y = x·a + b``: ``(a, b)``, each ``(C,)``.

        Raises:
            ConfigError: when the statistics are not per channel (they depend on the input).
        """
        scale, shift = self.coefficients(stats, eps, 1)
        one = next(t for t in (scale, shift, weight, bias) if t is not None)
        a = torch.ones((), dtype=one.dtype, device=one.device) if scale is None else scale
        b = torch.zeros((), dtype=one.dtype, device=one.device) if shift is None else shift
        if weight is not None:
            a, b = a * weight, b * weight
        if bias is not None:
            b = b + bias
        shape = torch.broadcast_shapes(a.shape, b.shape, *(t.shape for t in (weight, bias) if t is not None))
        if shape[0] != 1 or shape[3] != 1:
            raise ConfigError("statistics vary with the sample or position; nothing to fold")
        return a.expand(shape).reshape(-1), b.expand(shape).reshape(-1)

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in fields)})"


@dataclass(frozen=True, repr=False)
class Standardize(Operation):
    """Standardization ``x̂ = (x − μ)/√(σ² + ε)`` (biased batch variance)."""

    stat_names = ("mean", "var")

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        mean, var = nap.moments(v, spatial)
        return {"mean": mean, "var": var}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mean"], stats["var"], eps)


@dataclass(frozen=True, repr=False)
class Center(Operation):
    """Centering only ``x̂ = x − μ`` (mean-only BN, Salimans & Kingma 2016)."""

    stat_names = ("mean",)
    needs_spread = False
    uses_eps = False

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        return {"mean": nap.moments(v, spatial)[0]}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.center_coefficients(stats["mean"])


@dataclass(frozen=True, repr=False)
class Scale(Operation):
    """Scaling only by the quadratic mean: ``"rms"`` ``x/√(E[x²] + ε)`` (RMSNorm) or ``"l2"``
    ``x/√(Σx² + ε)`` (ScaleNorm's ``x/‖x‖``)."""

    kind: Literal["rms", "l2"] = "rms"

    stat_names = ("ms",)
    needs_spread = False

    def __post_init__(self) -> None:
        if self.kind not in ("rms", "l2"):
            raise ConfigError(f"Scale kind must be 'rms' or 'l2', got {self.kind!r}")

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        return {"ms": nap.mean_square(v, spatial)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        ms = stats["ms"] if self.kind == "rms" else stats["ms"] * m
        return Fs.rms_coefficients(ms, eps)


@dataclass(frozen=True, repr=False)
class L1(Operation):
    """L1 standardization ``x̂ = (x − μ)/(√(π/2)·E|x − μ| + ε)`` (Wu et al. 2018).

    For Gaussian ``x``, ``√(π/2)·E|x − μ| = σ``, so it matches BN in distribution while avoiding
    squares (cheaper, more stable in low precision).
    """

    stat_names = ("mean", "scale")

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        mean = nap.moments(v, spatial)[0]
        mad = nap.mean_abs_deviation(v, mean, spatial)
        return {"mean": mean, "scale": mad * math.sqrt(math.pi / 2)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.inverse_scale_coefficients(stats["scale"], eps, stats["mean"])


@dataclass(frozen=True, repr=False)
class Range(Operation):
    """Range (L∞) standardization ``x̂ = (x − μ)/((max − min)·C(m) + ε)``, ``C(m) = 1/√(2 ln m)``
    (Hoffer et al. 2018)."""

    stat_names = ("mean", "scale")

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        mean = nap.moments(v, spatial)[0]
        c = S.range_constant(nap.count(v, spatial))
        return {"mean": mean, "scale": nap.value_range(v, spatial) * c}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.inverse_scale_coefficients(stats["scale"], eps, stats["mean"])


@dataclass(frozen=True, repr=False)
class Divisive(Operation):
    """Divisive normalization ``x̂ = (x − μ)/(k + α·σ²)^β`` over the area.

    With ``center=False`` the second moment is ``E[x²]`` and nothing is subtracted, which over a
    window of ``n`` neighbouring channels is Krizhevsky's local response normalization
    ``x/(k + α/n·Σx²)^β`` (torch's ``local_response_norm``). ``eps`` is unused: ``k`` plays its
    role and must be > 0 when ``β > 0``.
    """

    k: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    center: bool = True

    uses_eps = False

    def __post_init__(self) -> None:
        if self.k < 0 or self.alpha < 0 or (self.k == 0 and self.beta > 0):
            raise ConfigError(
                f"Divisive needs k > 0 and alpha >= 0 (got k={self.k}, alpha={self.alpha}); "
                f"k is the constant that keeps the denominator away from 0"
            )

    @property
    def stat_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mean", "var") if self.center else ("ms",)

    @property
    def needs_spread(self) -> bool:  # type: ignore[override]
        return self.center

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        if self.center:
            mean, var = nap.moments(v, spatial)
            return {"mean": mean, "var": var}
        return {"ms": nap.mean_square(v, spatial)}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        second = stats["var"] if self.center else stats["ms"]
        return Fs.divisive_coefficients(stats.get("mean"), second, self.k, self.alpha, self.beta)


@dataclass(frozen=True, repr=False)
class Whiten(Operation):
    r"""Whitening ``x̂ = W (x − μ)`` with ``W (Σ + εI) Wᵀ = I``: decorrelates the ``D`` features.

    The partition's ``D`` axes are whitened jointly (``Batch(group_size=d)``: groups of ``d``
    channels over the batch; ``Group(g)``: the ``g`` group-vectors of each sample;
    ``Instance(group_size=d)``: groups of channels over positions). ``D = 1`` is standardization.

    Args:
        method: ``"zca"`` (``UΛ^{-1/2}Uᵀ``), ``"pca"`` (``Λ^{-1/2}Uᵀ``), ``"cholesky"``
            (``L^{-1}``) or ``"newton"`` (IterNorm's Newton–Schulz, ``iterations`` steps); see
            :mod:`normkit.functional.whiten`.
        iterations: Newton–Schulz steps ``T`` (``method="newton"`` only).
        estimate: what running estimates track for evaluation: ``"matrix"`` (the whitening
            matrix, the original DBN/IterNorm) or ``"covariance"`` (``Σ``, the whitening matrix
            recomputed from it at evaluation: the book's "Sigma" variants).
    """

    method: Literal["zca", "pca", "cholesky", "newton"] = "zca"
    iterations: int = 5
    estimate: Literal["matrix", "covariance"] = "matrix"

    def __post_init__(self) -> None:
        if self.method not in ("zca", "pca", "cholesky", "newton"):
            raise ConfigError(
                f"whitening method must be 'zca', 'pca', 'cholesky' or 'newton', got {self.method!r}"
            )
        if self.estimate not in ("matrix", "covariance"):
            raise ConfigError(f"estimate must be 'matrix' or 'covariance', got {self.estimate!r}")
        if not isinstance(self.iterations, int) or not 0 < self.iterations <= W.MAX_ITERATIONS:
            raise ConfigError(
                f"iterations must be an int in [1, {W.MAX_ITERATIONS}], got {self.iterations!r}"
            )

    @property
    def stat_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mean", "matrix") if self.estimate == "matrix" else ("mean", "cov")

    def _matrix(self, cov: Tensor, eps: float) -> Tensor:
        flat = cov.reshape(-1, *cov.shape[-2:])
        w = W.whitening_matrix(flat, self.method, eps=eps, iterations=self.iterations)
        return w.reshape(cov.shape)

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        gc, d = matrix_sizes(nap.groups(num_features), nap.roles)
        return {"mean": ((gc * d,), "0"), self.stat_names[1]: ((gc, d, d), "eye")}

    def fit(self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0) -> Stats:
        mat = matrix_view(v, nap.roles)
        mat = mat.to(torch.promote_types(mat.dtype, torch.float32))
        mean = mat.mean(-1, keepdim=True)
        cov = W.covariance((mat - mean).flatten(0, 1)).reshape(*mat.shape[:2], *([mat.shape[2]] * 2))
        return {"mean": mean, "cov": cov, "matrix": self._matrix(cov, eps)}

    def running(self, stats: Stats, m: int) -> Stats:
        mean = stats["mean"].mean(0).reshape(-1)
        if self.estimate == "covariance":
            return {"mean": mean, "cov": S.unbiased_variance(stats["cov"].mean(0), m)}
        return {"mean": mean, "matrix": stats["matrix"].mean(0)}

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        gc, d = matrix_sizes(nap.groups(num_features), nap.roles)
        out = {"mean": running["mean"].reshape(1, gc, d, 1)}
        key = self.stat_names[1]
        return {**out, key: running[key].unsqueeze(0)}

    def whitening(self, stats: Stats, eps: float) -> Tensor:
        """The whitening matrix ``(Gn, Gc, D, D)`` of fitted or running statistics (from the
        running covariance when that is what is tracked)."""
        if "matrix" in stats:
            return stats["matrix"]
        return self._matrix(stats["cov"], eps)

    def transform(
        self,
        v: Tensor,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        m: int,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        mat = matrix_view(v, nap.roles)
        w = self.whitening(stats, eps)
        folded = self._fold(w, stats["mean"], weight, bias, nap)
        if folded is not None:  # one matmul: y = (γ ⊙ W) x + (β − (γ ⊙ W) μ)
            lead = mat.shape[:2]
            m_, b_ = (t.expand(*lead, *t.shape[2:]).flatten(0, 1) for t in folded)
            out = torch.baddbmm(b_, m_, mat.to(w.dtype).flatten(0, 1))
            return unmatrix_view(out.reshape(mat.shape), v.shape, nap.roles)
        out = torch.matmul(w, mat.to(w.dtype) - stats["mean"])
        out = unmatrix_view(out, v.shape, nap.roles)
        return Fs.affine_transform(out, None, None, weight, bias)

    @staticmethod
    def _fold(
        w: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None, nap: Partition
    ) -> tuple[Tensor, Tensor] | None:
        """``(γ ⊙ W, β − (γ ⊙ W) μ)`` in the matrix layout, or ``None`` when the recovery varies
        along a sample axis (e.g. group whitening's per-channel γ) and cannot be folded."""
        rows = [None if t is None else matrix_view(t, nap.roles) for t in (weight, bias)]
        if any(r is not None and r.shape[-1] != 1 for r in rows):
            return None
        g, b = rows
        mat = w if g is None else w * g.to(w.dtype)
        shift = -torch.matmul(mat, mean)
        return mat, (shift if b is None else shift + b.to(w.dtype))

    def fold(
        self,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """``(M, b)`` with ``y = M x + b`` per group: ``M`` of shape ``(Gc, D, D)``, ``b`` ``(C,)``."""
        folded = self._fold(self.whitening(stats, eps), stats["mean"], weight, bias, nap)
        if folded is None:
            raise ConfigError(f"the recovery of {nap!r} varies within a whitening group; cannot fold")
        return folded[0][0], folded[1][0].reshape(-1)

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        raise ConfigError("whitening is a matrix transform; use transform() or fold()")
