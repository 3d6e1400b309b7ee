r"""Centred sliding-window moments in the form inductor compiles into few loops: the compiled
forward and backward of :func:`~normkit.functional.fused_local.local_divisive` (divisive
normalization) for centred windows without averaged axes that one padded copy sums at once (at
most :data:`~normkit.functional.shifted.TERMS_AT_ONCE` terms: the 3×3 default).

The moments are kept in parts, on the canonical view ``(N, A, B, S)`` (the window view's
positions flattened):

.. math::
    c = \overline{x},\quad m = B(x - c) = \mu - c,\quad
    v = \max\big(B(x - c)^2 - m^2,\ 0\big),\quad x - c \text{ (the copy's centre window)},

so the Function's forward ``y = γ (x − c − m)(k + αv)^(−β) + β₀`` is one loop over the copy
(``m``, ``v``, the saved root and ``y``; ``μ`` itself is never formed), and it saves ``c`` and
``m`` for the backward (no per-sample mean recomputed there; ``x − c − m`` rounds no ``μ ≈ c``).
The backward's two flipped window sums (of ``a = ∂L/∂v`` and ``b = ∂L/∂μ`` over each position's
count) are written, with the ``γ``/``β`` row sums, in one loop, and ``∂x`` read in a second.

Inductor's loops, measured (``(128, 64, 16, 16)`` float32, 1 thread, per-loop timers in the
generated C++): a padded copy read through ``as_strided`` windows is unmasked loads; slices of
the padding inlined are masked loads behind a lambda each, several times the cost (9 of them:
34 ms a forward); a copy padded along the innermost axis writes rows of 18 — a full vector and
a masked one per row of 16. So windows along the positions of a 2-D plane read a copy of each
plane padded as one row (:func:`_flat_copy`: ``W + 1`` zeros before, after), a shift along the
rows reading the neighbouring row where it runs past one, weighed by 0 there (:func:`_inside`);
the backward makes that copy by a concatenation with zeros (inductor writes the products into
the copy's slice: no masked load of the five tensors they read), the forward by padding (its
producer is ``x − c``). Everything stays on the canonical view: on the window view the plane's
reshape leaves a remainder in the indices of the copy's loop (``(p − W − 1) mod HW``), which
inductor gathers lane by lane, and loops over merged and unmerged positions do not fuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .shifted import Span, _groups, _spans, _total, _windows
from .statistics import inverse_count

__all__ = ["WindowParts", "window_parts", "window_parts_apply", "window_parts_backward"]


class WindowParts(NamedTuple):
    """The parts of centred window moments on the window view (see the module docstring):
    ``shift`` ``c`` (``(N, A, 1, …)``), ``centred`` ``μ − c``, ``var`` and ``centre``
    (``x − c``, a window of the padded copy)."""

    shift: Tensor
    centred: Tensor
    var: Tensor
    centre: Tensor


#: the windows of one padded copy grouped by their shift along the innermost axis: ``(0/1 per
#: position of that axis — those whose neighbour exists — or None, the windows)``
Columns = list[tuple[Tensor | None, list[Tensor]]]


def _flat_pad(shape: Sequence[int], spans: list[Span]) -> tuple[int, int] | None:
    """The zeros in front of and behind each plane of :func:`_flat_copy` for the window view
    ``shape`` ``(N, A, B, H, W)``; ``None`` for other views or windows along other axes."""
    if len(shape) != 5 or any(d < 3 for d, _, _ in spans):
        return None
    front = back = 0
    for d, before, after in spans:
        scale = shape[4] if d == 3 else 1
        front, back = front + before * scale, back + after * scale
    return front, back


def _flat_copy(x: Tensor, spans: list[Span], shape: Sequence[int], concat: bool
               ) -> Tensor | None:
    """The zero-padded copy of ``x`` (on the canonical view ``(N, A, B, H·W)`` of the window
    view ``shape``) for windows along the positions of a plane: each plane padded as one row,
    ``before`` rows of zeros and ``before`` values more in front (``after`` behind); ``None``
    for other windows. A window along the rows then reads the neighbouring rows' values where
    it runs past a row (:func:`_columns` weighs them by 0): inductor writes whole rows of the
    plane, where a copy padded along the rows writes short ones (a masked vector at the end of
    each: two loop steps per row of 16)."""
    pad = _flat_pad(shape, spans)
    if pad is None:
        return None
    if not concat:
        return F.pad(x, pad)
    front, back = pad
    return torch.cat([x.new_zeros(*x.shape[:-1], front), x, x.new_zeros(*x.shape[:-1], back)],
                     -1)


def _columns(x: Tensor, spans: list[Span], shape: Sequence[int],
             scale: Tensor | float = 1.0, concat: bool = False) -> tuple[Columns, Tensor]:
    """The shifted windows of one zero-padded copy of ``x · scale`` (``x`` and ``scale`` on the
    canonical view ``(N, A, B, S)`` of the window view ``shape``; each window of ``x``'s shape),
    grouped by their shift along the innermost axis of ``shape`` (:data:`Columns`), and the
    centre window. A tensor ``scale`` multiplies the copy padded like it (made once): read at
    the copy's positions, not at ``x``'s (a remainder in the index, which inductor does not
    vectorize)."""
    flat = _flat_copy(x if isinstance(scale, float) and scale == 1.0 else x * scale, spans,
                      shape, concat)
    if flat is None:  # a padded copy along every axis (shifted_sum's), on the window view
        if isinstance(scale, Tensor):
            scale = scale.reshape(*scale.shape[:3], *shape[3:])
        terms = [t.reshape(x.shape) for t in _windows(x.reshape(shape) * scale, spans)]
        centre = 0
        for _, before, after in spans:
            centre = centre * (before + after + 1) + before
        return [(None, terms)], terms[centre]
    width = shape[4]
    row_span = [(b, a) for d, b, a in spans if d == 3] or [(0, 0)]
    col_span = [(b, a) for d, b, a in spans if d == 4] or [(0, 0)]
    (rb, ra), (cb, ca) = row_span[0], col_span[0]
    cols: Columns = []
    centre = x
    for oc in range(cb + ca + 1):
        views = [flat.as_strided(x.shape, (*flat.stride()[:-1], 1), orow * width + oc)
                 for orow in range(rb + ra + 1)]
        if oc == cb:
            centre = views[rb]
        cols.append((None if oc == cb else _inside(shape, oc - cb, x), views))
    return cols, centre


def _inside(shape: Sequence[int], shift: int, like: Tensor) -> Tensor:
    """1 where ``w + shift`` is a position of a row of the window view ``shape`` (``0 ≤ w +
    shift < W``), else 0, over the plane's positions (flattened; float arithmetic, no bool
    tensor); made once (an ``as_strided`` view). Over the plane, not a row: the loops that read
    it then run over the plane's positions as one axis, like the rest of the work on the
    canonical view (inductor fuses loops of the same ranges only)."""
    rows, width = shape[-2], shape[-1]
    i = torch.arange(width, dtype=like.dtype, device=like.device) + shift
    inside = 1.0 - (i - i.clamp(0, width - 1)).abs().clamp(max=1.0)
    plane = (torch.ones(rows, 1, dtype=like.dtype, device=like.device) * inside).reshape(-1)
    return plane.as_strided(plane.shape, plane.stride())


def _column_sum(cols: Columns, fn: object = None) -> Tensor:
    """``Σ`` of the windows (of ``fn(window)`` if ``fn``), each column's sum weighed once."""
    total = None
    for weight, views in cols:
        part = _total([fn(t) for t in views] if callable(fn) else views)
        part = part if weight is None else part * weight
        total = part if total is None else total + part
    assert total is not None
    return total


def window_parts_apply(shape: Sequence[int], full: Sequence[int], dims: Sequence[int],
                       windows: Sequence[int]) -> bool:
    """Whether :func:`window_parts` sums these windows of the window view of ``shape``: no
    averaged axes (``full``), a window longer than 1, the terms at once."""
    return not full and len(_groups(_spans(shape, dims, windows, False))) == 1


def _on_planes(t: Tensor | float, shape: Sequence[int]) -> Tensor | float:
    """A tensor broadcastable against the window view ``shape`` on its canonical view (the
    planes flattened)."""
    if not isinstance(t, Tensor):
        return t
    return t.expand(*t.shape[:3], *shape[3:]).reshape(*t.shape[:3], -1)


def window_parts(x: Tensor, shape: Sequence[int], dims: Sequence[int], windows: Sequence[int],
                 include_pad: bool) -> WindowParts | None:
    r"""Centred local moments of ``x`` — on the canonical view ``(N, A, B, S)`` of the window
    view ``shape`` (``(N, A, B, *spatial)``, the planes flattened) — from one zero-padded copy
    of ``x − c`` (``c`` its mean over ``dims``), in parts (:class:`WindowParts`), on the
    canonical view; ``None`` where one copy does not sum every axis at once (more than
    :data:`~normkit.functional.shifted.TERMS_AT_ONCE` terms) or no window is longer than 1.

    .. math::
        m = \tfrac1n \sum_{w} (x - c)_w,\qquad v = \max\big(\tfrac1n \sum_w (x - c)_w^2 - m^2,\
        0\big)

    (``n`` the count of each window: :func:`~normkit.functional.statistics.inverse_count`).
    For inductor (no graph): the windows are unmasked loads of the copy; windows along the two
    innermost axes read a copy whose planes are padded as one row (:func:`_flat_copy`). On the
    canonical view: the loops that read the copy then index the plane's positions as one axis
    (on the window view its reshape leaves a remainder in the index, which inductor does not
    vectorize).

    Shape:
        ``x``: ``(N, A, B, S)`` in at least float32; ``shift`` ``(N, A, 1, 1)``, the others
        ``x``'s shape.

    Example:
        >>> import torch
        >>> from normkit.functional import statistics as S
        >>> x = torch.randn(2, 1, 3, 5, 4, dtype=torch.float64) + 100
        >>> p = window_parts(x.reshape(2, 1, 3, 20), x.shape, (3, 4), (3, 3), False)
        >>> mean, var = S.local_moments(x, (), (3, 4), (3, 3), False)
        >>> torch.allclose((p.centred + p.shift).reshape(x.shape), mean)
        True
        >>> torch.allclose(p.var.reshape(x.shape), var)
        True
    """
    groups = _groups(_spans(shape, dims, windows, False))
    if len(groups) != 1:
        return None
    shift = x.reshape(shape).mean(dim=tuple(dims), keepdim=True)
    shift = shift.reshape(*shift.shape[:3], -1)
    cols, centre = _columns(x - shift, groups[0], shape)
    inv = _on_planes(inverse_count(shape, dims, windows, include_pad, x), shape)
    s1 = _column_sum(cols)
    inv_t = inv if isinstance(inv, Tensor) else torch.full((), inv, dtype=x.dtype,
                                                           device=x.device)
    # μ − c by an addcmul: the op the Function keeps for its backward (fused_local)
    m1 = torch.addcmul(s1.new_zeros(()), s1, inv_t)
    var = (_column_sum(cols, lambda t: t * t) * inv - m1 * m1).clamp_min(0)
    return WindowParts(shift, m1, var, centre)


def _flipped_sum(t: Tensor, shape: Sequence[int], dims: Sequence[int],
                 windows: Sequence[int], scale: Tensor | float) -> Tensor:
    """The flipped window sum (``box_sum(flip=True)``, the adjoint) of ``t · scale`` (on the
    window view ``shape`` or its planes flattened: :func:`_columns`) from one padded copy, or
    axis by axis."""
    groups = _groups(_spans(shape, dims, windows, True))
    for i, group in enumerate(groups):
        t = _column_sum(_columns(t, group, shape, scale if i == 0 else 1.0, True)[0])
    return t


def window_parts_backward(x: Tensor, g: Tensor, r: Tensor, rs: Tensor, centred: Tensor,
                          shift: Tensor, shape: Sequence[int], dims: Sequence[int],
                          windows: Sequence[int], include_pad: bool, scale: float) -> Tensor:
    r"""``∂L/∂x`` of ``y = (x − μ) s^(−β)`` from the parts (:func:`window_parts`: ``μ − c``
    and ``c``), with ``scale = −βα``, on the canonical view of the window view ``shape``
    (the planes flattened):

    .. math::
        \partial x = g r + B^\top b + 2 (x - c) B^\top a,\quad
        a = \text{scale}\, g (x - \mu)\, r/s,\quad b = -2 (\mu - c) a - g r

    (``r = s^(−β)``, ``rs = r/s``, ``g`` the output gradient times ``γ``; ``Bᵀ`` the flipped
    window sum of the value over each position's count). ``a`` and ``b`` are each one
    expression, with one user: inductor writes both straight into their padded copies (a
    concatenation with zeros, :func:`_flat_copy`) in one loop — where it would write ``a``,
    read by both, in a pass of its own — and ``∂x`` in the loop that sums those.

    Shape:
        ``x, g, r, rs, centred``: the canonical view ``(N, A, B, S)``; ``shift`` ``(N, A, 1,
        1)``; ``shape`` the window view ``(N, A, B, *spatial)``. Returns ``x``'s shape.
    """
    inv = _on_planes(inverse_count(shape, dims, windows, include_pad, x), shape)
    xs = x - shift
    d = xs - centred
    pa = (g * d) * (rs * scale)  # a
    pb = g * (centred * d * rs * (-2.0 * scale) - r)  # b
    sb = _flipped_sum(pb, shape, dims, windows, inv)
    sa = _flipped_sum(pa, shape, dims, windows, inv)
    return g * r + sb + 2.0 * xs * sa

