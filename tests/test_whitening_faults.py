"""Whitening faults, fuzzed (see ``tests/test_whitening.py``): rank-deficient and repeated-eigenvalue
input, a large mean offset in float32, half input, NaN and constant input, over every preset.
Helpers, the presets and the numerics behind the tolerances: ``tests/whitening_util.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from whitening_util import (
    DT,
    ESTIMATES,
    FUZZ,
    PRESETS,
    GroupWhitening,
    InstanceWhitening,
    _eye,
    _gen,
    batch_groups,
    correlated,
    cov_rows,
    make_preset,
)

# ============================================================================ faults (fuzz)
# Every fault runs every method: the four batch presets in both estimate modes, and the two
# per-sample presets. Inputs are laid out so that each whitening problem (a d × m matrix) gets
# the fault: ``layout(rows)`` maps problems ``(P, d, m)`` to the module's input.
FAULT_CASES = [(n, e) for n in PRESETS for e in ESTIMATES] + [
    ("group_whitening", None), ("instance_whitening", None)]
FAULT_IDS = [f"{n}-{e}" if e else n for n, e in FAULT_CASES]
fault_params = pytest.mark.parametrize(("name", "estimate"), FAULT_CASES, ids=FAULT_IDS)
C = 8


def fault_module(name, estimate, d, method=None):
    if name == "group_whitening":
        return GroupWhitening(C, num_groups=d, affine=True)
    if name == "instance_whitening":
        return InstanceWhitening(C, group_size=d, affine=True)
    # momentum 1: eval then uses this very batch's statistics, so the eval path meets the same
    # ill-conditioned matrices as training (with 0.1 the identity initial estimate hides them).
    return make_preset(name, C, d, estimate=estimate, momentum=1.0)


def layout(name, rows, n):
    """Problems ``(P, d, m)`` as the input ``(n, C, S)`` of ``name`` (inverse of the matrix view)."""
    p, d, m = rows.shape
    if name == "group_whitening":  # P = n, d = g, m = (C/g)·S
        return rows.reshape(n, C, -1)
    if name == "instance_whitening":  # P = n·C/d, m = S
        return rows.reshape(n, C, m)
    # batch: P = C/d, m = n·S
    return rows.reshape(C, n, -1).transpose(0, 1).contiguous()


def shape_for(name, d, m):
    """``(P, n)`` for problems of ``m`` samples."""
    if name == "group_whitening":
        return 2, 2  # n = 2 samples, each one problem; (C/d)·S = m
    if name == "instance_whitening":
        return 2 * C // d, 2
    return C // d, m  # batch: n = m samples, S = 1


def group_size_for(name):
    # d = 4: C/d = 2 groups (batch/instance); group whitening: g = 8 groups of one channel each,
    # so that its m = (C/g)·S can be any number of positions
    return 8 if name == "group_whitening" else 4


def run_fault(name, estimate, x, m):
    """Train and eval forward + backward; finite outputs, gradients and buffers, dtype kept,
    ``|y| ≤ √m`` (W(Σ+εI)Wᵀ = I ⇒ WΣWᵀ ⪯ I, so each whitened coordinate has mean square ≤ 1)."""
    d = group_size_for(name)
    mod = fault_module(name, estimate, d)
    modes = ("train", "eval") if name in PRESETS else ("train",)
    bound = math.sqrt(m) * 1.05 + 0.05  # 5 %: half rounding of y (2⁻⁸) and mean error at 1e4
    for mode in modes:
        mod.train(mode == "train")
        xi = x.clone().requires_grad_()
        y = mod(xi)
        assert y.dtype == x.dtype, mode
        assert torch.isfinite(y).all(), f"{mode}: non-finite output"
        assert y.abs().max().item() <= bound, f"{mode}: |y| = {y.abs().max().item():.3g} > {bound:.3g}"
        g = torch.randn(y.shape, generator=_gen(40)).to(y.dtype)
        (y.float() * g.float()).sum().backward()
        assert torch.isfinite(xi.grad).all(), f"{mode}: non-finite input gradient"
        for n, p in mod.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"{mode}: non-finite {n}.grad"
        for n, b in mod.named_buffers():
            assert not b.is_floating_point() or torch.isfinite(b).all(), f"non-finite {n}"
        mod.zero_grad()
    return mod


@fault_params
@FUZZ
@given(m=st.integers(2, 3), scale=st.sampled_from([1.0, 10.0, 1e3, 1e-3]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
@example(m=3, scale=100.0, dtype=torch.float32, seed=0)
def test_fault_rank_deficient(name, estimate, m, scale, dtype, seed):
    # m < d = 4 samples per problem: Σ has rank m − 1, only ε keeps Σ + εI invertible
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    rows = torch.randn(p, d, m, generator=_gen(seed), dtype=DT) * scale
    run_fault(name, estimate, layout(name, rows, n).to(dtype), m)


@fault_params
@FUZZ
@given(pattern=st.sampled_from(["all", "pairs", "constant", "zero"]),
       scale=st.sampled_from([1.0, 1e-2, 1e2]), m=st.sampled_from([8, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_fault_repeated_eigenvalues(name, estimate, pattern, scale, m, dtype, seed):
    # already-white rows (all eigenvalues equal), pairwise equal eigenvalues, constant input (Σ = 0)
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    gen = _gen(seed)
    if pattern in ("constant", "zero"):
        value = 0.0 if pattern == "zero" else scale * 0.7
        rows = torch.full((p, d, m), value, dtype=DT)
    else:
        a = torch.randn(p, m, d, generator=gen, dtype=DT)
        q, _ = torch.linalg.qr(a - a.mean(1, keepdim=True))  # orthonormal, zero-mean columns
        spread = torch.ones(d, dtype=DT) if pattern == "all" else torch.tensor([1.0, 3.0]).repeat(d // 2)
        rows = (q * spread).transpose(-1, -2) * math.sqrt(m) * scale
    run_fault(name, estimate, layout(name, rows, n).to(dtype), m)


@fault_params
@FUZZ
@given(offset=st.sampled_from([1e4, -1e4, 3e3]), spread=st.sampled_from([1.0, 1e-1, 10.0]),
       m=st.sampled_from([8, 16, 64]), seed=st.integers(0, 2**16))
def test_fault_large_mean_offset_float32(name, estimate, offset, spread, m, seed):
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    gen = _gen(seed)
    mix = _eye(d) + 0.3 * torch.randn(d, d, generator=gen, dtype=DT)  # well conditioned
    rows = mix @ torch.randn(p, d, m, generator=gen, dtype=DT) * spread + offset
    x = layout(name, rows, n).float()
    mod = run_fault(name, estimate, x, m)
    if name in PRESETS and name != "iternorm":
        # Still white. The float32 mean of m values near |offset| is off by at most δ_c ≤
        # ulp(m·|offset|)/2 per channel (summation error; x − μ itself is exact, Sterbenz), which
        # adds δδᵀ (|δ|² ≤ d·δ_c²) to Σ; with ε that biases W Σ Wᵀ by ≲ (ε + |δ|²)/λ_min (λ_min of
        # the batch covariance of the float32 values, in float64). Float32 eigen round-off adds
        # ≲ κ·1e-7 ≪ 1e-3. (A one-pass E[x²] − E[x]² would be off by ulp(1e8) ≈ 8: not white.)
        mod.train()
        y = batch_groups(mod(x).double(), d)
        lam_min = torch.linalg.eigvalsh(cov_rows(batch_groups(x.double(), d)))[:, 0]
        delta2 = d * (2.0 ** (math.floor(math.log2(m * abs(offset))) - 23) / 2) ** 2
        err = (cov_rows(y) - _eye(d)).abs().amax((-1, -2))
        assert (err <= 2 * (mod.eps + delta2) / lam_min + 1e-3).all(), (err, lam_min)


@fault_params
@FUZZ
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), m=st.sampled_from([5, 16, 64]),
       scale=st.sampled_from([1.0, 1e-2, 30.0]), seed=st.integers(0, 2**16))
def test_fault_half_input_statistics_in_float32(name, estimate, dtype, m, scale, seed):
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    gen = _gen(seed)
    rows = torch.randn(d, d, generator=gen, dtype=DT) @ torch.randn(p, d, m, generator=gen, dtype=DT)
    x = layout(name, rows * scale, n).to(dtype)
    mod = run_fault(name, estimate, x, m)
    # statistics in float32: the half input gives exactly the float32 computation on the same
    # (exactly upcast) values, rounded once to the half dtype at the end
    ref = copy.deepcopy(mod)
    mod.train()
    ref.train()
    y = mod(x)
    y_ref = ref(x.float())
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=0, atol=0)
    for (k, a), (_, b) in zip(mod.named_buffers(), ref.named_buffers(), strict=True):
        assert a.dtype == b.dtype, k
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_nan_input_propagates_to_its_group_only(name, estimate):
    # TESTING.md: NaN/Inf input propagates to the output (no LAPACK error); groups are independent
    c, d = 8, 4
    x = correlated(16, c, 43, 2, dtype=torch.float32)
    clean = make_preset(name, c, d, estimate=estimate)
    ref = clean(x)
    bad = x.clone()
    bad[3, 1, 0] = float("nan")  # channel 1: group 0
    y = make_preset(name, c, d, estimate=estimate)(bad)
    assert torch.isnan(y[:, :d]).all()
    torch.testing.assert_close(y[:, d:], ref[:, d:], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_constant_input_gives_zero_in_float32(name):
    # Σ = 0: every method's W is then ε^{-1/2}·(orthogonal), x − μ is the float32 error of the mean
    # (≤ a few ulp(0.1) ≈ 1e-8), so |y| ≤ √d·316·1e-7 ≈ 1e-4 (bias 0)
    mod = make_preset(name, 8, 4)
    y = mod(torch.full((16, 8, 3), 0.1))
    assert y.abs().max().item() <= 1e-3
