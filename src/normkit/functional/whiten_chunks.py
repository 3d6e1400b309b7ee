"""Batched products of whitening steps over the samples ``(P, G, D, S)``, one cache-sized chunk
of samples at a time (for use inside the custom ops of :mod:`normkit.functional.whiten_ops`,
:mod:`normkit.functional.fused_batch_whiten` and :mod:`normkit.functional.fused_whiten`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["chunked_matmuls", "chunked_moments", "chunked_outer", "chunked_stats", "sample_chunks"]


# 1 MiB: half an L2 of this project's reference CPU (AMD EPYC, 2 MiB L2 per core); against 512 KiB
# a dbn / cd_bw / pca_bw training step measured 7-9 % faster (thread CPU time, 40 interleaved
# rounds at (128, 64, 16, 16)), per-sample whitening unchanged
_CHUNK_BYTES = 1 << 20
# elsewhere (CUDA, MPS) the chunks are not for a cache but bound the reused centring buffer: a
# kernel launch per product and chunk is ~10 µs, so a CPU-sized chunk would launch thousands per
# step at ImageNet shapes; 64 MiB keeps a step at a few launches per product
_DEVICE_CHUNK_BYTES = 1 << 26


def sample_chunks(x: Tensor) -> list[slice]:
    """Slices of the leading axis of ``x`` ``(P, G, D, S)`` of about 1 MiB each.

    The batched products of a whitening step over ``16 × 256`` blocks are bound by memory
    traffic more than by arithmetic on CPU: running the products that share an operand (``Mᵀg``
    and ``P x_c`` into one buffer, ``x − μ`` and its covariance) chunk by chunk, while the chunk
    is in cache, measured 2× faster than one batched call each. Off the CPU there is no such
    cache to fit and each product is a kernel launch: chunks of about 64 MiB there. For use
    inside custom ops (a Python loop over the chunks).

    Example:
        >>> [s.stop for s in sample_chunks(torch.empty(128, 4, 16, 256))][:2]
        [16, 32]
    """
    p, n = x.shape[0], _chunk_size(x)
    return [slice(i, min(i + n, p)) for i in range(0, p, n)]


def chunked_matmuls(pairs: list[tuple[Tensor, Tensor]], shift: Tensor | None = None, *,
                    mean: Tensor | None = None) -> Tensor:
    """``Σ_k mat_k @ x_k + shift`` for ``x_k`` ``(P, G, D, S)``, ``mat_k`` ``(1 or P, G, D, D)``
    and ``shift`` ``(1 or P, G, D, 1)``, as :func:`~normkit.functional.whiten.grouped_matmul`, one chunk of
    :func:`sample_chunks` at a time (all the terms of a chunk while it is in cache); a fresh
    contiguous tensor. With ``mean`` ``(1, G, D, 1)`` the last term's ``x`` is centred first,
    ``mat @ (x − mean)``, chunk by chunk in one reused chunk-sized buffer (exact under large
    offsets, and no activation-sized centred copy).

    Example:
        >>> a, b = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
        >>> x, y = torch.randn(2, 1, 3, 5), torch.randn(2, 1, 3, 5)
        >>> torch.allclose(chunked_matmuls([(a, x), (b, y)]), a @ x + b @ y)
        True
        >>> mu = y.mean((0, 3), keepdim=True)
        >>> torch.allclose(chunked_matmuls([(b, y)], mean=mu), b @ (y - mu))
        True
    """
    x0 = pairs[0][1]
    p, g, d, s = x0.shape
    out = torch.empty((p, g, d, s), dtype=torch.promote_types(x0.dtype, pairs[0][0].dtype),
                      device=x0.device)
    last = len(pairs) - 1
    k0 = _chunk_size(x0)
    # every operand split into its chunks once, as views where it allows (a few torch calls per
    # chunk instead of ~20 slices and views: at d = 16, 8 chunks and 4 passes a step, the calls
    # cost as much as a product); a matrix shared by the samples is expanded to a chunk once
    outs, outs3 = out.split(k0), _split3(out, k0)
    mats = [(True, _split3(mat, k0)) if mat.shape[0] == p
            else (False, mat.expand(k0, g, d, d).reshape(k0 * g, d, d)) for mat, _ in pairs]
    xs = [x.split(k0) if mean is not None and i == last else _split3(x, k0)
          for i, (_, x) in enumerate(pairs)]
    shared_shift = shift is not None and shift.shape[0] != p
    shifts = (shift.expand(k0, g, d, s) if shared_shift
              else None if shift is None else shift.split(k0))
    centre = None if mean is None else _Centring(pairs[last][1], mean, k0)
    for c, o4 in enumerate(outs):
        k, o = o4.shape[0], outs3[c]
        # the chunk starts as the shift (or 0) and accumulates every product: one pass fewer
        # than adding the shift after, and ~7 % faster than bmm(out=) for the first product
        if shifts is None:
            o.zero_()
        elif shared_shift:
            o4.copy_(shifts if k == k0 else shifts[:k])
        else:
            o4.copy_(shifts[c].expand(k, g, d, s))
        for i in range(last + 1):
            per_sample, mat = mats[i]
            m = mat[c] if per_sample else mat if k == k0 else mat[: k * g]
            o.baddbmm_(m, centre(xs[i][c]) if centre is not None and i == last else xs[i][c])
    return out


def _chunk_size(x: Tensor) -> int:
    """The samples in a chunk of :func:`sample_chunks` (all but the last chunk; at most all
    of them, so that chunk-sized buffers are no larger than the samples)."""
    per = max(math.prod(x.shape[1:]) * x.element_size(), 1)
    n = (_CHUNK_BYTES if x.device.type == "cpu" else _DEVICE_CHUNK_BYTES) // per
    return max(1, min(n, x.shape[0]))


def _split3(t: Tensor, k: int) -> tuple[Tensor, ...] | _Reshaped:
    """``t`` ``(P, G, D, E)`` as chunks of ``k`` samples viewed as ``(k·G, D, E)`` batches of
    matrices: views of one reshape when ``t`` allows, else each chunk copied when it is used."""
    p, g, d, e = t.shape
    if t.is_contiguous():
        return t.view(p * g, d, e).split(k * g)
    return _Reshaped(t.split(k), (-1, d, e))


class _Reshaped:
    """Chunks reshaped on access (a copy each, only when read: no activation-sized copy)."""

    def __init__(self, chunks: tuple[Tensor, ...], shape: tuple[int, ...]) -> None:
        self.chunks, self.shape = chunks, shape

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Tensor:
        return self.chunks[i].reshape(self.shape)


class _Centring:
    """``x − mean`` of a chunk ``(k, G, D, S)`` of the samples ``x`` into one reused buffer of
    ``k0`` samples (the last chunk may be shorter), returned as ``(k·G, D, S)`` matrices, in the
    promoted dtype of ``x`` and ``mean``."""

    def __init__(self, x: Tensor, mean: Tensor, k0: int) -> None:
        _, g, d, s = x.shape
        dtype = torch.promote_types(x.dtype, mean.dtype)
        self.buf = torch.empty((k0, g, d, s), dtype=dtype, device=x.device)
        self.buf3 = self.buf.view(k0 * g, d, s)
        self.mean, self.k0, self.g = mean, k0, g

    def __call__(self, x: Tensor) -> Tensor:
        k = x.shape[0]
        if k == self.k0:
            torch.sub(x, self.mean, out=self.buf)
            return self.buf3
        torch.sub(x, self.mean, out=self.buf[:k])
        return self.buf3[: k * self.g]


def chunked_outer(a: Tensor, b: Tensor, *, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(Σ_p a_p b_pᵀ, Σ a)`` over the leading and last axes of ``a, b`` ``(P, G, D, S)``:
    ``(1, G, D, D)`` and ``(1, G, D, 1)``, the products a chunk of :func:`sample_chunks` at a
    time (accumulated in place per matrix, summed once at the end), ``Σ a`` in one pass. With ``mean`` ``(1, G, D, 1)``, ``b −
    mean`` in place of ``b`` (centred chunk by chunk, as in :func:`chunked_matmuls`).

    Example:
        >>> a, b = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 5)
        >>> o, t = chunked_outer(a, b)
        >>> torch.allclose(o, (a @ b.mT).sum(0, keepdim=True)), torch.allclose(t, a.sum((0, 3), keepdim=True))
        (True, True)
        >>> mu = b.mean((0, 3), keepdim=True)
        >>> torch.allclose(chunked_outer(a, b, mean=mu)[0], (a @ (b - mu).mT).sum(0, keepdim=True))
        True
    """
    _, g, d, s = a.shape
    k0 = _chunk_size(a)
    acc = a.new_zeros((k0 * g, d, d))  # a product per matrix of a chunk, summed last
    bs = b.split(k0) if mean is not None else _split3(b, k0)
    centre = None if mean is None else _Centring(b, mean, k0)
    for c, ac in enumerate(_split3(a, k0)):
        n = ac.shape[0]
        bc = centre(bs[c]) if centre is not None else bs[c]
        (acc if n == k0 * g else acc[:n]).baddbmm_(ac, bc.mT)
    # Σ a in one pass after: a multi-axis sum per chunk measured slower
    return acc.view(-1, g, d, d).sum(0, keepdim=True), a.sum(3, keepdim=True).sum(0, keepdim=True)


def chunked_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~normkit.functional.whiten.batch_moments` with ``shared=True`` (``(1, G, D, 1)`` mean, biased ``(1, G, D, D)``
    covariance, contiguous centred samples), the centring and the covariance of a chunk of
    :func:`sample_chunks` together (the chunk is in cache for its product).

    Example:
        >>> x = torch.randn(8, 2, 3, 5, dtype=torch.float64)
        >>> from normkit.functional.whiten import batch_moments
        >>> all(torch.allclose(a, b) for a, b in zip(chunked_moments(x), batch_moments(x, True)))
        True
    """
    xf = _up(x)
    centered = torch.empty(xf.shape, dtype=xf.dtype, device=xf.device)
    mean, cov = _chunked_stats(xf, centered)
    return mean, cov, centered


def chunked_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and covariance of :func:`chunked_moments` without keeping the centred samples:
    each chunk is centred in one reused chunk-sized buffer (for callers that centre again chunk
    by chunk, :func:`chunked_matmuls` and :func:`chunked_outer` with ``mean``: one
    activation-sized tensor fewer).

    Example:
        >>> x = torch.randn(8, 2, 3, 5, dtype=torch.float64)
        >>> all(torch.equal(a, b) for a, b in zip(chunked_stats(x), chunked_moments(x)))
        True
    """
    return _chunked_stats(_up(x), None)


def _up(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunked_stats(xf: Tensor, centered: Tensor | None) -> tuple[Tensor, Tensor]:
    p, g, d, s = xf.shape
    m = max(p * s, 1)
    mean = xf.sum(3, keepdim=True).sum(0, keepdim=True).div_(m)
    k0 = _chunk_size(xf)
    # one (D × D) product per matrix of a chunk, accumulated in place and summed once at the end
    # (no fresh product and reduction per chunk)
    acc = xf.new_zeros((k0 * g, d, d))
    if centered is not None:
        outs, outs3 = centered.split(k0), _split3(centered, k0)
    else:
        centre = _Centring(xf, mean, k0)
    for i, xc in enumerate(xf.split(k0)):
        if centered is not None:
            c = outs3[i]
            torch.sub(xc, mean, out=outs[i])
        else:
            c = centre(xc)
        (acc if c.shape[0] == k0 * g else acc[: c.shape[0]]).baddbmm_(c, c.mT)
    return mean, acc.view(-1, g, d, d).sum(0, keepdim=True).div_(m)
