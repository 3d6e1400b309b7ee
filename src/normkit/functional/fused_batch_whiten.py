r"""Batch whitening in place on the canonical view as one ``torch.library`` custom op with a
hand-derived backward (DBN, PCA, Cholesky and IterNorm batch whitening with ``S ≥ d``).

The two ops of :mod:`normkit.functional.whiten_ops` leave ``W(Σ)`` to autograd between them, so
the input gradient comes in two parts (``Mᵀ(g − ḡ)`` from the apply op, ``(2/m)·sym(∂Σ)·x_c``
from the moments op), each a fresh activation-sized tensor that autograd then adds, and the
moments op's unused outputs get activation-sized zero gradients. Here the statistics are
computed once without autograd (:func:`batch_whiten_fit`) and one op applies
``y = (γ ⊙ W) x_c + β`` (:func:`batch_whiten_apply`) with the gradient of the whole map
``x → y``, in one buffer:

.. math::
    ∂L/∂x = Mᵀ (g − \bar g) + P\,x_c,\qquad P = \tfrac{1}{m}\big(∂L/∂Σ + (∂L/∂Σ)ᵀ\big),\qquad
    ∂L/∂M = G = \sum_n g_n x_{c,n}ᵀ,\quad ∂γ_i = \sum_j G_{ij} W_{ij},\quad ∂β = \sum g

with ``M = γ ⊙ W`` (rows), ``m = N·S`` samples per group and ``∂L/∂Σ`` the gradient through
``W(Σ)`` of ``G_W = γ ⊙ G``: for ZCA in closed form (``Σ + εI = U Λ Uᵀ``, ``f = λ^{-1/2}``,
``P = −(1/m) U (K ∘ Uᵀ(G_W + G_Wᵀ)U) Uᵀ``, ``K_ij = (f_i f_j)²/(f_i + f_j)``: the divided
difference of ``λ^{-1/2}``, no mask, see :mod:`normkit.functional.fused_whiten`); for
Cholesky ``∂L/∂Σ = Wᵀ Ψ W`` (:func:`_cholesky_grad`), for Newton–Schulz the iteration run in
reverse on the forward's saved iterates
(:func:`~normkit.functional.fused_newton.newton_input_term`), for PCA the masked eigen backward
(:func:`_pca_grad`), all on the ``D × D`` covariances. The activations are read by three
matmuls in the backward (``G``, ``Mᵀ g``, ``P x_c``, the last two into one buffer) and one sum
(``Σ g``). No activation is saved beyond the input: ``x − μ`` is formed again chunk by chunk
wherever it is read (the covariance, the product and the backward;
:mod:`normkit.functional.whiten_chunks`), in a reused cache-sized buffer: the same values as a
centred copy, without an activation-sized tensor (with a steady allocator the step time is
unchanged; with glibc's defaults its fresh pages cost more than the subtractions).

The op computes in at least float32 with autocast off and returns a fresh tensor. A second
derivative (``create_graph=True``) differentiates the plain composition instead
(:func:`batch_whiten_plain`, what ``native=False`` runs): exact for PCA, Cholesky and
Newton–Schulz, at autograd's cost; ZCA's divided-difference backward is first order and says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ._eager_ops import eager_op
from .fused_newton import newton_fit, newton_input_term
from .fused_whiten import inv_sqrt_eigh, zca_input_term
from .partition import as_dtype
from .whiten import (
    WhiteningMethod,
    _eigh_vjp,
    _full_precision,
    _pca_signs,
    _resolution,
    batch_moments,
    whitening_matrix,
)
from .whiten_chunks import chunked_matmuls, chunked_outer, chunked_stats
from .whiten_ops import _fresh

__all__ = ["batch_whiten_apply", "batch_whiten_fit", "batch_whiten_plain"]


@torch.library.custom_op("normkit::whiten_batch_stats", mutates_args=())
def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(1, G, D, 1)`` and biased covariance ``(1, G, D, D)`` of the samples ``x``
    ``(P, G, D, S)`` in at least float32 (no centred copy kept; not differentiable)."""
    with _full_precision(x):
        mean, cov = chunked_stats(x)
        return _fresh(mean), _fresh(cov)


@_stats.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _, g, d, _ = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty((1, g, d, 1), dtype=dt), x.new_empty((1, g, d, d), dtype=dt)


def batch_whiten_fit(x: Tensor, method: WhiteningMethod, eps: float, *,
                     iterations: int | None = None, data_dtype: torch.dtype | None = None
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    r"""Batch statistics for :func:`batch_whiten_apply`, without autograd: ``(μ, Σ, f, U, W)``
    of the samples ``x`` ``(P, G, D, S)`` (the canonical view; ``P·S`` samples per group, ``Σ``
    biased) with ``W = W(Σ)`` of ``method``; ``f, U`` (:func:`~normkit.functional.fused_whiten.
    inv_sqrt_eigh`) for ZCA, the ``scale`` and the stacked iterates ``steps`` of
    :func:`~normkit.functional.fused_newton.newton_fit` for Newton–Schulz (what the backward
    reads), ``None`` otherwise. The moments are one custom op
    (``normkit::whiten_batch_stats``). ``data_dtype``: the input's dtype
    (PCA's eigenvalue-gap tolerance, see :func:`~normkit.functional.whiten.pca_matrix`).

    Shape:
        ``x``: ``(P, G, D, S)``; outputs ``(1, G, D, 1)``, ``(1, G, D, D)``, ``(1, G, D)``
        (ZCA) or ``(2, G, 1, 1)`` (Newton) or ``None``, ``(1, G, D, D)`` (ZCA) or
        ``(3T, G, D, D)`` (Newton) or ``None``, ``(1, G, D, D)``.

    Example:
        >>> x = torch.randn(8, 2, 3, 5, dtype=torch.float64)
        >>> mean, cov, f, u, w = batch_whiten_fit(x, "zca", 1e-5)
        >>> from normkit.functional.whiten import zca_matrix
        >>> torch.allclose(w[0], zca_matrix(cov[0], 1e-5))
        True
    """
    with torch.no_grad():
        mean, cov = _stats(x)
        _, g, d, _ = cov.shape
        flat = cov.reshape(g, d, d)
        if method == "zca":
            f, u, w = inv_sqrt_eigh(flat, eps)
            return mean, cov, f.view(1, g, d), u.view(cov.shape), w.view(cov.shape)
        if method not in ("cholesky", "newton", "pca"):
            raise ConfigError(f"whitening method must be 'zca', 'pca', 'cholesky' or 'newton', "
                              f"got {method!r}")
        if method == "newton":  # the iterates kept for the backward (fused_newton)
            w, steps, scale = newton_fit(flat, eps, iterations or 5)
            return mean, cov, scale, steps, w.view(cov.shape)
        w = whitening_matrix(flat, method, eps=eps, data_dtype=data_dtype)
        return mean, cov, None, None, w.reshape(cov.shape)


def _cholesky_grad(w: Tensor, gw: Tensor) -> Tensor:
    r"""``∂L/∂Σ = Wᵀ Ψ W`` of ``W = L^{-1}``, ``LLᵀ = Σ + (ε + δ)I`` (``δ``, the rounding top-up,
    carries no gradient; :func:`~normkit.functional.whiten.cholesky_matrix`) for
    ``∂L/∂W = G_W``: ``∂L/∂L = −Wᵀ G_W Wᵀ``, so ``Lᵀ ∂L/∂L = −G_W Wᵀ``, ``T = tril(−G_W Wᵀ)``,
    ``Ψ = ½(T + tril(T, −1)ᵀ)`` (symmetric; torch's Cholesky backward with ``L^{-1} = W``)."""
    t = torch.bmm(gw, w.mT).neg_().tril_()
    psi = t.tril(-1).mT.add_(t).mul_(0.5)
    return torch.bmm(w.mT, torch.bmm(psi, w))


def _pca_grad(cov: Tensor, gw: Tensor, eps: float, data_dtype: torch.dtype) -> Tensor:
    r"""``∂L/∂Σ`` of PCA whitening ``W = diag(f) U'ᵀ`` (``Σ + εI = U Λ Uᵀ``, ``U' = U s`` with the
    sign ``s`` of :func:`~normkit.functional.whiten.pca_matrix`, ``f = λ^{-1/2}``, ``λ`` clamped
    at ``ε``) for ``∂L/∂W = G_W``: ``∂f_i = Σ_j G_ij U'_ji``, ``∂U = (f ⊙ G)ᵀ s``,
    ``∂λ = −½ λ^{-3/2} ∂f`` (0 where clamped), then the masked eigen backward of
    :func:`~normkit.functional.whiten.pca_matrix` (``eigh`` recomputed: the same ``D × D``
    factors as the fit's)."""
    _, d, _ = cov.shape
    lam, u = torch.linalg.eigh(cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device))
    signs = _pca_signs(u)
    us = u * signs
    floor = eps if eps > 0 else torch.finfo(lam.dtype).tiny
    lc = lam.clamp_min(floor)
    f = lc.rsqrt()
    df = (gw * us.mT).sum(-1)
    dlam = df * f.pow(3).mul_(-0.5) * (lam >= floor).to(lam.dtype)
    du = (gw * f.unsqueeze(-1)).mT * signs
    rel = _resolution(cov.dtype, data_dtype, d)
    return _eigh_vjp(lam, u, dlam, du, rel)


def _sigma_term(gw: Tensor, cov: Tensor, u: Tensor | None, f: Tensor | None, matrix: Tensor,
                method: str, eps: float, iterations: int, data_dtype: torch.dtype,
                m: int) -> Tensor:
    """``P = (1/m)(∂L/∂Σ + ∂L/∂Σᵀ)`` ``(1, G, D, D)`` for ``∂L/∂W = G_W`` (see the module
    docstring), in closed form."""
    _, g, d, _ = gw.shape
    flat = gw.reshape(g, d, d)
    if method == "zca":
        assert u is not None and f is not None
        return zca_input_term(u.reshape(g, d, d), f.reshape(g, d), flat, m).view(gw.shape)
    if method == "newton":
        if u is None or f is None:  # statistics without the iterates: run the iteration
            _, u, f = newton_fit(cov.reshape(g, d, d), eps, iterations)
        return newton_input_term(u, f, matrix.reshape(g, d, d), flat, m).view(gw.shape)
    if method == "cholesky":
        dsigma = _cholesky_grad(matrix.reshape(g, d, d), flat)
    else:
        dsigma = _pca_grad(cov.reshape(g, d, d), flat, eps, data_dtype)
    return (dsigma + dsigma.mT).div_(m).view(gw.shape)


def _apply_impl(x: Tensor, mean: Tensor, cov: Tensor, u: Tensor | None, f: Tensor | None,
                matrix: Tensor, weight: Tensor | None, bias: Tensor | None, method: str,
                eps: float, iterations: int, data_dtype: torch.dtype) -> Tensor:
    """``(γ ⊙ W) x_c + β`` (the body of the op ``normkit::whiten_batch_apply``)."""
    with _full_precision(mean):
        dt = mean.dtype
        mat = as_dtype(matrix, dt)
        mat = mat if weight is None else mat * as_dtype(weight, dt)
        return _fresh(chunked_matmuls([(mat, x)], None if bias is None else as_dtype(bias, dt),
                                      mean=mean))


_apply = torch.library.custom_op("normkit::whiten_batch_apply", _apply_impl, mutates_args=())


@_apply.register_fake
def _(x: Tensor, mean: Tensor, cov: Tensor, u: Tensor | None, f: Tensor | None,
      matrix: Tensor, weight: Tensor | None, bias: Tensor | None, method: str, eps: float,
      iterations: int, data_dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape, dtype=mean.dtype)


def _backward_impl(grad: Tensor, x: Tensor, mean: Tensor, cov: Tensor, u: Tensor | None,
                   f: Tensor | None, matrix: Tensor, weight: Tensor | None, method: str,
                   eps: float, iterations: int, data_dtype: torch.dtype, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The input, ``γ`` and ``β`` gradients of :func:`_apply` (the body of the backward op
    ``normkit::whiten_batch_apply_backward``; see the module docstring)."""
    with _full_precision(mean):
        dt = mean.dtype
        p, g, d, s = x.shape
        m = max(p * s, 1)
        gr = as_dtype(grad, dt)
        outer, gsum = chunked_outer(gr, x, mean=mean)  # G = Σ_n g_n x_cnᵀ, Σ g
        w = as_dtype(matrix, dt)
        if weight is None:
            dweight = gsum.new_zeros(())
            gw, mat = outer, w
        else:
            gam = as_dtype(weight, dt)
            dweight = (outer * w).sum(-1, keepdim=True)  # ∂γ_i = Σ_j G_ij W_ij
            gw, mat = outer.mul_(gam), w * gam
        pmat = _sigma_term(gw, as_dtype(cov, dt), u, f, w, method, eps, iterations, data_dtype, m)
        mt = mat.mT
        # Mᵀ g + P x_c − Mᵀ ḡ (the gradient through μ) into one buffer
        dx = chunked_matmuls([(mt, gr), (pmat, x)], torch.matmul(mt, gsum).div_(-m), mean=mean)
        return _fresh(as_dtype(dx, dtype)), _fresh(dweight), _fresh(gsum)


# the op for compile / export (one node); eager training calls _backward_impl directly
# (_eager_ops.eager_op: no dispatcher round trip per step)
_apply_backward = torch.library.custom_op("normkit::whiten_batch_apply_backward", _backward_impl,
                                          mutates_args=())


@_apply_backward.register_fake
def _(grad: Tensor, x: Tensor, mean: Tensor, cov: Tensor, u: Tensor | None, f: Tensor | None,
      matrix: Tensor, weight: Tensor | None, method: str, eps: float, iterations: int,
      data_dtype: torch.dtype, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    _, g, d, _ = x.shape
    stat = matrix.new_empty((1, g, d, 1))
    return (x.new_empty(x.shape, dtype=dtype),
            torch.empty_like(stat) if weight is not None else matrix.new_empty(()), stat)


def _apply_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, mean, cov, u, f, matrix, weight, bias, method, eps, iterations, data_dtype = inputs
    ctx.save_for_backward(x, mean, cov, u, f, matrix, weight, bias)  # x: the input, alive
    ctx.meta = (method, eps, iterations, data_dtype, x.dtype)
    ctx.params = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in (weight, bias))


def _reduce(t: Tensor, meta: tuple[tuple[int, ...], torch.dtype] | None) -> Tensor | None:
    if meta is None:
        return None
    shape, dtype = meta
    return t.sum_to_size(shape).to(dtype)


def batch_whiten_plain(x: Tensor, weight: Tensor | None, bias: Tensor | None, method: str,
                       eps: float, iterations: int, data_dtype: torch.dtype | None = None
                       ) -> Tensor:
    """The plain autograd composition of :func:`batch_whiten_apply`, ``(γ ⊙ W(Σ))(x − μ) + β``
    (what ``native=False`` runs): the op's second derivative differentiates it."""
    _, cov, centered = batch_moments(x, shared=True)
    _, g, d, _ = cov.shape
    w = whitening_matrix(cov.reshape(g, d, d), method, eps=eps,  # type: ignore[arg-type]
                         iterations=iterations, data_dtype=data_dtype).view(cov.shape)
    y = torch.matmul(w if weight is None else w * weight, centered)
    return y if bias is None else y + bias


def _apply_grad(ctx, grad, backward=_apply_backward):  # type: ignore[no-untyped-def]
    x, mean, cov, u, f, matrix, weight, bias = ctx.saved_tensors
    method, eps, iterations, data_dtype, dtype = ctx.meta
    if torch.is_grad_enabled():  # create_graph: differentiate the composition
        args = [x, weight, bias]
        wanted = [t for t in args if t is not None and t.requires_grad]
        with _full_precision(x):
            y = batch_whiten_plain(x, weight, bias, method, eps, iterations, data_dtype)
        grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
        dx, dweight, dbias = (next(grads) if t is not None and t.requires_grad else None
                              for t in args)
        return dx, None, None, None, None, None, dweight, dbias, None, None, None, None
    dx, dweight, dbias = backward(grad, x, mean, cov, u, f, matrix, weight, method, eps,
                                  iterations, data_dtype, dtype)
    pw, pb = ctx.params
    return (dx, None, None, None, None, None, _reduce(dweight, pw), _reduce(dbias, pb), None,
            None, None, None)


# eager training: the same implementation, setup and backward without the dispatcher's per-call
# binding of the 12 arguments and the backward op's round trip (0.1-0.4 ms of a (128, 64, 16, 16)
# step: dbn, cd_bw, pca_bw, iternorm); compile and export trace the op
_apply_call = eager_op(_apply, _apply_impl, setup_context=_apply_setup, backward=_apply_grad,
                       backward_impl=_backward_impl)


def batch_whiten_apply(
    x: Tensor, stats: tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor], *,
    method: WhiteningMethod, eps: float, iterations: int | None = None,
    data_dtype: torch.dtype | None = None, weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    r"""``y = (γ ⊙ W) x_c + β`` for the samples ``x`` ``(P, G, D, S)`` with the gradient of the
    whole map ``x → y`` (through ``μ``, ``Σ`` and ``W(Σ)``; see the module docstring) and of
    ``γ, β`` (``(1, G, D, 1)`` views, or ``None``).

    Args:
        x: the samples the statistics were computed from.
        stats: ``(μ, Σ, U, f, W)`` of :func:`batch_whiten_fit` of ``x`` (Newton–Schulz: ``U``,
            ``f`` the iterates and scale, or ``None`` to run the iteration again) with the same
            ``method``, ``eps``, ``iterations`` and ``data_dtype`` (constants to autograd).

    Shape:
        output ``(P, G, D, S)``, float32 (float64 stays float64), fresh and contiguous.

    Example:
        >>> x = torch.randn(16, 2, 3, 4, dtype=torch.float64, requires_grad=True)
        >>> mean, cov, f, u, w = batch_whiten_fit(x, "cholesky", 1e-5)
        >>> y = batch_whiten_apply(x, (mean, cov, u, f, w), method="cholesky", eps=1e-5)
        >>> from normkit.functional.whiten import batch_moments, cholesky_matrix
        >>> _, s, c = batch_moments(x, shared=True)
        >>> ref = cholesky_matrix(s[0], 1e-5) @ c
        >>> torch.allclose(y, ref)
        True
        >>> g = torch.randn_like(y)
        >>> torch.allclose(*(torch.autograd.grad(t, x, g)[0] for t in (y, ref)))
        True
    """
    mean, cov, u, f, w = stats
    args = (x, mean, cov, u, f, w, weight, bias, method, float(eps), iterations or 5,
            data_dtype or x.dtype)
    return _apply_call(*args)  # type: ignore[no-any-return]
