"""Model factory of ``normkit compare``: every registered method in every model it fits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit  # noqa: F401  (registers the methods)
from normkit import registry
from normkit.errors import ConfigError, UnknownMethodError
from normkit.experiments.data import Dataset
from normkit.experiments.models import MODELS, build_model, make_norm
from normkit.experiments.runner import CompareConfig, validate_methods

# methods that need a condition (a class, a style, a map) cannot be a classifier's norm layer
NEEDS_CONDITION = ["adain", "adalin", "cbn", "cin", "spade"]
METHODS = [*(m for m in registry.list_methods() if m not in NEEDS_CONDITION), "none"]
CONV_CASES = [("cnn1d", (40,)), ("cnn1d", (2, 40)), ("cnn2d", (1, 8, 8)), ("resnet", (40,)),
              ("resnet", (1, 8, 8))]
MLP_CASES = [("mlp", (40,)), ("mlp", (1, 8, 8))]


def fake_dataset(shape: tuple[int, ...], n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.arange(n) % 10
    return Dataset("fake", x, y, x.clone(), y.clone(), num_classes=10, source="test")


def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.train()(x)
    out.square().mean().backward()
    with torch.no_grad():
        model.eval()(x)
    return out


@pytest.mark.parametrize("model, shape", CONV_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_in_every_conv_model(method, model, shape):
    net = build_model(model, shape, 10, method)
    out = step(net, torch.randn(4, *shape))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("model, shape", MLP_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_mlp_trains_or_is_refused_clearly(method, model, shape):
    try:
        out = step(build_model(model, shape, 10, method), torch.randn(4, *shape))
    except Exception:
        cfg = CompareConfig(methods=[method], model=model, batch_sizes=[2])
        cfg.validate()
        with pytest.raises(ConfigError, match=rf"method {method!r} does not work in model "
                                              rf"'mlp' on fake inputs of shape"):
            validate_methods(fake_dataset(shape), cfg)
    else:
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_spatial_method_on_mlp_is_refused_before_training():
    cfg = CompareConfig(methods=["bn", "in"], model="mlp", batch_sizes=[4])
    cfg.validate()
    with pytest.raises(ConfigError, match=r"method 'in' does not work in model 'mlp'.*"
                                          r"spatial element.*drop it from --methods"):
        validate_methods(fake_dataset((40,)), cfg)


def test_groups_not_dividing_channels_is_refused():
    cfg = CompareConfig(methods=["gn:num_groups=7"], model="cnn1d", batch_sizes=[4])
    cfg.validate()
    with pytest.raises(ConfigError, match=r"'gn:num_groups=7'.*divisible by num_groups \(7\)"):
        validate_methods(fake_dataset((40,)), cfg)


def test_norm_goes_after_every_linear_and_before_relu():
    mlp = build_model("mlp", (1, 8, 8), 10, nn.BatchNorm1d, width=32, depth=3)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Flatten", *["Linear", "BatchNorm1d", "ReLU"] * 3, "Linear"]
    cnn = build_model("cnn2d", (1, 8, 8), 10, "bn")
    convs = [i for i, m in enumerate(cnn.net) if isinstance(m, nn.Conv2d)]
    assert all(type(cnn.net[i + 1]).__name__ == "BatchNorm" for i in convs)
    assert all(isinstance(cnn.net[i + 2], nn.ReLU) for i in convs)


def test_none_and_callables_and_spec_strings():
    assert isinstance(make_norm("none", 8), nn.Identity) and isinstance(make_norm(None, 8),
                                                                       nn.Identity)
    assert make_norm("gn:num_groups=4", 16).num_groups == 4
    assert make_norm("gn", 16, num_groups=2).num_groups == 2
    resnet = build_model("resnet", (40,), 10, "none")
    assert not any(isinstance(m, normkit.Normalization) for m in resnet.modules())


@pytest.mark.parametrize("model, shape, match", [
    ("cnn1d", (1, 8, 8), r"cnn1d needs \(L,\) or \(C, L\) sequences.*\(1, 8, 8\).*--model cnn2d"),
    ("cnn2d", (40,), r"cnn2d needs \(C, H, W\) images.*\(40,\).*--model cnn1d"),
    ("vit", (40,), r"unknown model 'vit'; choose one of mlp, cnn1d, cnn2d, resnet"),
])
def test_model_shape_errors(model, shape, match):
    with pytest.raises(ConfigError, match=match):
        build_model(model, shape, 10, "bn")


def test_unknown_method_lists_close_matches():
    with pytest.raises(UnknownMethodError, match=r"unknown normalization method 'bnn'"):
        build_model("mlp", (40,), 10, "bnn")


def test_models_registry_is_complete():
    assert set(MODELS) == {"mlp", "cnn1d", "cnn2d", "resnet"}


@pytest.mark.parametrize("method", NEEDS_CONDITION)
def test_methods_needing_a_condition_are_refused_clearly(method):
    cfg = CompareConfig(methods=[method], model="cnn1d", batch_sizes=[2])
    cfg.validate()
    with pytest.raises(ConfigError, match=rf"method {method!r} does not work in model 'cnn1d'"):
        validate_methods(fake_dataset((40,)), cfg)


def test_cnn1d_default_is_four_conv_layers_and_cnn2d_keeps_three():
    """The default 1-D CNN's last conv sees 5 of MNIST-1D's 40 positions (its batch statistics
    come from 5 values per example); ``channels=`` still overrides it; cnn2d is unchanged."""
    from normkit.experiments.models import CNN1D_CHANNELS

    seen = []
    model = build_model("cnn1d", (40,), 10, "bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [c.out_channels for c in convs] == list(CNN1D_CHANNELS) == [32, 64, 64, 64]
    convs[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(2, 40))
    assert seen == [torch.Size([2, 64, 5])]
    small = build_model("cnn1d", (40,), 10, "bn", channels=(8, 8))
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv1d)] == [8, 8]
    assert [m.out_channels for m in build_model("cnn2d", (1, 8, 8), 10, "bn").modules()
            if isinstance(m, nn.Conv2d)] == [32, 64, 64]
