r"""Batch whitening's fused training step as ``torch.library`` custom ops.

Autograd through ``μ``, ``x − μ``, ``Σ = X Xᵀ/m`` and ``W X`` makes ~10 passes over the
activations in the backward and saves several activation-sized intermediates. The fused step
splits the work into two custom ops, each one node to ``torch.compile`` and ``torch.export`` (a
fake kernel gives their shapes), with a hand-derived backward that is a custom op too:

=================================  =========================================================
``normkit::whiten_moments``        ``(μ, Σ, x_c)`` of the ``(P, G, D, S)`` samples of ``x``;
                                   differentiable through ``Σ`` only:
                                   ``∂x = (2/m)·sym(∂Σ)·x_c`` (``μ`` and ``x_c`` are
                                   constants to autograd, see below)
``normkit::whiten_apply``          ``y = M x_c + b``; ``∂x = Mᵀ(g − ḡ)`` (the gradient through
                                   ``x_c = x − μ(x)``), ``∂M = Σ g x_cᵀ``, ``∂b = Σ g``
=================================  =========================================================

``W = W(Σ)`` between them is small ``(D × D)`` autograd math (ZCA, PCA, Cholesky, Newton–Schulz
in :mod:`normkit.functional.whiten`), and ``M = γ ⊙ W``, ``b = β`` are formed by autograd too,
so ``∂Σ``, ``∂γ``, ``∂β`` come from autograd on ``D × D`` tensors and the activations are read
three times in the backward with ``x − μ`` the only saved activation. ``∂x`` sums both ops'
terms: ``Mᵀ(g − ḡ) + (2/m)·sym(∂Σ)·x_c``. ``Σ``'s path through ``μ`` adds nothing (its term is
a sum of ``x_c`` over the samples, which is zero), which is why ``μ`` and ``x_c`` may be
constants to autograd when both ops are used together, as :func:`whiten_with_gradient` does.

Both ops compute in at least float32 with autocast disabled (their statistics and matrices are
float32 under ``torch.autocast``), return fresh tensors (never views: an in-place op such as
``ReLU(inplace=True)`` may follow) and are first order: a second derivative raises. Eager
calls skip the dispatcher (:func:`~normkit.functional._eager_ops.eager_op`: the same
implementation, setup and backward in an ``autograd.Function``); compiled and exported code
sees the ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._eager_ops import eager_op
from .partition import Role, as_dtype, matrix_view, unmatrix_view
from .whiten import _first_order, _full_precision, batch_moments, grouped_matmul
from .whiten_chunks import chunked_moments

__all__ = ["whiten_moments", "whiten_with_gradient"]

_FIRST_ORDER = ("the fused batch-whitening backward",
                "build the module with native=False for the plain autograd composition "
                "(twice differentiable for cholesky, newton and pca)")


def _samples(x: Tensor, roles: str) -> Tensor:
    """``x`` ``(N, A, B, S)`` as ``(P, G, D, S)`` samples: itself (``roles=""``) or its matrix view."""
    return x if not roles else matrix_view(x, tuple(roles))  # type: ignore[arg-type]


def _fresh(t: Tensor) -> Tensor:
    """``t`` as a tensor that is not a view (a custom op's output may not be one)."""
    if t._base is None:
        return t
    return torch.ops.aten._unsafe_view(t.contiguous(), t.shape)


def _to_input(dx: Tensor, shape: Sequence[int], roles: str, dtype: torch.dtype) -> Tensor:
    """A gradient in the ``(P, G, D, S)`` layout back to the input's ``(N, A, B, S)``, contiguous."""
    dx = dx if not roles else unmatrix_view(dx, shape, tuple(roles))  # type: ignore[arg-type]
    return _fresh(as_dtype(dx, dtype).contiguous())


def _count(centered: Tensor, shared: bool) -> int:
    return centered.shape[0] * centered.shape[3] if shared else centered.shape[3]


# ---------------------------------------------------------------------------- moments
def _moments_impl(x: Tensor, shared: bool, roles: str) -> tuple[Tensor, Tensor, Tensor]:
    with _full_precision(x):
        if shared and not roles:  # in place: centring and covariance chunk by chunk
            mean, cov, centered = chunked_moments(x)
        else:
            mean, cov, centered = batch_moments(_samples(x, roles), shared)
        return _fresh(mean), _fresh(cov), _fresh(centered.contiguous())


_moments = torch.library.custom_op("normkit::whiten_moments", _moments_impl, mutates_args=())


@_moments.register_fake
def _(x: Tensor, shared: bool, roles: str) -> tuple[Tensor, Tensor, Tensor]:
    p, g, d, s = _samples(x, roles).shape
    dt = torch.promote_types(x.dtype, torch.float32)
    lead = 1 if shared else p
    return (x.new_empty((lead, g, d, 1), dtype=dt), x.new_empty((lead, g, d, d), dtype=dt),
            x.new_empty((p, g, d, s), dtype=dt))


def _moments_backward_impl(dcov: Tensor, centered: Tensor, shared: bool, roles: str,
                           shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    with _full_precision(centered):
        m = max(_count(centered, shared), 1)
        dsym = (dcov + dcov.transpose(-1, -2)).to(centered.dtype) / m
        return _to_input(grouped_matmul(dsym, centered), shape, roles, dtype)


_moments_backward = torch.library.custom_op("normkit::whiten_moments_backward",
                                            _moments_backward_impl, mutates_args=())


@_moments_backward.register_fake
def _(dcov: Tensor, centered: Tensor, shared: bool, roles: str, shape: Sequence[int],
      dtype: torch.dtype) -> Tensor:
    return centered.new_empty(shape, dtype=dtype)


def _moments_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, shared, roles = inputs
    mean, _, centered = output
    ctx.mark_non_differentiable(mean, centered)
    ctx.save_for_backward(centered)
    ctx.meta = (shared, roles, tuple(x.shape), x.dtype)


@_first_order(*_FIRST_ORDER)
def _moments_grad(ctx, dmean, dcov, dcentered,  # type: ignore[no-untyped-def]
                  backward=_moments_backward):
    if dcov is None:
        return None, None, None
    (centered,) = ctx.saved_tensors
    shared, roles, shape, dtype = ctx.meta
    return backward(dcov, centered, shared, roles, shape, dtype), None, None


_moments_call = eager_op(_moments, _moments_impl, setup_context=_moments_setup,
                         backward=_moments_grad, backward_impl=_moments_backward_impl)


# ------------------------------------------------------------------------------ apply
def _apply_impl(x: Tensor, centered: Tensor, matrix: Tensor, shift: Tensor | None, shared: bool,
                roles: str) -> Tensor:
    with _full_precision(centered):
        return _fresh(grouped_matmul(as_dtype(matrix, centered.dtype), centered,
                                     None if shift is None else as_dtype(shift, centered.dtype)))


_apply = torch.library.custom_op("normkit::whiten_apply", _apply_impl, mutates_args=())


@_apply.register_fake
def _(x: Tensor, centered: Tensor, matrix: Tensor, shift: Tensor | None, shared: bool,
      roles: str) -> Tensor:
    return torch.empty_like(centered, memory_format=torch.contiguous_format)


def _apply_backward_impl(grad: Tensor, centered: Tensor, matrix: Tensor, shared: bool, roles: str,
                         shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    with _full_precision(centered):
        g = as_dtype(grad, centered.dtype)
        mat = as_dtype(matrix, centered.dtype)
        m = max(_count(centered, shared), 1)
        gsum = g.sum((0, 3) if shared else (3,), keepdim=True)
        outer = torch.matmul(g, centered.transpose(-1, -2))  # Ĝ = Σ g x_cᵀ
        outer = outer.sum(0, keepdim=True) if outer.shape[0] != mat.shape[0] else outer
        mat_t = mat.transpose(-1, -2)
        dx = grouped_matmul(mat_t, g, torch.matmul(mat_t, gsum).div_(-m))  # Mᵀ (g − ḡ)
        return (_to_input(dx, shape, roles, dtype), _fresh(as_dtype(outer, matrix.dtype)),
                _fresh(gsum))


_apply_backward = torch.library.custom_op("normkit::whiten_apply_backward", _apply_backward_impl,
                                          mutates_args=())


@_apply_backward.register_fake
def _(grad: Tensor, centered: Tensor, matrix: Tensor, shared: bool, roles: str,
      shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    p, g, d, _ = centered.shape
    return (centered.new_empty(shape, dtype=dtype), matrix.new_empty(matrix.shape),
            centered.new_empty((1 if shared else p, g, d, 1)))


def _apply_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, centered, matrix, shift, shared, roles = inputs
    ctx.save_for_backward(centered, matrix)
    ctx.meta = (shared, roles, tuple(x.shape), x.dtype,
                None if shift is None else (tuple(shift.shape), shift.dtype))


@_first_order(*_FIRST_ORDER)
def _apply_grad(ctx, grad, backward=_apply_backward):  # type: ignore[no-untyped-def]
    centered, matrix = ctx.saved_tensors
    shared, roles, shape, dtype, shift_meta = ctx.meta
    dx, dmat, dshift = backward(grad, centered, matrix, shared, roles, shape, dtype)
    if shift_meta is not None:
        lead, sdt = shift_meta[0][0], shift_meta[1]
        dshift = (dshift if dshift.shape[0] == lead else dshift.sum(0, keepdim=True)).to(sdt)
    else:
        dshift = None
    return dx, None, dmat, dshift, None, None


_apply_call = eager_op(_apply, _apply_impl, setup_context=_apply_setup, backward=_apply_grad,
                       backward_impl=_apply_backward_impl)


# ----------------------------------------------------------------------------- public
def _roles(roles: Sequence[Role] | None) -> str:
    return "" if roles is None else "".join(roles)


def whiten_moments(x: Tensor, *, shared: bool, roles: Sequence[Role] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased covariance and centred samples of ``x`` as
    :func:`~normkit.functional.whiten.batch_moments` of its ``(P, G, D, S)`` samples (``x``
    itself, or its :func:`~normkit.functional.partition.matrix_view` under ``roles``), as one
    custom op: the covariance carries the gradient ``∂x = (2/m)·sym(∂Σ)·x_c`` (w.r.t. ``x``),
    the mean and the centred samples carry none (:func:`whiten_with_gradient` accounts for the
    centring). Float32 (float64 stays float64) whatever the input dtype or autocast.

    Shape:
        ``x``: ``(N, A, B, S)``; outputs ``(1 or P, G, D, 1)``, ``(1 or P, G, D, D)``,
        ``(P, G, D, S)`` (contiguous).

    Example:
        >>> x = torch.randn(8, 2, 3, 5, dtype=torch.float64)
        >>> mean, cov, xc = whiten_moments(x, shared=True)
        >>> ref = batch_moments(x, shared=True)
        >>> all(torch.allclose(a, b) for a, b in zip((mean, cov, xc), ref))
        True
    """
    return _moments_call(x, shared, _roles(roles))


def whiten_with_gradient(
    x: Tensor,
    centered: Tensor,
    matrix: Tensor,
    *,
    shared: bool,
    roles: Sequence[Role] | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    r"""``y = (γ ⊙ W) x_c + β`` in the ``(P, G, D, S)`` layout of ``centered``, with the gradient
    of the whole map ``x → y``.

    ``x`` is the input ``(N, A, B, S)``; ``centered``, and the covariance ``Σ`` that ``matrix``
    ``W`` was computed from with autograd, come from :func:`whiten_moments` of ``x``. With
    ``M = γ ⊙ W`` (rows scaled; ``weight``, ``bias`` are ``(1 or P, G, D, 1)`` views),
    ``g = ∂L/∂y`` and ``m`` samples:

    .. math::
        ∂L/∂x = Mᵀ (g − \bar g) + \tfrac{2}{m}\,\mathrm{sym}(∂L/∂Σ)\, x_c,\quad
        ∂L/∂M = Σ g x_cᵀ,\quad ∂L/∂β = Σ g

    (``∂L/∂Σ`` from ``W``'s own autograd graph, ``∂γ``, ``∂W`` from ``∂M``). The output is a
    fresh float32 tensor (not a view); map it back with
    :func:`~normkit.functional.partition.unmatrix_view` under ``roles``. First order: a second
    derivative raises; the plain autograd composition (``W (x − μ)`` with ``μ`` and ``Σ`` from
    autograd, ``native=False``) is the reference it is tested against.

    Example:
        >>> x = torch.randn(16, 2, 3, 4, dtype=torch.float64, requires_grad=True)
        >>> from normkit.functional.whiten import zca_matrix
        >>> mean, cov, xc = whiten_moments(x, shared=True)
        >>> w = zca_matrix(cov[0], eps=1e-5).unsqueeze(0)
        >>> y = whiten_with_gradient(x, xc, w, shared=True)
        >>> ref = w @ (x - x.mean((0, 3), keepdim=True))
        >>> torch.allclose(y, ref)
        True
        >>> g = torch.randn_like(y)
        >>> a = torch.autograd.grad(y, x, g)[0]
        >>> mu = x.mean((0, 3), keepdim=True)
        >>> s = ((x - mu) @ (x - mu).transpose(-1, -2)).sum(0, keepdim=True) / 64
        >>> b = torch.autograd.grad(zca_matrix(s[0], eps=1e-5) @ (x - mu), x, g)[0]
        >>> torch.allclose(a, b)
        True
    """
    mat = matrix if weight is None else matrix * as_dtype(weight, matrix.dtype)
    return _apply_call(x, centered, mat, bias, shared, _roles(roles))
