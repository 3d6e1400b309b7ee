"""Area partitioning (NAP) as pure tensor functions: the canonical ``(N, A, B, S)`` view.

An input of shape ``(N, C, *spatial)`` (or channels-last ``(N, *spatial, C)``) is viewed as
``(N, A, B, S)`` with ``C = A·B`` and ``S`` the flattened spatial positions. Channel ``c`` sits at
``(a, b) = divmod(c, B)``. Each axis then has a role: ``G`` (independent problems), ``D`` (features
normalized jointly) or ``M`` (samples the statistics are taken over). Standardization reduces over
the ``M`` axes; ``G`` and ``D`` axes both keep separate statistics.

The view is a free ``reshape`` for contiguous NCHW, channels-last and ``channel_axis=-1`` inputs;
nothing is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError, DTypeError, ShapeError

__all__ = [
    "Role",
    "as_dtype",
    "resolve_groups",
    "pad_channels",
    "narrow_channels",
    "canonical_view",
    "restore_view",
    "reduce_dims",
    "check_input",
    "matrix_view",
    "unmatrix_view",
]

Role = Literal["G", "D", "M"]
AXES = ("N", "A", "B", "S")


def resolve_groups(
    num_features: int, num_groups: int | None = None, group_size: int | None = None, *,
    ragged: bool = False,
) -> tuple[int, int]:
    """Split ``num_features`` channels into ``(num_groups, group_size)``.

    Exactly one of ``num_groups`` / ``group_size`` must be given; it must be positive and divide
    ``num_features`` — unless ``ragged`` and ``group_size`` is given: then the last group is
    smaller and the split is ``(⌈C/d⌉, d)`` with ``A·B ≥ C`` (the channels are zero-padded to
    ``A·B``, see :func:`pad_channels`).

    Example:
        >>> resolve_groups(64, num_groups=8)
        (8, 8)
        >>> resolve_groups(64, group_size=16)
        (4, 16)
        >>> resolve_groups(40, group_size=16, ragged=True)   # groups of 16, 16 and 8
        (3, 16)

    Raises:
        ConfigError: if both or neither are given, a value is not positive, or it does not divide.
    """
    if num_groups is not None and group_size is not None:
        raise ConfigError(
            f"pass either num_groups ({num_groups}) or group_size ({group_size}), not both"
        )
    if num_groups is None and group_size is None:
        raise ConfigError("pass one of num_groups= or group_size=")
    if not isinstance(num_features, int) or num_features <= 0:
        raise ConfigError(f"num_features must be a positive int, got {num_features!r}")
    what, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    if num_features % value and ragged and group_size is not None:
        if value > num_features:
            raise ConfigError(
                f"group_size ({value}) must be at most num_features ({num_features})"
            )
        return -(-num_features // value), value
    if num_features % value:
        divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
        raise ConfigError(
            f"num_features ({num_features}) must be divisible by {what} ({value}); "
            f"divisors of {num_features}: {divisors}"
        )
    other = num_features // value
    return (value, other) if num_groups is not None else (other, value)


def pad_channels(x: Tensor, num_padded: int, channel_axis: int = 1, value: float = 0.0) -> Tensor:
    """``x`` with ``num_padded`` channels of ``value`` (default zeros) appended at ``channel_axis``
    (a smaller last group of a ragged split, :func:`resolve_groups`); ``x`` itself when
    ``num_padded == 0``."""
    if num_padded == 0:
        return x
    axis = channel_axis % x.dim()
    pad = [0, 0] * (x.dim() - 1 - axis) + [0, num_padded]
    return torch.nn.functional.pad(x, pad, value=value)


def narrow_channels(y: Tensor, num_features: int, channel_axis: int = 1) -> Tensor:
    """Inverse of :func:`pad_channels`: the first ``num_features`` channels, contiguous like the
    input layout (a no-op when nothing was padded)."""
    if y.shape[channel_axis] == num_features:
        return y
    return y.narrow(channel_axis, 0, num_features).contiguous()


def check_input(x: Tensor, num_features: int, channel_axis: int) -> None:
    """Raise :class:`ShapeError` unless ``x`` has ``num_features`` channels and rank ≥ 2 (rank ≥ 1
    with ``channel_axis=-1``, where a single vector ``(C,)`` is one sample, as ``torch.nn.LayerNorm``
    accepts), and :class:`DTypeError` unless ``x`` is floating point (an integer or bool input
    would give integer-truncated statistics; torch's kernels refuse it too)."""
    if not x.is_floating_point():
        raise DTypeError(
            f"expected a floating-point input, got dtype {x.dtype}; convert it with x.float() "
            f"(or .to(torch.bfloat16 / torch.float16))"
        )
    if x.dim() < (1 if channel_axis == -1 else 2):
        raise ShapeError(
            f"expected an input of rank >= 2 (N, C, *spatial), got shape {tuple(x.shape)}; "
            f"add a batch dimension with x.unsqueeze(0)"
        )
    if x.shape[channel_axis] != num_features:
        raise ShapeError(
            f"expected {num_features} channels at axis {channel_axis}, got input of shape "
            f"{tuple(x.shape)} with {x.shape[channel_axis]}; check num_features or channel_axis"
        )


def canonical_view(x: Tensor, groups: tuple[int, int], channel_axis: int = 1) -> Tensor:
    """View ``x`` as ``(N, A, B, S)`` with ``(A, B) = groups`` and ``A·B = C``.

    ``channel_axis`` is ``1`` (``(N, C, *spatial)``) or ``-1`` (``(N, *spatial, C)``, e.g.
    ``(B, T, D)``). Returns a view whenever the strides allow (contiguous, channels-last,
    ``movedim`` of contiguous) and a copy otherwise.

    Shape:
        - x: ``(N, C, *spatial)`` or ``(N, *spatial, C)``
        - output: ``(N, A, B, prod(spatial))``
    """
    if channel_axis not in (1, -1, x.dim() - 1):
        raise ConfigError(f"channel_axis must be 1 or -1, got {channel_axis}")
    if channel_axis != 1:
        x = x.movedim(-1, 1)
    n, a, b = x.shape[0], groups[0], groups[1]
    s = 1
    for d in x.shape[2:]:
        s *= d
    return x.reshape(n, a, b, s)


def restore_view(v: Tensor, shape: Sequence[int], channel_axis: int = 1) -> Tensor:
    """Inverse of :func:`canonical_view`: back to ``shape`` (the original input's shape)."""
    if channel_axis == 1:
        return v.reshape(shape)
    moved = (shape[0], shape[-1], *shape[1:-1])
    return v.reshape(moved).movedim(1, -1)


def reduce_dims(roles: Sequence[Role]) -> tuple[int, ...]:
    """Indices of the ``M`` axes among ``(N, A, B, S)``: what statistics reduce over."""
    return tuple(i for i, r in enumerate(roles) if r == "M")


def stat_count(v: Tensor, dims: Sequence[int]) -> int:
    """Number of samples each statistic is taken over (product of the reduced sizes)."""
    m = 1
    for d in dims:
        m *= v.shape[d]
    return m


def param_view(t: Tensor, groups: tuple[int, int]) -> Tensor:
    """A per-channel tensor ``(C,)`` as ``(1, A, B, 1)``, broadcastable against the view."""
    return t.reshape(1, groups[0], groups[1], 1)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: at least float32 (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when ``t`` already has it (``to`` then returns ``t``
    itself too, but its dispatch costs ~1 µs per call: per-call overhead at small shapes).
    Traced, the check is a constant: the graph is the same.

    Example:
        >>> t = torch.ones(2)
        >>> as_dtype(t, torch.float32) is t, as_dtype(t, torch.float64).dtype
        (True, torch.float64)
    """
    return t if t.dtype == dtype else t.to(dtype)


def _matrix_perm(roles: Sequence[Role]) -> tuple[list[int], list[int], list[int]]:
    g = [i for i in (1, 2, 3) if roles[i] == "G"]
    d = [i for i in (1, 2, 3) if roles[i] == "D"]
    m = [i for i in range(4) if roles[i] == "M"]
    return g, d, m


def matrix_view(v: Tensor, roles: Sequence[Role]) -> Tensor:
    """The canonical view as a batch of matrices ``(Gn, Gc, D, M)`` for whitening.

    ``Gn`` is ``N`` when the batch axis is a ``G`` axis (per-sample problems) and 1 otherwise;
    ``Gc`` the product of the other ``G`` axes, ``D`` of the ``D`` axes (features whitened
    jointly) and ``M`` of the ``M`` axes (samples). Copies when the permutation requires it.

    Example:
        >>> v = torch.randn(8, 4, 16, 9)       # (N, A, B, S)
        >>> matrix_view(v, ("M", "G", "D", "M")).shape   # batch whitening, 4 groups of 16
        torch.Size([1, 4, 16, 72])
        >>> matrix_view(v, ("G", "D", "M", "M")).shape   # group whitening, 4 groups
        torch.Size([8, 1, 4, 144])
    """
    g, d, m = _matrix_perm(roles)
    lead = [0] if roles[0] == "G" else []
    p = v.permute(*lead, *g, *d, *m)
    sizes = [math.prod([v.shape[i] for i in axes]) for axes in (g, d, m)]
    return p.reshape(v.shape[0] if lead else 1, *sizes)


def unmatrix_view(mat: Tensor, shape: Sequence[int], roles: Sequence[Role]) -> Tensor:
    """Inverse of :func:`matrix_view`: back to the canonical ``(N, A, B, S)`` of ``shape``."""
    g, d, m = _matrix_perm(roles)
    perm = ([0] if roles[0] == "G" else []) + g + d + m
    inverse = sorted(range(4), key=perm.__getitem__)
    return mat.reshape([shape[i] for i in perm]).permute(*inverse)


def matrix_sizes(groups: tuple[int, int], roles: Sequence[Role]) -> tuple[int, int]:
    """``(Gc, D)`` of :func:`matrix_view` for the channel split ``groups = (A, B)``."""
    gc = math.prod([n for n, r in zip(groups, roles[1:3], strict=True) if r == "G"])
    d = math.prod([n for n, r in zip(groups, roles[1:3], strict=True) if r == "D"])
    return gc, d
