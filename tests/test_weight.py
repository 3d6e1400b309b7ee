"""normkit.weight: parametrizations (METHODS.md ch. 7, TESTING.md kind P).

Tolerances: float64 identities on ≤ 16×64 matrices hold to ~1e-13; they are checked at 1e-10
(1e-8 where an iteration or an eigendecomposition sits between). float32 comparisons against
torch's own parametrizations use the same ops in the same order, hence ≤ a few ulp (1e-6).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrizations as TP
from torch.nn.utils import parametrize

import normkit as nk
from normkit.weight import _parametrizations as P

DT = torch.float64
METHODS = list(nk.weight.METHODS)
OPTIONS = {"own": {"eps": 1e-9}, "oni": {"iterations": 7}}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"linear": nn.Linear(6, 4, dtype=DT), "conv1d": nn.Conv1d(3, 4, 3, dtype=DT),
            "conv2d": nn.Conv2d(2, 4, 2, padding=1, dtype=DT),
            "conv_t2d": nn.ConvTranspose2d(4, 3, 2, dtype=DT)}


def inputs(name: str, seed: int = 0) -> torch.Tensor:
    shapes = {"linear": (5, 6), "conv1d": (2, 3, 7), "conv2d": (2, 2, 4, 4), "conv_t2d": (2, 4, 3, 3)}
    return torch.randn(shapes[name], generator=gen(seed), dtype=DT)


def unit_matrix(w: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    return w.movedim(1 if transposed else 0, 0).flatten(1)


def cases():
    for method in METHODS:
        for layer in ("linear", "conv1d", "conv2d", "conv_t2d"):
            if method == "cosine_norm" and layer == "conv_t2d":
                continue
            yield pytest.param(method, layer, id=f"{method}-{layer}")


# ------------------------------------------------------------------------------ generic
@pytest.mark.parametrize(("method", "layer"), list(cases()))
def test_gradcheck(method, layer):
    mod = nk.weight.apply(layers()[layer], method, **OPTIONS.get(method, {}))
    x = inputs(layer).requires_grad_()
    names = [n for n, _ in mod.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mod.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), (x,))

    mod.eval()  # spectral norm: fixed u, v (training updates them between gradcheck's calls)
    assert gradcheck(f, (x, *params))


@pytest.mark.parametrize(("method", "layer"), list(cases()))
def test_state_dict_round_trip_and_remove(method, layer):
    mod = nk.weight.apply(layers()[layer], method, **OPTIONS.get(method, {}))
    x = inputs(layer)
    mod(x)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = nk.weight.apply(layers()[layer], method, **OPTIONS.get(method, {}))
    fresh.load_state_dict(state, strict=True)
    mod.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), mod(x), rtol=0, atol=0)
    clone = copy.deepcopy(mod)
    torch.testing.assert_close(clone(x), mod(x), rtol=0, atol=0)
    y, w = mod(x), mod.weight.detach().clone()
    nk.weight.remove(mod)
    assert not nk.weight.is_normalized(mod) and isinstance(mod.weight, nn.Parameter)
    torch.testing.assert_close(mod.weight, w, rtol=0, atol=0)
    if method != "cosine_norm":  # cosine also divides by the input norm, which removal drops
        torch.testing.assert_close(mod(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_cached_parametrization(method):
    mod = nk.weight.apply(layers()["conv2d"], method, **OPTIONS.get(method, {})).eval()
    x = inputs("conv2d")
    with parametrize.cached():
        y = mod(x)
        assert mod.weight is mod.weight  # computed once inside the context
    torch.testing.assert_close(y, mod(x), rtol=0, atol=0)


@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize("method", METHODS)
def test_compile_parity(method, dynamo_reset):
    torch.manual_seed(0)
    eager = nk.weight.apply(nn.Conv2d(2, 4, 3, padding=1), method)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, backend="eager")
    for train in (True, False, True):
        eager.train(train)
        compiled.train(train)
        x = torch.randn(2, 2, 5, 5, generator=gen(3))
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_mod.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_t2d"])
def test_weight_norm_unit_norms_equal_g(layer):
    mod = nk.weight.apply(layers()[layer], "weight_norm", dim=1 if layer == "conv_t2d" else 0)
    with torch.no_grad():
        mod.parametrizations.weight.original0.copy_(
            torch.rand(mod.parametrizations.weight.original0.shape, generator=gen(1), dtype=DT) + 0.5)
    g = mod.parametrizations.weight.original0.flatten()
    norms = unit_matrix(mod.weight, layer == "conv_t2d").norm(dim=1)
    torch.testing.assert_close(norms, g, rtol=1e-12, atol=1e-12)


def test_centered_weight_norm_rows_sum_to_zero_with_norm_g():
    mod = nk.weight.apply(layers()["conv2d"], "centered_weight_norm")
    w = unit_matrix(mod.weight)
    torch.testing.assert_close(w.sum(1), torch.zeros(4, dtype=DT), rtol=0, atol=1e-12)
    g = mod.parametrizations.weight.original0.flatten()
    torch.testing.assert_close(w.norm(dim=1), g, rtol=1e-12, atol=1e-12)


def test_weight_standardization_rows_have_mean_zero_std_one():
    mod = nk.weight.apply(layers()["conv2d"], "ws", eps=0.0)
    w = unit_matrix(mod.weight)
    torch.testing.assert_close(w.mean(1), torch.zeros(4, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.std(1, correction=0), torch.ones(4, dtype=DT), rtol=1e-12, atol=1e-12)


def test_spectral_norm_converges_to_the_largest_singular_value():
    v = torch.randn(8, 12, generator=gen(4), dtype=DT)
    sigma = torch.linalg.matrix_norm(v, 2)
    errors = []
    for steps in (1, 5, 50):
        sn = P.SpectralNorm(v, n_power_iterations=steps)
        with torch.no_grad():  # restart from the same vectors for every step count
            sn._u.copy_(torch.nn.functional.normalize(torch.ones(8, dtype=DT), dim=0))
            sn._v.copy_(torch.nn.functional.normalize(torch.ones(12, dtype=DT), dim=0))
        w = sn(v)
        errors.append(abs(torch.linalg.matrix_norm(w, 2).item() - 1))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10
    sn.eval()
    torch.testing.assert_close(v / sn(v), torch.full_like(v, sigma.item()), rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["own", "oni"])
@pytest.mark.parametrize(("rows", "group_size"), [(4, None), (8, 4)])
def test_orthogonal_rows(method, rows, group_size):
    kw = {"eps": 0.0} if method == "own" else {"iterations": 40}
    p = nk.weight.parametrization(method, torch.empty(0), group_size=group_size, **kw)
    w = p(torch.randn(rows, 3, 3, 3, generator=gen(5), dtype=DT)).flatten(1)
    d = group_size or rows
    for g in w.split(d):
        torch.testing.assert_close(g @ g.T, torch.eye(d, dtype=DT), rtol=0, atol=1e-8)
        torch.testing.assert_close(g.sum(1), torch.zeros(d, dtype=DT), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["own", "oni"])
def test_tall_groups_get_orthonormal_columns(method):
    """More rows than inputs: rows cannot be orthonormal; the columns are (uncentred)."""
    kw = {"eps": 0.0} if method == "own" else {"iterations": 40}
    p = nk.weight.parametrization(method, torch.empty(0), center=False, **kw)
    w = p(torch.randn(10, 4, generator=gen(6), dtype=DT))
    torch.testing.assert_close(w.T @ w, torch.eye(4, dtype=DT), rtol=0, atol=1e-8)
    centred = nk.weight.parametrization(method, torch.empty(0), eps=1e-6)(torch.randn(10, 4, dtype=DT))
    assert torch.isfinite(centred).all()


def test_oni_orthogonality_improves_with_iterations_and_ignores_scale():
    v = torch.randn(16, 64, generator=gen(7), dtype=DT)
    errors = []
    for t in range(1, 8):
        w = P.OrthogonalNewton(iterations=t)(v)
        errors.append(torch.linalg.matrix_norm(w @ w.T - torch.eye(16, dtype=DT)).item())
        torch.testing.assert_close(P.OrthogonalNewton(iterations=t)(v * 37.5), w, rtol=1e-10, atol=1e-12)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_oni_scale_fixed_and_learned():
    v = torch.randn(4, 9, generator=gen(8), dtype=DT)
    w = P.OrthogonalNewton(iterations=30, scale=2 ** 0.5)(v)
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(4, dtype=DT), rtol=0, atol=1e-8)
    mod = nk.weight.apply(nn.Linear(9, 4, dtype=DT), "oni", learn_scale=True, scale=2.0)
    assert "parametrizations.weight.0.scale" in mod.state_dict()
    mod.weight.sum().backward()
    assert mod.parametrizations.weight[0].scale.grad is not None


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
def test_cosine_norm_outputs_the_cosine(layer):
    mod = nk.weight.apply(layers()[layer], "cosine_norm")
    with torch.no_grad():
        mod.bias.zero_()
    x = inputs(layer)
    y = mod(x)
    w = mod.parametrizations.weight.original.flatten(1)
    if layer == "linear":
        patches = x
    elif layer == "conv1d":
        patches = x.unfold(2, 3, 1).permute(0, 2, 1, 3).flatten(2)  # (N, L, C·k)
    else:
        patches = nn.functional.unfold(x, 2, padding=1).transpose(1, 2)
    cos = nn.functional.cosine_similarity(patches.unsqueeze(-2), w, dim=-1, eps=0)
    expected = cos if layer == "linear" else cos.transpose(1, 2).reshape(y.shape)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    assert y.abs().max() <= 1 + 1e-12


def test_cosine_norm_with_groups_and_reflect_padding():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect", bias=False, dtype=DT)
    mod = nk.weight.apply(conv, "cos")
    x = torch.randn(2, 4, 5, 5, generator=gen(9), dtype=DT)
    y = mod(x)
    xp = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for g in range(2):
        patches = nn.functional.unfold(xp[:, 2 * g: 2 * g + 2], 3).transpose(1, 2)  # (N, L, 18)
        w = mod.parametrizations.weight.original[3 * g: 3 * g + 3].flatten(1)
        cos = nn.functional.cosine_similarity(patches.unsqueeze(-2), w, dim=-1, eps=0)
        torch.testing.assert_close(y[:, 3 * g: 3 * g + 3], cos.transpose(1, 2).reshape(2, 3, 5, 5),
                                   rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ torch parity
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_t2d"])
def test_weight_norm_equals_torch(layer):
    torch.manual_seed(1)
    ours = layers()[layer].float()
    theirs = copy.deepcopy(ours)
    TP.weight_norm(theirs)
    nk.weight.apply(ours, "wn", dim=0)  # torch's default dim=0 for every layer type
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = inputs(layer).float()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    # torch's fused _weight_norm backward orders the sums differently: both sit ~3e-7·max|grad|
    # (max|grad| ≈ 15 here) from the float64 value, so rtol 1e-5 with atol 1e-5.
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_old_style_weight_norm_checkpoint_loads():
    lin = nn.Linear(5, 3)
    g = torch.rand(3, 1) + 0.5
    v = torch.randn(3, 5)
    old = {"weight_g": g, "weight_v": v, "bias": torch.zeros(3)}  # torch.nn.utils.weight_norm's keys
    ours = nk.weight.apply(lin, "wn")
    ours.load_state_dict(old)
    torch.testing.assert_close(ours.weight, g * v / v.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_t2d"])
def test_spectral_norm_equals_torch(layer):
    torch.manual_seed(2)
    ours = layers()[layer].float()
    theirs = copy.deepcopy(ours)
    TP.spectral_norm(theirs)
    nk.weight.apply(ours, "sn")
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for train in (True, True, False):
        ours.train(train)
        theirs.train(train)
        x = inputs(layer, seed=3).float()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)


def test_spectral_norm_two_forwards_then_one_backward():
    """GAN discriminator on real and fake batches: both forwards update u, v in place; the graph
    keeps copies, so one backward through both works and matches separate backwards."""
    d = nk.weight.apply(nn.Linear(6, 1, dtype=DT), "sn")
    real, fake = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    loss = d(real).mean() - d(fake).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters())


def test_power_iteration_only_in_training():
    mod = nk.weight.apply(nn.Linear(6, 4), "sn").eval()
    with torch.no_grad():  # off the converged vector, so a training step must move it
        mod.parametrizations.weight[0]._u.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    u = mod.parametrizations.weight[0]._u.clone()
    mod(torch.randn(2, 6))
    torch.testing.assert_close(mod.parametrizations.weight[0]._u, u, rtol=0, atol=0)
    mod.train()(torch.randn(2, 6))
    assert not torch.equal(mod.parametrizations.weight[0]._u, u)


# ------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("method", METHODS)
def test_zero_weight_and_zero_row_are_finite(method):
    mod = nk.weight.apply(nn.Linear(6, 4, dtype=DT), method, **OPTIONS.get(method, {}))
    stored = [p for n, p in mod.named_parameters() if "original" in n][-1]
    for zero_rows in (slice(0, 1), slice(None)):
        with torch.no_grad():
            stored[zero_rows] = 0
        mod.zero_grad()
        x = torch.randn(3, 6, dtype=DT, requires_grad=True)
        y = mod(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), method
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in mod.parameters()), method
    assert torch.equal(mod.weight, torch.zeros_like(mod.weight)) or method in ("own", "oni")


def test_apply_to_model_and_remove_from_model():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2), nn.Flatten(),
                        nn.LazyLinear(2))
    net(torch.randn(1, 3, 6, 6))
    done = nk.weight.apply_to_model(net, "sn", exclude=lambda n, m: n == "4")
    assert done == ["0", "2"]
    assert net[2].parametrizations.weight[0].dim == 1  # ConvTranspose: output units at dim 1
    assert nk.weight.remove_from_model(net) == ["0", "2"]


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: nk.weight.apply(nn.Linear(3, 2), "spectral"), nk.UnknownMethodError, "did you mean"),
    (lambda: nk.weight.apply(nn.Linear(3, 2), "wn", iterations=3), nk.ConfigError, "weight_norm"),
    (lambda: nk.weight.apply(nn.Linear(3, 4), "own", group_size=3), nk.ConfigError,
     r"group_size \(3\) must divide the number of output units \(4\)"),
    (lambda: nk.weight.apply(nn.Linear(3, 2), "oni", iterations=0), nk.ConfigError, r"\[1, 64\], got 0"),
    (lambda: nk.weight.apply(nn.Linear(3, 2), "sn", n_power_iterations=0), nk.ConfigError, "got 0"),
    (lambda: nk.weight.apply(nn.Linear(3, 2), "ws", eps=-1.0), nk.ConfigError, "got -1.0"),
    (lambda: nk.weight.apply(nn.Linear(3, 2), "oni", scale=0.0), nk.ConfigError, "scale"),
    (lambda: nk.weight.apply(nn.ConvTranspose2d(3, 2, 2), "cos"), nk.ConfigError, "ConvTranspose2d"),
    (lambda: nk.weight.apply(nn.ReLU(), "wn"), nk.ConfigError, "no tensor 'weight'"),
    (lambda: nk.weight.apply(nk.weight.apply(nn.Linear(3, 2), "wn"), "sn"), nk.ConfigError,
     "already parametrized"),
    (lambda: nk.weight.remove(nn.Linear(3, 2)), nk.ConfigError, "not parametrized"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


class _HFStyleRMSNorm(nn.Module):  # Hugging Face's LlamaRMSNorm: not a torch norm subclass
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))


class _BatchNormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: a torch BN subclass
    pass


@pytest.mark.parametrize("norm", [
    nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.LayerNorm([4, 3]),
    nn.InstanceNorm2d(4, affine=True), nn.RMSNorm(4), _BatchNormAct(4), _HFStyleRMSNorm(4),
    nk.BatchNorm(4), nk.LayerNorm([4, 3]), nk.create("dbn", 4, affine="coloring"),
], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("method", ["wn", "sn", "ws"])
def test_apply_refuses_a_normalization_layers_gamma(norm, method):
    """Weight normalization of a norm layer's γ would silently rescale it (WN on a 1-D γ pins
    |γ_i| = g_i): refused with the layer and what the methods apply to."""
    name = type(norm).__name__
    with pytest.raises(nk.ConfigError, match=rf"{name}\.weight of shape .* affine parameter of a "
                                             r"normalization layer.*Linear/Conv"):
        nk.weight.apply(norm, method)
    assert not nk.weight.is_normalized(norm)


def test_apply_to_model_names_the_norm_layers_path():
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)))
    with pytest.raises(nk.ConfigError, match=r"1\.0\.weight \(BatchNorm1d\) of shape \(4,\)"):
        nk.weight.apply_to_model(net, "wn", types=(nn.Linear, nn.BatchNorm1d))
    # the default types select Linear/Conv only, so a model with norms converts as before
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert nk.weight.apply_to_model(net, "wn") == ["0"]


def test_a_linear_named_norm_is_not_refused():
    """The class-name rule only covers 1-D parameters of non-Linear/Conv modules."""
    class NormedLinear(nn.Linear):
        pass

    assert nk.weight.is_normalized(nk.weight.apply(NormedLinear(3, 2), "wn"))


def test_apply_refuses_timm_norm_layers():
    """timm's norms: torch subclasses (LayerNorm2d, BatchNormAct2d) and plain modules (RmsNorm,
    EvoNorm2dB0, whose extra ``v`` is 1-D too)."""
    layers = pytest.importorskip("timm.layers")
    for norm in (layers.RmsNorm(8), layers.LayerNorm2d(8), layers.BatchNormAct2d(8),
                 layers.EvoNorm2dB0(8)):
        for name, _ in norm.named_parameters(recurse=False):
            with pytest.raises(nk.ConfigError, match=r"affine parameter of a normalization layer"):
                nk.weight.apply(norm, "wn", name=name)
