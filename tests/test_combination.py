"""Multi-mode and combinational methods (book ch. 5): hand-computed values, the helpers' math
(sparsemax, pooled moments) and properties (batch permutation equivariance, sample
independence, scale invariance). ``tests/test_combination_methods.py``: switchable normalization,
batch-instance normalization, EvoNorm, FRN, batch-channel normalization and folding. The
hypothesis tests stay in this file: hypothesis derives a derandomized test's examples from its
pytest node id. Helpers: ``tests/combination_util.py``.

Tolerances. Everything runs in float64. Two computations of the same formula (a module and a
plain-tensor reference, or two modules that must coincide) agree to float64 round-off: a few
hundred roundings of O(10) values, far below ``1e-10`` (``TIGHT``, as tests/test_generic.py).
Hand-computed literals are given to 6–7 significant digits: ``1e-6``. Invariances that hold only
where σ² ≫ ε use ε = 1e-12 (variances of ≥ 2 standard-normal values are ≳ 1e-6 with
overwhelming probability for these seeds, so ε/σ² ≲ 1e-6): checked to ``1e-6`` relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

import normkit as nk
from combination_util import (
    DT,
    HAND,
    SETTINGS,
    TIGHT,
    _randomize,
    _x,
    seeds,
)
from normkit.functional.merging import pool_moments
from normkit.functional.simplex import sparsemax
from normkit.nop._owned import instance_moments


# ===================================================================== hand-computed values
def test_frn_hand_computed():
    # x = (3, 4) over two positions: ν² = (9 + 16)/2 = 12.5, x̂ = (3, 4)/√12.5
    x = torch.tensor([[[3.0, 4.0]]], dtype=DT)
    plain = nk.create("frn", 1, tlu=False, eps=1e-12, dtype=DT)
    assert_close(plain(x), torch.tensor([[[0.8485281, 1.1313708]]], dtype=DT), **HAND)
    tlu = nk.create("frn", 1, eps=1e-12, dtype=DT)
    with torch.no_grad():
        tlu.tau.fill_(0.9)
        tlu.weight.fill_(2.0)
        tlu.bias.fill_(-1.0)
    # γx̂ + β = (0.6970563, 1.2627417); max(·, 0.9)
    assert_close(tlu(x), torch.tensor([[[0.9, 1.2627417]]], dtype=DT), **HAND)


def test_bin_hand_computed():
    # channel values: sample 0 (1, 3), sample 1 (5, 7). BN: μ = 4, σ² = (9+1+1+9)/4 = 5.
    # IN: μ = 2 and 6, σ² = 1. ρ = 0.25: y = 0.25·(x − 4)/√5 + 0.75·(x − μ_n)/1.
    x = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]], dtype=DT)
    m = nk.create("bin", 1, gate_init=0.25, eps=1e-12, dtype=DT)
    s5 = 1 / math.sqrt(5)
    want = [[-0.75 - 0.75 * s5, 0.75 - 0.25 * s5], [-0.75 + 0.25 * s5, 0.75 + 0.75 * s5]]
    assert_close(m(x), torch.tensor(want, dtype=DT).unsqueeze(1), **HAND)
    assert_close(m(x)[0, 0, 0], torch.tensor(-1.0854102, dtype=DT), **HAND)


def test_evonorm_b0_hand_computed():
    # same data: σ²_B = 5, σ²_I = 1, v = 1: den = max(√5, x + 1)
    # x = 1: max(2.2360680, 2) → 1/√5; x = 3: 4 → 0.75; x = 5: 6 → 5/6; x = 7: 8 → 7/8
    x = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]], dtype=DT)
    m = nk.create("evonorm_b0", 1, eps=1e-12, dtype=DT)
    want = torch.tensor([[[0.4472136, 0.75]], [[0.8333333, 0.875]]], dtype=DT)
    assert_close(m(x), want, **HAND)
    assert_close(m.running_var, torch.tensor([0.9 + 0.1 * 5 * 4 / 3], dtype=DT), **TIGHT)


def test_evonorm_s0_hand_computed():
    # one group of two channels (1, 3), (5, 7): σ²_G = 5; y = x·sigmoid(x)/√5
    # (x = 1: sigmoid(1) = 0.7310586, /√5 = 0.3269393)
    x = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]], dtype=DT)
    m = nk.create("evonorm_s0", 2, num_groups=1, eps=1e-12, dtype=DT)
    sig = [1 / (1 + math.exp(-v)) for v in (1.0, 3.0, 5.0, 7.0)]
    want = [v * s / math.sqrt(5) for v, s in zip((1.0, 3.0, 5.0, 7.0), sig, strict=True)]
    assert_close(m(x), torch.tensor(want, dtype=DT).reshape(1, 2, 2), **HAND)
    assert_close(m(x)[0, 0, 0], torch.tensor(0.3269393, dtype=DT), **HAND)


def test_switchable_norm_hand_computed():
    # one channel, two samples (1, 3) and (5, 7): IN μ = (2, 6), σ² = 1; LN = IN (one channel);
    # BN μ = 4, σ² = 5. Mean logits (0, −∞, 0) → weights (½, 0, ½): μ = (3, 5). Variance logits
    # all 0 → (⅓, ⅓, ⅓): σ² = (1 + 1 + 5)/3 = 7/3. y = (x − μ)/√(7/3).
    x = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]], dtype=DT)
    m = nk.create("switchable_norm", 1, eps=1e-12, dtype=DT)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.0, -math.inf, 0.0]))
    r = math.sqrt(3 / 7)
    want = torch.tensor([[[-2 * r, 0.0]], [[0.0, 2 * r]]], dtype=DT)
    assert_close(m(x), want, **HAND)


def test_bcn_hand_computed():
    # two channels, two samples, one position each. BN per channel: channel 0 (1, 3) → (−1, 1),
    # channel 1 (2, 10) → (−1, 1). bn_bias (0, 2): h = sample 0 (−1, 1), sample 1 (1, 3).
    # GN with one group per sample: (−1, 1) → (−1, 1); (1, 3) → (−1, 1).
    x = torch.tensor([[1.0, 2.0], [3.0, 10.0]], dtype=DT)
    m = nk.create("bcn", 2, num_groups=1, eps=1e-12, dtype=DT)
    with torch.no_grad():
        m.bn_bias.copy_(torch.tensor([0.0, 2.0]))
    assert_close(m(x), torch.tensor([[-1.0, 1.0], [-1.0, 1.0]], dtype=DT), **HAND)
    with torch.no_grad():
        m.bn_bias.copy_(torch.tensor([0.0, 0.5]))
    # h = (−1, −0.5), (1, 1.5): each (−1, 1) after GN again: GN removes a per-sample shift
    assert_close(m(x), torch.tensor([[-1.0, 1.0], [-1.0, 1.0]], dtype=DT), **HAND)
    with torch.no_grad():
        m.bn_weight.copy_(torch.tensor([1.0, 3.0]))
    # h = (−1, −2.5), (1, 3.5): GN → (1, −1), (−1, 1)
    assert_close(m(x), torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=DT), **HAND)


# ========================================================================== helpers' math
@SETTINGS
@given(st.integers(1, 6), seeds, st.floats(0.1, 5.0))
def test_sparsemax_is_the_simplex_projection(n, seed, spread):
    z = _x((n,), seed, loc=0.0, scale=spread)
    p = sparsemax(z)
    assert (p >= 0).all()
    assert_close(p.sum(), torch.tensor(1.0, dtype=DT), **TIGHT)
    # KKT conditions of argmin ‖p − z‖² on the simplex: z_i − p_i = τ on the support, z_i ≤ τ off
    support = p > 0
    tau = (z - p)[support]
    assert_close(tau, tau[:1].expand_as(tau), **TIGHT)
    assert (z[~support] <= tau[0] + 1e-12).all()
    # translation invariance, as softmax
    assert_close(sparsemax(z + 3.7), p, **TIGHT)


@SETTINGS
@given(st.integers(2, 5), seeds)
def test_sparsemax_jacobian(n, seed):
    """On the support S: J = diag(s) − s sᵀ/|S| (Martins & Astudillo 2016, Prop. 2)."""
    z = _x((n,), seed, loc=0.0, scale=0.7)
    p = sparsemax(z)
    s = (p > 0).to(DT)
    want = torch.diag(s) - torch.outer(s, s) / s.sum()
    jac = torch.autograd.functional.jacobian(sparsemax, z)
    assert_close(jac, want, **TIGHT)


def test_sparsemax_one_hot_and_uniform():
    assert torch.equal(sparsemax(torch.tensor([0.0, 1.0, 0.0], dtype=DT)),
                       torch.tensor([0.0, 1.0, 0.0], dtype=DT))
    assert_close(sparsemax(torch.zeros(4, dtype=DT)), torch.full((4,), 0.25, dtype=DT), **TIGHT)
    # a gap just under 1 keeps the runner-up
    assert sparsemax(torch.tensor([0.0, 0.99], dtype=DT))[0] > 0


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), seeds)
def test_pooled_moments_equal_direct_moments(n, c, s, seed):
    x = _x((n, c, 1, s), seed, loc=50.0)
    mean, var = pool_moments(*instance_moments(x), (0, 3))
    assert_close(mean.flatten(), x.mean((0, 2, 3)), **TIGHT)
    assert_close(var.flatten(), x.var((0, 2, 3), correction=0), **TIGHT)
    mean, var = pool_moments(*instance_moments(x), (1, 2))
    assert_close(var.flatten(), x.reshape(n, -1).var(1, correction=0), **TIGHT)


# ========================================================================= properties
BATCH_METHODS = {
    "switchable_norm": {},
    "switchable_norm_sparse": {"sparse": True},
    "bin": {"gate_init": 0.4},
    "evonorm_b0": {},
    "bcn": {"num_groups": 2},
}
PER_SAMPLE = {
    "evonorm_s0": {"num_groups": 2},
    "frn": {},
    "switchable_norm_in_ln": {"modes": ("in", "ln")},
}


def _make(key, table, **kw):
    name = key.removesuffix("_sparse").removesuffix("_in_ln")
    return _randomize(nk.create(name, 4, dtype=DT, **table[key], **kw), 19)


@pytest.mark.parametrize("key", list(BATCH_METHODS))
@SETTINGS
@given(n=st.integers(2, 5), s=st.integers(2, 4), seed=seeds)
def test_batch_permutation_equivariance(key, n, s, seed):
    m = _make(key, BATCH_METHODS)
    x = _x((n, 4, s), seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert_close(m(x)[perm], m(x[perm]), **TIGHT)


@pytest.mark.parametrize("key", list(PER_SAMPLE))
@SETTINGS
@given(n=st.integers(2, 5), s=st.integers(2, 4), seed=seeds)
def test_samples_are_independent(key, n, s, seed):
    m = _make(key, PER_SAMPLE)
    x = _x((n, 4, s), seed)
    other = x.clone()
    other[1:] = _x((n - 1, 4, s), seed + 1)
    assert_close(m(x)[0], m(other)[0], **TIGHT)


SCALE_INVARIANT = {
    "switchable_norm": {},
    "switchable_norm_sparse": {"sparse": True},
    "bin": {"gate_init": 0.4},
    "evonorm_b0": {},
    "bcn": {"num_groups": 2},
    "frn_no_tlu": {"tlu": False},
    "switchable_norm_in_ln": {"modes": ("in", "ln")},
}


@pytest.mark.parametrize("key", list(SCALE_INVARIANT))
@SETTINGS
@given(alpha=st.floats(0.01, 100.0), seed=seeds)
def test_positive_scale_invariance(key, alpha, seed):
    """y(αx) = y(x) for α > 0 where σ² ≫ ε (ε = 1e-12): every statistic scales with x (EvoNorm-B0's
    max too, as both of its arguments are homogeneous of degree 1)."""
    name = key.removesuffix("_sparse").removesuffix("_in_ln").removesuffix("_no_tlu")
    m = _randomize(nk.create(name, 4, eps=1e-12, dtype=DT, **SCALE_INVARIANT[key]), 21)
    x = _x((3, 4, 5), seed)
    assert_close(m(alpha * x), m(x), rtol=1e-6, atol=1e-6)
