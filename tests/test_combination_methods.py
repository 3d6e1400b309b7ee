"""Combinational methods (book ch. 5, see ``tests/test_combination.py`` for the tolerances):
switchable normalization, batch-instance normalization, EvoNorm, filter response normalization
and batch-channel normalization against their formulas and equivalences; folding refused where it
must be. Helpers: ``tests/combination_util.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from combination_util import (
    DT,
    TIGHT,
    _copy_affine,
    _randomize,
    _x,
)
from normkit.nop._combination import (
    BatchChannelStandardize,
    SwitchableStandardize,
)

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
