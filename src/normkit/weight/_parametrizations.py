"""Weight parametrizations ``W = f(V)`` for :func:`torch.nn.utils.parametrize.register_parametrization`.

Each class is an ``nn.Module`` whose ``forward`` maps the stored tensor(s) ``V`` to the weight the
layer uses. A weight is viewed as a matrix ``(out, fan_in)`` with the output unit at ``dim`` (0 for
Linear / ConvNd, 1 for ConvTranspose) and everything else flattened. Install them with
:func:`normkit.weight.apply`, which picks ``dim`` from the layer type.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import whiten as W
from ._layout import from_matrix, weight_matrix

__all__ = [
    "WeightNorm",
    "CenteredWeightNorm",
    "WeightStandardization",
    "SpectralNorm",
    "OrthogonalWeightNorm",
    "OrthogonalNewton",
    "UnitNorm",
]


def _unit_dims(weight: Tensor, dim: int | None) -> tuple[int, ...]:
    """The dimensions a per-unit norm reduces over (all but ``dim``; all when ``dim`` is None)."""
    if dim is None:
        return tuple(range(weight.dim()))
    return tuple(d for d in range(weight.dim()) if d != dim % weight.dim())


def _safe_div(v: Tensor, norm: Tensor) -> Tensor:
    """``v / norm`` with ``0`` where ``norm == 0`` (a zero unit stays zero, zero gradient)."""
    return torch.where(norm > 0, v / torch.where(norm > 0, norm, 1), 0)


def _check_dim(dim: int | None) -> None:
    if dim is not None and not isinstance(dim, int):
        raise ConfigError(f"dim must be an int or None, got {dim!r}")


class WeightNorm(nn.Module):
    r"""Weight normalization ``W = g · V/‖V‖`` per output unit (Salimans & Kingma 2016).

    Stores ``original0 = g`` (shape of ``torch.norm_except_dim``: the weight's shape with 1 outside
    ``dim``) and ``original1 = V``, exactly as ``torch.nn.utils.parametrizations.weight_norm``: the
    two are interchangeable, state_dicts included. A zero unit ``V_i = 0`` gives ``W_i = 0`` with a
    zero gradient (torch's gives NaN).

    Args:
        dim: the output-unit dimension; ``None`` normalizes the whole tensor.

    Example:
        >>> lin = torch.nn.Linear(4, 3)
        >>> p = WeightNorm(0)
        >>> g, v = p.right_inverse(lin.weight.detach())
        >>> torch.allclose(p(g, v), lin.weight)
        True
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        _check_dim(dim)
        self.dim = dim

    def _norm(self, v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(v, dim=_unit_dims(v, self.dim), keepdim=True)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return _safe_div(v, self._norm(v)) * g

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight


class CenteredWeightNorm(WeightNorm):
    r"""Centred weight normalization ``W = g · (V − μ_V)/‖V − μ_V‖`` per output unit, ``μ_V`` the
    mean over the unit's fan-in (Huang et al. 2017). Each unit's weights sum to 0 and have norm
    ``g``. Stores ``original0 = g``, ``original1 = V`` (as :class:`WeightNorm`); at registration
    ``g`` is the norm of the centred weight, so a weight that was centred is kept unchanged.

    Example:
        >>> p = CenteredWeightNorm(0)
        >>> g, v = torch.ones(3, 1), torch.randn(3, 5)
        >>> w = p(g, v)
        >>> torch.allclose(w.sum(1), torch.zeros(3), atol=1e-6), torch.allclose(w.norm(dim=1), torch.ones(3))
        (True, True)
    """

    def _centred(self, v: Tensor) -> Tensor:
        return v - v.mean(_unit_dims(v, self.dim), keepdim=True)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        vc = self._centred(v)
        return _safe_div(vc, self._norm(vc)) * g

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(self._centred(weight)), weight


class WeightStandardization(nn.Module):
    r"""Weight standardization ``W = (V − μ_V)/√(σ²_V + ε)`` per output unit (Qiao et al. 2019),
    ``μ_V, σ²_V`` the mean and biased variance over the unit's fan-in. Usually followed by GN.

    Args:
        dim: the output-unit dimension.
        eps: added to the variance (a constant unit gives 0, finite).

    Example:
        >>> w = WeightStandardization()(torch.randn(8, 3, 3, 3))
        >>> torch.allclose(w.mean((1, 2, 3)), torch.zeros(8), atol=1e-6)
        True
    """

    def __init__(self, dim: int = 0, eps: float = 1e-5) -> None:
        super().__init__()
        _check_dim(dim)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        self.dim, self.eps = dim, eps

    def forward(self, v: Tensor) -> Tensor:
        dims = _unit_dims(v, self.dim)
        var, mean = torch.var_mean(v, dim=dims, keepdim=True, correction=0)
        return (v - mean) * torch.rsqrt(var + self.eps) if self.eps > 0 else _safe_div(
            v - mean, var.sqrt())


class SpectralNorm(nn.Module):
    r"""Spectral normalization ``W = V / σ_max(V)`` (Miyato et al. 2018), ``σ_max`` estimated by
    power iteration with persistent vectors ``u``, ``v``.

    In training each forward runs ``n_power_iterations`` steps ``v ← Vᵀu/‖Vᵀu‖``,
    ``u ← Vv/‖Vv‖`` on the buffers (in place, without autograd) and uses copies of them, so two
    forwards before one backward work (a GAN discriminator on real and fake batches). Evaluation
    leaves them unchanged. ``σ = uᵀ V v``. Same buffers (``_u``, ``_v``), initialization rule (15
    steps from random unit vectors) and numbers as ``torch.nn.utils.parametrizations.spectral_norm``,
    whose state_dicts load into it. A zero weight has ``σ = 0`` and is returned unchanged (torch's
    gives NaN).

    Args:
        weight: the weight to normalize (sets the buffer sizes).
        n_power_iterations: steps per training forward (≥ 1).
        dim: the output-unit dimension (0; 1 for ConvTranspose).
        eps: guard of the vector normalizations.

    Example:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> sn = SpectralNorm(w, n_power_iterations=50)
        >>> round(torch.linalg.matrix_norm(sn(w), 2).item(), 9)
        1.0
    """

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ConfigError(f"n_power_iterations must be a positive int, got {n_power_iterations!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ConfigError(f"eps must be > 0, got {eps!r}")
        ndim = weight.dim()
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps, self.n_power_iterations = eps, n_power_iterations
        if ndim > 1:
            mat = self._matrix(weight)
            h, w = mat.shape
            u = mat.new_empty(h).normal_(0, 1)
            v = mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
            self._power_method(mat, 15)

    def _matrix(self, weight: Tensor) -> Tensor:
        return weight_matrix(weight, self.dim)

    @torch.no_grad()
    def _power_method(self, mat: Tensor, steps: int) -> None:
        for _ in range(steps):
            self._u = F.normalize(torch.mv(mat, self._v), dim=0, eps=self.eps, out=self._u)
            self._v = F.normalize(torch.mv(mat.H, self._u), dim=0, eps=self.eps, out=self._v)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.dim() == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        mat = self._matrix(weight)
        if self.training:
            self._power_method(mat, self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u, torch.mv(mat, v))
        return weight / torch.where(sigma != 0, sigma, 1)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value  # any W with σ(W) = 1 is its own preimage; torch's convention


def _groups(rows: int, group_size: int | None) -> int:
    if group_size is None:
        return 1
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ConfigError(f"group_size must be a positive int or None, got {group_size!r}")
    if rows % group_size:
        raise ConfigError(f"group_size ({group_size}) must divide the number of output units ({rows})")
    return rows // group_size


class _Orthogonal(nn.Module):
    """Shared by OWN and ONI: ``(G, g, fan_in)`` groups of centred rows, orthogonalized as rows
    (``g ≤ fan_in``: ``W = S^{-1/2} Z``, ``S = Z Zᵀ``) or, for a tall group (``g > fan_in``, rows
    cannot be orthonormal), as columns (``W = Z S^{-1/2}``, ``S = Zᵀ Z``)."""

    def __init__(self, *, method: W.WhiteningMethod, iterations: int, dim: int,
                 group_size: int | None, center: bool, eps: float, scale: float,
                 learn_scale: bool) -> None:
        super().__init__()
        _check_dim(dim)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"scale must be a finite number > 0, got {scale!r}")
        self.dim, self.group_size, self.center, self.eps = dim, group_size, center, eps
        self.method, self.iterations = method, iterations
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.scale = float(scale)

    def _inv_sqrt(self, s: Tensor) -> Tensor:
        return W.whitening_matrix(s, self.method, eps=self.eps, iterations=self.iterations)

    def forward(self, v: Tensor) -> Tensor:
        mat = weight_matrix(v, self.dim)
        rows, fan_in = mat.shape
        groups = _groups(rows, self.group_size)
        z = mat.reshape(groups, rows // groups, fan_in)
        dtype = torch.promote_types(z.dtype, torch.float32)
        z = z.to(dtype)
        if self.center:
            z = z - z.mean(-1, keepdim=True)
        if z.shape[1] <= fan_in:
            w = self._inv_sqrt(z @ z.transpose(-1, -2)) @ z
        else:
            w = z @ self._inv_sqrt(z.transpose(-1, -2) @ z)
        w = w.reshape(rows, fan_in).to(v.dtype) * self.scale
        return from_matrix(w, v, self.dim)


class OrthogonalWeightNorm(_Orthogonal):
    r"""Orthogonal weight normalization (OWN, Huang et al. 2018): ``W = (Z Zᵀ + εI)^{-1/2} Z`` with
    ``Z`` the rows of ``V`` centred over their fan-in, per group of ``group_size`` rows, so
    ``W Wᵀ = I`` (up to ``ε``). ZCA from :func:`normkit.functional.whiten.zca_matrix` (the same
    code as DBN; its backward is first-order). A group with more rows than inputs is orthogonalized
    by columns instead (``W = Z (ZᵀZ + εI)^{-1/2}``); centring leaves ``fan_in − 1`` dimensions,
    so exact orthonormality needs ``group_size < fan_in``, and ``ε`` keeps the rest finite.

    Args:
        dim: the output-unit dimension.
        group_size: rows orthogonalized together (must divide the output units); ``None``: all.
        center: centre the rows first (the paper's choice).
        eps: ridge on ``Z Zᵀ``.
        scale: a fixed gain on ``W`` (e.g. ``√2`` before ReLU); ``learn_scale`` makes it a parameter.

    Example:
        >>> w = OrthogonalWeightNorm(eps=0.0)(torch.randn(4, 9, dtype=torch.float64))
        >>> torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64))
        True
    """

    def __init__(self, dim: int = 0, *, group_size: int | None = None, center: bool = True,
                 eps: float = 1e-5, scale: float = 1.0, learn_scale: bool = False) -> None:
        super().__init__(method="zca", iterations=1, dim=dim, group_size=group_size,
                         center=center, eps=eps, scale=scale, learn_scale=learn_scale)


class OrthogonalNewton(_Orthogonal):
    r"""Orthogonalization by Newton's iteration (ONI, Huang et al. 2020): ``W = B_T Z/‖Z‖_F``,
    ``B_{t+1} = ½(3B_t − B_t³ S)``, ``S = Z Zᵀ/‖Z‖²_F``, ``B_0 = I`` — IterNorm's Newton–Schulz
    (:func:`normkit.functional.whiten.newton_schulz_matrix`, the same code) on the rows of ``V``.
    ``T = iterations`` controls how orthogonal ``W`` is (``‖WWᵀ − I‖`` falls with ``T``); the
    output is invariant to a positive rescaling of ``V`` (with ``eps=0``, the default). Tall groups
    (more rows than inputs) are orthogonalized by columns.

    Args:
        dim: the output-unit dimension.
        iterations: ``T`` (1 … 64; the paper uses 5).
        group_size: rows per group (must divide the output units); ``None``: all.
        center: centre the rows first.
        eps: ridge on ``S`` before the iteration.
        scale: gain on ``W`` (``√2`` for ReLU conv layers is common); ``learn_scale`` learns it.

    Example:
        >>> p = OrthogonalNewton(iterations=30)
        >>> w = p(torch.randn(4, 9, dtype=torch.float64))
        >>> torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
        True
    """

    def __init__(self, dim: int = 0, *, iterations: int = 5, group_size: int | None = None,
                 center: bool = True, eps: float = 0.0, scale: float = 1.0,
                 learn_scale: bool = False) -> None:
        if not isinstance(iterations, int) or not 0 < iterations <= W.MAX_ITERATIONS:
            raise ConfigError(f"iterations must be an int in [1, {W.MAX_ITERATIONS}], got {iterations!r}")
        super().__init__(method="newton", iterations=iterations, dim=dim, group_size=group_size,
                         center=center, eps=eps, scale=scale, learn_scale=learn_scale)


class UnitNorm(WeightNorm):
    """``W = V/‖V‖`` per output unit (no gain): the weight side of cosine normalization. A zero
    unit stays zero."""

    def forward(self, v: Tensor) -> Tensor:  # type: ignore[override]
        return _safe_div(v, self._norm(v))

    def right_inverse(self, weight: Tensor) -> Tensor:  # type: ignore[override]
        return weight
