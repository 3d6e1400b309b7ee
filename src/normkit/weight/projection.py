"""Projection-based weight normalization (PBWN, Huang et al. 2017, book ch. 7).

Instead of reparametrizing ``W = g · V/‖V‖`` (weight normalization), PBWN keeps the plain weight
and projects it back onto the sphere after every optimizer step:

.. math:: w_i \\leftarrow s \\cdot \\frac{w_i}{\\max(\\|w_i\\|_2, \\epsilon)}

for each output unit ``i`` (a row of :func:`~normkit.weight.regularizers.weight_matrix`). The
forward pass then costs nothing extra and any ``torch.optim`` optimizer works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from ._layout import LAYER_TYPES, check_weight
from .regularizers import _layers

__all__ = ["renormalize_", "project_unit_norm"]


def _check_scale_eps(scale: float, eps: float) -> None:
    for name, val, hint in (("scale", scale, "1.0"), ("eps", eps, "1e-12")):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) \
                or val <= 0:
            raise ConfigError(f"{name} must be a finite number > 0 (e.g. {hint}), got {val!r}")


@torch.no_grad()
def _renormalize(weight: Tensor, dim: int, groups: int, scale: float, eps: float) -> None:
    # Unit = (block, row): view dim 0 as (groups, shape[0]/groups) when the rows are another dim,
    # so a grouped ConvTranspose ``(in, out/groups, *k)`` gets one norm per output unit.
    view, keep = weight, {dim}
    if dim != 0 and groups > 1:
        view, keep = weight.unflatten(0, (groups, weight.shape[0] // groups)), {0, dim + 1}
    reduce = [i for i in range(view.ndim) if i not in keep]
    src = view.float() if view.dtype in (torch.float16, torch.bfloat16) else view
    norm = torch.linalg.vector_norm(src, dim=reduce, keepdim=True)
    view.mul_((scale / norm.clamp_min(eps)).to(view.dtype))


def renormalize_(weight: Tensor, *, dim: int = 0, scale: float = 1.0, eps: float = 1e-12,
                 groups: int = 1) -> Tensor:
    """Rescale each output unit of ``weight`` in place to norm ``scale`` (under ``no_grad``).

    ``w_i ← scale · w_i / max(‖w_i‖, eps)`` with ``w_i`` the ``i``-th slice along ``dim`` (the
    row of ``weight_matrix(weight, dim)``). The norm is taken in at least float32. A zero unit
    stays zero (finite, no NaN); a unit with norm below ``eps`` ends with norm
    ``scale · ‖w_i‖ / eps`` (as :func:`torch.nn.functional.normalize`). The result does not
    depend on a positive rescaling of the incoming units.

    Args:
        weight: tensor with ``ndim >= 2``, changed in place and returned.
        dim: the output dim (0 for Linear/ConvNd, 1 for ConvTranspose).
        scale: target norm (> 0).
        eps: norm floor (> 0).
        groups: for ``dim != 0`` (ConvTranspose ``(in, out/groups, *k)``), the layer's groups, so
            each of the ``out`` units is normalized on its own; no effect for ``dim = 0``.

    Example:
        >>> w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        >>> w[1] = 0
        >>> n = renormalize_(w, scale=2.0).flatten(1).norm(dim=1)
        >>> torch.allclose(n, torch.tensor([2.0, 0.0, 2.0, 2.0], dtype=torch.float64))
        True
    """
    dim = check_weight(weight, dim, groups)
    _check_scale_eps(scale, eps)
    _renormalize(weight, dim, groups, scale, eps)
    return weight


def project_unit_norm(
    optimizer: torch.optim.Optimizer,
    modules_or_params: nn.Module | Tensor | Iterable[nn.Module | Tensor],
    *,
    dim: int = 0,
    scale: float = 1.0,
    eps: float = 1e-12,
    types: tuple[type[nn.Module], ...] = LAYER_TYPES,
) -> RemovableHandle:
    """PBWN: after every ``optimizer.step()``, :func:`renormalize_` the chosen weights.

    Registers ``optimizer.register_step_post_hook``; ``handle.remove()`` stops it. The weights are
    not touched at registration: call :func:`renormalize_` once to start on the sphere.

    Args:
        optimizer: any :class:`torch.optim.Optimizer`.
        modules_or_params: a module (every sub-layer of ``types`` is projected, ConvTranspose with
            its output dim 1 and groups), a weight tensor/Parameter (projected along ``dim``), or
            an iterable of these. Parametrized layer weights raise :class:`ConfigError`.
        dim: output dim of the tensors passed directly.
        scale: target norm of each unit (> 0).
        eps: norm floor (> 0); zero units stay zero.
        types: layer classes to project inside modules.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(4, 2, 3))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> handle = project_unit_norm(opt, net)
        >>> net[1](net[0](torch.randn(5, 6, 3)).mT).sum().backward()
        >>> opt.step()
        >>> torch.allclose(net[1].weight.flatten(1).norm(dim=1), torch.ones(2))
        True
        >>> handle.remove()
    """
    _check_scale_eps(scale, eps)
    items = [modules_or_params] if isinstance(modules_or_params, (nn.Module, Tensor)) \
        else list(modules_or_params)
    targets: list[tuple[Tensor, int, int]] = []
    for item in items:
        if isinstance(item, nn.Module):
            targets += [(w, d, g) for _, w, d, g in _layers(item, types, "project_unit_norm")]
        elif isinstance(item, Tensor):
            targets.append((item, check_weight(item, dim), 1))
        else:
            raise ConfigError(
                f"project_unit_norm takes modules or weight tensors, got {type(item).__name__}"
            )
    if not targets:
        raise ConfigError(
            f"project_unit_norm found no weight to project in {modules_or_params!r} "
            f"(types={[t.__name__ for t in types]}); pass the layers or their weights"
        )

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for w, d, g in targets:
            _renormalize(w, d, g, scale, eps)

    return optimizer.register_step_post_hook(hook)
