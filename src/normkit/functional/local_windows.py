r"""Centred sliding-window statistics in the form inductor compiles into few loops: divisive
normalization's compiled forward (:func:`~normkit.functional.fused_local.local_divisive`).

Compiled by inductor, for centred windows without averaged axes whose terms one padded copy
sums at once (:func:`~normkit.functional.shifted.shifted_moment_sums`: the 3×3 default), the
statistics are kept in parts, all on the window view ``(N, A, B, *spatial)``:

.. math::
    c = \overline{x},\quad m = B(x - c) = \mu - c,\quad
    v = \max(B(x - c)^2 - m^2,\ 0),\quad x - c \text{ (the padded copy's centre window)},

so that the Function's forward, ``y = γ (x − c − m)(k + αv)^(−β) + β₀``, reads only the padded
copy and per-sample / per-channel values: inductor computes ``m``, ``v``, the saved root and
``y`` in one loop over the window view (the loop of the window sums, which reads the padded
copy's rows: a node that read ``x`` or ``μ`` itself would run over merged positions, a loop
of its own) and ``μ = m + c`` only where something reads it. The Function saves ``m`` and
``c`` instead of ``μ`` (the backward uses ``x − c`` and ``μ − c`` — no per-sample mean over
the input recomputed there), and its backward runs on the window view too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .shifted import _groups, _spans, _total, _windows, padded, shifted_sum
from .statistics import inverse_count

__all__ = ["WindowParts", "window_parts", "window_parts_apply", "window_parts_backward",
           "window_rows"]


class WindowParts(NamedTuple):
    """The parts of centred window moments on the window view (see the module docstring):
    ``shift`` ``c`` (``(N, A, 1, …)``), ``centred`` ``μ − c``, ``var`` and ``centre``
    (``x − c``, a window of the padded copy)."""

    shift: Tensor
    centred: Tensor
    var: Tensor
    centre: Tensor


def window_parts_apply(shape: Sequence[int], full: Sequence[int], dims: Sequence[int],
                       windows: Sequence[int]) -> bool:
    """Whether :func:`window_parts` sums these windows of the window view of ``shape``: no
    averaged axes (``full``), a window longer than 1, the terms at once."""
    return not full and len(_groups(_spans(shape, dims, windows, False))) == 1


def window_parts(x: Tensor, dims: Sequence[int], windows: Sequence[int],
                 include_pad: bool) -> WindowParts | None:
    r"""Centred local moments of the window view ``x`` from one zero-padded copy of ``x − c``
    (``c`` its mean over ``dims``), in parts (:class:`WindowParts`); ``None`` where one copy
    does not sum every axis at once (more than
    :data:`~normkit.functional.shifted.TERMS_AT_ONCE` terms) or no window is longer than 1.

    .. math::
        m = \tfrac1n \sum_{w} (x - c)_w,\qquad v = \max\big(\tfrac1n \sum_w (x - c)_w^2 - m^2,\
        0\big)

    (``n`` the count of each window: :func:`~normkit.functional.statistics.inverse_count`).
    For inductor (no graph): the windows are unmasked loads of the copy.

    Shape:
        ``x``: ``(N, A, B, *spatial)`` in at least float32; ``shift`` ``(N, A, 1, …)``, the
        others ``x``'s shape.

    Example:
        >>> import torch
        >>> from normkit.functional import statistics as S
        >>> x = torch.randn(2, 1, 3, 5, 4, dtype=torch.float64) + 100
        >>> p = window_parts(x, (3, 4), (3, 3), False)
        >>> mean, var = S.local_moments(x, (), (3, 4), (3, 3), False)
        >>> torch.allclose(p.centred + p.shift, mean), torch.allclose(p.var, var)
        (True, True)
    """
    groups = _groups(_spans(x.shape, dims, windows, False))
    if len(groups) != 1:
        return None
    shift = x.mean(dim=tuple(dims), keepdim=True)
    terms = _windows(x - shift, groups[0])
    centre = 0  # the window at offset 0 on every axis: `before` values into the padding
    for _, before, after in groups[0]:
        centre = centre * (before + after + 1) + before
    inv = inverse_count(x.shape, dims, windows, include_pad, x)
    m1 = torch.addcmul(terms[0] * inv, _total(terms[1:]), inv)  # kept for the backward
    var = (_total([t * t for t in terms]) * inv - m1 * m1).clamp_min(0)
    return WindowParts(shift, m1, var, terms[centre])



def window_parts_backward(x: Tensor, g: Tensor, r: Tensor, rs: Tensor, centred: Tensor,
                          shift: Tensor, dims: Sequence[int], windows: Sequence[int],
                          include_pad: bool, scale: float) -> Tensor:
    r"""``∂L/∂x`` of ``y = (x − μ) s^(−β)`` on the window view, from the parts
    (:func:`window_parts`: ``μ − c`` and ``c``), with ``scale = −βα``:

    .. math::
        \partial x = g r + B^\top b + 2 (x - c) B^\top a,\quad
        a = \text{scale}\, g (x - \mu)\, r/s,\quad b = -2 (\mu - c) a - g r

    (``r = s^(−β)``, ``rs = r/s``, ``g`` the output gradient times ``γ``; ``Bᵀ`` the flipped
    window sum of the value over each position's count). ``a`` and ``b`` are each one
    expression, with one user: inductor computes both in the loop that writes their padded
    copies, and ``∂x`` in the loop that sums those (where it would write ``a``, read by both,
    in a pass of its own).
    """
    inv = inverse_count(x.shape, dims, windows, include_pad, x)
    xs = x - shift
    d = xs - centred
    pa = (g * d) * (rs * inv * scale)  # a / n
    pb = (g * inv) * (centred * d * rs * (-2.0 * scale) - r)  # b / n
    sb = shifted_sum(pb, dims, windows, flip=True)
    sa = shifted_sum(pa, dims, windows, flip=True)
    return g * r + sb + 2.0 * xs * sa


def window_rows(t: Tensor, dims: Sequence[int], windows: Sequence[int]) -> Tensor:
    """``t`` summed over the positions of the window view, ``(N, A, B)``: over the padding of
    :func:`window_parts_backward`'s copies (zeros) where the windows run along positions only,
    so that inductor makes the sums (``γ``'s and ``β``'s gradients) in the loop that writes
    those copies, not in a pass of their own."""
    spans = _spans(t.shape, dims, windows, True)
    if all(d >= 3 for d, _, _ in spans):
        t = padded(t, spans)
    return t.sum(tuple(range(3, t.dim())))
