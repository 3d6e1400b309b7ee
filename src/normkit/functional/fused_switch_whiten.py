r"""Switchable whitening's training step (Pan et al. 2019) as ``torch.library`` custom ops with
a hand-derived backward, built on the per-sample ZCA of :mod:`normkit.functional.fused_whiten`
(its closed-form eigen backward ``zca_input_term``).

The batch moments are pooled from the per-sample ones (no second pass over the activations), one
``eigh`` per sample of the mixed covariance ``Σ_n``, and the backward carries the gradient through
the mixture weights as well. Both ops compute in at least float32 with autocast off, return fresh
tensors and are first order (a second derivative raises: use ``native=False``). Eager calls
skip the dispatcher (:func:`~normkit.functional._eager_ops.eager_op`); compiled and exported
code sees the ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._eager_ops import eager_op
from .fused_whiten import _centered, _fit_grad, _fit_setup, _reduce, inv_sqrt_eigh, zca_input_term
from .partition import as_dtype
from .whiten import _first_order, _full_precision, grouped_matmul
from .whiten_chunks import chunked_matmuls
from .whiten_ops import _fresh

__all__ = ["switch_whiten_apply", "switch_whiten_fit"]


# ------------------------------------------------------------------ switchable whitening
# Per sample n (of P) and group: x̃ = x − μ_I (instance-centred), Σ_I = x̃ x̃ᵀ/S, μ_B = mean μ_I,
# δ = μ_I − μ_B, Σ_B = mean(Σ_I) + mean(δ δᵀ) (the batch moments pooled from the instance ones:
# no second pass), Σ_n = c_bw Σ_B + c_bn Diag Σ_B + c_iw Σ_I + c_in Diag Σ_I, and with the
# mixed mean a_B μ_B + (1 − a_B) μ_I: x − μ_n = x̃ + a_B δ, y = M (x̃ + a_B δ) + β, M = γ ⊙ W(Σ_n).
def _switch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(x̃, Σ_I, δ, μ_B, Σ_B)`` of the samples ``x`` ``(P, G, D, S)`` (see above)."""
    p, g, d, s = x.shape
    xt, mi = _centered(x)
    ci = torch.matmul(xt, xt.mT).div_(max(s, 1))
    mb = mi.mean(0, keepdim=True)
    delta = mi - mb
    cb = ci.mean(0, keepdim=True) + torch.matmul(delta, delta.mT).mean(0, keepdim=True)
    return xt, ci, delta, mb, cb


def _diag(a: Tensor) -> Tensor:
    return torch.diag_embed(a.diagonal(dim1=-2, dim2=-1))


def _mixture(ci: Tensor, cb: Tensor, coef: Tensor) -> Tensor:
    """``Σ_n`` of the coefficients ``coef = (c_bw, c_bn, c_iw, c_in)``."""
    c = as_dtype(coef, ci.dtype)
    return c[0] * cb + c[1] * _diag(cb) + c[2] * ci + c[3] * _diag(ci)


def _switch_fit_impl(x: Tensor, coef: Tensor, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _full_precision(x):
        p, g, d, _ = x.shape
        xt, ci, delta, mb, cb = _switch_moments(x)
        f, u, w = inv_sqrt_eigh(_mixture(ci, cb, coef).reshape(p * g, d, d), eps)
        return (_fresh(xt), _fresh(ci), _fresh(delta), _fresh(mb), _fresh(cb),
                _fresh(f.view(p, g, d)), _fresh(u.reshape(p, g, d, d)), _fresh(w.view(p, g, d, d)))


_switch_fit = torch.library.custom_op("normkit::switch_whiten_fit", _switch_fit_impl,
                                      mutates_args=())


@_switch_fit.register_fake
def _(x: Tensor, coef: Tensor, eps: float) -> tuple[Tensor, ...]:
    p, g, d, s = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)
    e = x.new_empty
    return (e((p, g, d, s), dtype=dt), e((p, g, d, d), dtype=dt), e((p, g, d, 1), dtype=dt),
            e((1, g, d, 1), dtype=dt), e((1, g, d, d), dtype=dt), e((p, g, d), dtype=dt),
            e((p, g, d, d), dtype=dt), e((p, g, d, d), dtype=dt))


_switch_fit_call = eager_op(_switch_fit, _switch_fit_impl, setup_context=_fit_setup,
                            backward=_fit_grad)


def switch_whiten_fit(x: Tensor, coef: Tensor, eps: float) -> tuple[Tensor, ...]:
    r"""Switchable whitening's statistics for :func:`switch_whiten_apply`, one custom op whose
    outputs are constants to autograd: ``(x̃, Σ_I, δ, μ_B, Σ_B, f, U, W)`` of the samples ``x``
    ``(P, G, D, S)`` (the ``Batch(group_size=D)`` canonical view): instance-centred ``x̃``, the
    per-sample covariances ``Σ_I``, ``δ = μ_I − μ_B``, the batch mean and (biased) covariance
    pooled from the instance moments, and :func:`inv_sqrt_eigh` of the mixture
    ``c_bw Σ_B + c_bn Diag Σ_B + c_iw Σ_I + c_in Diag Σ_I`` (``coef`` ``(4,)`` in that order).

    Example:
        >>> x = torch.randn(4, 1, 2, 5, dtype=torch.float64)
        >>> xt, ci, delta, mb, cb, f, u, w = switch_whiten_fit(x, torch.tensor([1., 0, 0, 0]), 0.)
        >>> flat = x.permute(1, 2, 0, 3).reshape(2, 20)
        >>> torch.allclose(cb[0, 0], torch.cov(flat, correction=0))
        True
    """
    return _switch_fit_call(x, coef, float(eps))


def _switch_apply_impl(x: Tensor, xt: Tensor, delta: Tensor, ci: Tensor, cb: Tensor, u: Tensor,
                       f: Tensor, matrix: Tensor, mean_coef: Tensor, coef: Tensor,
                       weight: Tensor | None, bias: Tensor | None) -> Tensor:
    with _full_precision(xt):
        dt = xt.dtype
        mat = as_dtype(matrix, dt)
        mat = mat if weight is None else mat * as_dtype(weight, dt)
        shift = torch.matmul(mat, delta * as_dtype(mean_coef, dt))  # M a_B δ, (P, G, D, 1)
        if bias is not None:
            shift = shift + as_dtype(bias, dt)
        return _fresh(grouped_matmul(mat, xt, shift))


_switch_apply = torch.library.custom_op("normkit::switch_whiten_apply", _switch_apply_impl,
                                        mutates_args=())


@_switch_apply.register_fake
def _(x: Tensor, xt: Tensor, delta: Tensor, ci: Tensor, cb: Tensor, u: Tensor, f: Tensor,
      matrix: Tensor, mean_coef: Tensor, coef: Tensor, weight: Tensor | None,
      bias: Tensor | None) -> Tensor:
    return torch.empty_like(xt, memory_format=torch.contiguous_format)


def _switch_backward_impl(grad: Tensor, x: Tensor, delta: Tensor, ci: Tensor, cb: Tensor, u: Tensor,
                          f: Tensor, matrix: Tensor, mean_coef: Tensor, coef: Tensor,
                          weight: Tensor | None, dtype: torch.dtype
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _full_precision(x):
        xt = _centered(x)[0]
        dt = xt.dtype
        p, g, d, s = xt.shape
        b = p * g
        gf = as_dtype(grad, dt).reshape(b, d, s)
        xc = xt.view(b, d, s)
        w = as_dtype(matrix, dt).reshape(b, d, d)
        uu = as_dtype(u, dt).reshape(b, d, d)
        a_b = as_dtype(mean_coef, dt)
        c = as_dtype(coef, dt)
        dlt = delta.reshape(b, d, 1)
        gsum = gf.sum(-1, keepdim=True)  # ĝ
        outer = torch.baddbmm(torch.bmm(gsum * a_b, dlt.mT), gf, xc.mT)  # ∂L/∂M
        gam = None if weight is None else as_dtype(weight, dt).expand(p, g, d, 1).reshape(b, d, 1)
        mt = w if gam is None else w * gam.mT  # Mᵀ (W symmetric)
        dweight = (outer * w).sum(-1, keepdim=True).view(p, g, d, 1)
        gw = outer if gam is None else outer.mul_(gam)
        # m = 2: (2/m)·sym(∂L/∂Σ_n) = ∂L/∂Σ_n (symmetric)
        pn = zca_input_term(uu, as_dtype(f, dt).view(b, d), gw, 2).view(p, g, d, d)
        pbar = pn.sum(0, keepdim=True)
        qb = c[0] * pbar + c[1] * _diag(pbar)  # ∂L/∂Σ_B
        pi = (c[2] * pn + c[3] * _diag(pn)).add_(qb / p)  # ∂L/∂Σ_I
        mtg = torch.bmm(mt, gsum).view(p, g, d, 1)  # Mᵀ ĝ
        h = torch.matmul(qb, delta).mul_(2.0 / p).add_(mtg * a_b)  # ∂L/∂δ
        col = (h - h.mean(0, keepdim=True) - mtg).div_(s).reshape(b, d, 1)
        dx = chunked_matmuls([(mt.view(p, g, d, d), gf.view(p, g, d, s)),
                              (pi.mul_(2.0 / s), xt)], col.view(p, g, d, 1))
        da = (mtg * delta).sum().reshape(1)  # Σ ĝᵀ M δ
        dcoef = torch.stack([(pbar * cb).sum(), (pbar.diagonal(dim1=-2, dim2=-1)
                                                 * cb.diagonal(dim1=-2, dim2=-1)).sum(),
                             (pn * ci).sum(), (pn.diagonal(dim1=-2, dim2=-1)
                                               * ci.diagonal(dim1=-2, dim2=-1)).sum()])
        return (_fresh(dx.view(p, g, d, s).to(dtype)), _fresh(dweight),
                _fresh(gsum.view(p, g, d, 1)), da, dcoef)


_switch_backward = torch.library.custom_op("normkit::switch_whiten_apply_backward",
                                           _switch_backward_impl, mutates_args=())


@_switch_backward.register_fake
def _(grad: Tensor, x: Tensor, delta: Tensor, ci: Tensor, cb: Tensor, u: Tensor, f: Tensor,
      matrix: Tensor, mean_coef: Tensor, coef: Tensor, weight: Tensor | None,
      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    p, g, d, s = x.shape
    e = matrix.new_empty
    return (x.new_empty((p, g, d, s), dtype=dtype), e((p, g, d, 1)), e((p, g, d, 1)), e((1,)),
            e((4,)))


def _switch_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, xt, delta, ci, cb, u, f, matrix, mean_coef, coef, weight, bias = inputs
    ctx.save_for_backward(x, delta, ci, cb, u, f, matrix, mean_coef, coef, weight)  # x, not x̃
    ctx.meta = x.dtype
    ctx.params = tuple(None if t is None else (tuple(t.shape), t.dtype)
                       for t in (weight, bias, mean_coef, coef))


@_first_order("the fused switchable-whitening backward",
              "build the module with native=False for the plain autograd composition")
def _switch_grad(ctx, grad, backward=_switch_backward):  # type: ignore[no-untyped-def]
    x, delta, ci, cb, u, f, matrix, mean_coef, coef, weight = ctx.saved_tensors
    dx, dweight, dbias, da, dcoef = backward(grad, x, delta, ci, cb, u, f, matrix, mean_coef,
                                             coef, weight, ctx.meta)
    pw, pb, pa, pc = ctx.params
    return (dx, None, None, None, None, None, None, None, _reduce(da, pa), _reduce(dcoef, pc),
            _reduce(dweight, pw), _reduce(dbias, pb))


_switch_apply_call = eager_op(_switch_apply, _switch_apply_impl, setup_context=_switch_setup,
                              backward=_switch_grad, backward_impl=_switch_backward_impl)


def switch_whiten_apply(x: Tensor, stats: Sequence[Tensor], mean_coef: Tensor, coef: Tensor, *,
                        weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    r"""Switchable whitening ``y = (γ ⊙ W(Σ_n))(x − a_B μ_B − (1 − a_B) μ_I) + β`` of the samples
    ``x`` ``(P, G, D, S)``, with the gradient of the whole map (through the instance and batch
    moments, the mixture and ``W``) w.r.t. ``x``, the mean weight ``a_B`` (``mean_coef``, ``()``
    or ``(1,)``), the covariance weights ``coef`` ``(4,)`` and ``γ, β`` ``(1, G, D, 1)``.

    ``stats`` is ``(x̃, Σ_I, δ, Σ_B, f, U, W)`` from :func:`switch_whiten_fit` of ``x`` with the
    same ``coef``. First order. Output ``(P, G, D, S)``, float32 (float64 stays float64).

    Example:
        >>> x = torch.randn(4, 1, 2, 5, dtype=torch.float64, requires_grad=True)
        >>> coef = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64)
        >>> with torch.no_grad():
        ...     xt, ci, delta, mb, cb, f, u, w = switch_whiten_fit(x, coef, 1e-5)
        >>> a = torch.tensor(0.5, dtype=torch.float64)
        >>> y = switch_whiten_apply(x, (xt, ci, delta, cb, f, u, w), a, coef)
        >>> from normkit.functional.whiten import zca_matrix
        >>> mi, mb = x.mean(-1, keepdim=True), x.mean((0, 3), keepdim=True)
        >>> ci = (x - mi) @ (x - mi).mT / 5
        >>> cb = ((x - mb) @ (x - mb).mT).sum(0, keepdim=True) / 20
        >>> ref = zca_matrix((0.5 * cb + 0.5 * ci).flatten(0, 1), 1e-5).view(4, 1, 2, 2) @ (
        ...     x - 0.5 * mb - 0.5 * mi)
        >>> torch.allclose(y, ref)
        True
        >>> g = torch.randn_like(y)
        >>> torch.allclose(*(torch.autograd.grad(t, x, g)[0] for t in (y, ref)))
        True
    """
    xt, ci, delta, cb, f, u, w = stats
    return _switch_apply_call(x, xt, delta, ci, cb, u, f, w, mean_coef, coef, weight, bias)
