"""Conditional and input-adaptive normalization (book ch. 4.3): formulas, equivalences, errors.

Float64 throughout; the references are written from the papers' formulas, so agreement is to
rounding (1e-10 on O(1) values).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normkit as nk

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=DT)


def bn_train(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + eps)


def in_train(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    dims = tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + eps)


def randomize(m: torch.nn.Module, seed: int) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed), dtype=p.dtype))


def test_cbn_picks_each_samples_class_affine():
    m = nk.create("cbn", 3, num_classes=4, dtype=DT)
    randomize(m, 1)
    x, c = randn(6, 3, 5), torch.tensor([3, 0, 1, 3, 2, 2])
    y = m(x, c)
    ref = bn_train(x) * m.weight.detach()[c][:, :, None] + m.bias.detach()[c][:, :, None]
    torch.testing.assert_close(y, ref, **TOL)


def test_cbn_with_one_class_equals_bn():
    cbn, bn = nk.create("cbn", 3, num_classes=1, dtype=DT), nk.create("bn", 3, dtype=DT)
    randomize(bn, 2)
    with torch.no_grad():
        cbn.weight.copy_(bn.weight[None])
        cbn.bias.copy_(bn.bias[None])
    for train in (True, True, False):
        cbn.train(train)
        bn.train(train)
        x = randn(5, 3, 4, seed=3)
        zero = torch.zeros(5, dtype=torch.long)
        torch.testing.assert_close(cbn(x, zero), bn(x), **TOL)
        torch.testing.assert_close(cbn.running_var, bn.running_var, **TOL)


def test_cbn_embedding_is_linear_in_the_embedding():
    m = nk.create("cbn", 3, embedding_dim=2, dtype=DT)
    randomize(m, 4)
    x, e = randn(4, 3, seed=5), randn(4, 2, seed=6)
    g = m.weight.detach() + e @ m.weight_proj.detach().T
    b = m.bias.detach() + e @ m.bias_proj.detach().T
    torch.testing.assert_close(m(x, e), bn_train(x) * g + b, **TOL)


def test_cin_is_in_with_a_per_style_affine():
    m = nk.create("cin", 2, num_classes=3, dtype=DT)
    randomize(m, 7)
    x, c = randn(3, 2, 4, 4, seed=8), torch.tensor([2, 2, 0])
    ref = in_train(x) * m.weight.detach()[c][:, :, None, None] + m.bias.detach()[c][:, :, None, None]
    torch.testing.assert_close(m(x, c), ref, **TOL)


def test_adain_transfers_the_style_statistics():
    m = nk.create("adain", 3, dtype=DT, eps=1e-12, style_eps=0.0)
    content, style = randn(2, 3, 6, 6, seed=9), 2 + 3 * randn(2, 3, 4, 5, seed=10)
    y = m(content, style)
    torch.testing.assert_close(y.mean((2, 3)), style.mean((2, 3)), **TOL)
    torch.testing.assert_close(y.std((2, 3), correction=0), style.std((2, 3), correction=0),
                               rtol=1e-9, atol=1e-9)


def test_spade_is_bn_modulated_per_position_by_the_map():
    m = nk.create("spade", 2, label_channels=3, hidden=4, dtype=DT)
    randomize(m, 11)
    x, seg = randn(2, 2, 4, 4, seed=12), randn(2, 3, 2, 2, seed=13)
    net = m.spade
    s = F.interpolate(seg, size=(4, 4), mode="nearest")
    h = F.relu(F.conv2d(s, net.shared.weight, net.shared.bias, padding=1))
    gamma = F.conv2d(h, net.gamma.weight, net.gamma.bias, padding=1)
    beta = F.conv2d(h, net.beta.weight, net.beta.bias, padding=1)
    torch.testing.assert_close(m(x, seg), bn_train(x) * (1 + gamma) + beta, **TOL)


def test_input_adaptive_recoveries_start_as_the_plain_normalization():
    x = randn(4, 3, 5, seed=14)
    bn = nk.create("bn", 3, dtype=DT)
    torch.testing.assert_close(nk.create("attentive_norm", 3, dtype=DT)(x), bn(x), **TOL)
    iebn = nk.create("iebn", 3, dtype=DT)
    torch.testing.assert_close(iebn(x), 0.5 * bn_train(x), **TOL)  # gate σ(0) = 1/2 at init
    dln = nk.create("dynamic_ln", 3, dtype=DT, channel_axis=-1)
    xs = randn(2, 5, 3, seed=15)
    torch.testing.assert_close(dln(xs), F.layer_norm(xs, (3,)), **TOL)


def test_dynamic_ln_predicts_affine_from_the_sequence_mean():
    m = nk.create("dynamic_ln", 3, dtype=DT, channel_axis=-1)
    randomize(m, 16)
    x = randn(2, 5, 3, seed=17)
    s = x.mean(1)
    g = m.weight.detach() + s @ m.weight_proj.detach().T
    b = m.bias.detach() + s @ m.bias_proj.detach().T
    torch.testing.assert_close(m(x), F.layer_norm(x, (3,)) * g[:, None] + b[:, None], **TOL)


def test_attentive_norm_mixes_affines_by_attention():
    m = nk.create("attentive_norm", 3, num_affines=2, dtype=DT)
    randomize(m, 18)
    x = randn(4, 3, 5, seed=19)
    lam = torch.sigmoid(x.mean(2) @ m.attention_weight.detach().T + m.attention_bias.detach())
    g, b = lam @ m.weight.detach(), lam @ m.bias.detach()
    torch.testing.assert_close(m(x), bn_train(x) * g[:, :, None] + b[:, :, None], **TOL)


def test_missing_or_unexpected_condition_raises():
    x = randn(4, 3, 5)
    with pytest.raises(nk.ConfigError, match=r"needs a condition: call module\(x, condition\)"):
        nk.create("cbn", 3, num_classes=2)(x.float())
    with pytest.raises(nk.ConfigError, match="takes no condition"):
        nk.create("bn", 3)(x.float(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(nk.ShapeError, match=r"integer class indices of shape \(4,\)"):
        nk.create("cbn", 3, num_classes=2)(x.float(), torch.zeros(4))
    with pytest.raises(nk.ShapeError, match=r"embedding of shape \(4, 2\)"):
        nk.create("cbn", 3, embedding_dim=2)(x.float(), torch.zeros(4, 3))
    with pytest.raises(nk.ShapeError, match="style has 2 channels"):
        nk.create("adain", 3)(x.float(), torch.zeros(4, 2, 5))
    with pytest.raises(nk.ShapeError, match=r"map of shape \(4, 3, ...\)"):
        nk.create("spade", 3, label_channels=3, hidden=2)(torch.zeros(4, 3, 2, 2), torch.zeros(4, 2, 2, 2))


def test_conditional_modules_refuse_to_fold():
    m = nk.create("cbn", 3, num_classes=2)
    m(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(nk.ConfigError, match="nothing fixed to fold"):
        m.eval().folded()


def test_adalin_mixes_instance_and_layer_statistics_by_rho():
    m = nk.create("adalin", 3, dtype=DT)
    with torch.no_grad():
        m.gate.copy_(torch.tensor([0.0, 0.3, 1.0], dtype=DT))
    x = randn(2, 3, 4, 4, seed=20)
    gamma, beta = randn(2, 3, seed=21), randn(2, 3, seed=22)
    lnx = F.layer_norm(x, x.shape[1:], eps=1e-5)
    rho = m.gate.detach()[None, :, None, None]
    ref = (rho * in_train(x) + (1 - rho) * lnx) * gamma[:, :, None, None] + beta[:, :, None, None]
    torch.testing.assert_close(m(x, (gamma, beta)), ref, **TOL)
    with torch.no_grad():  # ρ is clamped to [0, 1] in the forward (the paper clips it)
        m.gate.fill_(2.0)
    torch.testing.assert_close(m(x, (gamma, beta)), in_train(x) * gamma[:, :, None, None]
                               + beta[:, :, None, None], **TOL)
    with pytest.raises(nk.ShapeError, match=r"\(gamma, beta\), two tensors"):
        m(x, (gamma,))
    with pytest.raises(nk.ShapeError, match=r"each of shape \(2, 3\), got \(2, 2\)"):
        m(x, (gamma[:, :2], beta))


def test_ilm_corrects_the_gn_affine_from_the_pooled_input():
    m = nk.create("ilm", 4, num_groups=2, reduction=2, dtype=DT)
    randomize(m, 23)
    x = randn(3, 4, 5, seed=24)
    p = x.mean(2)
    h = torch.relu(p @ m.encoder_weight.detach().T + m.encoder_bias.detach())
    g = m.weight.detach() + torch.tanh(h @ m.gamma_weight.detach().T)
    b = m.bias.detach() + torch.tanh(h @ m.beta_weight.detach().T)
    gn = F.group_norm(x, 2, eps=1e-5)
    torch.testing.assert_close(m(x), gn * g[:, :, None] + b[:, :, None], **TOL)
