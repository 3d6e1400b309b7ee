"""torch's call form of the per-sample norms over trailing dimensions (``LayerNorm``, ``RMSNorm``):
``Norm(normalized_shape, eps, elementwise_affine, ...)``, shared by :class:`~normkit.LayerNorm` and
:class:`~normkit.RMSNorm`.

torch normalizes the last ``k = len(normalized_shape)`` dimensions of its input, which must equal
``normalized_shape``, with an elementwise ``γ`` (and ``β``) of that shape. normkit runs it as its
composition over the ``prod(normalized_shape)`` values of each position flattened into one
channel axis (``channel_axis=-1``, ``over="channels"``), with :class:`~normkit.nrr.Affine`
parameters of shape ``normalized_shape`` (``Affine(shape=...)``), so state_dicts are torch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["TrailingDims", "torch_call_form", "normalized_shape_of"]


def normalized_shape_of(value: Any) -> tuple[int, ...]:
    """torch's ``normalized_shape`` (an int or a sequence of ints) as a tuple, validated."""
    shape = (value,) if isinstance(value, int) else value
    if (not isinstance(shape, (list, tuple, torch.Size)) or not shape
            or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape)):
        raise ConfigError(
            f"normalized_shape must be a positive int or a non-empty list/tuple of positive "
            f"ints, got {value!r}")
    return tuple(int(d) for d in shape)


def torch_call_form(
    name: str, num_features: int | Sequence[int], affine: bool | None,
    elementwise_affine: bool | None, over: str | None, kw: dict[str, Any],
) -> tuple[int, tuple[int, ...] | None, bool]:
    """Read the constructor arguments of ``name`` (``"LayerNorm"``, ``"RMSNorm"``).

    torch's form is selected by a list/tuple first argument or by ``elementwise_affine=`` (torch's
    name for ``affine``); it sets ``channel_axis=-1`` in ``kw`` unless given, and needs
    ``channel_axis=-1``, ``over="channels"`` for a ``normalized_shape`` of more than one
    dimension.

    Returns:
        ``(num_features, normalized_shape, affine)``: ``num_features`` is
        ``prod(normalized_shape)`` in torch's form; ``normalized_shape`` is ``None`` in
        normkit's form (``num_features`` an int without ``elementwise_affine``).

    Raises:
        ConfigError: ``affine`` and ``elementwise_affine`` disagree; a bad ``normalized_shape``;
            a multi-dimensional one with another layout.
    """
    if affine is not None and elementwise_affine is not None and affine != elementwise_affine:
        raise ConfigError(
            f"affine={affine!r} and elementwise_affine={elementwise_affine!r} disagree "
            f"(elementwise_affine is torch's name for affine); pass one of them")
    on = next((a for a in (affine, elementwise_affine) if a is not None), True)
    if isinstance(num_features, int) and elementwise_affine is None:
        return num_features, None, on
    shape = normalized_shape_of(num_features)
    kw.setdefault("channel_axis", -1)
    if len(shape) > 1 and (kw["channel_axis"] != -1 or over not in (None, "channels")):
        raise ConfigError(
            f"normalized_shape={list(shape)} normalizes the last {len(shape)} dimensions "
            f"(torch's {name}): it needs channel_axis=-1 and over='channels', got "
            f"channel_axis={kw['channel_axis']}, over={over!r}")
    return math.prod(shape), shape, on


class TrailingDims:
    """Mixin for a :class:`~normkit.Normalization` preset with torch's call form: the
    ``normalized_shape`` attribute, ``elementwise_affine``, and the forward over several
    trailing dimensions (the generic composition on the flattened dimensions, or the class's
    :meth:`_trailing_kernel`)."""

    normalized_shape: tuple[int, ...] | None

    def _set_normalized_shape(self, shape: tuple[int, ...] | None) -> None:
        """``normalized_shape``: torch's where the module is torch's layer (over the channels of
        each position, ``channel_axis=-1``; ``(C,)`` for one dimension), else ``None``."""
        if shape is None or len(shape) == 1:
            torch_layout = (type(self.nap).__name__ == "Position"  # type: ignore[attr-defined]
                            and self.channel_axis == -1)  # type: ignore[attr-defined]
            shape = (self.num_features,) if torch_layout else None  # type: ignore[attr-defined]
        self.normalized_shape = shape

    @property
    def elementwise_affine(self) -> bool:
        """torch's name for :attr:`affine`."""
        return self.affine  # type: ignore[attr-defined]

    def _trailing_kernel(self, x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """torch's kernel over the trailing ``shape`` of ``x``, or ``None`` for the composition."""
        return None

    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        """Normalize ``x``; torch's form with a multi-dimensional ``normalized_shape`` normalizes
        the trailing dimensions (flattened into the channel axis)."""
        shape = self.normalized_shape
        if shape is None or len(shape) == 1:
            return super().forward(x, condition)  # type: ignore[misc]
        k = len(shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
            raise ShapeError(
                f"expected an input whose last {k} dimensions are normalized_shape={list(shape)}, "
                f"got shape {tuple(x.shape)}; check normalized_shape")
        if self.native and x.numel() > 0:  # type: ignore[attr-defined]
            y = self._trailing_kernel(x, shape)
            if y is not None:
                return y
        return super().forward(x.flatten(x.dim() - k), condition).unflatten(-1, shape)  # type: ignore[misc]
