"""The chunked products of batch whitening (:mod:`normkit.functional.whiten_chunks`): equal to the
one-shot formulas whatever the chunking (chunks smaller than a sample, a short last chunk, one
chunk), with the centring done chunk by chunk (``mean=``) equal to a stored centred copy, and
half-precision samples promoted like the stored copy is."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from normkit.functional import whiten_chunks as WC

F64 = torch.float64


@pytest.fixture(params=[1, 3 * 2 * 3 * 5 * 8, 1 << 30], ids=["sample-per-chunk", "short-last",
                                                                 "one-chunk"])
def chunk_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of one sample, of three samples (7 = 3 + 3 + 1: a short last chunk), or all."""
    monkeypatch.setattr(WC, "_CHUNK_BYTES", request.param)
    return int(request.param)


def _data(dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 2, 3, 5, generator=g, dtype=F64) * 3 + 100).to(dtype)  # a large offset
    a = torch.randn(7, 2, 3, 5, generator=g, dtype=F64)
    m1 = torch.randn(1, 2, 3, 3, generator=g, dtype=F64)
    m2 = torch.randn(7, 2, 3, 3, generator=g, dtype=F64)
    shift = torch.randn(1, 2, 3, 1, generator=g, dtype=F64)
    return x, a, m1, m2, shift


def test_chunks_cover_the_samples_once(chunk_bytes: int) -> None:
    x = torch.empty(7, 2, 3, 5, dtype=F64)
    covered = [i for sl in WC.sample_chunks(x) for i in range(sl.start, sl.stop)]
    assert covered == list(range(7))


def test_stats_equal_the_moments_with_their_centred_copy(chunk_bytes: int) -> None:
    x = _data()[0]
    mean, cov, centered = WC.chunked_moments(x)
    xc = x - x.mean((0, 3), keepdim=True)
    assert_close(centered, xc, rtol=0, atol=1e-12)
    assert_close(cov, (xc @ xc.mT).sum(0, keepdim=True) / 35, rtol=1e-12, atol=1e-12)
    m2, c2 = WC.chunked_stats(x)
    assert torch.equal(m2, mean) and torch.equal(c2, cov)  # the same values, no copy kept


def test_matmuls_centre_chunk_by_chunk(chunk_bytes: int) -> None:
    x, a, m1, m2, shift = _data()
    mean = x.mean((0, 3), keepdim=True)
    ref = m2 @ a + m1 @ (x - mean) + shift
    assert_close(WC.chunked_matmuls([(m2, a), (m1, x)], shift, mean=mean), ref,
                 rtol=1e-12, atol=1e-10)
    assert_close(WC.chunked_matmuls([(m1, x)], None, mean=mean), m1 @ (x - mean),
                 rtol=1e-12, atol=1e-10)
    assert_close(WC.chunked_matmuls([(m2, a), (m1, x)], shift), m2 @ a + m1 @ x + shift,
                 rtol=1e-12, atol=1e-9)


def test_outer_centres_chunk_by_chunk(chunk_bytes: int) -> None:
    x, a, *_ = _data()
    mean = x.mean((0, 3), keepdim=True)
    outer, total = WC.chunked_outer(a, x, mean=mean)
    assert_close(outer, (a @ (x - mean).mT).sum(0, keepdim=True), rtol=1e-12, atol=1e-10)
    assert_close(total, a.sum((0, 3), keepdim=True), rtol=1e-12, atol=1e-12)


def test_half_samples_are_centred_in_float32_as_the_stored_copy_is(chunk_bytes: int) -> None:
    x = _data(torch.bfloat16)[0]
    mean, cov, centered = WC.chunked_moments(x)
    assert mean.dtype == cov.dtype == centered.dtype == torch.float32
    m1 = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    y = WC.chunked_matmuls([(m1, x)], None, mean=mean)
    assert y.dtype == torch.float32
    # the same centred values (float32 rounding of the products aside)
    assert_close(y, WC.chunked_matmuls([(m1, centered)], None), rtol=1e-6, atol=1e-5)


def test_chunk_size_follows_the_device() -> None:
    # CPU: cache-sized chunks (1 MiB: 16 samples of 4·16·256 float32); elsewhere (here the meta
    # device, which stands for CUDA / MPS) one launch per product covers up to 64 MiB
    cpu = WC.sample_chunks(torch.empty(128, 4, 16, 256))
    assert [(s.start, s.stop) for s in cpu[:2]] == [(0, 16), (16, 32)] and len(cpu) == 8
    off = WC.sample_chunks(torch.empty(2048, 4, 16, 256, device="meta"))
    assert [(s.start, s.stop) for s in off] == [(0, 1024), (1024, 2048)]


def test_strided_operands_and_per_sample_shifts(chunk_bytes: int) -> None:
    # operands that cannot be viewed as (k·G, D, S) chunks (a transposed copy's view: each chunk
    # is copied when read) and a per-sample shift give the one-shot formulas
    x, a, m1, m2, shift = _data()
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xs.is_contiguous()
    per_sample = torch.randn(7, 2, 3, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    mean = x.mean((0, 3), keepdim=True)
    assert_close(WC.chunked_matmuls([(m2.mT, xs), (m1, xs)], per_sample, mean=mean),
                 m2.mT @ x + m1 @ (x - mean) + per_sample, rtol=1e-12, atol=1e-9)
    outer, total = WC.chunked_outer(xs, a)
    assert_close(outer, (x @ a.mT).sum(0, keepdim=True), rtol=1e-12, atol=1e-9)
    assert_close(total, x.sum((0, 3), keepdim=True), rtol=1e-12, atol=1e-9)
