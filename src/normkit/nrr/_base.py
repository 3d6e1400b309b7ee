"""Recovery base class and the unconditional recoveries (see :mod:`normkit.nrr`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional.partition import as_dtype, canonical_view, resolve_groups, restore_view
from ..functional.whiten import grouped_matmul

__all__ = ["Recovery", "Identity", "Affine", "Scalar", "Coloring"]


class Recovery:
    """Base class: creates and resets the parameters of a recovery and views them for use.

    Attributes:
        needs_condition: the module's forward needs a second argument (``module(x, condition)``).
        conditional: ``(γ, β)`` depend on the input or the condition
            (:meth:`conditional_views`), so nothing is fixed to fold.
    """

    needs_condition: bool = False
    conditional: bool = False

    def check_condition(self, condition: Any, x: Tensor) -> None:
        """Raise :class:`ConfigError` when a condition is missing or not expected."""
        if self.needs_condition and condition is None:
            raise ConfigError(
                f"{self!r} needs a condition: call module(x, condition)")
        if not self.needs_condition and condition is not None:
            raise ConfigError(
                f"{self!r} takes no condition, got one of type {type(condition).__name__}; call "
                f"module(x)")

    def conditional_views(
        self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor, condition: Any,
        channel_axis: int,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(γ, β)`` for this input and condition, broadcastable against the canonical
        ``(N, A, B, S)`` view (per sample ``(N, A, B, 1)`` or per position ``(N, A, B, S)``).
        Default: the static :meth:`views`."""
        return self.views(params, groups)

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, nn.Parameter | None]:
        """Parameters to register on the module, by name (``None`` registers an absent one)."""
        return {"weight": None, "bias": None}

    @torch.no_grad()
    def reset(self, params: dict[str, nn.Parameter | None], num_features: int) -> None:
        """Initialize the parameters in place."""

    def views(
        self, params: dict[str, Tensor | None], groups: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(γ, β)`` broadcastable against the canonical ``(N, A, B, S)`` view, which the
        operation applies (folded into its own scale and shift where that is cheaper)."""
        return None, None

    def post(self, y: Tensor, params: dict[str, Tensor | None], channel_axis: int) -> Tensor:
        """Applied to the normalized output ``y`` (input layout) after the operation: recoveries
        that are not per-channel (a matrix per group) act here. Default: ``y``."""
        return y

    def compose(
        self, folded: tuple[Tensor, Tensor], params: dict[str, Tensor | None]
    ) -> tuple[Tensor, Tensor]:
        """The module's folded evaluation map (``Normalization.folded``) with :meth:`post`
        composed in. Default: unchanged (per-channel recoveries are folded by the operation)."""
        return folded

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
        bias: learn ``β`` (init 0); ``False`` keeps ``γ`` only (torch's ``bias=False``: the
            module's ``bias`` is ``None`` and absent from its state_dict).
        zero_init: initialize ``γ = 0`` (residual branches start as identity, Goyal et al. 2017).
        shape: the parameters' shape, e.g. torch ``LayerNorm``'s elementwise ``normalized_shape``
            ``(C, H, W)``; its product must be ``num_features`` (they act on the flattened
            channels). ``None``: ``(num_features,)``.
    """

    weight: bool = True
    bias: bool = True
    zero_init: bool = False
    shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        s = f"Affine(weight={self.weight!r}, bias={self.bias!r}, zero_init={self.zero_init!r}"
        return s + (")" if self.shape is None else f", shape={self.shape!r})")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, nn.Parameter | None]:
        shape = (num_features,) if self.shape is None else tuple(self.shape)
        if math.prod(shape) != num_features:
            raise ConfigError(
                f"Affine shape {shape} has {math.prod(shape)} elements but the module has "
                f"num_features={num_features}; pass a shape whose product is num_features")
        return {
            "weight": nn.Parameter(torch.empty(shape, **factory)) if self.weight else None,
            "bias": nn.Parameter(torch.empty(shape, **factory)) if self.bias else None,
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


@dataclass(frozen=True, repr=False)
class Coloring(Recovery):
    r"""Coloring: a learned ``d × d`` matrix per group of ``d`` channels, ``y_k = Γ_k x̂_k + β_k``.

    The recovery of whitening (Siarohin, Sangineto & Sebe 2019, *Whitening and Coloring Batch
    Transform for GANs*, ICLR; the book's ch. 4.3): where a per-channel affine can only rescale
    the whitened features, ``Γ`` gives them back any covariance ``Γ Γᵀ``. ``Γ`` starts at the
    identity, ``β`` at 0. ``Γ = diag(γ)`` is :class:`Affine`.

    Args:
        group_size: channels per group ``d`` (must divide ``C``; use the whitening's group size).
        bias: learn ``β``.

    Shape:
        parameters ``weight`` ``(C/d, d, d)`` and ``bias`` ``(C,)``.

    Example:
        >>> import torch, normkit as nk
        >>> wc = nk.Normalization(4, nap=nk.nap.Batch(group_size=2), nop=nk.nop.Whiten(),
        ...                       nrr=nk.nrr.Coloring(group_size=2))
        >>> wc.weight.shape
        torch.Size([2, 2, 2])
        >>> wc(torch.randn(8, 4, 3)).shape
        torch.Size([8, 4, 3])
    """

    group_size: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ConfigError(f"Coloring group_size must be a positive int, got {self.group_size!r}")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, nn.Parameter | None]:
        a, d = resolve_groups(num_features, group_size=self.group_size)
        return {
            "weight": nn.Parameter(torch.empty(a, d, d, **factory)),
            "bias": nn.Parameter(torch.empty(num_features, **factory)) if self.bias else None,
        }

    @torch.no_grad()
    def reset(self, params: dict[str, nn.Parameter | None], num_features: int) -> None:
        w = params["weight"]
        w.copy_(torch.eye(w.shape[-1], dtype=w.dtype, device=w.device).expand_as(w))
        if params.get("bias") is not None:
            params["bias"].zero_()

    def post(self, y: Tensor, params: dict[str, Tensor | None], channel_axis: int) -> Tensor:
        w, b = params["weight"], params.get("bias")
        a, d = w.shape[0], w.shape[-1]
        dtype = torch.promote_types(y.dtype, w.dtype)
        v = canonical_view(y, (a, d), channel_axis).to(dtype)
        shift = None if b is None else as_dtype(b, dtype).reshape(1, a, d, 1)
        out = grouped_matmul(as_dtype(w, dtype).unsqueeze(0), v, shift)
        return restore_view(as_dtype(out, y.dtype), y.shape, channel_axis)

    def compose(
        self, folded: tuple[Tensor, Tensor], params: dict[str, Tensor | None]
    ) -> tuple[Tensor, Tensor]:
        w, b = params["weight"], params.get("bias")
        a, d = w.shape[0], w.shape[-1]
        mat, shift = folded
        w = as_dtype(w, mat.dtype)
        if mat.dim() == 1:  # per-channel scale: Γ diag(a)
            mat = w * mat.reshape(a, 1, d)
        elif mat.shape == w.shape:  # blocks of the same size: Γ M
            mat = w @ mat
        else:
            raise ConfigError(
                f"cannot fold Coloring(group_size={d}) after blocks of shape {tuple(mat.shape)}; "
                f"use the operation's group size"
            )
        shift = (w @ as_dtype(shift, w.dtype).reshape(a, d, 1)).reshape(-1)
        return mat, shift if b is None else shift + as_dtype(b, shift.dtype)
