"""Orthogonality regularizers on layer weights (book ch. 7): soft orthogonality, SRIP, Parseval.

A layer weight is read as a matrix ``W`` of shape ``(out, fan_in)`` (:func:`weight_matrix`):
``weight.flatten(1)`` for Linear/ConvNd (output dim 0), and output dim 1 for ConvTranspose, whose
weight is ``(in, out/groups, *k)``. A grouped layer is its dense block-diagonal equivalent: its
``groups`` blocks ``W_g`` never interact, so the penalties below are those of the dense matrix
(Frobenius terms add over blocks, spectral norms take the max over blocks).

All penalties use the *achievable* Gram matrix: ``WWᵀ`` (``out × out``) for a wide or square ``W``
and ``WᵀW`` (``fan_in × fan_in``) for a tall one. A wide ``W`` can have orthonormal rows but
``WᵀW`` then has rank ``out < fan_in``, so ``‖WᵀW − I‖`` could never fall below 1 (Bansal et al.
2018, "Can We Gain More from Orthogonality Regularizations in Training Deep CNNs?"; their ``W`` is
our ``Wᵀ``). Both Grams have the same non-zero eigenvalues ``σᵢ²``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ._layout import LAYER_TYPES, check_weight, unit_dim, weight_matrix

__all__ = [
    "weight_matrix",
    "soft_orthogonality",
    "srip",
    "parseval_retraction_",
    "orthogonality_penalty",
    "parseval_step_",
    "LAYER_TYPES",
]



def _blocks(weight: Tensor, dim: int, groups: int) -> Tensor:
    """``(groups, rows, cols)`` blocks of the dense block-diagonal matrix; ``groups`` splits dim 0
    (the output dim of Conv, the input dim of ConvTranspose)."""
    if dim == 0:
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    w = weight.unflatten(0, (groups, weight.shape[0] // groups)).movedim(dim + 1, 1)
    return w.flatten(2)


def _unblocks(m: Tensor, shape: torch.Size, dim: int, groups: int) -> Tensor:
    """Inverse of :func:`_blocks`: back to a tensor of ``shape``."""
    if dim == 0:
        return m.reshape(shape)
    rest = [s for i, s in enumerate(shape) if i not in (0, dim)]
    w = m.reshape(groups, shape[dim], shape[0] // groups, *rest).movedim(1, dim + 1)
    return w.flatten(0, 1)


def _gram_minus_eye(m: Tensor) -> Tensor:
    """``G − I`` with ``G`` the smaller Gram of each block ``(g, r, c)``, in at least float32."""
    if m.dtype in (torch.float16, torch.bfloat16):
        m = m.float()
    g = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return g - torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)


def soft_orthogonality(weight: Tensor, *, dim: int = 0, groups: int = 1) -> Tensor:
    r"""Soft orthogonality penalty (SO, Bansal et al. 2018), a differentiable scalar:

    .. math::
        \|WW^\top - I\|_F^2 \ (\text{rows} \le \text{cols}), \qquad
        \|W^\top W - I\|_F^2 \ (\text{rows} > \text{cols})

    summed over the ``groups`` blocks. Zero for orthonormal rows (wide) or columns (tall); a zero
    weight gives ``min(rows, cols)`` per block with zero (finite) gradient.

    Args:
        weight: any tensor with ``ndim >= 2``; read as :func:`weight_matrix` ``(weight, dim)``.
        dim: the output dim (0 for Linear/ConvNd, 1 for ConvTranspose).
        groups: blocks of the layer; dim 0 is split into ``groups`` parts (see module doc).

    Returns:
        a 0-dim tensor, in the weight's dtype (float32 for half/bfloat16 weights).

    Example:
        >>> q = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64)).Q  # orthonormal columns
        >>> float(soft_orthogonality(q)) < 1e-24 and float(soft_orthogonality(q.T)) < 1e-24
        True
    """
    dim = check_weight(weight, dim, groups)
    return _gram_minus_eye(_blocks(weight, dim, groups)).square().sum()


def srip(
    weight: Tensor,
    *,
    dim: int = 0,
    groups: int = 1,
    iterations: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Spectral restricted isometry penalty (SRIP, Bansal et al. 2018): ``σ_max(G − I)`` with
    ``G`` the achievable Gram (``WWᵀ`` if rows ≤ cols, else ``WᵀW``), by power iteration.

    With ``A = G − I`` (symmetric) and a start vector ``v₀``, each iteration does
    ``u = A v;  σ = ‖u‖;  v = u / σ``, so after ``T`` iterations
    ``σ = ‖A^T v₀‖ / ‖A^(T−1) v₀‖`` (powers of ``A``; the paper's two-product estimate is
    ``T = 2``); ``σ`` rises monotonically to ``‖A‖₂`` as ``T`` grows. The iteration is
    differentiated through (nothing is detached). For ``groups > 1`` the result is the max over
    blocks (the spectral norm of the dense layer).

    The start vector is reproducible: ``randn`` from ``generator``, or by default from a fresh
    CPU generator seeded with 0, so the same weight always gives the same loss (no state is kept
    between calls, unlike :func:`torch.nn.utils.parametrizations.spectral_norm`).

    Args:
        weight: tensor with ``ndim >= 2``; ``dim``/``groups`` as in :func:`soft_orthogonality`.
        iterations: number of products with ``A`` (≥ 1).
        generator: source of the start vector; ``None`` = seeded with 0.

    Returns:
        a 0-dim tensor ≥ 0; finite with finite gradients for a zero weight (``A = −I``, ``σ = 1``)
        and for an exactly orthogonal one (``σ = 0``; the guarded division gives zero gradient).

    Example:
        >>> w = torch.randn(5, 9, dtype=torch.float64)
        >>> a = w @ w.T - torch.eye(5, dtype=torch.float64)
        >>> torch.allclose(srip(w, iterations=300), torch.linalg.matrix_norm(a, 2))
        True
    """
    dim = check_weight(weight, dim, groups)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations must be an int >= 1, got {iterations!r}")
    a = _gram_minus_eye(_blocks(weight, dim, groups))
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v = torch.randn(a.shape[:-1], generator=gen, device=gen.device, dtype=torch.float64)
    v = (v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)).to(device=a.device, dtype=a.dtype)
    tiny = torch.finfo(a.dtype).tiny
    sigma = a.new_zeros(a.shape[0])
    for _ in range(iterations):
        u = (a @ v.unsqueeze(-1)).squeeze(-1)
        sigma = torch.linalg.vector_norm(u, dim=-1)
        v = u / sigma.clamp_min(tiny).unsqueeze(-1)
    return sigma.amax()


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
            or beta < 0:
        raise ConfigError(f"beta must be a finite number >= 0 (e.g. 1e-4), got {beta!r}")


@torch.no_grad()
def parseval_retraction_(weight: Tensor, beta: float = 0.0001, *, dim: int = 0,
                         groups: int = 1) -> None:
    r"""One Parseval retraction step, in place (Cisse et al. 2017, Parseval networks):

    .. math:: W \leftarrow (1 + \beta) W - \beta\, W W^\top W

    Each singular value maps as ``σ ← (1 + β)σ − βσ³`` (fixed point 1), so repeated steps after
    the optimizer's drive the non-zero singular values of each block to 1 for a small ``β``
    (``β σ² < 2`` is needed; the paper uses ``β ≈ 1e-4``). ``WWᵀW`` is formed through the smaller
    Gram. Zero singular values stay 0 (a zero weight stays zero). Runs under ``no_grad``.

    Example:
        >>> w = torch.randn(4, 9, dtype=torch.float64) / 3
        >>> for _ in range(200):
        ...     parseval_retraction_(w, beta=0.2)
        >>> torch.allclose(torch.linalg.svdvals(w), torch.ones(4, dtype=torch.float64))
        True
    """
    dim = check_weight(weight, dim, groups)
    _check_beta(beta)
    m = _blocks(weight, dim, groups)
    wwtw = (m @ m.mT) @ m if m.shape[-2] <= m.shape[-1] else m @ (m.mT @ m)
    weight.copy_(_unblocks((1 + beta) * m - beta * wwtw, weight.shape, dim, groups))


def _layers(model: nn.Module, types: tuple[type[nn.Module], ...],
            what: str) -> list[tuple[nn.Module, Tensor, int, int]]:
    """``(module, weight, dim, groups)`` for each layer of ``types`` in ``model`` with a weight."""
    if not isinstance(types, tuple) or not all(isinstance(t, type) for t in types):
        raise ConfigError(f"types must be a tuple of module classes, got {types!r}")
    out = []
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, types) and isinstance(w, Tensor):
            if what and parametrize.is_parametrized(mod, "weight"):
                raise ConfigError(
                    f"{what} changes weights in place, but {type(mod).__name__}.weight is "
                    f"parametrized; remove the parametrization or pass types= without this layer"
                )
            dim = unit_dim(mod)
            out.append((mod, w, dim, getattr(mod, "groups", 1)))
    return out


def orthogonality_penalty(
    model: nn.Module,
    kind: Literal["soft", "srip"] = "soft",
    *,
    types: tuple[type[nn.Module], ...] = LAYER_TYPES,
    iterations: int = 2,
) -> Tensor:
    """Sum of :func:`soft_orthogonality` or :func:`srip` over every layer of ``types`` in
    ``model`` (ConvTranspose read with ``dim=1``, ``groups`` from the layer). Add ``λ ·`` this
    to the training loss. Parametrized weights are penalized as computed. ``0.`` if no layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 3, 1))
        >>> for w in (net[0].weight, net[2].weight):
        ...     _ = nn.init.orthogonal_(w)
        >>> float(orthogonality_penalty(net).detach()) < 1e-10
        True
    """
    if kind not in ("soft", "srip"):
        raise ConfigError(f"kind must be 'soft' or 'srip', got {kind!r}")
    terms = [
        soft_orthogonality(w, dim=d, groups=g) if kind == "soft"
        else srip(w, dim=d, groups=g, iterations=iterations)
        for _, w, d, g in _layers(model, types, "")
    ]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return sum(terms[1:], terms[0])  # type promotion across float32/float64 layers


def parseval_step_(model: nn.Module, beta: float = 0.0001, *,
                   types: tuple[type[nn.Module], ...] = LAYER_TYPES) -> None:
    """Apply :func:`parseval_retraction_` to every layer of ``types`` in ``model`` (call it after
    each ``optimizer.step()``). Parametrized weights raise :class:`ConfigError`.

    Example:
        >>> net = nn.Linear(6, 3)
        >>> for _ in range(300):
        ...     parseval_step_(net, beta=0.3)
        >>> torch.allclose(torch.linalg.svdvals(net.weight), torch.ones(3), atol=1e-5)
        True
    """
    _check_beta(beta)
    for _, w, d, g in _layers(model, types, "parseval_step_"):
        parseval_retraction_(w, beta, dim=d, groups=g)
