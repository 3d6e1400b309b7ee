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

from ._estimator import EstimatorAPI, deprecated_alias, is_array, to_numpy, to_tensor
from .errors import ConfigError, NormkitError, ShapeError
from .functional.merging import merge_moments
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


# renamed buffers (version 2): the old names stay as deprecated aliases and load from checkpoints
_RENAMED = {"count": "n_samples_seen_", "mean": "mean_", "scatter": "scatter_",
            "matrix": "matrix_", "inverse_matrix": "inverse_matrix_",
            "feature_shape": "feature_shape_"}


class InputNormalizer(EstimatorAPI, nn.Module):
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
    (:func:`~normkit.functional.merging.merge_moments`) on the centred scatter
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

    *State.* Buffers ``n_samples_seen_`` (int64), ``mean_`` (``D``) and ``scatter_`` (``(D, D)``,
    the diagonal ``(D,)`` for center/standardize) are float64 statistics; ``matrix_`` /
    ``inverse_matrix_`` (in ``dtype``) and ``feature_shape_`` (int64) define the transform, so
    ``state_dict`` round-trips into a module built with the same arguments (or with
    ``num_features=None``, which takes the sizes from the state). ``.to(dtype)`` casts the float64
    statistics too — cast before fitting only if you mean it. The names without the trailing
    underscore (``count``, ``mean``, ``scatter``, ``matrix``, ``inverse_matrix``,
    ``feature_shape``; version 1) are deprecated aliases, and checkpoints with them still load.

    *scikit-learn conventions* (without importing it): numpy (or any ``__array__``) input gives
    numpy output, tensors give tensors (integer data becomes float64); ``fit(X, y=None)``,
    ``fit_transform``; ``get_params``/``set_params`` over the constructor arguments, stored
    unchanged (``sklearn.base.clone`` and ``Pipeline`` work; ``set_params`` drops the fit);
    fitted attributes end in ``_``: ``n_features_in_`` (set by the fit), ``mean_``, ``scale_``
    (``standardize``: ``√(σ² + ε)``), ``components_`` (``pca``: the unit principal axes, rows by
    decreasing variance), ``n_samples_seen_``; :class:`NotFittedError` before a fit.

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
        ShapeError: input without a batch dimension, with a feature count other than ``D``, or
            neither a tensor nor an array (nor, for ``fit``, a loader).
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
        >>> std = InputNormalizer(method="standardize").fit_transform(x.numpy())  # numpy in and out
        >>> type(std).__name__, std.shape
        ('ndarray', (500, 3))
    """

    _version = 2  # 2: fitted buffers renamed with a trailing underscore
    _PARAMS = ("num_features", "method", "eps", "rank", "device", "dtype")
    n_samples_seen_: Tensor
    mean_: Tensor
    scatter_: Tensor
    matrix_: Tensor
    inverse_matrix_: Tensor
    feature_shape_: Tensor
    count = deprecated_alias("count", "n_samples_seen_")
    mean = deprecated_alias("mean", "mean_")
    scatter = deprecated_alias("scatter", "scatter_")
    matrix = deprecated_alias("matrix", "matrix_")
    inverse_matrix = deprecated_alias("inverse_matrix", "inverse_matrix_")
    feature_shape = deprecated_alias("feature_shape", "feature_shape_")

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
        self._validate_params(num_features=num_features, method=method, eps=eps, rank=rank,
                              device=device, dtype=dtype)
        # the constructor's arguments, unchanged (scikit-learn's clone contract: get_params)
        self.num_features = num_features
        self.method: InputMethod = method
        self.eps = eps
        self.rank = rank
        self.device = device
        self.dtype = dtype
        self._configure()

    def _validate_params(self, *, num_features: int | None, method: str, eps: float,
                         rank: int | None, **_: Any) -> None:
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

    def _configure(self) -> None:
        """The unfitted state for the constructor arguments (also after ``set_params``)."""
        self._d: int | None = self.num_features  # D, known from the arguments or the first fit
        self._factory: dict[str, Any] = {"device": self.device,
                                         "dtype": self.dtype or torch.get_default_dtype()}
        self._fitted = False
        self.__dict__.pop("n_features_in_", None)
        device = self.device
        self.register_buffer("n_samples_seen_", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("feature_shape_",
                             torch.tensor([] if self._d is None else [self._d],
                                          dtype=torch.int64, device=device))
        self._allocate(self._d or 0)

    # ------------------------------------------------------------------------------ state
    @property
    def out_features(self) -> int | None:
        """Features of the transform's output: ``rank or D`` for ``pca``, else ``D``."""
        if self._d is None:
            return None
        return (self.rank or self._d) if self.method == "pca" else self._d

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
            self.register_buffer(name + "_", torch.zeros(shape, dtype=dtype, device=device))

    def _set_features(self, d: int) -> None:
        if self.rank is not None and self.rank > d:
            raise ConfigError(f"rank={self.rank} exceeds the number of features D={d}; "
                              f"pass rank <= {d} or None")
        if self._d is None:
            self._d = d
            self._allocate(d)
        elif d != self._d:
            raise ShapeError(f"{type(self).__name__} expects {self._d} features per "
                             f"sample, got {d}; build it with num_features={d} or pass inputs "
                             f"whose non-batch dimensions multiply to {self._d}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        for old, new in _RENAMED.items():  # version-1 checkpoints
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        mean = state_dict.get(prefix + "mean_")
        if self._d is None and isinstance(mean, Tensor) and mean.numel() > 0:
            self._set_features(mean.numel())
        shape = state_dict.get(prefix + "feature_shape_")
        if isinstance(shape, Tensor) and shape.shape != self.feature_shape_.shape:
            self.feature_shape_ = torch.empty_like(shape, device=self.n_samples_seen_.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = int(self.n_samples_seen_) > 0
        if self._fitted:
            self.n_features_in_ = self._d

    def extra_repr(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return f"{self._d}, method={self.method!r}, eps={self.eps}{rank}"

    def __sklearn_is_fitted__(self) -> bool:
        """scikit-learn's ``check_is_fitted`` protocol."""
        return self._fitted

    @property
    def scale_(self) -> Tensor:
        """``standardize``: the per-feature scale ``√(σ² + ε)`` (``(D,)``), scikit-learn's
        ``StandardScaler.scale_``."""
        self._check_fitted()
        if self.method != "standardize":
            raise ConfigError(f"scale_ is the per-feature scale of method='standardize'; this "
                              f"normalizer uses method={self.method!r} (see matrix_)")
        return self.inverse_matrix_

    @property
    def components_(self) -> Tensor:
        """``pca``: the unit principal axes, ``(k, D)`` rows by decreasing variance,
        scikit-learn's ``PCA.components_`` (the transform's rows are them divided by
        ``√(λ + ε)``)."""
        self._check_fitted()
        if self.method != "pca":
            raise ConfigError(f"components_ are the principal axes of method='pca'; this "
                              f"normalizer uses method={self.method!r} (see matrix_)")
        m = self.matrix_
        return m / torch.linalg.vector_norm(m, dim=1, keepdim=True)

    # -------------------------------------------------------------------------------- fit
    def _flat(self, x: Tensor, array: bool = False) -> Tensor:
        if not isinstance(x, Tensor):
            raise ShapeError(f"{type(self).__name__} expects a torch.Tensor or a numpy array "
                            f"(N, *feature_shape), got {type(x).__name__}")
        if x.dim() < 2:
            fix = ("reshape it with x.reshape(-1, 1) (one feature) or x.reshape(1, -1) (one "
                   "sample)" if array else "add one with x.unsqueeze(0)")
            what = "array" if array else "tensor"
            raise ShapeError(f"{type(self).__name__} expects inputs (N, *feature_shape) with a "
                             f"batch dimension, got a {x.dim()}-D {what} of shape "
                             f"{tuple(x.shape)}; {fix}")
        return x.reshape(x.shape[0], -1)

    def _input(self, x: Any) -> tuple[Tensor, bool]:
        """``(tensor, was an array)``: array-likes are converted onto the buffers' device."""
        if is_array(x):
            return to_tensor(x, self.mean_.device), True
        return x, False

    @torch.no_grad()
    def _accumulate(self, x: Tensor, array: bool = False) -> None:
        flat = self._flat(x, array)
        self._set_features(flat.shape[1])
        if int(self.n_samples_seen_) == 0:  # the first batch fixes the feature shape
            self.feature_shape_ = torch.tensor(x.shape[1:], dtype=torch.int64,
                                               device=self.n_samples_seen_.device)
        m = flat.shape[0]
        if m == 0:
            return
        xf = flat.detach().to(device=self.mean_.device, dtype=torch.float64)
        mean_b, cov_b, _ = batch_moments(xf.T[None, None], shared=False)  # (1,1,D,1), (1,1,D,D)
        scatter_b = cov_b[0, 0] * m
        if self.scatter_.dim() == 1:
            scatter_b = scatter_b.diagonal().clone()
        n = int(self.n_samples_seen_)
        total, mean, scatter = merge_moments(n, self.mean_, self.scatter_, m,
                                             mean_b[0, 0, :, 0], scatter_b)
        self.n_samples_seen_.fill_(total)
        self.mean_.copy_(mean)
        self.scatter_.copy_(scatter)

    def partial_fit(self, x: Tensor | Any, y: Any = None) -> InputNormalizer:
        """Add the batch ``x`` of shape ``(N, *feature_shape)`` (a tensor or an array) to the
        statistics and refresh the transform (``y`` is ignored). Returns ``self``."""
        self._accumulate(*self._input(x))
        self._finalize()
        return self

    def fit(self, data: Tensor | Any | Iterable[Any], y: Any = None) -> InputNormalizer:
        """Fit from scratch on a tensor or array ``(N, *feature_shape)`` or on an iterable of
        tensors or of ``(x, y, ...)`` tuples/lists (a ``DataLoader``); the transform is computed
        once, at the end. ``y`` is ignored (scikit-learn's signature). With
        ``num_features=None`` the feature count is inferred again. Returns ``self``."""
        if self.num_features is None and self._d is not None:
            self._d = None  # a refit may see another feature count
            self._allocate(0)
        self.n_samples_seen_.zero_()
        self.mean_.zero_()
        self.scatter_.zero_()
        self._fitted = False
        data, array = self._input(data)
        if isinstance(data, Tensor):
            self._accumulate(data, array)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            for batch in data:
                if isinstance(batch, (tuple, list)) and batch:
                    batch = batch[0]
                self._accumulate(*self._input(batch))
        else:
            raise ShapeError(f"{type(self).__name__}.fit expects a tensor, an array or an iterable "
                            f"of batches (a DataLoader), got {type(data).__name__}")
        self._finalize()
        return self

    @torch.no_grad()
    def _finalize(self) -> None:
        n, d, eps = int(self.n_samples_seen_), self.mean_.numel(), self.eps
        if n == 0:
            raise ShapeError(f"{type(self).__name__}.fit got no samples; pass a non-empty tensor "
                             f"(N, *feature_shape) or loader")
        dtype = self._factory["dtype"]
        where = type(self).__name__
        self.n_features_in_ = d  # scikit-learn's fitted feature count
        if self.method == "center":
            self._fitted = True
            return
        sigma = self.scatter_ / n
        if self.method == "standardize":
            small = (sigma <= eps).nonzero().flatten().tolist()
            if small:
                warnings.warn(f"{where}: {len(small)} constant feature(s) {_head(small)} "
                              f"(variance <= eps={eps:g}); regularised as "
                              f"(x - mean)/sqrt(var + eps), so a constant feature maps to 0",
                              UserWarning, stacklevel=3)
            std = (sigma + eps).sqrt()
            self.matrix_.copy_(std.reciprocal().to(dtype))
            self.inverse_matrix_.copy_(std.to(dtype))
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
        self.matrix_.copy_(w.to(dtype))
        self.inverse_matrix_.copy_(inv.to(dtype))
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

    def transform(self, x: Tensor | Any) -> Tensor | Any:
        """``W (x − μ)`` of ``x`` of shape ``(N, *feature_shape)``, in ``x``'s dtype (computed in
        the buffers' dtype); an array gives an array."""
        self._check_fitted()
        x, array = self._input(x)
        flat = self._flat(x, array)
        if flat.shape[1] != self._d:
            raise ShapeError(f"{type(self).__name__} was fitted on {self._d} features, "
                             f"got {flat.shape[1]} (input shape {tuple(x.shape)})")
        work = torch.promote_types(x.dtype, self.matrix_.dtype)
        xc = flat.to(work) - self.mean_.to(work)
        if self.method == "center":
            y = xc
        elif self.method == "standardize":
            y = xc * self.matrix_.to(work)
        else:
            y = xc @ self.matrix_.to(work).T
        y = y.to(x.dtype if x.is_floating_point() else work)
        y = y if self.method == "pca" else y.reshape(x.shape)
        return to_numpy(y) if array else y

    forward = transform

    def inverse_transform(self, y: Tensor | Any) -> Tensor | Any:
        """``W⁺ y + μ`` (exact inverse at full rank, best reconstruction at ``rank=k``), reshaped
        to ``(N, *feature_shape)`` of the fit; an array gives an array."""
        self._check_fitted()
        y, array = self._input(y)
        flat = self._flat(y, array)
        if flat.shape[1] != self.out_features:
            raise ShapeError(f"inverse_transform expects {self.out_features} features per sample "
                             f"(the transform's output), got {flat.shape[1]} (shape "
                             f"{tuple(y.shape)})")
        work = torch.promote_types(y.dtype, self.matrix_.dtype)
        yf = flat.to(work)
        if self.method == "standardize":
            yf = yf * self.inverse_matrix_.to(work)
        elif self.method != "center":
            yf = yf @ self.inverse_matrix_.to(work).T
        x = (yf + self.mean_.to(work)).to(y.dtype if y.is_floating_point() else work)
        x = x.reshape(y.shape[0], *self.feature_shape_.tolist())
        return to_numpy(x) if array else x


def _head(items: list[int], k: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:k])
    return f"[{shown}{', ...' if len(items) > k else ''}]"

