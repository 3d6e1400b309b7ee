"""``NormAct`` and ``nk.norm_act``: the order norm → drop → act, the keywords timm passes, the
activation names, errors, and the timm models that take a norm+act ``norm_layer=`` (EfficientNet,
RegNet) — built from config, trained a few steps.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from torch import nn

import normkit as nk
from models_util import import_or_fail
from normkit.apply.norm_act import activation
from normkit.errors import ConfigError, UnknownMethodError


class Negate(nn.Module):
    """A "dropout" that is not the identity, so the order of drop and act shows in the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_norm_act_order_is_norm_drop_act() -> None:
    torch.manual_seed(0)
    layer = nk.norm_act("bn", act_layer="relu", drop_layer=Negate)(4)
    x = torch.randn(8, 4, 3, 3)
    ref = torch.relu(-layer.norm(x))  # act(drop(norm(x))); drop(act(...)) would be ≤ 0
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    assert (layer(x) >= 0).all() and (layer(x) > 0).any()


def test_factory_is_a_plain_function_with_timms_keywords() -> None:
    f = nk.norm_act("gn", num_groups=2, act_layer="silu")
    # timm's get_norm_act_layer calls a types.FunctionType as given (a class is swapped by name)
    assert isinstance(f, types.FunctionType)
    layer = f(8, apply_act=True, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"},
              inplace=True, drop_layer=functools.partial(nn.Dropout, 0.0), device="cpu",
              dtype=torch.float64)
    assert isinstance(layer.norm, nk.GroupNorm) and layer.norm.num_groups == 2
    assert isinstance(layer.act, nn.GELU) and layer.act.approximate == "tanh"  # GELU: no inplace
    assert isinstance(layer.drop, nn.Dropout)
    assert layer.norm.weight.dtype == torch.float64
    assert isinstance(f(8, apply_act=False).act, nn.Identity)
    assert f(8).tail_names == ("drop", "act")  # timm's children, in timm's order
    assert isinstance(f(8).act, nn.SiLU) and isinstance(f(8).drop, nn.Identity)


def test_factory_inplace_follows_timm() -> None:
    f = nk.norm_act("bn", act_layer="relu")
    assert f(4).act.inplace is True  # timm's BatchNormAct2d default
    assert f(4, inplace=False).act.inplace is False
    g = nk.norm_act("bn", act_layer="relu", act_kwargs={"inplace": False})
    assert g(4, inplace=True).act.inplace is False  # act_kwargs' own value wins, as in timm
    assert nk.norm_act("bn", act_layer="relu", inplace=False)(4).act.inplace is False


def test_factory_method_kwargs_and_overrides() -> None:
    f = nk.norm_act("iternorm:group_size=4", act_layer=None, eps=1e-3)
    layer = f(8, eps=1e-4)  # keywords a model passes (e.g. eps=) override the bound ones
    assert isinstance(layer.norm, nk.IterNorm) and layer.norm.eps == 1e-4
    assert isinstance(layer.act, nn.Identity)
    g = nk.norm_act(nk.partial("gn", num_groups=4), act_layer=nn.ReLU)
    assert g(8).norm.num_groups == 4 and g.__name__ == "norm_act_GroupNorm"


def test_norm_act_equals_its_parts_in_train_and_eval() -> None:
    torch.manual_seed(0)
    layer = nk.norm_act("dbn", group_size=4, act_layer="silu", inplace=False)(8)
    ref = nk.DecorrelatedBatchNorm(8, group_size=4)
    ref.load_state_dict(layer.norm.state_dict())
    x = torch.randn(16, 8, 3, 3)
    torch.testing.assert_close(layer(x), nn.functional.silu(ref(x)))
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), nn.functional.silu(ref(x)))


def test_weight_and_bias_are_the_norms() -> None:
    layer = nk.norm_act("gn", num_groups=2, act_layer="relu")(8)
    assert layer.weight is layer.norm.weight and layer.bias is layer.norm.bias
    nn.init.zeros_(layer.weight)  # what RegNet's zero_init_last does to the last norm
    assert torch.count_nonzero(layer.norm.weight) == 0
    assert nk.norm_act("gn", num_groups=2, affine=False, act_layer=None)(8).weight is None


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    f = nk.norm_act("iternorm", group_size=4, act_layer="relu")
    a, b = f(8), f(8)
    a(torch.randn(16, 8, 2, 2))
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x = torch.randn(4, 8, 2, 2)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {f"norm.{k}" for k in a.norm.state_dict()}
    # a timm BatchNormAct2d-style flat state dict (weight, running_mean, … at the top) loads too
    c = f(8)
    c.load_state_dict(a.norm.state_dict(), strict=True)
    c.eval()
    assert torch.equal(c(x), a(x))


@pytest.mark.parametrize("name, cls", [("relu", nn.ReLU), ("SiLU", nn.SiLU), ("swish", nn.SiLU),
                                       ("leaky_relu", nn.LeakyReLU), ("gelu", nn.GELU),
                                       ("hard-swish", nn.Hardswish), ("identity", nn.Identity)])
def test_activation_names(name: str, cls: type) -> None:
    assert type(activation(name)) is cls
    assert type(activation(name, inplace=True)) is cls


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"norm_act\('iternorm'\) needs act_layer=.*'silu' for "
                                          r"EfficientNet"):
        nk.norm_act("iternorm", group_size=8)
    with pytest.raises(ConfigError, match=r"unknown activation 'swishy'; known names: .*'silu'"):
        nk.norm_act("bn", act_layer="swishy")
    with pytest.raises(UnknownMethodError, match=r"unknown normalization method 'iternrom'.*"
                                                 r"'iternorm'"):
        nk.norm_act("iternrom", act_layer="relu")
    with pytest.raises(ConfigError, match=r"act_layer .* returned int, not an nn.Module"):
        nk.norm_act("bn", act_layer=lambda: 3)
    with pytest.raises(ConfigError, match=r"act_layer must be .* got 3"):
        activation(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- timm models
def _train(model: nn.Module, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, act, act_cls", [("efficientnet_b0", "silu", nn.SiLU),
                                                 ("regnetx_002", "relu", nn.ReLU)])
def test_timm_norm_act_model_builds_and_trains(name: str, act: str, act_cls: type) -> None:
    timm = import_or_fail("timm")
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=10, pretrained=False)
    norm_layer = nk.norm_act("iternorm", group_size=8, act_layer=act)
    model = timm.create_model(name, num_classes=10, pretrained=False, norm_layer=norm_layer)
    # every timm norm+act layer became a NormAct with the model's activation where it had one
    ref_norms = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    ours = [m for m in model.modules() if isinstance(m, nk.NormAct)]
    assert len(ours) == len(ref_norms) > 10
    assert [type(m.act) for m in ours] == [act_cls if isinstance(m.act, act_cls) else nn.Identity
                                           for m in ref_norms]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    losses = _train(model)
    assert losses[-1] < losses[0], losses


def test_timm_norm_act_inplace_activation() -> None:
    """timm's blocks ask for in-place activations; whitening's output takes them."""
    timm = import_or_fail("timm")
    model = timm.create_model("regnetx_002", num_classes=10,
                              norm_layer=nk.norm_act("iternorm", group_size=8, act_layer="relu"))
    losses = _train(model, steps=3)
    assert losses[-1] < losses[0], losses


def test_timm_swaps_a_class_by_name() -> None:
    """Documented in docs/models.md: timm's norm+act models replace a norm class by the timm class
    of the same name, and refuse any other."""
    timm = import_or_fail("timm")
    model = timm.create_model("efficientnet_b0", num_classes=10,
                              norm_layer=nk.partial("gn", num_groups=8))
    assert type(model.bn1).__name__ == "GroupNormAct"  # timm's, not normkit's GroupNorm
    assert not any(isinstance(m, nk.Normalization) for m in model.modules())
    with pytest.raises(AssertionError, match="No equivalent norm_act layer for iternorm"):
        timm.create_model("efficientnet_b0", norm_layer=nk.partial("iternorm", group_size=8))


def test_timm_convnext_needs_conv_mlp() -> None:
    timm = import_or_fail("timm")
    model = timm.create_model("convnext_atto", num_classes=10,  # conv_mlp=True by default
                              norm_layer=nk.partial("gn", num_groups=8))
    assert type(model.stem[1]) is nk.GroupNorm
    with pytest.raises(AssertionError, match="conv MLP must be used"):
        timm.create_model("convnext_atto", conv_mlp=False, norm_layer=nk.partial("gn"))
