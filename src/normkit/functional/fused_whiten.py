r"""Per-sample ZCA whitening (instance and group whitening) as ``torch.library`` custom ops with a
hand-derived backward.

Each sample's ``(D × S)`` block ``x`` is whitened with its own ``W = (Σ + εI)^{-1/2}``,
``Σ = x_c x_cᵀ/m`` (``m = S``). Autograd through ``μ``, ``x − μ``, ``Σ``, ``eigh``, ``W`` and
``W x_c`` runs a dozen passes over the activations and the divided-difference eigen backward
(:class:`normkit.functional.whiten._InvSqrtEigh`) masks near-equal pairs with bool tensors. Here
the statistics are computed once without autograd (:func:`sample_zca_fit`) and one op applies
``y = (γ ⊙ W) x_c + β`` (:func:`sample_zca_apply`) with the gradient of the whole map ``x → y``:

.. math::
    ∂L/∂x = Mᵀ (g − \bar g) + P\,x_c,\qquad
    P = -\tfrac{1}{m}\,U\big(K ∘ Uᵀ (G_W + G_Wᵀ) U\big)Uᵀ,\qquad
    K_{ij} = \frac{(f_i f_j)^2}{f_i + f_j}

with ``M = γ ⊙ W`` (rows), ``G = g x_cᵀ``, ``G_W = γ ⊙ G``, ``Σ + εI = U Λ Uᵀ`` and
``f = λ^{-1/2}``; ``∂γ_i = Σ_j G_{ij} W_{ij}``, ``∂β = Σ g``. ``K`` is the divided difference
``(f_i − f_j)/(λ_i − λ_j)`` of ``f(λ) = λ^{-1/2}`` in closed form (``λ_i − λ_j =
(√λ_i − √λ_j)(√λ_i + √λ_j)`` cancels): exact for equal eigenvalues too (``K_ii = f'(λ_i) =
−½λ_i^{-3/2}`` up to the sign carried by ``P``), with no mask and no cancellation. The
activations are read by three matmuls in the backward (``G``, ``Mᵀ g``, ``P x_c``); nothing
activation-sized is saved beyond the input (``x − μ`` is recomputed from it: one pass), only the
``D × D`` factors ``U``, ``W`` and the eigenvalues.

Both ops compute in at least float32 with autocast off, return fresh tensors and are first
order (a second derivative raises: use ``native=False``, the plain composition). Eager calls
skip the dispatcher (:func:`~normkit.functional._eager_ops.eager_op`); compiled and exported
code sees the ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._eager_ops import eager_op
from .partition import Role, as_dtype, matrix_view, unmatrix_view
from .whiten import _first_order, _full_precision, grouped_matmul
from .whiten_chunks import chunked_matmuls
from .whiten_ops import _fresh, _roles, _samples, _to_input

__all__ = ["inv_sqrt_eigh", "sample_zca_apply", "sample_zca_fit", "zca_input_term"]

_FIRST_ORDER = ("the fused per-sample whitening backward",
                "build the module with native=False for the plain autograd composition")


def inv_sqrt_eigh(cov: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(f, U, W)`` with ``Σ + εI = U Λ Uᵀ``, ``f = λ^{-1/2}`` (``λ`` clamped at ``ε``, or the
    dtype's ``tiny`` when ``ε = 0``) and ``W = U diag(f) Uᵀ``, for covariances ``(B, D, D)``;
    no autograd. A non-finite ``Σ`` gives NaN ``f`` and ``W`` (never a LAPACK error).

    Example:
        >>> a = torch.randn(2, 3, 9, dtype=torch.float64)
        >>> cov = a @ a.mT / 9
        >>> f, u, w = inv_sqrt_eigh(cov, 1e-5)
        >>> eye = torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(w @ (cov + 1e-5 * eye) @ w, eye.expand(2, 3, 3))
        True
    """
    # Non-finite Σ: eigh on zeros instead (finite), then NaN eigenvalues for those matrices. The
    # float64 sum neither overflows for finite float32 entries nor hides a NaN or ±Inf.
    finite = torch.isfinite(cov.sum((-2, -1), dtype=torch.float64)).unsqueeze(-1)
    a = torch.nan_to_num(cov, nan=0.0, posinf=0.0, neginf=0.0)
    a.diagonal(dim1=-2, dim2=-1).add_(eps)
    lam, u = torch.linalg.eigh(a)
    f = lam.clamp_min(eps if eps > 0 else torch.finfo(lam.dtype).tiny).rsqrt()
    f = torch.where(finite, f, torch.full_like(f, float("nan")))  # (B, D): small
    # eigh's eigenvectors are column-major; contiguous so that the custom ops' outputs have the
    # strides of their fake kernels (inductor asserts them)
    u = u.contiguous()
    return f, u, torch.matmul(u * f.unsqueeze(-2), u.mT)


def _centered(xs: Tensor) -> tuple[Tensor, Tensor]:
    """``(x − μ, μ)`` over the last axis of the samples ``xs`` ``(P, G, D, S)``, in at least
    float32, contiguous. The backwards recompute it from the saved input (the same kernels on
    the same values: the same bits) instead of saving an activation-sized tensor."""
    xf = xs.to(torch.promote_types(xs.dtype, torch.float32))
    mean = xf.mean(-1, keepdim=True)
    return (xf - mean).contiguous(), mean


# ------------------------------------------------------------------------------- fit
def _fit_impl(x: Tensor, roles: str, eps: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _full_precision(x):
        centered, mean = _centered(_samples(x, roles))
        p, g, d, s = centered.shape
        cov = torch.matmul(centered, centered.mT).div_(max(s, 1))
        f, u, w = inv_sqrt_eigh(cov.view(p * g, d, d), eps)
        return (_fresh(mean), _fresh(cov), _fresh(centered), _fresh(f.view(p, g, d)),
                _fresh(u.reshape(p, g, d, d)), _fresh(w.view(p, g, d, d)))


_fit = torch.library.custom_op("normkit::whiten_sample_fit", _fit_impl, mutates_args=())


@_fit.register_fake
def _(x: Tensor, roles: str, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    p, g, d, s = _samples(x, roles).shape
    dt = torch.promote_types(x.dtype, torch.float32)
    mats = x.new_empty((p, g, d, d), dtype=dt)
    return (x.new_empty((p, g, d, 1), dtype=dt), mats, x.new_empty((p, g, d, s), dtype=dt),
            x.new_empty((p, g, d), dtype=dt), torch.empty_like(mats), torch.empty_like(mats))


def _fit_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.mark_non_differentiable(*output)  # constants: sample_zca_apply differentiates them


def _fit_grad(ctx, *grads):  # type: ignore[no-untyped-def]
    return None, None, None


_fit_call = eager_op(_fit, _fit_impl, setup_context=_fit_setup, backward=_fit_grad)


def sample_zca_fit(x: Tensor, roles: Sequence[Role], eps: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Per-sample statistics for :func:`sample_zca_apply`, as one custom op whose outputs are
    constants to autograd (:func:`sample_zca_apply` carries their gradient):
    ``(μ, Σ, x_c, f, U, W)`` of the ``(P, G, D, S)`` matrix view of ``x`` under ``roles``
    (``P·G`` independent problems over their ``S`` samples), ``Σ`` biased, ``(f, U, W)`` of
    :func:`inv_sqrt_eigh`. Float32 (float64 stays float64) whatever the dtype or autocast.

    Shape:
        ``x``: ``(N, A, B, S)``; outputs ``(P, G, D, 1)``, ``(P, G, D, D)``, ``(P, G, D, S)``
        (contiguous), ``(P, G, D)``, ``(P, G, D, D)``, ``(P, G, D, D)``.

    Example:
        >>> x = torch.randn(2, 1, 3, 7, dtype=torch.float64)
        >>> mean, cov, xc, f, u, w = sample_zca_fit(x, ("G", "G", "D", "M"), 1e-5)
        >>> torch.allclose(cov[0, 0], torch.cov(x[0, 0], correction=0))
        True
    """
    return _fit_call(x, _roles(roles), float(eps))


# ----------------------------------------------------------------------------- apply
def _k(f: Tensor, m: int) -> Tensor:
    """``−K/m``: ``K_ij = (f_i f_j)²/(f_i + f_j)``, the divided difference of ``λ^{-1/2}``."""
    ff = f.unsqueeze(-1) * f.unsqueeze(-2)
    return ff.square_().div_(f.unsqueeze(-1) + f.unsqueeze(-2)).mul_(-1.0 / m)


def zca_input_term(u: Tensor, f: Tensor, gw: Tensor, m: int) -> Tensor:
    r"""``P = −(1/m) U (K ∘ Uᵀ(G_W + G_Wᵀ)U) Uᵀ``, ``K_ij = (f_i f_j)²/(f_i + f_j)``: the input
    gradient's term through ``Σ`` of ZCA whitening ``W = (Σ + εI)^{-1/2} = U diag(f) Uᵀ``, on
    ``x_c``, for ``∂L/∂W = G_W`` and ``m`` samples (``P = (2/m)·sym(∂L/∂Σ)``). ``u`` ``(B, D, D)``,
    ``f`` ``(B, D)``, ``gw`` ``(B, D, D)`` (not modified).

    Example:
        >>> a = torch.randn(1, 3, 8, dtype=torch.float64)
        >>> f, u, w = inv_sqrt_eigh(a @ a.mT / 8, 1e-5)
        >>> from normkit.functional.whiten import zca_matrix
        >>> s = (a @ a.mT / 8).requires_grad_()
        >>> gw = torch.randn(1, 3, 3, dtype=torch.float64)
        >>> (ds,) = torch.autograd.grad(zca_matrix(s, 1e-5), s, gw)
        >>> torch.allclose(zca_input_term(u, f, gw, 8), (ds + ds.mT) / 8)
        True
    """
    inner = torch.bmm(u.mT, torch.bmm(gw + gw.mT, u)).mul_(_k(f, m))
    return torch.bmm(u, torch.bmm(inner, u.mT))


def _apply_impl(x: Tensor, centered: Tensor, u: Tensor, f: Tensor, matrix: Tensor,
                weight: Tensor | None, bias: Tensor | None, post_weight: Tensor | None,
                post_bias: Tensor | None, roles: str) -> Tensor:
    with _full_precision(centered):
        dt = centered.dtype
        mat = as_dtype(matrix, dt)
        mat = mat if weight is None else mat * as_dtype(weight, dt)
        y = grouped_matmul(mat, centered, None if bias is None else as_dtype(bias, dt))
        yc = unmatrix_view(y, x.shape, tuple(roles))  # type: ignore[arg-type]  # a view of y
        if post_weight is not None:
            yc.mul_(as_dtype(post_weight, dt))
        if post_bias is not None:
            yc.add_(as_dtype(post_bias, dt))
        return _fresh(y)


_apply = torch.library.custom_op("normkit::whiten_sample_apply", _apply_impl, mutates_args=())


@_apply.register_fake
def _(x: Tensor, centered: Tensor, u: Tensor, f: Tensor, matrix: Tensor,
      weight: Tensor | None, bias: Tensor | None, post_weight: Tensor | None,
      post_bias: Tensor | None, roles: str) -> Tensor:
    return torch.empty_like(centered, memory_format=torch.contiguous_format)


def _apply_backward_impl(grad: Tensor, x: Tensor, u: Tensor, f: Tensor, matrix: Tensor,
                         weight: Tensor | None, post_weight: Tensor | None, roles: str,
                         shape: Sequence[int], dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _full_precision(x):
        centered = _centered(_samples(x, roles))[0]
        dt = centered.dtype
        p, g, d, s = centered.shape
        b = p * g
        xc = centered.view(b, d, s)
        w = as_dtype(matrix, dt).reshape(b, d, d)
        grad = as_dtype(grad, dt)
        gc = unmatrix_view(grad, shape, tuple(roles))  # type: ignore[arg-type]
        dpost_b = gc.sum((0, 3), keepdim=True)  # ∂β of a per-channel recovery after W
        dpost_w = dpost_b.new_zeros(())
        if post_weight is not None:  # y = γ ⊙ y₀ + β: ∂γ = Σ g y₀ (y₀ = W x_c recomputed)
            y0 = unmatrix_view(torch.bmm(w, xc).view(p, g, d, s), shape, tuple(roles))  # type: ignore[arg-type]
            dpost_w = (gc * y0).sum((0, 3), keepdim=True)
            grad = matrix_view(gc * as_dtype(post_weight, dt),
                               tuple(roles))  # type: ignore[arg-type]
        gf = grad.reshape(b, d, s)
        uu = as_dtype(u, dt).reshape(b, d, d)
        outer = torch.bmm(gf, xc.mT)  # G = g x_cᵀ = ∂L/∂M
        gsum = gf.sum(-1, keepdim=True)
        if weight is None:
            dweight = gsum.new_zeros(())
            gw, mt = outer, w  # W is symmetric: Mᵀ = W
        else:
            gam = as_dtype(weight, dt).expand(p, g, d, 1).reshape(b, d, 1)
            dweight = (outer * w).sum(-1, keepdim=True).view(p, g, d, 1)  # ∂γ_i = Σ_j G_ij W_ij
            gw, mt = outer.mul_(gam), w * gam.mT  # G_W = γ ⊙ G, Mᵀ = W diag(γ)
        pmat = zca_input_term(uu, as_dtype(f, dt).view(b, d), gw, s)  # P: the gradient through Σ
        # Mᵀ g + P x_c − Mᵀ ḡ (the gradient through μ) into one buffer, chunk by chunk
        four = (p, g, d, d)
        dx = chunked_matmuls([(mt.reshape(four), gf.view(p, g, d, s)),
                              (pmat.view(four), centered)],
                             torch.bmm(mt, gsum).div_(-s).view(p, g, d, 1))
        return (_to_input(dx.view(p, g, d, s), shape, roles, dtype), _fresh(dweight),
                _fresh(gsum.view(p, g, d, 1)), dpost_w, dpost_b)


_apply_backward = torch.library.custom_op("normkit::whiten_sample_apply_backward",
                                          _apply_backward_impl, mutates_args=())


@_apply_backward.register_fake
def _(grad: Tensor, x: Tensor, u: Tensor, f: Tensor, matrix: Tensor,
      weight: Tensor | None, post_weight: Tensor | None, roles: str, shape: Sequence[int],
      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    p, g, d, _ = _samples(x, roles).shape
    stat = matrix.new_empty((p, g, d, 1))
    chan = matrix.new_empty((1, shape[1], shape[2], 1))
    return (x.new_empty(shape, dtype=dtype),
            torch.empty_like(stat) if weight is not None else matrix.new_empty(()), stat,
            torch.empty_like(chan) if post_weight is not None else matrix.new_empty(()), chan)


def _apply_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, centered, u, f, matrix, weight, bias, post_weight, post_bias, roles = inputs
    ctx.save_for_backward(x, u, f, matrix, weight, post_weight)  # the input, not x − μ
    ctx.meta = (roles, tuple(x.shape), x.dtype)
    ctx.params = tuple(None if t is None else (tuple(t.shape), t.dtype)
                       for t in (weight, bias, post_weight, post_bias))


def _reduce(t: Tensor, meta: tuple[tuple[int, ...], torch.dtype] | None) -> Tensor | None:
    """A per-problem parameter gradient summed to the parameter's shape and dtype."""
    if meta is None:
        return None
    shape, dtype = meta
    return t.sum_to_size(shape).to(dtype)


@_first_order(*_FIRST_ORDER)
def _apply_grad(ctx, grad, backward=_apply_backward):  # type: ignore[no-untyped-def]
    x, u, f, matrix, weight, post_weight = ctx.saved_tensors
    roles, shape, dtype = ctx.meta
    dx, dweight, dbias, dpw, dpb = backward(grad, x, u, f, matrix, weight, post_weight, roles,
                                            shape, dtype)
    pw, pb, ppw, ppb = ctx.params
    return (dx, None, None, None, None, _reduce(dweight, pw), _reduce(dbias, pb),
            _reduce(dpw, ppw), _reduce(dpb, ppb), None)


_apply_call = eager_op(_apply, _apply_impl, setup_context=_apply_setup, backward=_apply_grad,
                       backward_impl=_apply_backward_impl)


def sample_zca_apply(
    x: Tensor, stats: tuple[Tensor, Tensor, Tensor, Tensor], *, roles: Sequence[Role],
    weight: Tensor | None = None, bias: Tensor | None = None,
    post_weight: Tensor | None = None, post_bias: Tensor | None = None,
) -> Tensor:
    r"""``y = (γ ⊙ W) x_c + β`` in the ``(P, G, D, S)`` matrix view of ``x`` under ``roles``, with
    the gradient of the whole map ``x → y`` (through ``μ``, ``Σ`` and ``W``; see the module
    docstring); or, with ``post_weight``, ``post_bias``, ``γ ⊙ (W x_c) + β`` with ``γ, β`` per
    channel of the canonical view (a recovery that varies along the samples of a matrix, e.g.
    group whitening's), applied in place: ``∂γ = Σ g ⊙ W x_c`` recomputes ``W x_c`` instead of
    saving it.

    Args:
        x: the canonical view ``(N, A, B, S)`` the statistics were computed from.
        stats: ``(x_c, f, U, W)`` of :func:`sample_zca_fit` of ``x`` (constants to autograd).
        roles: the partition's roles (per-sample: the first is ``"G"``).
        weight, bias: ``γ, β`` per row, ``(1 or P, G, D, 1)`` views, or ``None``.
        post_weight, post_bias: ``γ, β`` ``(1, A, B, 1)`` on the canonical view, or ``None``
            (not with ``weight`` / ``bias``).

    Shape:
        output ``(P, G, D, S)``, float32 (float64 stays float64), fresh and contiguous; map it
        back with :func:`~normkit.functional.partition.unmatrix_view`.

    Example:
        >>> x = torch.randn(3, 1, 2, 6, dtype=torch.float64, requires_grad=True)
        >>> roles = ("G", "G", "D", "M")
        >>> with torch.no_grad():
        ...     mean, cov, xc, f, u, w = sample_zca_fit(x, roles, 1e-5)
        >>> y = sample_zca_apply(x, (xc, f, u, w), roles=roles)
        >>> from normkit.functional.whiten import zca_matrix
        >>> c = x - x.mean(-1, keepdim=True)
        >>> ref = zca_matrix((c @ c.mT / 6).flatten(0, 1), 1e-5).view(3, 1, 2, 2) @ c
        >>> torch.allclose(y, ref)
        True
        >>> g = torch.randn_like(y)
        >>> a, b = (torch.autograd.grad(t, x, g)[0] for t in (y, ref))
        >>> torch.allclose(a, b)
        True
    """
    centered, f, u, w = stats
    return _apply_call(x, centered, u, f, w, weight, bias, post_weight, post_bias, _roles(roles))
