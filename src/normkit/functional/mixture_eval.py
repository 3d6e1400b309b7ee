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
* ``K = 1``: ``y = o_0 + s_0 z`` (the posterior is 1), written on ``x`` as torch BN's eval (a
  module runs BN's kernel itself: :meth:`~normkit.nop.MixtureStandardize.eval_moments`);
  ``K = 2``: ``p_1 = sigmoid(d)``, ``d = a_1 − a_0`` (saturates to 0 or 1: no NaN however far a
  value lies from both components), ``y = (o_0 + s_0 z) + p_1·((o_1 − o_0) + (s_1 − s_0) z)``;
  more: ``p = softmax_k(a)``, ``y = Σ_k p_k (o_k + s_k z)`` (in place: the softmax written out
  in base 2, ``e_k = 2^{a_k log₂e − max}``, ``y = Σ_k e_k (o_k + s_k z) / Σ_k e_k``).

Nothing is fitted, so the result is an ordinary function of ``x`` (and of ``γ, β`` and the
running estimates): when a gradient is asked for, or under ``torch.compile`` / ``torch.export``
/ ``torch.func`` transforms, the same formulas run as plain out-of-place ops autograd
differentiates; otherwise (``torch.no_grad()``, inference) they write into a few buffers in
place, over runs of samples that stay in cache (ten passes over the activations for ``K = 2``),
with the per-channel coefficients laid out as the input (:func:`_columns`: rows of a few
pixels for channels-last).
Where a gradient is asked for through ``γ, β`` alone (an evaluation forward outside
``no_grad``) ``x̂`` is computed in place and ``γ x̂ + β`` by autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .fused_mixture import LOG2_E, _coef, _quad
from .partition import as_dtype, stats_dtype
from .standardize import affine_transform
from .whiten_chunks import _DEVICE_CHUNK_BYTES

__all__ = ["mixture_eval"]

# a plane's run of samples in the in-place form: ~2 MiB on CPU, cache-resident; elsewhere each op
# on a run is a kernel launch, so runs of batch whitening's device chunk size (64 MiB)
CHUNK_BYTES = 1 << 21


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
    mean, var, log_prior = as_dtype(mean, dt), as_dtype(var, dt), as_dtype(log_prior, dt)
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
        off = shift[0] - scale[0] * centre
        if not inplace:
            y = x * scale[0, :, None] + off[:, None]
        else:
            y = torch.mul(x, scale[0, :, None], out=torch.empty_like(x)).add_(off[:, None])
    else:
        coef = _coef(mc, var, log_prior, eps)  # (K, C, 3)
        if not inplace:
            y = (_pair if k == 2 else _many)(x, centre, coef, scale, shift)
        else:
            y = _chunked(x, centre, coef, scale, shift)
    y = y.reshape(v.shape)
    return y if fold else affine_transform(y, None, None, weight, bias)


def _pair(x: Tensor, centre: Tensor, coef: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Two components: ``y = (o_0 + s_0 z) + sigmoid(a_1 − a_0)·((o_1 − o_0) + (s_1 − s_0) z)``
    (the autograd form)."""
    o0, s0 = shift[0, :, None], scale[0, :, None]
    do, ds = (shift[1] - shift[0])[:, None], (scale[1] - scale[0])[:, None]
    z = x - centre[:, None]
    return o0 + s0 * z + torch.sigmoid(_quad(coef[1] - coef[0], z)) * (do + ds * z)


def _many(x: Tensor, centre: Tensor, coef: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """More than two components: ``y = Σ_k softmax_k(a)·(o_k + s_k z)`` (the autograd form)."""
    k = coef.shape[0]
    z = x - centre[:, None]
    p = torch.softmax(torch.stack([_quad(coef[i], z) for i in range(k)]), 0)
    y = p[0] * (shift[0, :, None] + scale[0, :, None] * z)
    for i in range(1, k):
        y = y + p[i] * (shift[i, :, None] + scale[i, :, None] * z)
    return y


TILE = 2048  # values of a channels-last tile row: r whole pixels of C channels, in L1


def _across(x: Tensor) -> int:
    """For ``x`` ``(N, C, S)`` with the channels innermost and each sample dense (channels-last
    input): the number ``r`` of positions per tile row (a divisor of ``S``, ``r·C ≤`` :data:`TILE`
    where it can); else 0 (the positions innermost, or other strides: per-channel columns)."""
    n, c, s = x.shape
    if s == 1 or c == 1 or x.stride(1) != 1 or x.stride(2) != c or (n > 1 and x.stride(0) != c * s):
        return 0
    r = 1
    for d in range(2, min(s, TILE // c) + 1):
        if s % d == 0:
            r = d
    return r


def _columns(t: Tensor, r: int) -> Tensor:
    """Per-channel coefficients ``(C, m)`` as operands of the runs: columns ``(C, m, 1)`` of runs
    ``(J, C, 1, S)`` (``r = 0``), or rows ``(1, m, r·C)`` of channels-last runs ``(J, S/r, 1,
    r·C)`` (a column broadcast along the fastest axis keeps torch's loops at ``C`` values each,
    several times slower; a row of ``r`` pixels, in L1, keeps them long)."""
    return t[:, :, None] if r == 0 else t.t().repeat(1, r)[None]


def _chunked(x: Tensor, centre: Tensor, coef: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The in-place form over runs of samples of about :data:`CHUNK_BYTES` per plane (64 MiB off
    the CPU), into one
    output laid out as ``x``: the passes over a run stay in cache, its work planes are reused,
    and the per-channel coefficients are prepared once (:func:`_columns`)."""
    k = coef.shape[0]
    n, c, s = x.shape
    y = torch.empty_like(x)
    r = _across(x)
    if r:  # channels-last: (N, S/r, 1, r·C) views of the input and the output
        xv, yv = (t.transpose(1, 2).reshape(n, s // r, 1, r * c) for t in (x, y))
    else:  # (N, C, 1, S): the columns' trailing axes broadcast
        xv, yv = x.unsqueeze(2), y.unsqueeze(2)
    chunk = CHUNK_BYTES if x.device.type == "cpu" else _DEVICE_CHUNK_BYTES
    size = max(1, chunk // max(1, c * s * x.element_size()))
    first = xv[:size]
    if k == 2:
        # z − centre, then y = (z·Δs + Δo)·p_1 + z·s_0 + o_0
        cols = _columns(torch.stack((centre, scale[1] - scale[0], shift[1] - shift[0], scale[0],
                                     shift[0]), 1), r).split(1, 1)
        quads = [_columns(coef[1] - coef[0], r)]
    else:  # the logits in base 2 (exp2 is ~3x faster than exp here)
        cols = _columns(torch.cat((centre[:, None], shift.t(), scale.t()), 1), r).split(1, 1)
        quads = [_columns(coef[i] * LOG2_E, r) for i in range(k)]
    # z and p_1 (K = 2); z, the maximum (then the sum) and the exponentials (more)
    work = [torch.empty_like(first) for _ in range(2 if k == 2 else k + 2)]
    into = _pair_into if k == 2 else _many_into
    for i in range(0, n, size):
        j = min(size, n - i)
        planes = work if j == first.shape[0] else [w[:j] for w in work]
        into(xv[i:i + j], cols, quads, yv[i:i + j], planes)
    return y


def _pair_into(x: Tensor, cols: Sequence[Tensor], quads: list[Tensor], out: Tensor,
               work: list[Tensor]) -> Tensor:
    """:func:`_pair` in place into ``out`` (``cols``: centre, ``Δs``, ``Δo``, ``s_0``, ``o_0``;
    ``quads``: the coefficients of ``d = a_1 − a_0``)."""
    z = torch.sub(x, cols[0], out=work[0])
    p = _quad(quads[0], z, work[1]).sigmoid_()
    y = torch.mul(z, cols[1], out=out).add_(cols[2]).mul_(p)
    return y.addcmul_(z, cols[3]).add_(cols[4])


def _many_into(x: Tensor, cols: Sequence[Tensor], quads: list[Tensor], out: Tensor,
               work: list[Tensor]) -> Tensor:
    """:func:`_many` in place into ``out``, the softmax written out in base 2: ``e_k =
    2^{a_k log₂e − max}``, ``y = (Σ_k e_k o_k + z·Σ_k e_k s_k) / Σ_k e_k`` (``cols``: centre,
    ``o_k``, ``s_k``; ``quads``: the logits' coefficients times ``log₂e``)."""
    k = len(quads)
    z, top, e = work[0], work[1], work[2:]
    torch.sub(x, cols[0], out=z)
    for i in range(k):
        _quad(quads[i], z, e[i])
    torch.maximum(e[0], e[1], out=top)
    for i in range(2, k):
        torch.maximum(top, e[i], out=top)
    for i in range(k):
        e[i].sub_(top).exp2_()
    total = torch.add(e[0], e[1], out=top)
    for i in range(2, k):
        total.add_(e[i])
    y = torch.mul(e[0], cols[1], out=out)  # Σ_k e_k o_k
    lin = e[0].mul_(cols[k + 1])  # Σ_k e_k s_k, in e_0's plane
    for i in range(1, k):
        y.addcmul_(e[i], cols[1 + i])
        lin.addcmul_(e[i], cols[k + 1 + i])
    return y.addcmul_(lin, z).div_(total)
