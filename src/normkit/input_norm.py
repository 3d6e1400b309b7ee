r"""Input normalization fitted once on a data set: centring, standardization, PCA/ZCA/Cholesky
whitening (book ch. 2).

A linear model's Hessian is :math:`\tilde X^\top \tilde X / n`, best conditioned when the inputs are
centred, decorrelated and scaled; :class:`InputNormalizer` applies that preprocessing as a
``nn.Module`` (a model's first layer) with statistics estimated on the data, not on the batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import ConfigError, NormkitError, ShapeError
from .functional.statistics import merge_moments
from .functional.whiten import (
    batch_moments,
    cholesky_matrix,
    coloring_matrix,
    pca_matrix,
    zca_matrix,
)

__all__ = ["InputNormalizer", "NotFittedError"]

InputMethod = Literal["center", "standardize", "pca", "zca", "cholesky"]
_METHODS = ("center", "standardize", "pca", "zca", "cholesky")


class NotFittedError(NormkitError):
    """An :class:`InputNormalizer` was used before ``fit``/``partial_fit`` (or loading a state)."""


class InputNormalizer(nn.Module):
    r"""Normalize inputs with statistics fitted on a data set: ``y = W (x − μ)``.

    .. math::

        \mu = \tfrac1n \textstyle\sum_i x_i, \qquad
        \Sigma = \tfrac1n \textstyle\sum_i (x_i - \mu)(x_i - \mu)^\top \ \text{(biased)}

    =============== ================================================ ==========================
    ``method``      ``W``                                            output features
    =============== ================================================ ==========================
    ``center``      ``I``                                            ``D`` (input shape kept)
    ``standardize`` ``diag(σ² + ε)^{-1/2}``                           ``D`` (input shape kept)
    ``zca``         ``U (Λ + ε)^{-1/2} Uᵀ``  (``Σ = U Λ Uᵀ``)         ``D`` (input shape kept)
    ``pca``         ``(Λ + ε)^{-1/2} Uᵀ``, rows by decreasing λ       ``k`` (flat ``(N, k)``)
    ``cholesky``    ``L^{-1}``, ``Σ + εI = L Lᵀ``                      ``D`` (input shape kept)
    =============== ================================================ ==========================

    The matrices come from :mod:`normkit.functional.whiten` (``zca_matrix``, ``pca_matrix``,
    ``cholesky_matrix``, ``coloring_matrix``). ``rank=k`` (``pca``/``zca`` only) keeps the top-``k``
    principal components: PCA outputs their ``k`` whitened coordinates; ZCA projects onto them and
    rotates back, ``W = U_k (Λ_k + ε)^{-1/2} U_kᵀ`` (``D`` outputs in a ``k``-dimensional subspace).
    ``inverse_transform`` applies ``x = W⁺ y + μ``: the exact inverse at full rank
    (``(Σ + εI)^{1/2}`` for ZCA, ``U (Λ+ε)^{1/2}`` for PCA, ``L`` for Cholesky), and for
    ``rank=k`` the Moore–Penrose pseudo-inverse ``U_k (Λ_k + ε)^{1/2}`` (PCA; ZCA adds ``U_kᵀ``
    on the right), whose output is the best rank-``k`` reconstruction ``μ + U_k U_kᵀ (x − μ)``.

    *Inputs* have shape ``(N, *feature_shape)``: every non-batch dimension is a feature, flattened
    in row-major order (``D = ∏ feature_shape``), so an image ``(N, C, H, W)`` is whitened over
    all ``C·H·W`` pixels. Shape-preserving methods reshape the output back to the input's shape.

    *Fitting.* ``fit(x)`` on one tensor, ``fit(loader)`` on an iterable of tensors or of
    ``(x, y, ...)`` tuples/lists, ``partial_fit(x)`` to add one batch and refresh ``W`` (streaming).
    Batches are merged exactly, count-weighted, with Chan et al.'s formula
    (:func:`~normkit.functional.statistics.merge_moments`) on the centred scatter
    ``M₂ = Σ (x − μ)(x − μ)ᵀ`` in float64, so streaming in any batch sizes gives the fit at once
    to rounding. ``fit`` restarts from scratch; ``partial_fit`` continues (also after loading).

    *Regularisation.* ``ε`` is added to the covariance's eigenvalues (``Σ + εI``; the variances
    for ``standardize``). When the covariance is singular or nearly so — fewer samples than
    features (rank ``≤ n − 1 < D``), a constant feature, collinear features: any eigenvalue (or,
    for ``standardize``, variance) ``≤ ε`` — the result stays finite (such directions are scaled
    by ``(λ + ε)^{-1/2} ≤ ε^{-1/2}``; a direction without variance maps to 0) and a
    ``UserWarning`` names the cause and ``ε``. ``center`` never warns. ``ε`` is absolute: choose
    it small against the data's variances (the default ``1e-5`` suits unit-scale data; use e.g.
    ``1e-12`` for near-exact whitening of well-conditioned float64 data).

    *State.* Buffers ``count`` (int64), ``mean`` (``D``) and ``scatter`` (``(D, D)``, the diagonal
    ``(D,)`` for center/standardize) are float64 statistics; ``matrix``/``inverse_matrix`` (in
    ``dtype``) and ``feature_shape`` (int64) define the transform, so ``state_dict`` round-trips
    into a module built with the same arguments (or with ``num_features=None``, which takes the
    sizes from the state). ``.to(dtype)`` casts the float64 statistics too — cast before fitting
    only if you mean it.

    Args:
        num_features: ``D``; ``None`` to infer it at the first fit (or state load).
        method: one of ``center``, ``standardize``, ``pca``, ``zca``, ``cholesky``. Default
            ``zca``.
        eps: ``ε > 0`` added to the covariance eigenvalues / variances. Default ``1e-5``.
        rank: keep the top-``rank`` principal components (``pca``/``zca``); ``None``: all.
        device, dtype: of the transform buffers (default dtype: torch's default).

    Shape:
        Input ``(N, *feature_shape)`` with ``∏ feature_shape = D``; output the same shape, except
        ``pca``: ``(N, k)`` with ``k = rank or D``. ``inverse_transform`` maps back to
        ``(N, *feature_shape)`` of the fit.

    Raises:
        ConfigError: unknown ``method``, ``eps ≤ 0``, ``rank`` out of ``1..D`` or given to a
            method without principal components.
        ShapeError: input without a batch dimension, or with a feature count other than ``D``.
        NotFittedError: ``transform``/``inverse_transform`` before any fit.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        ...     [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.3, 0.2]], dtype=torch.float64)
        >>> norm = InputNormalizer(3, method="zca", eps=1e-12, dtype=torch.float64).fit(x)
        >>> y = norm(x)
        >>> torch.allclose(torch.cov(y.T, correction=0), torch.eye(3, dtype=torch.float64))
        True
        >>> torch.allclose(norm.inverse_transform(y), x)
        True
        >>> model = nn.Sequential(norm, nn.Linear(3, 2, dtype=torch.float64))   # a first layer
        >>> model(x).shape
        torch.Size([500, 2])
    """

    count: Tensor
    mean: Tensor
    scatter: Tensor
    matrix: Tensor
    inverse_matrix: Tensor
    feature_shape: Tensor

    def __init__(
        self,
        num_features: int | None = None,
        *,
        method: InputMethod = "zca",
        eps: float = 1e-5,
        rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if method not in _METHODS:
            raise ConfigError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"eps must be a number > 0 (it regularises singular covariances), "
                              f"got {eps!r}; use e.g. 1e-12 for near-exact whitening")
        if rank is not None:
            if method not in ("pca", "zca"):
                raise ConfigError(f"rank={rank} needs principal components: use method='pca' "
                                  f"or 'zca', not {method!r}")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank must be a positive int (or None for all components), "
                                  f"got {rank!r}")
        if num_features is not None and (isinstance(num_features, bool)
                                         or not isinstance(num_features, int) or num_features < 1):
            raise ConfigError(f"num_features must be a positive int or None, got {num_features!r}")
        if num_features is not None and rank is not None and rank > num_features:
            raise ConfigError(f"rank={rank} exceeds the number of features D={num_features}; "
                              f"pass rank <= {num_features} or None")
        self.method: InputMethod = method
        self.eps = float(eps)
        self.rank = rank
        self.num_features = num_features
        self._factory: dict[str, Any] = {"device": device,
                                         "dtype": dtype or torch.get_default_dtype()}
        self._fitted = False
        self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("feature_shape",
                             torch.tensor([] if num_features is None else [num_features],
                                          dtype=torch.int64, device=device))
        self._allocate(num_features or 0)

    # ------------------------------------------------------------------------------ state
    @property
    def out_features(self) -> int | None:
        """Features of the transform's output: ``rank or D`` for ``pca``, else ``D``."""
        if self.num_features is None:
            return None
        return (self.rank or self.num_features) if self.method == "pca" else self.num_features

    def _shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        k = (self.rank or d) if self.method == "pca" else d
        diag = self.method in ("center", "standardize")
        return {"mean": (d,), "scatter": (d,) if diag else (d, d),
                "matrix": (0,) if self.method == "center" else (d,) if diag else (k, d),
                "inverse_matrix": (0,) if self.method == "center" else (d,) if diag else (d, k)}

    def _allocate(self, d: int) -> None:
        device = self._factory["device"]
        for name, shape in self._shapes(d).items():
            dtype = torch.float64 if name in ("mean", "scatter") else self._factory["dtype"]
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    def _set_features(self, d: int) -> None:
        if self.rank is not None and self.rank > d:
            raise ConfigError(f"rank={self.rank} exceeds the number of features D={d}; "
                              f"pass rank <= {d} or None")
        if self.num_features is None:
            self.num_features = d
            self._allocate(d)
        elif d != self.num_features:
            raise ShapeError(f"{type(self).__name__} expects {self.num_features} features per "
                             f"sample, got {d}; build it with num_features={d} or pass inputs "
                             f"whose non-batch dimensions multiply to {self.num_features}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        mean = state_dict.get(prefix + "mean")
        if self.num_features is None and isinstance(mean, Tensor) and mean.numel() > 0:
            self._set_features(mean.numel())
        shape = state_dict.get(prefix + "feature_shape")
        if isinstance(shape, Tensor) and shape.shape != self.feature_shape.shape:
            self.feature_shape = torch.empty_like(shape, device=self.count.device)  # metadata
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = int(self.count) > 0

    def extra_repr(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return f"{self.num_features}, method={self.method!r}, eps={self.eps}{rank}"

    # -------------------------------------------------------------------------------- fit
    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{type(self).__name__} expects inputs (N, *feature_shape) with a "
                             f"batch dimension, got {shape}; add one with x.unsqueeze(0)")
        return x.reshape(x.shape[0], -1)

    @torch.no_grad()
    def _accumulate(self, x: Tensor) -> None:
        flat = self._flat(x)
        self._set_features(flat.shape[1])
        if int(self.count) == 0:  # the first batch fixes the feature shape
            self.feature_shape = torch.tensor(x.shape[1:], dtype=torch.int64,
                                              device=self.count.device)
        m = flat.shape[0]
        if m == 0:
            return
        xf = flat.detach().to(device=self.mean.device, dtype=torch.float64)
        mean_b, cov_b, _ = batch_moments(xf.T[None, None], shared=False)  # (1,1,D,1), (1,1,D,D)
        scatter_b = cov_b[0, 0] * m
        if self.scatter.dim() == 1:
            scatter_b = scatter_b.diagonal().clone()
        n = int(self.count)
        total, mean, scatter = merge_moments(n, self.mean, self.scatter, m, mean_b[0, 0, :, 0],
                                             scatter_b)
        self.count.fill_(total)
        self.mean.copy_(mean)
        self.scatter.copy_(scatter)

    def partial_fit(self, x: Tensor) -> InputNormalizer:
        """Add the batch ``x`` of shape ``(N, *feature_shape)`` to the statistics and refresh the
        transform. Returns ``self``."""
        self._accumulate(x)
        self._finalize()
        return self

    def fit(self, data: Tensor | Iterable[Any]) -> InputNormalizer:
        """Fit from scratch on a tensor ``(N, *feature_shape)`` or on an iterable of tensors or of
        ``(x, y, ...)`` tuples/lists (a ``DataLoader``); the transform is computed once, at the
        end. Returns ``self``."""
        self.count.zero_()
        self.mean.zero_()
        self.scatter.zero_()
        self._fitted = False
        batches = [data] if isinstance(data, Tensor) else data
        for batch in batches:
            if isinstance(batch, (tuple, list)) and batch:
                batch = batch[0]
            self._accumulate(batch)
        self._finalize()
        return self

    @torch.no_grad()
    def _finalize(self) -> None:
        n, d, eps = int(self.count), self.mean.numel(), self.eps
        if n == 0:
            raise ShapeError(f"{type(self).__name__}.fit got no samples; pass a non-empty tensor "
                             f"(N, *feature_shape) or loader")
        dtype = self._factory["dtype"]
        where = type(self).__name__
        if self.method == "center":
            self._fitted = True
            return
        sigma = self.scatter / n
        if self.method == "standardize":
            small = (sigma <= eps).nonzero().flatten().tolist()
            if small:
                warnings.warn(f"{where}: {len(small)} constant feature(s) {_head(small)} "
                              f"(variance <= eps={eps:g}); regularised as "
                              f"(x - mean)/sqrt(var + eps), so a constant feature maps to 0",
                              UserWarning, stacklevel=3)
            std = (sigma + eps).sqrt()
            self.matrix.copy_(std.reciprocal().to(dtype))
            self.inverse_matrix.copy_(std.to(dtype))
            self._fitted = True
            return
        self._warn_singular(sigma, n, eps)
        s3 = sigma[None]
        if self.method == "cholesky":
            w = cholesky_matrix(s3, eps)[0]
            inv = torch.linalg.solve_triangular(w, torch.eye(d, dtype=w.dtype, device=w.device),
                                                upper=False)
        elif self.method == "zca" and self.rank is None:
            w, inv = zca_matrix(s3, eps)[0], coloring_matrix(s3, eps)[0]
        else:
            p = pca_matrix(s3, eps)[0].flip(0)[: self.rank or d]  # rows s_i u_iᵀ, λ descending
            s = p.norm(dim=1)  # s_i = (λ_i + ε)^{-1/2}
            u = (p / s[:, None]).T  # (D, k) orthonormal eigenvectors
            pinv = u / s  # U_k (Λ_k + ε)^{1/2}
            w, inv = (p, pinv) if self.method == "pca" else (u @ p, pinv @ u.T)
        self.matrix.copy_(w.to(dtype))
        self.inverse_matrix.copy_(inv.to(dtype))
        self._fitted = True

    def _warn_singular(self, sigma: Tensor, n: int, eps: float) -> None:
        lam = torch.linalg.eigvalsh(sigma)
        small = int((lam <= eps).sum())
        if not small:
            return
        d = sigma.shape[0]
        causes = []
        if n <= d:
            causes.append(f"fewer samples (n={n}) than features (D={d}): rank <= n - 1")
        const = (sigma.diagonal() <= eps).nonzero().flatten().tolist()
        if const:
            causes.append(f"{len(const)} constant feature(s) {_head(const)}")
        if not causes:
            causes.append("collinear features")
        warnings.warn(f"{type(self).__name__}({self.method!r}): the covariance is singular or "
                      f"nearly so ({small} of {d} eigenvalues <= eps={eps:g}; {'; '.join(causes)})"
                      f"; regularised by adding eps to the eigenvalues (Sigma + eps*I), so those "
                      f"directions are scaled by at most eps^-1/2 and a direction without "
                      f"variance maps to 0", UserWarning, stacklevel=4)

    # -------------------------------------------------------------------------- transform
    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__}({self.method!r}) is not fitted: call "
                                 f".fit(x_train) (a tensor or a loader) or .partial_fit(batch) "
                                 f"first, or load a fitted state_dict")

    def transform(self, x: Tensor) -> Tensor:
        """``W (x − μ)`` of ``x`` of shape ``(N, *feature_shape)``, in ``x``'s dtype
        (computed in the buffers' dtype)."""
        self._check_fitted()
        flat = self._flat(x)
        if flat.shape[1] != self.num_features:
            raise ShapeError(f"{type(self).__name__} was fitted on {self.num_features} features, "
                             f"got {flat.shape[1]} (input shape {tuple(x.shape)})")
        work = torch.promote_types(x.dtype, self.matrix.dtype)
        xc = flat.to(work) - self.mean.to(work)
        if self.method == "center":
            y = xc
        elif self.method == "standardize":
            y = xc * self.matrix.to(work)
        else:
            y = xc @ self.matrix.to(work).T
        y = y.to(x.dtype)
        return y if self.method == "pca" else y.reshape(x.shape)

    forward = transform

    def inverse_transform(self, y: Tensor) -> Tensor:
        """``W⁺ y + μ`` (exact inverse at full rank, best reconstruction at ``rank=k``), reshaped
        to ``(N, *feature_shape)`` of the fit."""
        self._check_fitted()
        flat = self._flat(y)
        if flat.shape[1] != self.out_features:
            raise ShapeError(f"inverse_transform expects {self.out_features} features per sample "
                             f"(the transform's output), got {flat.shape[1]} (shape "
                             f"{tuple(y.shape)})")
        work = torch.promote_types(y.dtype, self.matrix.dtype)
        yf = flat.to(work)
        if self.method == "standardize":
            yf = yf * self.inverse_matrix.to(work)
        elif self.method != "center":
            yf = yf @ self.inverse_matrix.to(work).T
        x = (yf + self.mean.to(work)).to(y.dtype)
        return x.reshape(y.shape[0], *self.feature_shape.tolist())


def _head(items: list[int], k: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:k])
    return f"[{shown}{', ...' if len(items) > k else ''}]"

