"""Domain-shift adaptation: AdaBN, domain-specific norms, TransNorm, prediction-time BN, TENT."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normkit as nk
from normkit.apply.adapt import (
    DomainSpecificNorm,
    Tent,
    TransNorm,
    adabn,
    domain_specific,
    prediction_time_bn,
    softmax_entropy,
    tent_adapt,
    tent_parameters,
    use_domain,
)
from normkit.errors import ConfigError, ShapeError

BNS = {"torch": nn.BatchNorm1d, "normkit": nk.BatchNorm}


def net(bn=nn.BatchNorm1d, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), bn(6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


# ----------------------------------------------------------------------------------------- AdaBN
@pytest.mark.parametrize("kind", BNS)
def test_adabn_sets_the_target_statistics_exactly(kind):
    model = net(BNS[kind]).eval()
    torch.manual_seed(1)
    target = [torch.randn(n, 5, dtype=torch.float64) * 3 + 2 for n in (7, 9, 4)]
    assert adabn(model, target) is model
    h = model[0](torch.cat(target)).detach()
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-10)
    assert torch.allclose(model[1].running_var, h.var(0, unbiased=True), atol=1e-10)
    assert not model.training and not model[1].training
    x = target[0]  # evaluation now normalizes with the target statistics
    expected = F.batch_norm(h[:7], h.mean(0), h.var(0), model[1].weight, model[1].bias,
                            eps=model[1].eps)
    assert torch.allclose(model[:2](x), expected, atol=1e-10)


def test_adabn_num_batches_and_errors():
    model = net().eval()
    batches = [torch.randn(8, 5, dtype=torch.float64) + i for i in range(3)]
    adabn(model, batches, num_batches=1)
    assert torch.allclose(model[1].running_mean, model[0](batches[0]).mean(0).detach(),
                          atol=1e-10)
    plain = nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(2, 6))
    with pytest.raises(ConfigError, match=r"adabn: Sequential has no batch-statistics layer"):
        adabn(plain, batches)
    with pytest.raises(ConfigError, match="recalibrate got no batches"):
        adabn(model, [])


# -------------------------------------------------------------------------- domain-specific norm
def test_dsbn_keeps_separate_statistics_and_shares_the_other_weights():
    model = domain_specific(net(), 2)
    dsbn = model[1]
    assert isinstance(dsbn, DomainSpecificNorm) and dsbn.num_domains == 2
    for m in dsbn.domains:
        m.momentum = None  # cumulative average: running mean = mean of what the domain saw
    torch.manual_seed(2)
    xs = [torch.randn(16, 5, dtype=torch.float64) + 4, torch.randn(16, 5, dtype=torch.float64) - 4]
    for k, x in enumerate(xs):
        with use_domain(model, k):
            model(x).sum().backward()
    for k, x in enumerate(xs):
        h = model[0](x).detach()
        assert torch.allclose(dsbn.domains[k].running_mean, h.mean(0), atol=1e-10)
        assert torch.allclose(dsbn.domains[k].running_var, h.var(0), atol=1e-10)
        assert int(dsbn.domains[k].num_batches_tracked) == 1
    assert not torch.allclose(dsbn.domains[0].running_mean, dsbn.domains[1].running_mean)
    # one Linear serves both domains; each domain has its own γ, β
    assert sum(1 for m in model.modules() if isinstance(m, nn.Linear)) == 2
    assert dsbn.domains[0].weight is not dsbn.domains[1].weight
    model.zero_grad()
    with use_domain(model, 1):
        model(xs[1]).sum().backward()
    assert dsbn.domains[0].weight.grad is None and dsbn.domains[1].weight.grad is not None
    assert model[0].weight.grad is not None


def test_dsbn_domain_argument_equals_the_context_and_per_domain_layer():
    dsbn = DomainSpecificNorm(4, 3, norm="gn:num_groups=2", eps=1e-3)
    assert all(type(m).__name__ == "GroupNorm" and m.eps == 1e-3 for m in dsbn.domains)
    with torch.no_grad():
        dsbn.domains[2].weight.uniform_(0.5, 2)
    x = torch.randn(3, 4, 5)
    with use_domain(dsbn, 2):
        y = dsbn(x)
    assert torch.equal(y, dsbn(x, domain=2)) and torch.equal(y, dsbn.domains[2](x))
    assert not torch.equal(y, dsbn(x, domain=0))
    factory = DomainSpecificNorm(4, 2, norm=nn.BatchNorm1d, momentum=0.5)
    assert all(isinstance(m, nn.BatchNorm1d) and m.momentum == 0.5 for m in factory.domains)


def test_dsbn_state_dict_round_trip():
    model = domain_specific(net(), 2)
    for k in (0, 1):
        with use_domain(model, k):
            model(torch.randn(8, 5, dtype=torch.float64) * (k + 1))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"1.domains.0.running_mean", "1.domains.1.weight", "0.weight"} <= set(state)
    fresh = domain_specific(net(seed=5), 2)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(4, 5, dtype=torch.float64)
    model.eval(), fresh.eval()
    for k in (0, 1):
        with use_domain(model, k), use_domain(fresh, k):
            assert torch.equal(model(x), fresh(x))


def test_adabn_under_a_domain_leaves_the_other_domains_statistics():
    model = domain_specific(net(), 2).eval()
    before = model[1].domains[0].running_mean.clone()
    target = [torch.randn(8, 5, dtype=torch.float64) + 3]
    with use_domain(model, 1):
        adabn(model, target)
    assert torch.equal(model[1].domains[0].running_mean, before)
    assert torch.allclose(model[1].domains[1].running_mean,
                          model[0](target[0]).mean(0).detach(), atol=1e-10)


def test_gradcheck_domain_specific_norm():
    dsbn = DomainSpecificNorm(3, 2, dtype=torch.float64)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsbn(t, domain=1), (x,))


def test_domain_errors():
    dsbn = DomainSpecificNorm(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match=r"domain must be an int in \[0, 1\] \(2 domains\), "
                                          r"got 2"):
        dsbn(x, domain=2)
    with pytest.raises(ConfigError, match=r"no domain given; call it with domain=k"):
        dsbn(x)
    with pytest.raises(ConfigError, match=r"domain must be an int in \[0, 1\].*got -1"):
        with use_domain(dsbn, -1):
            pass
    with pytest.raises(ConfigError, match=r"use_domain: Linear has no DomainSpecificNorm"):
        with use_domain(nn.Linear(2, 2), 0):
            pass
    with pytest.raises(ConfigError, match=r"num_domains must be an int ≥ 1, got 0"):
        DomainSpecificNorm(3, 0)
    with pytest.raises(ConfigError, match=r"domain_specific: Linear has no statistics module"):
        domain_specific(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ TransNorm
def _transnorm_reference(tn, xs, xt):
    """Direct computation of the joint-batch training output from the paper's formula."""
    def stats(x):
        dims = [d for d in range(x.dim()) if d != 1]
        return x.mean(dims), x.var(dims, unbiased=False)

    (ms, vs), (mt, vt) = stats(xs), stats(xt)
    d = (ms / torch.sqrt(vs + tn.eps) - mt / torch.sqrt(vt + tn.eps)).abs()
    c = ms.numel()
    alpha = c * (1 / (1 + d)) / (1 / (1 + d)).sum()
    shape = (1, -1) + (1,) * (xs.dim() - 2)

    def out(x, m, v):
        xhat = (x - m.view(shape)) / torch.sqrt(v.view(shape) + tn.eps)
        return (1 + alpha.view(shape)) * (tn.weight.view(shape) * xhat + tn.bias.view(shape))

    return torch.cat([out(xs, ms, vs), out(xt, mt, vt)]), alpha


def test_transnorm_matches_the_formula():
    torch.manual_seed(3)
    tn = TransNorm(4, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        tn.weight.uniform_(0.5, 2), tn.bias.uniform_(-1, 1)
    xs = torch.randn(6, 4, 3, dtype=torch.float64) * 2 + 1
    xt = torch.randn(6, 4, 3, dtype=torch.float64) - torch.arange(4.0).view(1, 4, 1)
    expected, alpha = _transnorm_reference(tn, xs, xt)
    assert torch.allclose(tn(torch.cat([xs, xt])), expected, atol=1e-10)
    assert alpha.mean().item() == pytest.approx(1.0, abs=1e-12)
    # evaluation, one domain: the running statistics of both domains enter α
    tn.eval()
    rs = tn.domains[0].running_mean, tn.domains[0].running_var
    rt = tn.domains[1].running_mean, tn.domains[1].running_var
    d = (rs[0] / torch.sqrt(rs[1] + 1e-3) - rt[0] / torch.sqrt(rt[1] + 1e-3)).abs()
    a = 4 * (1 / (1 + d)) / (1 / (1 + d)).sum()
    assert torch.allclose(tn.attention(*rs, *rt), a, atol=1e-12)
    xhat = F.batch_norm(xt, *rt, tn.weight, tn.bias, eps=1e-3)
    assert torch.allclose(tn(xt, domain=1), (1 + a.view(1, 4, 1)) * xhat, atol=1e-10)


def test_transnorm_gradcheck_joint_and_one_domain():
    torch.manual_seed(4)
    tn = TransNorm(3, dtype=torch.float64)
    x = torch.randn(8, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tn(t), (x,))
    assert torch.autograd.gradcheck(lambda t: tn(t, domain=1), (x,))
    params = (tn.weight, tn.bias)
    assert torch.autograd.gradcheck(lambda w, b: tn(x.detach()) * w.sum() + b.sum(), params)


def test_transnorm_errors():
    tn = TransNorm(3)
    with pytest.raises(ShapeError, match=r"joint batch \[source; target\] of even size, got 5"):
        tn(torch.randn(5, 3))
    with pytest.raises(ShapeError, match=r"TransNorm\(3\) needs \(N, 3, \*\) inputs, got shape "
                                         r"\(4, 2\)"):
        tn(torch.randn(4, 2))
    with pytest.raises(ConfigError, match=r"domain must be an int in \[0, 1\].*got 3"):
        tn(torch.randn(4, 3), domain=3)


# --------------------------------------------------------------------------- prediction-time BN
@pytest.mark.parametrize("kind", BNS)
def test_prediction_time_bn_uses_batch_statistics_and_leaves_running_ones(kind):
    model = net(BNS[kind]).eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(10, 5, dtype=torch.float64) * 3 + 1
    y = prediction_time_bn(model, x, batch_size=5)
    h = model[0](x).detach()
    bn = model[1]
    expected = torch.cat([model[2:](F.batch_norm(c, None, None, bn.weight, bn.bias, training=True,
                                                 eps=bn.eps)) for c in h.split(5)])
    assert torch.allclose(y, expected, atol=1e-10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training and not bn.training
    with pytest.raises(ConfigError, match="batch_size must be a positive int or None, got 0"):
        prediction_time_bn(model, x, batch_size=0)
    with pytest.raises(ConfigError, match="prediction_time_bn: Linear has no batch-statistics"):
        prediction_time_bn(nn.Linear(5, 2), x)


# ------------------------------------------------------------------------------------------ TENT
@pytest.mark.parametrize("kind", BNS)
def test_tent_changes_only_gamma_beta_and_lowers_entropy(kind):
    torch.manual_seed(6)
    model = net(BNS[kind], dtype=torch.float32).eval()
    with torch.no_grad():  # a trained-looking classifier: large logits
        model[3].weight.mul_(4)
    state = copy.deepcopy(model.state_dict())
    gamma_beta = {id(model[1].weight), id(model[1].bias)}
    assert {id(p) for p in tent_parameters(model)} == gamma_beta
    x = torch.randn(64, 5) * 2 + 1.5  # a shifted batch
    with nk.apply.batch_statistics(model), torch.no_grad():
        before = softmax_entropy(model(x)).mean()
    tent = Tent(model, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.5), steps=5)
    out = tent(x)
    assert out.shape == (64, 3) and not out.requires_grad
    with nk.apply.batch_statistics(model), torch.no_grad():
        after = softmax_entropy(model(x)).mean()
    assert after < before - 1e-3
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"1.weight", "1.bias"}  # running statistics untouched too
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    tent.reset()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_tent_episodic_and_online():
    model = net(dtype=torch.float32).eval()
    x = torch.randn(16, 5)
    episodic = Tent(model, episodic=True, optimizer_factory=lambda p: torch.optim.SGD(p, lr=1.0))
    assert torch.equal(episodic(x), episodic(x))
    online = tent_adapt(copy.deepcopy(model), [x, x], lr=1.0)
    assert online.shape == (32, 3) and not torch.equal(online[:16], online[16:])


def test_tent_on_a_transnorm_and_a_gn_model():
    model = nn.Sequential(nn.Linear(5, 4), TransNorm(4), nn.Linear(4, 3))
    params = tent_parameters(model)
    assert [p.shape for p in params] == [torch.Size([4]), torch.Size([4])]
    gn = nn.Sequential(nn.Linear(5, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3))
    assert tent_adapt(gn, [torch.randn(6, 5)], lr=0.1).shape == (6, 3)


def test_tent_errors():
    with pytest.raises(ConfigError, match=r"Tent: Sequential has no normalization layer with "
                                          r"γ, β"):
        Tent(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"steps must be an int ≥ 1, got 0"):
        Tent(net(), steps=0)
    with pytest.raises(ConfigError, match=r"lr must be > 0, got -1"):
        tent_adapt(net(), [torch.randn(4, 5)], lr=-1)
    with pytest.raises(ConfigError, match="tent_adapt got no batches"):
        tent_adapt(net(), [], lr=0.1)
