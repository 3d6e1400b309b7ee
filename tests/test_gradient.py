"""Tests of normkit.gradient: gradient transforms, their optimizer hooks, LARS and LAMB (kind O).

Tolerances: float64 computations that follow the same formula in a different operation order
agree to a few ulps, so 1e-12 relative is generous; runs that execute the identical sequence of
operations (hook vs. hand-applied transform, save/load vs. uninterrupted) must be bit-identical.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit.gradient as G
from normkit.errors import ConfigError

F64 = torch.float64


def _net(seed: int = 0, dtype: torch.dtype = F64) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.LayerNorm(3)
    ).to(dtype)
    with torch.no_grad():  # no zero-initialized parameter (its trust ratio would be pinned to 1)
        net[3].weight.normal_(1.0, 0.1)
        net[3].bias.normal_(0.0, 0.1)
    return net


def _data(seed: int = 1, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 4, 4, generator=g, dtype=dtype)
    return x, torch.randn(6, 3, generator=g, dtype=dtype)


def _backward(net: torch.nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    x, y = _data(seed, next(net.parameters()).dtype)
    (scale * (net(x) - y).square().mean()).backward()


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, scale: float = 1.0,
           start: int = 0) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        _backward(net, scale, seed=i)
        opt.step()


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("shape", [(8, 5), (6, 3, 3, 3), (4, 2, 3), (1, 7)])
def test_centralize_zero_mean_over_fan_in(shape: tuple[int, ...]) -> None:
    g = 5 + torch.randn(shape, dtype=F64)
    c = G.centralize(g)
    assert c.shape == g.shape and c.dtype == g.dtype
    mean = c.mean(dim=tuple(range(1, g.dim())))
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-14, rtol=0)
    # centralization is a projection: the removed part is exactly the per-unit mean
    unit_mean = g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
    torch.testing.assert_close(g - c, unit_mean.expand_as(g))


@pytest.mark.parametrize("shape", [(5,), ()])
def test_centralize_leaves_1d_and_scalars_unchanged(shape: tuple[int, ...]) -> None:
    b = torch.randn(shape)
    assert G.centralize(b) is b


@pytest.mark.parametrize("fn", [G.centralize, G.block_normalize,
                                lambda g: G.adaptive_clip(g, torch.ones_like(g))])
def test_low_precision_keeps_dtype(fn) -> None:
    g = (100 * torch.randn(6, 5)).to(torch.bfloat16)
    out = fn(g)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = fn(g.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("shape", [(3,), (4, 5), (2, 3, 3, 3)])
def test_block_normalize_unit_norm(shape: tuple[int, ...], scale: float) -> None:
    g = scale * torch.randn(shape, dtype=F64)
    out = G.block_normalize(g)
    assert out.dtype == F64
    assert torch.linalg.vector_norm(out).item() == pytest.approx(1.0, abs=1e-14)
    torch.testing.assert_close(out * torch.linalg.vector_norm(g), g)  # direction kept


def test_block_normalize_zero_stays_zero() -> None:
    out = G.block_normalize(torch.zeros(3, 4))
    assert torch.equal(out, torch.zeros(3, 4))


def test_unitwise_norm_shapes() -> None:
    assert G.unitwise_norm(torch.ones(4, 3, 2, 2)).shape == (4, 1, 1, 1)
    assert G.unitwise_norm(torch.ones(4, 9)).flatten().tolist() == [3.0] * 4
    assert G.unitwise_norm(torch.full((4,), 2.0)).tolist() == [4.0]  # 1-D: whole-tensor norm
    assert G.unitwise_norm(torch.tensor(-3.0)).item() == 3.0


def test_adaptive_clip_bound_and_untouched_units() -> None:
    torch.manual_seed(0)
    lam, eps = 0.05, 1e-3
    w = torch.randn(16, 8, dtype=F64)
    w[0] = 0.0  # zero weight: threshold lam * eps
    g = torch.randn(16, 8, dtype=F64) * torch.logspace(-4, 1, 16, dtype=F64)[:, None]
    out = G.adaptive_clip(g, w, clipping=lam, eps=eps)
    bound = lam * G.unitwise_norm(w).clamp_min(eps).flatten()
    g_norm, out_norm = G.unitwise_norm(g).flatten(), G.unitwise_norm(out).flatten()
    clipped = g_norm > bound
    assert clipped.any() and (~clipped).any()
    assert (out_norm <= bound * (1 + 1e-12)).all()
    torch.testing.assert_close(out_norm[clipped], bound[clipped], rtol=1e-12, atol=0)
    assert torch.equal(out[~clipped], g[~clipped])  # under the threshold: bit-identical
    torch.testing.assert_close(out[clipped] / out_norm[clipped, None],
                               g[clipped] / g_norm[clipped, None])  # direction kept


def test_adaptive_clip_zero_gradient_and_zero_weight_finite() -> None:
    z = torch.zeros(3, 4)
    assert torch.equal(G.adaptive_clip(z, z), z)
    g = torch.ones(3, 4)
    out = G.adaptive_clip(g, z, clipping=0.01, eps=1e-3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(G.unitwise_norm(out).flatten(), torch.full((3,), 1e-5))
    bias = torch.tensor([3.0, 4.0])  # 1-D: one unit, the whole tensor
    out = G.adaptive_clip(bias, torch.tensor([0.0, 10.0]), clipping=0.1)
    torch.testing.assert_close(out, torch.tensor([0.6, 0.8]))


# ---------------------------------------------------------------- hooks on any optimizer


def test_centralize_hook_equals_manual_on_sgd() -> None:
    a, b = _net(), _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    handle = G.centralize_gradients(opt_a)
    for i in range(3):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _backward(net, seed=i)
        raw_bias = a[0].bias.grad.clone()
        with torch.no_grad():
            for p in b.parameters():
                p.grad = G.centralize(p.grad)
        opt_a.step()
        opt_b.step()
        assert torch.equal(a[0].bias.grad, raw_bias)  # 1-D untouched
        w = a[2].weight.grad
        torch.testing.assert_close(w.mean(dim=1), torch.zeros(3, dtype=F64), atol=1e-15, rtol=0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    handle.remove()


@pytest.mark.parametrize("install", [G.centralize_gradients, G.normalize_gradients,
                                     G.clip_gradients_adaptive])
def test_hook_removal_restores_plain_behaviour(install) -> None:
    a, b = _net(), _net()
    opt_a = torch.optim.Adam(a.parameters(), lr=0.01)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.01)
    install(opt_a).remove()
    _train(a, opt_a, 2, scale=1e3)
    _train(b, opt_b, 2, scale=1e3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_centralize_hook_min_ndim_and_exclude() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    G.centralize_gradients(opt, min_ndim=3, exclude=[net[0].weight])
    _backward(net)
    raw = [p.grad.clone() for p in net.parameters()]
    opt.step()
    for p, r in zip(net.parameters(), raw, strict=True):
        assert torch.equal(p.grad, r)  # conv weight excluded, linear weight has ndim 2 < 3


def test_normalize_hook_unit_norm_per_parameter() -> None:
    net = _net()
    net[3].bias.requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    G.normalize_gradients(opt, exclude=lambda p: p is net[0].bias)
    _backward(net, scale=1e4)
    raw = net[0].bias.grad.clone()
    opt.step()
    assert torch.equal(net[0].bias.grad, raw)
    assert net[3].bias.grad is None
    for p in net.parameters():
        if p.grad is not None and p is not net[0].bias:
            assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, abs=1e-14)


def test_agc_hook_clips_all_but_excluded_layer() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    G.clip_gradients_adaptive(opt, clipping=1e-3, exclude=net[3].parameters())
    _backward(net, scale=1e6)
    before = {p: (p.detach().clone(), p.grad.clone()) for p in net.parameters()}
    opt.step()
    for p, (w, g) in before.items():
        if p is net[3].weight or p is net[3].bias:
            assert torch.equal(p.grad, g)
        else:
            assert torch.equal(p.grad, G.adaptive_clip(g, w, clipping=1e-3))


def test_hook_refuses_closure() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    G.centralize_gradients(opt)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        _backward(net)
        return torch.tensor(0.0)

    with pytest.raises(ConfigError, match="closure"):
        opt.step(closure)


# ---------------------------------------------------------------- LARS / LAMB: reference


def test_lars_reference_two_steps() -> None:
    torch.manual_seed(0)
    w0, g1, g2 = (torch.randn(4, 3, dtype=F64) for _ in range(3))
    lr, m, beta, eta, eps = 0.5, 0.9, 0.01, 0.02, 1e-8
    p = torch.nn.Parameter(w0.clone())
    opt = G.LARS([p], lr=lr, momentum=m, weight_decay=beta, trust_coefficient=eta, eps=eps)
    w, buf = w0.clone(), None
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        local = eta * w.norm() / (g.norm() + beta * w.norm() + eps)
        d = local * (g + beta * w)
        buf = d if buf is None else m * buf + d
        w = w - lr * buf
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_lamb_reference_two_steps() -> None:
    torch.manual_seed(0)
    w0, g1, g2 = (torch.randn(4, 3, dtype=F64) for _ in range(3))
    lr, (b1, b2), eps, lam = 0.01, (0.8, 0.95), 1e-6, 0.1
    p = torch.nn.Parameter(w0.clone())
    opt = G.LAMB([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate((g1, g2), start=1):
        p.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + lam * w
        w = w - lr * (w.norm() / r.norm()) * r
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    assert opt.state[p]["step"] == 2


def test_lamb_weight_norm_bounds_clamp_phi() -> None:
    p = torch.nn.Parameter(100 * torch.ones(4, 4, dtype=F64))  # ‖w‖ = 400
    opt = G.LAMB([p], lr=0.1, weight_norm_bounds=(0.0, 10.0))
    p.grad = torch.randn(4, 4, dtype=F64)
    before = p.detach().clone()
    opt.step()
    assert (p.detach() - before).norm().item() == pytest.approx(0.1 * 10.0, rel=1e-12)


# ---------------------------------------------------------------- LARS / LAMB: properties


def _lars(params, **kw):
    return G.LARS(params, lr=0.5, momentum=0.9, trust_coefficient=0.01, eps=0.0, **kw)


def _lamb(params, **kw):
    kw.setdefault("weight_decay", 0.1)
    return G.LAMB(params, lr=0.01, eps=1e-30, **kw)


@settings(deadline=None, derandomize=True, max_examples=12)
@given(make=st.sampled_from([_lars, _lamb]), scale=st.floats(1e-3, 1e3))
def test_update_invariant_to_gradient_scale(make, scale: float) -> None:
    # every parameter adapted (exclude_1d=False): excluded ones take plain, scale-dependent
    # SGD steps, which would change the later gradients of the adapted ones too
    a, b = _net(), _net()
    _train(a, make(a.parameters(), exclude_1d=False), 3)
    _train(b, make(b.parameters(), exclude_1d=False), 3, scale=scale)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [_lars, _lamb])
@pytest.mark.parametrize("zero", ["weight", "grad", "both"])
def test_trust_ratio_one_with_zero_norm(make, zero: str) -> None:
    w = torch.zeros(3, 4, dtype=F64) if zero in ("weight", "both") else torch.randn(3, 4, dtype=F64)
    g = torch.zeros(3, 4, dtype=F64) if zero in ("grad", "both") else torch.randn(3, 4, dtype=F64)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    # adapt=False: trust ratio fixed at 1. No weight decay: for LAMB a zero gradient with decay
    # leaves r = λw ≠ 0 and a well-defined ratio (next test)
    opt, plain = make([p], weight_decay=0.0), make([q], adapt=False, weight_decay=0.0)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    plain.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_zero_gradient_with_decay() -> None:
    """LARS: ‖g‖ = 0 pins the ratio to 1 (step γβw). LAMB divides by ‖r‖ = ‖λw‖ > 0 instead, a
    well-defined ratio: the step has length γ‖w‖."""
    w = torch.randn(3, 4, dtype=F64)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    lars = G.LARS([p], lr=0.1, momentum=0.0, weight_decay=0.01)
    lamb = G.LAMB([q], lr=0.01, weight_decay=0.1)
    p.grad, q.grad = torch.zeros_like(w), torch.zeros_like(w)
    lars.step()
    lamb.step()
    torch.testing.assert_close(p.detach(), w - 0.1 * 0.01 * w, rtol=1e-12, atol=0)
    torch.testing.assert_close(q.detach(), w - 0.01 * w, rtol=1e-12, atol=0)


def test_lars_excluded_params_follow_torch_sgd() -> None:
    a, b = _net(), _net()
    groups = [{"params": [a[0].weight, a[2].weight]},
              # adapt=False keeps weight_decay=0.01 only where exclude_1d is off
              {"params": [a[0].bias, a[2].bias], "adapt": False, "exclude_1d": False},
              {"params": list(a[3].parameters())}]  # default 1-D exclusion: no decay either
    opt_a = G.LARS(groups, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_b = torch.optim.SGD([{"params": [b[0].bias, b[2].bias], "weight_decay": 0.01},
                             {"params": list(b[3].parameters())}], lr=0.1, momentum=0.9,
                            foreach=False)
    for i in range(3):
        _train(a, opt_a, 1, start=i)
        _train(b, opt_b, 1, start=i)
        for name in ("0.bias", "2.bias", "3.weight", "3.bias"):
            assert torch.equal(a.get_parameter(name), b.get_parameter(name)), name
        # keep the remaining parameters equal so the next gradients agree
        with torch.no_grad():
            for name in ("0.weight", "2.weight"):
                b.get_parameter(name).copy_(a.get_parameter(name))


def test_lamb_excluded_params_follow_adam_and_adamw() -> None:
    a, b, c = _net(), _net(), _net()
    opt_a = G.LAMB([{"params": [a[0].weight, a[2].weight]},
                    {"params": [a[0].bias, a[2].bias], "adapt": False, "exclude_1d": False},
                    {"params": list(a[3].parameters())}], lr=0.01, eps=1e-8, weight_decay=0.1)
    opt_b = torch.optim.AdamW([b[0].bias, b[2].bias], lr=0.01, eps=1e-8, weight_decay=0.1,
                              foreach=False)
    opt_c = torch.optim.Adam(c[3].parameters(), lr=0.01, eps=1e-8, foreach=False)
    for i in range(3):
        for net, opt in ((a, opt_a), (b, opt_b), (c, opt_c)):
            _train(net, opt, 1, start=i)
        for name, ref in (("0.bias", b), ("2.bias", b), ("3.weight", c), ("3.bias", c)):
            torch.testing.assert_close(a.get_parameter(name), ref.get_parameter(name),
                                       rtol=1e-12, atol=1e-14)
        with torch.no_grad():
            for net in (b, c):
                for p, q in zip(net.parameters(), a.parameters(), strict=True):
                    p.copy_(q)


@pytest.mark.parametrize("cls", [G.LARS, G.LAMB])
def test_exclude_bias_and_norm_equals_default(cls) -> None:
    a, b = _net(), _net()
    groups = G.exclude_bias_and_norm(b)
    assert [len(g["params"]) for g in groups] == [2, 4]
    _train(a, cls(a.parameters(), lr=0.1, weight_decay=0.01), 2)
    _train(b, cls(groups, lr=0.1, weight_decay=0.01), 2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("cls", [G.LARS, G.LAMB])
def test_low_precision_params(cls) -> None:
    net = _net(dtype=torch.bfloat16)
    opt = cls(net.parameters(), lr=0.01)
    _train(net, opt, 2)
    for p in net.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    for state in opt.state.values():
        for v in state.values():
            assert not isinstance(v, torch.Tensor) or v.dtype == torch.bfloat16


# ---------------------------------------------------------------- serialization


@pytest.mark.parametrize("make", [
    lambda ps: G.LARS(ps, lr=0.1, weight_decay=1e-3),
    lambda ps: G.LAMB(ps, lr=0.01, weight_decay=0.01, weight_norm_bounds=(0.0, 5.0)),
])
def test_state_dict_round_trip_continues_identically(make) -> None:
    ref = _net()
    opt_ref = make(ref.parameters())
    _train(ref, opt_ref, 5)

    net = _net()
    opt = make(net.parameters())
    _train(net, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = _net(seed=123)
    fresh.load_state_dict(ckpt["model"])
    opt_fresh = make(fresh.parameters())
    opt_fresh.load_state_dict(ckpt["opt"])
    assert opt_fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    _train(fresh, opt_fresh, 2, start=3)
    for pa, pb in zip(ref.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("cls", [G.LARS, G.LAMB])
def test_state_dict_before_the_timm_options_loads(cls) -> None:
    """A state_dict saved before ``always_adapt``/``trust_clip``/... existed gets the defaults."""
    net = _net()
    opt = cls(net.parameters(), lr=0.1)
    sd = opt.state_dict()
    new = set(cls._NEW_OPTIONS) - {"adapt", "exclude_1d", "weight_norm_bounds"}
    for k in new:
        del sd["param_groups"][0][k]
    opt.load_state_dict(sd)
    assert {k: opt.param_groups[0][k] for k in new} == {k: cls._NEW_OPTIONS[k] for k in new}
    _train(net, opt, 1)


@pytest.mark.parametrize("cls", [G.LARS, G.LAMB])
def test_deepcopy_optimizer(cls) -> None:
    net = _net()
    opt = cls(net.parameters(), lr=0.1)
    _train(net, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["exclude_1d"] is True and "adapt" in sd["param_groups"][0]
    assert cls.__name__ in repr(opt)


# ---------------------------------------------------------------- bad input

BAD = [
    (lambda ps: G.LARS(ps, lr=-0.1), r"lr .*-0\.1"),
    (lambda ps: G.LARS(ps, lr=0.1, eps=-1e-8), r"eps .*-1e-08"),
    (lambda ps: G.LARS(ps, lr=0.1, trust_coefficient=-0.5), r"trust_coefficient .*-0\.5"),
    (lambda ps: G.LARS(ps, lr=0.1, trust_coefficient=0.0), r"trust_coefficient .*0\.0"),
    (lambda ps: G.LARS(ps, lr=0.1, momentum=1.0), r"momentum .*1\.0"),
    (lambda ps: G.LARS(ps, lr=0.1, weight_decay=math.nan), r"weight_decay .*nan"),
    (lambda ps: G.LARS([{"params": ps, "lr": -2.0}], lr=0.1), r"lr .*-2\.0"),
    (lambda ps: G.LARS(ps, lr=0.1, adapt="yes"), r"adapt .*'yes'"),
    (lambda ps: G.LAMB(ps, lr=-1e-3), r"lr .*-0\.001"),
    (lambda ps: G.LAMB(ps, betas=(1.0, 0.999)), r"betas\[0\] .*1\.0"),
    (lambda ps: G.LAMB(ps, betas=(0.9, -0.1)), r"betas\[1\] .*-0\.1"),
    (lambda ps: G.LAMB(ps, betas=(0.9,)), r"betas .*\(0\.9,\)"),
    (lambda ps: G.LAMB(ps, eps=0.0), r"eps .*0\.0.*zero second moment"),
    (lambda ps: G.LAMB(ps, eps=-1.0), r"eps .*-1\.0"),
    (lambda ps: G.LAMB(ps, weight_norm_bounds=(2.0, 1.0)), r"weight_norm_bounds .*\(2\.0, 1\.0\)"),
    (lambda ps: G.LARS(ps, lr=0.1, momentum=0.0, nesterov=True), r"nesterov.*momentum=0\.0"),
    (lambda ps: G.LARS(ps, lr=0.1, dampening=0.5, nesterov=True), r"dampening=0\.5"),
    (lambda ps: G.LARS(ps, lr=0.1, dampening=1.5), r"dampening .*\[0, 1\], got 1\.5"),
    (lambda ps: G.LARS(ps, lr=0.1, trust_clip=1), r"trust_clip .*got 1"),
    (lambda ps: G.LAMB(ps, max_grad_norm=0.0), r"max_grad_norm .*0\.0.*None"),
    (lambda ps: G.LAMB([{"params": ps, "max_grad_norm": 2.0}], max_grad_norm=1.0),
     r"one value for the optimizer \(1\.0\); a param group got 2\.0"),
    (lambda ps: G.LAMB(ps, decoupled_decay="yes"), r"decoupled_decay .*'yes'"),
    (lambda ps: G.adaptive_clip(torch.ones(2), torch.ones(2), clipping=0.0), r"clipping .*0\.0"),
    (lambda ps: G.adaptive_clip(torch.ones(2), torch.ones(2), eps=-1.0), r"eps .*-1\.0"),
    (lambda ps: G.clip_gradients_adaptive(torch.optim.SGD(ps, lr=1), clipping=-0.01),
     r"clipping .*-0\.01"),
    (lambda ps: G.block_normalize(torch.ones(2), eps=0.0), r"eps .*0\.0"),
    (lambda ps: G.normalize_gradients(torch.optim.SGD(ps, lr=1), eps=-1.0), r"eps .*-1\.0"),
    (lambda ps: G.centralize_gradients(torch.optim.SGD(ps, lr=1), min_ndim=1), r"min_ndim .*1"),
    (lambda ps: G.centralize_gradients(object()), r"Optimizer, got object"),
    (lambda ps: G.normalize_gradients(torch.optim.SGD(ps, lr=1), exclude=[1, 2]), r"element of type int"),
]


@pytest.mark.parametrize(("build", "match"), BAD)
def test_bad_config_raises(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build([torch.nn.Parameter(torch.ones(2, 2))])
