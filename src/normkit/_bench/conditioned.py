"""Every registered method as a module ``y = m(x)`` for the benchmarks, conditional ones included.

Conditional methods take ``module(x, condition)``; :func:`build_method` gives them the constructor
arguments they require (:data:`CONDITIONS`) and wraps them in :class:`Conditioned` with a fixed
condition drawn once, so a timed call is the layer alone, as a model calls it after computing its
condition.

Example:
    >>> import torch
    >>> x = torch.randn(2, 4, 3, 3)
    >>> m = build_method("cbn", x, torch.Generator().manual_seed(0))
    >>> m(x).shape
    torch.Size([2, 4, 3, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CONDITIONS", "Conditioned", "build_method", "inner"]

_CLASSES = 10  # classes of cbn / cin
_LABELS = 8  # label channels of spade's segmentation map


def _classes(x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randint(0, _CLASSES, (x.shape[0],), generator=gen)


def _style(x: Tensor, gen: torch.Generator) -> Tensor:
    return 1 + 2 * torch.randn(x.shape, generator=gen)


def _affine_pair(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    n, c = x.shape[:2]
    return 1 + 0.1 * torch.randn(n, c, generator=gen), 0.1 * torch.randn(n, c, generator=gen)


def _segmentation(x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.rand(x.shape[0], _LABELS, *x.shape[2:], generator=gen)


# method -> (constructor arguments it requires, the condition for an input x)
CONDITIONS: dict[str, tuple[dict[str, Any], Callable[[Tensor, torch.Generator], Any]]] = {
    "cbn": ({"num_classes": _CLASSES}, _classes),
    "cin": ({"num_classes": _CLASSES}, _classes),
    "adain": ({}, _style),
    "adalin": ({}, _affine_pair),
    "spade": ({"label_channels": _LABELS}, _segmentation),
}


class Conditioned(nn.Module):
    """``y = inner(x, condition)`` with a fixed ``condition`` (a tensor or a tuple of tensors)."""

    def __init__(self, inner: nn.Module, condition: Any) -> None:
        super().__init__()
        self.inner = inner
        self.condition = condition

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x, self.condition)


def inner(m: nn.Module) -> nn.Module:
    """The normalization layer of ``m`` (``m`` itself unless it is :class:`Conditioned`)."""
    return m.inner if isinstance(m, Conditioned) else m


def _to(cond: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A condition (a tensor or a tuple of them) on ``device``; with ``dtype``, its floating
    tensors in that dtype (class labels stay integers)."""
    if isinstance(cond, tuple):
        return tuple(_to(c, device, dtype) for c in cond)
    return cond.to(device, dtype) if dtype is not None and cond.is_floating_point() else \
        cond.to(device)


def build_method(method: str, x: Tensor, gen: torch.Generator, **kwargs: Any) -> nn.Module:
    """``normkit.create(method, C, **kwargs)`` on ``x``'s device, called as ``m(x)``: conditional
    methods get their required arguments and a fixed condition drawn from ``gen`` (a CPU
    generator) for inputs shaped like ``x``."""
    import normkit as nk

    ctor, make = CONDITIONS.get(method, ({}, None))
    m = nk.create(method, x.shape[1], **{**ctor, **kwargs}).to(x.device)
    return m if make is None else Conditioned(m, _to(make(x, gen), x.device))
