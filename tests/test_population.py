"""Population-whitened layers (NNN, GWNN): function-preserving refresh, whitened statistics,
gradients, serialization, compile, optimizer state and errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from normkit.errors import ConfigError, ShapeError
from normkit.population import (
    RefreshEvery,
    WhitenedConv2d,
    WhitenedLinear,
    population_layers,
    refresh,
    whiten_layers,
)

F_IN = 6


def _mix(f: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A well-conditioned (cond 4) non-orthogonal mixing, so inputs are correlated."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))[0]
    return (q * torch.linspace(0.5, 2.0, f, dtype=torch.float64)).to(dtype)


def _linear_data(n: int, seed: int, *, f: int = F_IN, k: int | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Correlated inputs with offset 3 (on a ``k``-dim affine subspace if ``k``)."""
    g = torch.Generator().manual_seed(seed)
    if k is None:
        return torch.randn(n, f, generator=g, dtype=dtype) @ _mix(f, 1, dtype) + 3
    basis = _mix(f, 2, dtype)[:k]  # (k, f), the same subspace for every seed
    return torch.randn(n, k, generator=g, dtype=dtype) @ basis + 3


def _conv_data(n: int, seed: int, *, c: int = 4, k: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    flat = _linear_data(n * 25, seed, f=c, k=k, dtype=dtype)  # (N·H·W, C)
    return flat.view(n, 5, 5, c).permute(0, 3, 1, 2).contiguous()


LINEAR = {
    "pca": dict(),
    "zca": dict(method="zca"),
    "cholesky": dict(method="cholesky"),
    "grouped": dict(group_size=3, method="zca"),
    "low_rank": dict(rank=2),
    "grouped_low_rank": dict(group_size=3, rank=2),
    "no_bias": dict(bias=False, method="zca"),
}
CONV = {
    "conv": dict(padding=1),
    "conv_strided_zca": dict(padding=(1, 2), stride=2, method="zca"),
    "conv_grouped": dict(group_size=2, padding=1, method="cholesky"),
    "conv_low_rank": dict(rank=2, padding=1),
}


def _build(name: str, dtype: torch.dtype = torch.float32, eps: float = 1e-3) -> nn.Module:
    torch.manual_seed(0)
    if name in LINEAR:
        kw = LINEAR[name]
        return nn.Sequential(WhitenedLinear(F_IN, 5, eps=eps, dtype=dtype, **kw), nn.Tanh(),
                             WhitenedLinear(5, 3, eps=eps, dtype=dtype))
    kw = CONV[name]
    return nn.Sequential(WhitenedConv2d(4, 3, 3, eps=eps, dtype=dtype, **kw), nn.Tanh(),
                         WhitenedConv2d(3, 2, 2, eps=eps, dtype=dtype))


def _batches(name: str, seed: int, dtype: torch.dtype = torch.float32, *,
             general: bool = False) -> list[torch.Tensor]:
    """Three batches for config ``name``; for low rank on a ``rank``-dim affine subspace per
    group (where a refresh is exact) unless ``general``."""
    cfg = LINEAR[name] if name in LINEAR else CONV[name]
    k = None if general else cfg.get("rank")
    if k is not None and cfg.get("group_size"):  # each group on its own k-dim subspace
        g = cfg["group_size"]
        return [torch.cat([_linear_data(40, 7 * seed + 3 * i + j, f=g, k=k, dtype=dtype)
                           for j in range(F_IN // g)], 1) for i in range(3)]
    if name in LINEAR:
        return [_linear_data(40, seed + i, k=k, dtype=dtype) for i in range(3)]
    return [_conv_data(6, seed + i, k=k, dtype=dtype) for i in range(3)]


# ------------------------------------------------------------------------- function preserved
@pytest.mark.parametrize("name", [*LINEAR, *CONV])
def test_refresh_preserves_outputs(name: str) -> None:
    """Outputs right before and after a refresh agree to float32 rounding (1e-5 relative).
    Low rank: on inputs whose centred values lie in the kept ``rank``-dim subspace (then
    ``VW(P′ − I)(x − c′) = 0``, also for the first refresh from ``W = [I_k 0]``)."""
    model = _build(name)
    probe = _batches(name, 100)[0]
    for r, seed in enumerate((10, 20, 30)):
        before = model(probe)
        refresh(model, _batches(name, seed))
        after = model(probe)
        if r == 0 and name == "conv_low_rank":
            continue  # padded positions hold 0 − c′, off the subspace; exact from W's 2nd refresh
        err = (after - before).abs().max() / before.abs().max()
        assert err <= 1e-5, (name, r, float(err))
    assert all(int(m.num_refreshes) == 3 for m in population_layers(model))


def test_refresh_through_weight_parametrization() -> None:
    """A parametrized ``V`` (weight norm) is re-expressed through its ``right_inverse``."""
    layer = WhitenedLinear(F_IN, 4, method="zca")
    nn.utils.parametrizations.weight_norm(layer)
    x = _linear_data(30, 0)
    before = layer(x)
    refresh(layer, [x])
    assert (layer(x) - before).abs().max() <= 1e-5 * before.abs().max()


def test_mean_offset_1e4_float32() -> None:
    """Inputs offset by 1e4 in float32: the refresh keeps the function and whitens (statistics
    two-pass per batch, merged in float64; the layer subtracts ``c`` before the matmul)."""
    layer = WhitenedLinear(F_IN, 4, method="zca", eps=1e-6)
    data = [_linear_data(200, i) + 1e4 for i in range(3)]
    refresh(layer, data[:2])
    before = layer(data[2])
    refresh(layer, data[1:])
    assert (layer(data[2]) - before).abs().max() <= 1e-5 * before.abs().max()
    z = torch.cat([layer.whiten(x) for x in data[1:]])
    # float32 per-batch moments at offset 1e4 (ulp 1e-3) and ε/λ_min = 4e-6: observed 8e-5
    assert torch.allclose(torch.cov(z.T), torch.eye(F_IN), atol=2e-4)


def test_low_rank_change_formula() -> None:
    """On general data a low-rank refresh changes the output by exactly ``VW(P′ − I)(x − c′)``
    with ``P′ = W′⁺W′`` (grouped blocks; float64)."""
    layer = WhitenedLinear(F_IN, 4, group_size=3, rank=2, dtype=torch.float64)
    refresh(layer, _linear_data(50, 0, dtype=torch.float64))
    x = _linear_data(30, 1, dtype=torch.float64)
    old_m, before = layer.effective_weight(), layer(x)
    refresh(layer, _linear_data(50, 2, dtype=torch.float64))
    w = layer.whitening
    proj = torch.block_diag(*(torch.linalg.pinv(b) @ b for b in w))  # P′ per group
    expected = (x - layer.population_mean) @ (proj - torch.eye(F_IN, dtype=x.dtype)) @ old_m.T
    assert torch.allclose(layer(x) - before, expected, atol=1e-10)
    assert expected.abs().max() > 1e-3  # the subspace did move: the check is not vacuous


# -------------------------------------------------------------------------- whitened inputs
@pytest.mark.parametrize("name", [*LINEAR, *CONV])
def test_whitened_input_has_identity_covariance(name: str) -> None:
    """After a refresh, each layer's input (collected over the refresh batches, after the
    refresh of the layers before it) whitened by its ``W``, ``c`` has mean 0 and unbiased
    covariance ``I`` per group (``I_k`` on the kept subspace) — ``I − εWWᵀ`` with ε = 1e-12."""
    model = _build(name, torch.float64, eps=1e-12)
    for m in population_layers(model):
        if isinstance(m, WhitenedConv2d):
            m.padding = (0, 0)  # statistics are over the unpadded input
    data = _batches(name, 5, torch.float64, general=True)  # low rank changes the function
    refresh(model, data)
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in population_layers(model)}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen[mod].append(mod.whiten(a[0])))
             for m in seen]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    for m, zs in seen.items():
        z = torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t
                       for t in zs])
        blocks = z.view(len(z), m.groups, m.rank)
        eye = torch.eye(m.rank, dtype=z.dtype)
        for g in range(m.groups):
            zg, w = blocks[:, g], m.whitening[g]
            expected = eye - m.eps * w @ w.T  # W Σ Wᵀ = I − εWWᵀ exactly
            if m is model[0]:  # well-conditioned input: ε/λ_min < 1e-10, so ≈ I itself
                assert (expected - eye).abs().max() < 1e-10
            if m.bias is None:  # no centring: second moment (biased) is I
                assert torch.allclose(zg.T @ zg / len(zg), expected, atol=1e-9), name
            else:
                assert torch.allclose(zg.mean(0), torch.zeros(m.rank, dtype=z.dtype), atol=1e-9)
                assert torch.allclose(torch.cov(zg.T), expected, atol=1e-9), name


def test_equals_plain_layers() -> None:
    """Before a refresh a WhitenedLinear/Conv2d is nn.Linear/Conv2d with the same seed; after,
    it equals the plain layer with weight ``M = VW`` and bias ``d − Σ M c`` (float64)."""
    x = _conv_data(3, 0, dtype=torch.float64)
    torch.manual_seed(1)
    plain = nn.Conv2d(4, 3, 3, padding=1, stride=2, dtype=torch.float64)
    torch.manual_seed(1)
    conv = WhitenedConv2d(4, 3, 3, padding=1, stride=2, dtype=torch.float64)
    assert torch.allclose(conv(x), plain(x), atol=1e-12)  # explicit padding: other op order
    refresh(conv, [x])
    m = conv.effective_weight()
    plain.weight.data, plain.bias.data = m, conv.bias - m.sum((2, 3)) @ conv.population_mean
    assert torch.allclose(conv(x), plain(x), atol=1e-12)
    torch.manual_seed(2)
    lin_plain = nn.Linear(F_IN, 4)
    torch.manual_seed(2)
    lin = WhitenedLinear(F_IN, 4)
    xl = _linear_data(8, 0)
    assert torch.equal(lin(xl), lin_plain(xl))


# -------------------------------------------------------------------- gradients, state, compile
@pytest.mark.parametrize("name", ["grouped", "low_rank", "conv_strided_zca", "conv_low_rank"])
def test_gradcheck(name: str) -> None:
    layer = _build(name, torch.float64)[0]
    data = _batches(name, 3, torch.float64)
    refresh(layer, data)
    x = data[0][:1].clone().requires_grad_()
    params = {k: p.detach().clone().requires_grad_() for k, p in layer.named_parameters()}

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, params["weight"], params["bias"]))


@pytest.mark.parametrize("name", ["grouped_low_rank", "conv_grouped"])
def test_state_dict_round_trip(name: str) -> None:
    model = _build(name)
    refresh(model, _batches(name, 0))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"0.population_mean", "0.whitening", "0.num_refreshes"} <= set(state)
    fresh = _build(name)
    torch.manual_seed(5)
    for p in fresh.parameters():
        p.data.normal_()
    fresh.load_state_dict(state, strict=True)
    x = _batches(name, 9)[0]
    assert torch.equal(fresh(x), model(x))
    assert int(fresh[0].num_refreshes) == 1


@pytest.mark.parametrize("name", ["grouped", "conv_low_rank"])
def test_compile_matches_eager(name: str, dynamo_reset: None) -> None:
    model = _build(name)
    refresh(model, _batches(name, 0))
    x = _batches(name, 1)[0]
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    y_c, y_e = compiled(x), model(x)
    assert torch.allclose(y_c, y_e, rtol=1e-6, atol=1e-6)
    y_c.square().sum().backward()
    y_e.square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-6), n


# -------------------------------------------------------------------------- optimizer state
def _trained(momentum_opt: type = torch.optim.SGD) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _build("grouped")
    refresh(model, _batches("grouped", 0))
    kw = {"lr": 0.1, "momentum": 0.9} if momentum_opt is torch.optim.SGD else {"lr": 0.01}
    opt = momentum_opt(model.parameters(), **kw)
    for x in _batches("grouped", 1):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def _zero_grad_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    (0 * model(x).sum()).backward()  # zero gradients: the step is the momentum alone
    opt.step()


@pytest.mark.parametrize("state", ["transform", "keep", "reset"])
def test_optimizer_state_after_refresh(state: str) -> None:
    """``transform`` applies the re-expression to the momentum, so a momentum-only step changes
    the function exactly as without the refresh; ``keep`` leaves the buffers (then the step
    differs), ``reset`` drops them."""
    model, opt = _trained()
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not shared tensors
    layer = model[0]
    buf = opt.state[layer.weight]["momentum_buffer"].clone()
    refresh(model, _batches("grouped", 7), optimizer=opt, optimizer_state=state)
    x = _batches("grouped", 8)[0]
    if state == "reset":
        assert layer.weight not in opt.state and layer.bias not in opt.state
        return
    new_buf = opt.state[layer.weight]["momentum_buffer"]
    if state == "keep":
        assert torch.equal(new_buf, buf)
    _zero_grad_step(model, opt, x)
    _zero_grad_step(ref_model, ref_opt, x)
    err = (model(x) - ref_model(x)).abs().max() / ref_model(x).abs().max()
    if state == "transform":
        assert err <= 1e-5
    else:
        assert err > 1e-3


def test_adam_first_moment_transformed_second_kept() -> None:
    model, opt = _trained(torch.optim.Adam)
    layer = model[0]
    sq = opt.state[layer.weight]["exp_avg_sq"].clone()
    avg = opt.state[layer.weight]["exp_avg"].clone()
    refresh(model, _batches("grouped", 7), optimizer=opt)
    assert torch.equal(opt.state[layer.weight]["exp_avg_sq"], sq)
    assert not torch.allclose(opt.state[layer.weight]["exp_avg"], avg)


# ----------------------------------------------------------------------------- callback, misc
def test_refresh_every_in_a_loop() -> None:
    model = _build("pca")
    calls = []

    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        calls.append(1)
        return [(x, torch.zeros(len(x))) for x in _batches("pca", len(calls))]

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cb = RefreshEvery(model, batches, every=3, num_batches=2, optimizer=opt)
    cb.refresh()
    x = _batches("pca", 50)[0]
    did = []
    for _ in range(7):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        before = model(x)
        did.append(cb())
        assert (model(x) - before).abs().max() <= 1e-5 * before.abs().max()
    assert did == [False, False, True, False, False, True, False]
    assert len(calls) == 3 and int(model[0].num_refreshes) == 3 and model.training


def test_tensor_batch_and_warnings() -> None:
    model = nn.Sequential(WhitenedLinear(F_IN, 3), WhitenedLinear(3, 2))
    holder = nn.Module()
    holder.model, holder.unused = model, WhitenedLinear(2, 2)
    holder.forward = model.forward  # type: ignore[method-assign]  # never calls holder.unused
    unused = holder.unused
    with pytest.warns(RuntimeWarning, match="1 population-whitened layer"):
        refresh(holder, _linear_data(20, 0))  # a tensor is one batch
    assert int(model[0].num_refreshes) == 1 and int(unused.num_refreshes) == 0
    bad = _linear_data(20, 1)
    bad[0, 0] = float("nan")
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match="non-finite input statistics"):
        refresh(model[0], [bad])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.warns(RuntimeWarning, match="2 samples for groups of 6"):
        refresh(model[0], _linear_data(2, 3))
    assert torch.isfinite(model[0].whitening).all()


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(rank=0), r"rank must be an int in \[1, 6\].*got 0"),
    (dict(rank=7), r"rank must be an int in \[1, 6\].*got 7"),
    (dict(rank=4, group_size=3), r"rank must be an int in \[1, 3\] \(the group size\)"),
    (dict(rank=2, method="zca"), r"rank=2 .* needs method='pca', got method='zca'"),
    (dict(group_size=4), r"num_features \(6\) must be divisible by group_size \(4\)"),
    (dict(group_size=0), r"group_size must be a positive int, got 0"),
    (dict(eps=0.0), r"eps must be a number > 0 .* got 0.0"),
    (dict(eps=-1e-3), r"eps must be a number > 0 .* got -0.001"),
    (dict(method="newton"), r"method must be one of .*'zca', 'pca', 'cholesky'.* got 'newton'"),
])
def test_construction_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WhitenedLinear(F_IN, 3, **kwargs)


def test_input_and_call_errors() -> None:
    layer = WhitenedLinear(F_IN, 3)
    with pytest.raises(ShapeError, match=r"expected input \(\*, 6\) with 6 features, got shape "
                                         r"\(4, 5\)"):
        layer(torch.randn(4, 5))
    with pytest.raises(ShapeError, match=r"expected input \(\*, 6\).*got shape \(4, 5\)"):
        refresh(layer, [torch.randn(4, 5)])
    conv = WhitenedConv2d(4, 2, 3)
    with pytest.raises(ShapeError,
                       match=r"expected input \(N, 4, H, W\), got shape \(2, 3, 5, 5\)"):
        conv(torch.randn(2, 3, 5, 5))
    with pytest.raises(ConfigError, match="refresh got no batches"):
        refresh(layer, [])
    with pytest.raises(ConfigError, match="Linear has no population-whitened layer"):
        refresh(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(ConfigError, match="num_batches must be a positive int or None, got 0"):
        refresh(layer, [torch.randn(3, F_IN)], num_batches=0)
    with pytest.raises(ConfigError, match="optimizer_state must be one of .* got 'zero'"):
        refresh(layer, [torch.randn(3, F_IN)], optimizer_state="zero")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="every must be a positive int .* got 0"):
        RefreshEvery(layer, [torch.randn(3, F_IN)], every=0)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        RefreshEvery(layer, iter([torch.randn(3, F_IN)]), every=5)
    with pytest.raises(ConfigError, match=r"padding >= 0, got .*\(-1, -1\)"):
        WhitenedConv2d(4, 2, 3, padding=-1)


# ------------------------------------------------------------------------------ whiten_layers
def test_whiten_layers_keeps_the_function_until_refresh_then_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5, bias=False))
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    before = model(x)
    weight0 = model[0].weight.detach().clone()
    assert whiten_layers(model, method="zca", eps=1e-3) == ["0", "3"]
    assert isinstance(model[0], WhitenedConv2d) and isinstance(model[3], WhitenedLinear)
    assert (model[0].stride, model[0].padding, model[3].bias) == ((2, 2), (1, 1), None)
    assert torch.equal(model[0].weight, weight0)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    with pytest.warns(RuntimeWarning, match="16 samples for groups of 96 features"):
        refresh(model, [x[:8], x[8:]])  # the Linear's 96 inputs from 16 samples: singular
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)  # re-expressed
    z = model[0].whiten(x)[..., 1:-1, 1:-1].transpose(0, 1).flatten(1).double()  # unpadded
    torch.testing.assert_close(torch.cov(z), torch.eye(3, dtype=torch.float64), atol=2e-2,
                               rtol=0)  # ε = 1e-3 against variances ≈ 4


def test_whiten_layers_skip_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert whiten_layers(model, skip=["1"]) == ["0"] and type(model[1]) is nn.Linear
    with pytest.raises(ConfigError, match="no nn.Linear / nn.Conv2d"):
        whiten_layers(nn.Sequential(nn.ReLU()))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match=r"layer '0'.*groups=2.*pass it in skip="):
        whiten_layers(grouped)
    assert type(grouped[0]) is nn.Conv2d  # nothing replaced when one layer is refused
