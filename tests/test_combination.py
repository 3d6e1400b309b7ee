"""Multi-mode and combinational methods (book ch. 5): reference values, equivalences, properties.

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import normkit as nk
from normkit.functional.merging import pool_moments
from normkit.functional.simplex import sparsemax
from normkit.nop import BatchChannelStandardize, SwitchableStandardize
from normkit.nop._owned import instance_moments

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
HAND = {"rtol": 1e-6, "atol": 1e-6}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


def _x(shape, seed=0, loc=0.3, scale=1.4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale + loc


def _randomize(m, seed=0, skip=()):
    """Random parameters (weight in [0.5, 1.5), bias ~ N(0, 0.25)) except the names in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in skip:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return m


def _copy_affine(src, dst, pairs=(("weight", "weight"), ("bias", "bias"))):
    with torch.no_grad():
        for a, b in pairs:
            getattr(dst, b).copy_(getattr(src, a))


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


# =============================================================== switchable normalization
BRANCHES = {  # one-hot logits per branch and the method it must equal
    "in": (torch.tensor([2.0, 0.0, 0.0]), lambda c: nk.InstanceNorm(c, affine=True, dtype=DT)),
    "ln": (torch.tensor([0.0, 2.0, 0.0]), lambda c: nk.LayerNorm(c, over="all", dtype=DT)),
    "bn": (torch.tensor([0.0, 0.0, 2.0]), lambda c: nk.BatchNorm(c, dtype=DT)),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_sparse_switchable_norm_on_one_branch_is_that_branch(branch):
    """Sparsemax of logits whose leader is ahead by ≥ 1 is exactly one-hot: SN *is* the branch,
    in training, in evaluation (BN: after the same running updates) and in its gradients."""
    logits, make = BRANCHES[branch]
    sn = _randomize(nk.create("switchable_norm", 3, sparse=True, dtype=DT), 1)
    ref = make(3)
    with torch.no_grad():
        sn.mean_weight.copy_(logits)
        sn.var_weight.copy_(logits)
    _copy_affine(sn, ref)
    for step in range(2):
        x = _x((4, 3, 5), step).requires_grad_()
        y, y_ref = sn(x), ref(x)
        assert_close(y, y_ref, **TIGHT)
        cot = _x(y.shape, 10 + step)
        g = torch.autograd.grad(y, [x, sn.weight, sn.mean_weight], cot)
        g_ref = torch.autograd.grad(y_ref, [x, ref.weight], cot)
        assert_close(g[0], g_ref[0], **TIGHT)
        assert_close(g[1], g_ref[1], **TIGHT)
    # the BN running estimates are tracked whatever the weights
    bn = nk.BatchNorm(3, dtype=DT)
    for step in range(2):
        bn(_x((4, 3, 5), step))
    assert_close(sn.running_mean, bn.running_mean, **TIGHT)
    assert_close(sn.running_var, bn.running_var, **TIGHT)
    if branch == "bn":
        ref = bn
        _copy_affine(sn, ref)
    sn.eval()
    ref.eval()
    x = _x((2, 3, 5), 7)
    assert_close(sn(x), ref(x), **TIGHT)


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_switchable_operation_with_forced_one_hot_softmax(branch):
    """softmax reaches a one-hot only with −∞ logits: the operation then computes the branch."""
    logits, make = BRANCHES[branch]
    forced = torch.where(logits > 0, 0.0, -math.inf)
    sn = nk.create("switchable_norm", 3, dtype=DT)
    with torch.no_grad():
        sn.mean_weight.copy_(forced)
        sn.var_weight.copy_(forced)
    x = _x((4, 3, 2, 3), 3)
    assert_close(sn(x), make(3)(x), **TIGHT)


@pytest.mark.parametrize("mode", ["in", "ln", "bn"])
def test_switchable_norm_with_a_single_mode(mode):
    sn = _randomize(nk.create("switchable_norm", 4, modes=(mode,), dtype=DT), 2)
    ref = BRANCHES[mode][1](4)
    _copy_affine(sn, ref)
    assert sn.nap.batch_dependent == (mode == "bn")
    for train in (True, False):
        sn.train(train)
        ref.train(train)
        x = _x((3, 4, 5), 4 + train)
        assert_close(sn(x), ref(x), **TIGHT)


def test_switchable_norm_mixture_of_statistics():
    """Generic weights: the mixture of the three means and variances, from the formula."""
    sn = nk.create("switchable_norm", 3, affine=False, dtype=DT)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.3, -0.2, 1.1]))
        sn.var_weight.copy_(torch.tensor([-0.5, 0.4, 0.0]))
    x = _x((4, 3, 6), 5)
    wm, wv = torch.softmax(sn.mean_weight.detach(), 0), torch.softmax(sn.var_weight.detach(), 0)
    mi, vi = x.mean(2, keepdim=True), x.var(2, correction=0, keepdim=True)
    ml, vl = x.mean((1, 2), keepdim=True), x.var((1, 2), correction=0, keepdim=True)
    mb, vb = x.mean((0, 2), keepdim=True), x.var((0, 2), correction=0, keepdim=True)
    mean = wm[0] * mi + wm[1] * ml + wm[2] * mb
    var = wv[0] * vi + wv[1] * vl + wv[2] * vb
    assert_close(sn(x), (x - mean) / torch.sqrt(var + sn.eps), **TIGHT)


def test_switchable_norm_logits_learn():
    """The logits get gradients, and the sparse ones reach exact zeros."""
    sn = nk.create("switchable_norm", 3, sparse=True, dtype=DT)
    x = _x((4, 3, 5), 6)
    (sn(x) * _x((4, 3, 5), 8)).sum().backward()
    assert sn.mean_weight.grad is not None and sn.mean_weight.grad.abs().sum() > 0
    assert sn.var_weight.grad is not None and sn.var_weight.grad.abs().sum() > 0
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([1.0, 0.5, -1.0]))
    assert torch.equal(sn.nop.mixture(sn.mean_weight.detach())[2], torch.tensor(0.0, dtype=DT))


def test_switchable_operation_refuses_other_partitions():
    with pytest.raises(nk.ConfigError, match=r"needs nap=Batch\(\) or nap=Instance\(\).*Group"):
        nk.Normalization(4, nap=nk.nap.Group(num_groups=2), nop=SwitchableStandardize())
    with pytest.raises(nk.ConfigError, match=r"modes \('in', 'ln', 'bn'\) need nap=Batch\(\)"):
        nk.Normalization(4, nap=nk.nap.Instance(), nop=SwitchableStandardize())
    with pytest.raises(nk.ConfigError, match=r"modes \('in', 'ln'\) need nap=Instance\(\)"):
        nk.Normalization(4, nap=nk.nap.Batch(), nop=SwitchableStandardize(modes=("in", "ln")))


# ========================================================== batch-instance normalization
def test_bin_gate_one_is_bn_and_gate_zero_is_in():
    x1, x2 = _x((4, 3, 5), 1), _x((4, 3, 5), 2)
    for gate, ref in ((1.0, nk.BatchNorm(3, dtype=DT)),
                      (0.0, nk.InstanceNorm(3, affine=True, dtype=DT))):
        m = _randomize(nk.create("bin", 3, gate_init=gate, dtype=DT), 3, skip=("gate",))
        _copy_affine(m, ref)
        for x in (x1, x2):
            assert_close(m(x), ref(x), **TIGHT)
        m.eval()
        ref.eval()
        assert_close(m(x1), ref(x1), **TIGHT)
        bn = nk.BatchNorm(3, dtype=DT)
        bn(x1), bn(x2)
        assert_close(m.running_mean, bn.running_mean, **TIGHT)  # tracked either way
        assert_close(m.running_var, bn.running_var, **TIGHT)


def test_bin_gate_is_clamped_in_forward():
    x = _x((4, 3, 5), 4)
    out = {}
    for g in (-0.3, 0.0, 1.0, 1.7):
        m = nk.create("bin", 3, dtype=DT)
        with torch.no_grad():
            m.gate.fill_(g)
        out[g] = m(x)
    assert torch.equal(out[-0.3], out[0.0]) and torch.equal(out[1.7], out[1.0])
    m.gate.grad = None
    out_g = m(x.requires_grad_())
    (out_g * _x(out_g.shape, 5)).sum().backward()
    assert torch.equal(m.gate.grad, torch.zeros(3, dtype=DT))  # outside [0, 1]: no gradient
    m.clip_gate_()
    assert torch.equal(m.gate.detach(), torch.ones(3, dtype=DT))


def test_bin_mixes_outputs_linearly_in_the_gate():
    x = _x((4, 3, 5), 6)
    m0 = nk.create("bin", 3, gate_init=0.0, dtype=DT)
    m1 = nk.create("bin", 3, gate_init=1.0, dtype=DT)
    mr = nk.create("bin", 3, gate_init=0.3, dtype=DT)
    assert_close(mr(x), 0.3 * m1(x) + 0.7 * m0(x), **TIGHT)


# ================================================================================ EvoNorm
def test_evonorm_b0_formula_in_train_and_eval():
    m = _randomize(nk.create("evonorm_b0", 3, dtype=DT), 7)
    x = _x((4, 3, 2, 3), 7)
    v = m.v.detach().view(1, 3, 1, 1)
    w, b = m.weight.detach().view(1, 3, 1, 1), m.bias.detach().view(1, 3, 1, 1)
    si = x.var((2, 3), correction=0, keepdim=True)

    def ref(sb):
        return x / torch.maximum(torch.sqrt(sb + m.eps), v * x + torch.sqrt(si + m.eps)) * w + b

    sb = x.var((0, 2, 3), correction=0, keepdim=True)
    assert_close(m(x), ref(sb), **TIGHT)
    m.eval()
    assert_close(m(x), ref(m.running_var.view(1, 3, 1, 1)), **TIGHT)


def test_evonorm_s0_with_v_zero_is_half_the_uncentred_group_scaling():
    """v = 0: sigmoid(0) = ½, so y = ½·x/√(σ²_G + ε)."""
    m = nk.create("evonorm_s0", 4, num_groups=2, affine=False, dtype=DT)
    with torch.no_grad():
        m.v.zero_()
    x = _x((3, 4, 5), 8)
    var = x.reshape(3, 2, -1).var(2, correction=0)[:, :, None, None]
    want = 0.5 * x.reshape(3, 2, 2, 5) / torch.sqrt(var + m.eps)
    assert_close(m(x), want.reshape(x.shape), **TIGHT)


def test_evonorm_s0_large_v_gates_like_relu():
    """v → ∞: sigmoid(v·x) → 1[x > 0], so y → relu(x)/√(σ²_G + ε)."""
    m = nk.create("evonorm_s0", 4, num_groups=1, affine=False, dtype=DT)
    with torch.no_grad():
        m.v.fill_(1e4)
    x = _x((2, 4, 6), 9)
    x = torch.where(x.abs() < 0.01, 0.5, x)  # |v·x| ≥ 100: sigmoid within e^-100 of 0 or 1
    want = torch.relu(x) / torch.sqrt(x.reshape(2, -1).var(1, correction=0)[:, None, None] + m.eps)
    assert_close(m(x), want, **TIGHT)


def test_evonorm_default_groups():
    assert nk.create("evonorm_s0", 64).num_groups == 32
    assert nk.create("evonorm_s0", 48).num_groups == 16  # gcd(48, 32)
    assert nk.create("evonorm_s0", 6).num_groups == 2
    assert nk.create("evonorm_s0", 8, group_size=4).num_groups == 2


# ================================================================ filter response norm
def test_frn_without_tlu_is_instance_rms_scaling():
    """tlu=False (no learned ε) is the composition Instance() + Scale("rms") + Affine()."""
    frn = _randomize(nk.create("frn", 4, tlu=False, dtype=DT), 10)
    assert type(frn.nop) is nk.nop.Scale
    comp = nk.Normalization(4, nap=nk.nap.Instance(), nop=nk.nop.Scale("rms"), eps=1e-6, dtype=DT)
    _copy_affine(frn, comp)
    x = _x((3, 4, 2, 3), 10)
    w, b = frn.weight.detach().view(1, 4, 1, 1), frn.bias.detach().view(1, 4, 1, 1)
    nu2 = x.pow(2).mean((2, 3), keepdim=True)
    assert_close(frn(x), x / torch.sqrt(nu2 + 1e-6) * w + b, **TIGHT)
    assert_close(frn(x), comp(x), **TIGHT)


def test_frn_with_one_position_is_x_over_its_own_magnitude():
    """Spatial size 1 (or a (N, C) input): ν² = x², so x̂ = x/√(x² + ε) ≈ sign(x) — the case
    that motivates the learned ε."""
    frn = nk.create("frn", 4, tlu=False, affine=False, dtype=DT)
    x = _x((5, 4), 11)
    assert_close(frn(x), x / torch.sqrt(x * x + 1e-6), **TIGHT)
    assert_close(frn(x.unsqueeze(-1)).squeeze(-1), frn(x), **TIGHT)
    big = nk.create("frn", 4, tlu=False, affine=False, eps=1.0, dtype=DT)
    assert_close(big(x), x / torch.sqrt(x * x + 1.0), **TIGHT)


def test_frn_tlu_is_max_with_tau():
    frn = _randomize(nk.create("frn", 4, dtype=DT), 12)
    plain = nk.create("frn", 4, tlu=False, dtype=DT)
    _copy_affine(frn, plain)
    x = _x((3, 4, 5), 12)
    tau = frn.tau.detach().view(1, 4, 1)
    assert_close(frn(x), torch.maximum(plain(x), tau), **TIGHT)
    fresh = nk.create("frn", 4, dtype=DT)  # τ = 0: TLU starts as a ReLU
    assert_close(fresh(x), torch.relu(nk.create("frn", 4, tlu=False, dtype=DT)(x)), **TIGHT)


@pytest.mark.parametrize("learned", [0.03, -0.03])
def test_frn_learned_eps_adds_its_magnitude(learned):
    frn = nk.create("frn", 4, learnable_eps=True, eps=1e-3, dtype=DT)
    assert frn.learned_eps.item() == 1e-4
    with torch.no_grad():
        frn.learned_eps.fill_(learned)
    ref = nk.create("frn", 4, eps=1e-3 + abs(learned), dtype=DT)
    x = _x((3, 4, 2), 13)
    assert_close(frn(x), ref(x), **TIGHT)
    y = frn(x)
    (y * _x(y.shape, 14)).sum().backward()
    assert frn.learned_eps.grad is not None and frn.learned_eps.grad.abs().item() > 0


def test_frn_is_batch_independent_in_train_and_eval():
    frn = _randomize(nk.create("frn", 4, dtype=DT), 15)
    x = _x((3, 4, 5), 15)
    y = frn(x)
    frn.eval()
    assert torch.equal(frn(x), y)
    assert_close(frn(x[1:2]), y[1:2], **TIGHT)


# ======================================================== batch-channel normalization
def _bn_then(norm, c, *, seed=16):
    bcn_kw = {"group_size": 1} if isinstance(norm, nk.InstanceNorm) else {"num_groups": 1}
    bcn = _randomize(nk.create("bcn", c, dtype=DT, **bcn_kw), seed)
    bn = nk.BatchNorm(c, dtype=DT)
    _copy_affine(bcn, bn, (("bn_weight", "weight"), ("bn_bias", "bias")))
    _copy_affine(bcn, norm)
    return bcn, bn, norm


@pytest.mark.parametrize("second", ["in", "ln"])
def test_bcn_structure_with_one_channel_per_group_and_one_group(second):
    """group_size=1: y = IN(BN(x)); num_groups=1: y = LN(BN(x)) — with BN's affine between the
    steps and the module's after; in evaluation BN uses its running estimates."""
    c = 4
    norm = (nk.InstanceNorm(c, affine=True, dtype=DT) if second == "in"
            else nk.LayerNorm(c, over="all", dtype=DT))
    bcn, bn, norm = _bn_then(norm, c)
    for step in range(2):
        x = _x((3, c, 5), 20 + step).requires_grad_()
        y, y_ref = bcn(x), norm(bn(x))
        assert_close(y, y_ref, **TIGHT)
        cot = _x(y.shape, 30 + step)
        assert_close(torch.autograd.grad(y, x, cot)[0], torch.autograd.grad(y_ref, x, cot)[0],
                     **TIGHT)
    assert_close(bcn.running_mean, bn.running_mean, **TIGHT)
    assert_close(bcn.running_var, bn.running_var, **TIGHT)
    bcn.eval()
    bn.eval()
    x = _x((2, c, 5), 22)
    assert_close(bcn(x), norm(bn(x)), **TIGHT)


def test_bcn_is_gn_after_bn():
    bcn = _randomize(nk.create("bcn", 6, num_groups=3, dtype=DT), 17)
    bn, gn = nk.BatchNorm(6, dtype=DT), nk.GroupNorm(6, num_groups=3, dtype=DT)
    _copy_affine(bcn, bn, (("bn_weight", "weight"), ("bn_bias", "bias")))
    _copy_affine(bcn, gn)
    x = _x((4, 6, 3, 2), 17)
    assert_close(bcn(x), gn(bn(x)), **TIGHT)
    assert bcn.num_groups == 3


def test_bcn_without_bn_affine():
    plain = nk.create("bcn", 4, num_groups=2, bn_affine=False, dtype=DT)
    assert {n for n, _ in plain.named_parameters()} == {"weight", "bias"}
    full = nk.create("bcn", 4, num_groups=2, dtype=DT)  # γ_b = 1, β_b = 0 at initialization
    x = _x((3, 4, 5), 18)
    assert_close(plain(x), full(x), **TIGHT)


def test_bcn_operation_refuses_batch_independent_partitions():
    with pytest.raises(nk.ConfigError, match=r"needs nap=Batch\(\)"):
        nk.Normalization(4, nap=nk.nap.Instance(), nop=BatchChannelStandardize(num_groups=2))


def test_bcn_default_groups():
    assert nk.create("bcn", 64).num_groups == 32
    assert nk.create("bcn", 12).num_groups == 4


# ============================================================================ folding
@pytest.mark.parametrize("name", ["switchable_norm", "bin", "evonorm_b0", "bcn"])
def test_running_methods_refuse_to_fold(name):
    """These keep running statistics, yet their evaluation uses each input's own statistics (or
    is not affine in x): there is no fixed affine map to fold."""
    m = nk.create(name, 4, **({"num_groups": 2} if name == "bcn" else {}))
    m(torch.randn(3, 4, 5))
    m.eval()
    assert m.nop.foldable is False
    with pytest.raises(nk.ConfigError, match="nothing fixed to fold"):
        m.folded()


def test_frn_without_tlu_folding_is_refused_for_lack_of_running_statistics():
    with pytest.raises(nk.ConfigError, match="no running statistics to fold"):
        nk.create("frn", 4, tlu=False).folded()


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
