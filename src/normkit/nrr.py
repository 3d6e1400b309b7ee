"""NRR — normalized representation recovery: how is representational power given back?

A recovery is an immutable description; the parameters it needs are registered on the owning
:class:`normkit.Normalization` under torch's names (``weight``, ``bias`` of shape ``(C,)``), so a
normkit BN's state_dict is a torch BN's.

=====================  ====================================  =====================
recovery               y                                     parameters
=====================  ====================================  =====================
``None`` / ``Identity()``  x̂                                 —
``Affine()``           γ ⊙ x̂ + β  (per channel)              weight (C,), bias (C,)
``Scalar(init)``       g · x̂   (one learned scalar)          weight (1,)
=====================  ====================================  =====================

Example:
    >>> import normkit as nk
    >>> nk.nrr.Affine(bias=False)
    Affine(weight=True, bias=False, zero_init=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["Recovery", "Identity", "Affine", "Scalar"]


class Recovery:
    """Base class: creates and resets the parameters of a recovery and views them for use."""

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, nn.Parameter | None]:
        """Parameters to register on the module, by name (``None`` registers an absent one)."""
        return {"weight": None, "bias": None}

    @torch.no_grad()
    def reset(self, params: dict[str, nn.Parameter | None], num_features: int) -> None:
        """Initialize the parameters in place."""

    def views(
        self, params: dict[str, Tensor | None], groups: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(γ, β)`` broadcastable against the canonical ``(N, A, B, S)`` view."""
        return None, None

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in fields)})"


@dataclass(frozen=True, repr=False)
class Identity(Recovery):
    """No recovery: ``y = x̂``."""


@dataclass(frozen=True, repr=False)
class Affine(Recovery):
    """Per-channel affine ``y = γ ⊙ x̂ + β`` (Ioffe & Szegedy 2015).

    Args:
        weight: learn ``γ`` (init 1, or 0 with ``zero_init``).
        bias: learn ``β`` (init 0).
        zero_init: initialize ``γ = 0`` (residual branches start as identity, Goyal et al. 2017).
    """

    weight: bool = True
    bias: bool = True
    zero_init: bool = False

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, nn.Parameter | None]:
        return {
            "weight": nn.Parameter(torch.empty(num_features, **factory)) if self.weight else None,
            "bias": nn.Parameter(torch.empty(num_features, **factory)) if self.bias else None,
        }

    @torch.no_grad()
    def reset(self, params: dict[str, nn.Parameter | None], num_features: int) -> None:
        if params.get("weight") is not None:
            params["weight"].fill_(0.0 if self.zero_init else 1.0)
        if params.get("bias") is not None:
            params["bias"].zero_()

    def views(
        self, params: dict[str, Tensor | None], groups: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor | None]:
        w, b = params.get("weight"), params.get("bias")
        shape = (1, groups[0], groups[1], 1)
        return (None if w is None else w.reshape(shape)), (None if b is None else b.reshape(shape))


@dataclass(frozen=True, repr=False)
class Scalar(Recovery):
    """One learned scalar gain ``y = g · x̂`` (ScaleNorm, Nguyen & Salazar 2019).

    Args:
        init: initial ``g``; ``None`` means ``√num_features`` (the paper's choice).
    """

    init: float | None = None

    def __post_init__(self) -> None:
        if self.init is not None and not math.isfinite(self.init):
            raise ConfigError(f"Scalar init must be finite, got {self.init}")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, nn.Parameter | None]:
        return {"weight": nn.Parameter(torch.empty(1, **factory)), "bias": None}

    @torch.no_grad()
    def reset(self, params: dict[str, nn.Parameter | None], num_features: int) -> None:
        params["weight"].fill_(math.sqrt(num_features) if self.init is None else self.init)

    def views(
        self, params: dict[str, Tensor | None], groups: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor | None]:
        return params["weight"].reshape(1, 1, 1, 1), None
