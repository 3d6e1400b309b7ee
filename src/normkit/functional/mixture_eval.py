r"""Mixture normalization's evaluation: each value normalized with its posteriors under a fixed
(running) per-channel mixture, in a handful of passes over the activations.

The plain form (:func:`~normkit.functional.mixture.gmm_posterior` then
:func:`~normkit.functional.mixture.mixture_output`) builds ``K``-times-activation-sized logits
and a softmax over a new leading axis (25–37× torch BN's eval forward at ``(128, 64, 16, 16)``,
one thread). Here every per-value quantity is a per-channel polynomial in the values centred on
the mixture's mean, ``z = x − c``, ``c = Σ_k π_k μ_k`` (a shift that keeps the quadratic
logits as precise as ``(x − μ_k)²`` under a large common offset):

* logits ``a_k = A_k·[1, z, z²]`` (:func:`~normkit.functional.fused_mixture._coef` of the
  centred means ``μ_k − c``), evaluated as ``a + z(b + c z)``
  (:func:`~normkit.functional.fused_mixture._quad`);
* ``γ x̂_k + β = o_k + s_k z`` with ``s_k = γ r_k``, ``o_k = β − γ r_k (μ_k − c)``, ``r_k =
  (σ²_k + ε)^{-1/2}``;
* ``K = 1``: ``y = o_0 + s_0 z`` (the posterior is 1), written on ``x`` as torch BN's eval;
  ``K = 2``: ``p_1 = sigmoid(d)``, ``d = a_1 − a_0`` (saturates to 0 or 1: no NaN however far a
  value lies from both components), ``y = (o_0 + s_0 z) + p_1·((o_1 − o_0) + (s_1 − s_0) z)``;
  more: ``p = softmax_k(a)``, ``y = Σ_k p_k (o_k + s_k z)`` (in place: the softmax written out
  in base 2, ``e_k = 2^{a_k log₂e − max}``, ``y = Σ_k e_k (o_k + s_k z) / Σ_k e_k``).

Nothing is fitted, so the result is an ordinary function of ``x`` (and of ``γ, β`` and the
running estimates): when a gradient is asked for, or under ``torch.compile`` / ``torch.export``
/ ``torch.func`` transforms, the same formulas run as plain out-of-place ops autograd
differentiates; otherwise (``torch.no_grad()``, inference) they write into a few buffers in
place, over runs of samples that stay in cache (ten passes over the activations for ``K = 2``).
Where a gradient is asked for through ``γ, β`` alone (an evaluation forward outside
``no_grad``) ``x̂`` is computed in place and ``γ x̂ + β`` by autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .fused_mixture import _coef, _quad
from .partition import stats_dtype
from .standardize import affine_transform

__all__ = ["mixture_eval"]

_LOG2_E = 1 / math.log(2)
CHUNK_BYTES = 1 << 21  # a plane's run of samples in the in-place form: ~2 MiB, cache-resident


def _in_place(*tensors: Tensor | None) -> bool:
    """Whether buffers may be written in place: no gradient is asked for through any of
    ``tensors``, and nothing traces or transforms the call."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def mixture_eval(v: Tensor, mean: Tensor, var: Tensor, log_prior: Tensor,
                 weight: Tensor | None, bias: Tensor | None, *, eps: float) -> Tensor:
    r"""``γ·Σ_k p(k | x)·(x − μ_k)/√(σ²_k + ε) + β`` under the fixed mixture ``(μ, σ², log π)``.

    .. math::
        p(k \mid x) = \frac{\pi_k\,\mathcal{N}(x; \mu_k, \sigma_k^2 + \epsilon)}
                           {\sum_j \pi_j\,\mathcal{N}(x; \mu_j, \sigma_j^2 + \epsilon)}

    Equal to :func:`~normkit.functional.mixture.gmm_posterior` followed by
    :func:`~normkit.functional.mixture.mixture_output` and ``γ, β`` (what
    ``Normalization(native=False)`` runs), differentiable in ``x``, ``γ``, ``β`` and the mixture.

    Args:
        v: the canonical view ``(N, C, 1, S)`` (any strides).
        mean, var, log_prior: ``(K, C)``; ``log_prior`` normalized (``logsumexp`` 0 over ``K``).
        weight, bias: ``C`` values (per channel, folded into the per-channel coefficients),
            any shape broadcastable against ``v`` (applied after), or ``None``.
        eps: added to the variances.

    Shape:
        ``(N, C, 1, S)`` → same, in at least float32.

    Example:
        >>> import torch
        >>> from normkit.functional.mixture import gmm_posterior, mixture_output
        >>> v = torch.randn(4, 3, 1, 10, dtype=torch.float64)
        >>> mean = torch.tensor([[-1.0, 0.0, 2.0], [1.0, 0.5, 3.0]], dtype=torch.float64)
        >>> var = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.2, 1.0]], dtype=torch.float64)
        >>> log_prior = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), 0)
        >>> y = mixture_eval(v, mean, var, log_prior, None, None, eps=1e-5)
        >>> x = v.reshape(4, 3, 10)
        >>> post = gmm_posterior(x, mean, var, log_prior, 1e-5)
        >>> ref = mixture_output(x, mean, var, post, 1e-5).reshape(v.shape)
        >>> bool(torch.allclose(y, ref))
        True
    """
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    x = v.reshape(n, c, s).to(stats_dtype(v))
    dt = x.dtype
    mean, var, log_prior = mean.to(dt), var.to(dt), log_prior.to(dt)
    inplace = _in_place(v, mean, var, log_prior)
    # γ, β folded into the per-channel coefficients, unless per value or (in place) asked for a
    # gradient: then applied after, by autograd (x̂ computed in place all the same)
    fold = all(t is None or t.numel() == c for t in (weight, bias)) and (
        not inplace or _in_place(weight, bias))
    w, b = (weight, bias) if fold else (None, None)
    k = mean.shape[0]
    # γ x̂_k + β = o_k + s_k z per channel, z = x − centre
    centre = (log_prior.exp() * mean).sum(0) if k > 1 else mean[0]
    mc = mean - centre
    scale = torch.rsqrt(var + eps)
    if w is not None:
        scale = scale * w.reshape(1, c).to(dt)
    shift = -mc * scale
    if b is not None:
        shift = shift + b.reshape(1, c).to(dt)
    if k == 1:  # on x itself, as torch BN's eval: y = s_0 x + (o_0 − s_0 c)
        off = (shift[0] - scale[0] * centre)[:, None]
        y = torch.mul(x, scale[0, :, None], out=torch.empty_like(x) if inplace else None)
        y = y.add_(off) if inplace else y + off
    else:
        coef = _coef(mc, var, log_prior, eps)  # (K, C, 3)
        form = _pair if k == 2 else _many
        y = form(x, centre, coef, scale, shift) if not inplace else _chunked(
            form, x, centre, coef, scale, shift)
    y = y.reshape(v.shape)
    return y if fold else affine_transform(y, None, None, weight, bias)


def _chunked(form: Callable[..., Tensor], x: Tensor, centre: Tensor, coef: Tensor,
             scale: Tensor, shift: Tensor) -> Tensor:
    """``form`` in place over runs of samples of about :data:`CHUNK_BYTES` per plane, into one
    output: the passes over a run stay in cache, and its work planes are reused."""
    n, k = x.shape[0], coef.shape[0]
    y = torch.empty_like(x)
    size = max(1, CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
    first = x[:size]
    if k == 2:  # z and the posterior
        work = [torch.empty_like(first), torch.empty_like(first)]
    else:  # z, the exponentials, their maximum and sum
        work = [torch.empty_like(first), first.new_empty((k, *first.shape)),
                torch.empty_like(first)]
    for i in range(0, n, size):
        j = min(size, n - i)
        form(x[i:i + j], centre, coef, scale, shift, y[i:i + j],
             [w[:j] if w.dim() == x.dim() else w[:, :j] for w in work])
    return y


def _pair(x: Tensor, centre: Tensor, coef: Tensor, scale: Tensor, shift: Tensor,
          out: Tensor | None = None, work: list[Tensor] | None = None) -> Tensor:
    """Two components: ``y = (o_0 + s_0 z) + sigmoid(a_1 − a_0)·((o_1 − o_0) + (s_1 − s_0) z)``;
    in place into ``out`` with the work planes ``work`` (``z``, ``p_1``) when given."""
    o0, s0 = shift[0, :, None], scale[0, :, None]
    do, ds = (shift[1] - shift[0])[:, None], (scale[1] - scale[0])[:, None]
    if out is None or work is None:
        z = x - centre[:, None]
        return o0 + s0 * z + torch.sigmoid(_quad(coef[1] - coef[0], z)) * (do + ds * z)
    z = torch.sub(x, centre[:, None], out=work[0])
    p = _quad(coef[1] - coef[0], z, work[1]).sigmoid_()
    y = torch.mul(z, ds, out=out).add_(do).mul_(p)
    return y.addcmul_(z, s0).add_(o0)


def _many(x: Tensor, centre: Tensor, coef: Tensor, scale: Tensor, shift: Tensor,
          out: Tensor | None = None, work: list[Tensor] | None = None) -> Tensor:
    """More than two components: ``y = Σ_k softmax_k(a)·(o_k + s_k z)``; in place into ``out``
    with the work planes ``work`` (``z``, the exponentials ``(K, …)`` and their maximum and sum)
    when given."""
    k = coef.shape[0]
    if out is None or work is None:
        z = x - centre[:, None]
        p = torch.softmax(torch.stack([_quad(coef[i], z) for i in range(k)]), 0)
        y = p[0] * (shift[0, :, None] + scale[0, :, None] * z)
        for i in range(1, k):
            y = y + p[i] * (shift[i, :, None] + scale[i, :, None] * z)
        return y
    # a softmax written out in base 2 (exp2 is ~3x faster than exp here): logits·log₂e
    z = torch.sub(x, centre[:, None], out=work[0])
    e, top = work[1], work[2]
    coef2 = coef * _LOG2_E
    for i in range(k):
        _quad(coef2[i], z, e[i])
    torch.maximum(e[0], e[1], out=top)
    for i in range(2, k):
        torch.maximum(top, e[i], out=top)
    for i in range(k):
        e[i].sub_(top).exp2_()
    total = torch.add(e[0], e[1], out=top)
    for i in range(2, k):
        total.add_(e[i])
    # (Σ_k e_k o_k + z·Σ_k e_k s_k) / Σ_k e_k, the second sum in e_0's plane
    y = torch.mul(e[0], shift[0, :, None], out=out)
    for i in range(1, k):
        y.addcmul_(e[i], shift[i, :, None])
    lin = e[0].mul_(scale[0, :, None])
    for i in range(1, k):
        lin.addcmul_(e[i], scale[i, :, None])
    return y.addcmul_(lin, z).div_(total)
