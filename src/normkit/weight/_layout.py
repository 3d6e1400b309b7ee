"""How a layer's weight is read: a matrix ``(out, fan_in)`` with the output unit at ``dim``."""

from __future__ import annotations

import torch  # noqa: F401  (the doctests' namespace)
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["LAYER_TYPES", "TRANSPOSED", "unit_dim", "check_weight", "weight_matrix", "from_matrix"]

TRANSPOSED: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Layers the model-level functions of :mod:`normkit.weight` act on by default.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED)


def unit_dim(module: nn.Module) -> int:
    """The output-unit dimension of a layer's weight: 1 for ConvTranspose, else 0."""
    return 1 if isinstance(module, TRANSPOSED) else 0


def check_weight(weight: Tensor, dim: int, groups: int = 1) -> int:
    """Validate ``weight``/``dim``/``groups``; return ``dim`` as a non-negative index."""
    if not isinstance(weight, Tensor) or weight.ndim < 2:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ConfigError(
            f"expected a weight with ndim >= 2 (out, fan_in, ...), got {got}; 1-D parameters "
            f"(biases, norm affines) have no rows to orthogonalize or normalize"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or not -weight.ndim <= dim < weight.ndim:
        raise ConfigError(f"dim must be an int in [{-weight.ndim}, {weight.ndim}), got {dim!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
            or weight.shape[0] % groups:
        raise ConfigError(
            f"groups must be a positive int dividing weight.shape[0]={weight.shape[0]}, "
            f"got {groups!r}"
        )
    return dim % weight.ndim


def weight_matrix(weight: Tensor, dim: int = 0) -> Tensor:
    """View ``weight`` as the matrix ``W`` of shape ``(weight.shape[dim], rest)``: ``dim`` first,
    the other dims flattened in order (a view where possible).

    Use ``dim=0`` for Linear/ConvNd ``(out, in/groups, *k)`` and ``dim=1`` for ConvTranspose
    ``(in, out/groups, *k)``.

    Example:
        >>> weight_matrix(torch.zeros(8, 3, 5, 5)).shape  # Conv2d(3, 8, 5)
        torch.Size([8, 75])
        >>> weight_matrix(torch.zeros(3, 8, 5), dim=1).shape  # ConvTranspose1d(3, 8, 5)
        torch.Size([8, 15])
    """
    dim = check_weight(weight, dim)
    return weight.movedim(dim, 0).flatten(1)


def from_matrix(mat: Tensor, like: Tensor, dim: int = 0) -> Tensor:
    """Inverse of :func:`weight_matrix` for a weight shaped like ``like``."""
    return mat.reshape(like.movedim(dim, 0).shape).movedim(0, dim)
