"""normkit.apply.recognize: a norm recognised by what it computes, and sync of norm+act layers.

The look-alike classes (tests/norm_lookalikes.py) copy what timm and Hugging Face write (norm+act subclasses of torch
norms, channels-first LayerNorm2d, RMSNorms that are not torch subclasses), so the logic is
tested without either library; the same table then runs on the real classes where installed.
Recognition compares float64 outputs to 1e-5 relative (HF norms compute in float32 inside).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit as nk
from norm_lookalikes import (
    BiasIgnoringLayerNorm,
    BNAct,
    BNActThenDrop,
    DoubledBN,
    FastLayerNorm,
    FrozenBatchNorm2d,
    GemmaStyleRMSNorm,
    GNAct,
    HiddenEpsLayerNorm,
    LayerNorm2d,
    LlamaStyleRMSNorm,
    ProjRMSNorm,
    RmsNorm2dWithBias,
)
from normkit.apply.recognize import NormAct, Recognition, looks_like_norm, recognize
from normkit.errors import ConfigError

C = 6
# class -> (kind, channel_axis, over, weight_offset, tail, how)
EXPECTED = {
    "torch_bn": (lambda: nn.BatchNorm2d(C), ("batch", 1, None, 0.0, (), "class")),
    "torch_ln": (lambda: nn.LayerNorm(C), ("layer", -1, "channels", 0.0, (), "class")),
    "torch_rms": (lambda: nn.RMSNorm(C), ("rms", -1, "channels", 0.0, (), "class")),
    "normkit": (lambda: nk.GroupNorm(C, num_groups=2), ("normkit", 1, None, 0.0, (), "class")),
    "bn_act": (lambda: BNAct(C, nn.SiLU()), ("batch", 1, None, 0.0, ("act",), "probe")),
    "bn_drop_act": (lambda: BNAct(C, nn.SiLU(), nn.Dropout(0.5)),
                    ("batch", 1, None, 0.0, ("drop", "act"), "probe")),
    "bn_act_drop": (lambda: BNActThenDrop(C, nn.SiLU(), nn.Dropout(0.5)),
                    ("batch", 1, None, 0.0, ("act", "drop"), "probe")),
    "bn_no_act": (lambda: BNAct(C, nn.Identity()), ("batch", 1, None, 0.0, (), "probe")),
    "gn_act": (lambda: GNAct(C), ("group", 1, None, 0.0, ("act",), "probe")),
    "ln2d": (lambda: LayerNorm2d(C), ("layer", 1, "channels", 0.0, (), "probe")),
    "fast_ln": (lambda: FastLayerNorm(C), ("layer", -1, "channels", 0.0, (), "probe")),
    "llama_rms": (lambda: LlamaStyleRMSNorm(C), ("rms", -1, "channels", 0.0, (), "probe")),
    "gemma_rms": (lambda: GemmaStyleRMSNorm(C), ("rms", -1, "channels", 1.0, (), "probe")),
    "rms2d_bias": (lambda: RmsNorm2dWithBias(C), ("rms", 1, "channels", 0.0, (), "probe")),
    "frozen_bn": (lambda: FrozenBatchNorm2d(C), ("frozen", 1, None, 0.0, (), "probe")),
}


def _fields(r: Recognition) -> tuple:
    return r.kind, r.channel_axis, r.over, r.weight_offset, r.tail, r.how


@pytest.mark.parametrize("name", list(EXPECTED))
def test_recognized_by_what_it_computes(name: str) -> None:
    make, want = EXPECTED[name]
    m = make()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    r = recognize(m, "blocks.0.norm")
    assert _fields(r) == want and r.num_features == C
    assert looks_like_norm(m)
    for k, v in m.state_dict().items():  # the probe ran on a copy
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng) and m.training  # nor the RNG, nor the mode


def test_eps_is_read_from_eps_or_variance_epsilon() -> None:
    assert recognize(LlamaStyleRMSNorm(C, eps=1e-5)).eps == 1e-5
    assert recognize(GemmaStyleRMSNorm(C, eps=3e-6)).eps == 3e-6
    assert recognize(LayerNorm2d(C, eps=1e-6)).eps == 1e-6


@pytest.mark.parametrize("make, found", [
    (lambda: DoubledBN(C), r"'m.n' \(DoubledBN\) has its own forward, and its output matches none "
                           r"of: BN. Fix"),
    (lambda: HiddenEpsLayerNorm(C), r"\(HiddenEpsLayerNorm\) has its own forward, and its output "
                                    r"matches none of: LN over the last dim, RMS over the last dim"),
    (lambda: BiasIgnoringLayerNorm(C), r"matches none of: LN over the last dim, LN over dim 1"),
    (lambda: ProjRMSNorm(C), r"children \['proj'\].*followed by proj"),
])
def test_unrecognisable_layers_are_refused_with_path_and_what_was_found(make, found) -> None:
    with pytest.raises(ConfigError, match=found):
        recognize(make(), "m.n")


def test_not_a_norm() -> None:
    assert not looks_like_norm(nn.Linear(3, 3)) and not looks_like_norm(nn.ReLU())
    with pytest.raises(ConfigError, match=r"'fc' \(Linear\) is not a normalization layer"):
        recognize(nn.Linear(3, 3), "fc")
    with pytest.raises(ConfigError, match=r"normalizes over \(4, 5\), more than the channel axis"):
        recognize(nn.LayerNorm((4, 5)))


# ------------------------------------------------------------------------------- NormAct
def test_norm_act_order_and_flat_state_dict_keys() -> None:
    torch.manual_seed(0)
    old = BNAct(C, nn.SiLU())
    with torch.no_grad():
        old.weight.uniform_(0.5, 1.5)
        old.running_mean.normal_()
    layer = NormAct(nk.BatchNorm(C), drop=nn.Identity(), act=nn.SiLU())
    layer.load_state_dict(old.state_dict())  # keys of the norm+act layer: weight, running_mean…
    assert torch.equal(layer.norm.running_mean, old.running_mean)
    assert set(layer.state_dict()) == {f"norm.{k}" for k in old.state_dict()}
    x = torch.randn(2, C, 3, 3)
    torch.testing.assert_close(layer.eval()(x), old.eval()(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot be named 'norm'"):
        NormAct(nn.Identity(), norm=nn.ReLU())


# ---------------------------------------------------------------------------------- sync
def test_sync_keeps_the_activation_of_a_norm_act_layer() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, C, 3), BNAct(C, nn.SiLU(), nn.Dropout(0.2)))
    model[1].running_var.uniform_(0.5, 2)
    act = model[1].act
    x = torch.randn(2, 3, 5, 5)
    y = model.eval()(x)
    group = object()  # a stand-in: conversion records the group, no collective runs here
    nk.sync(model, group)
    assert isinstance(model[1], NormAct) and model[1].tail_names == ("drop", "act")
    assert model[1].act is act and model[1].norm.process_group is group
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)


def test_sync_refuses_what_it_cannot_see_through() -> None:
    with pytest.raises(ConfigError, match=r"1: cannot be synchronized: layer '1' \(DoubledBN\) "
                                          r"has its own forward.*Fix: leave it out"):
        nk.sync(nn.Sequential(nn.Conv2d(3, C, 1), DoubledBN(C)), object())

    class OwnBatchNorm(nn.Module):  # batch statistics, not a torch subclass
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(C))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - x.mean((0, 2, 3), keepdim=True)) * self.weight[:, None, None]

    with pytest.raises(ConfigError, match=r"block: OwnBatchNorm normalizes with statistics of the "
                                          r"batch.*Fix"):
        nk.sync(nn.ModuleDict({"block": OwnBatchNorm()}), object())
    frozen = nn.Sequential(LlamaStyleRMSNorm(C))  # per-sample: nothing to synchronize
    assert nk.sync(frozen, object()) is frozen and isinstance(frozen[0], LlamaStyleRMSNorm)


# ------------------------------------------------------------------ the real libraries
def _timm_table() -> list:
    layers = pytest.importorskip("timm.layers")
    return [
        (layers.BatchNormAct2d(C, act_layer=nn.SiLU), ("batch", 1, None, 0.0, ("act",))),
        (layers.BatchNormAct2d(C, apply_act=False), ("batch", 1, None, 0.0, ())),
        (layers.GroupNormAct(C, num_groups=2), ("group", 1, None, 0.0, ("act",))),
        (layers.LayerNorm(C), ("layer", -1, "channels", 0.0, ())),
        (layers.LayerNorm2d(C), ("layer", 1, "channels", 0.0, ())),
        (layers.RmsNorm(C), ("rms", -1, "channels", 0.0, ())),
        (layers.RmsNorm2d(C), ("rms", 1, "channels", 0.0, ())),
    ]


def _hf_table() -> list:
    pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    rms = ("rms", -1, "channels", 0.0, ())
    return [(LlamaRMSNorm(C), rms), (T5LayerNorm(C), rms), (MistralRMSNorm(C), rms),
            (GemmaRMSNorm(C), ("rms", -1, "channels", 1.0, ()))]


@pytest.mark.parametrize("table", [_timm_table, _hf_table], ids=["timm", "transformers"])
def test_real_library_norms(table) -> None:
    for m, want in table():
        r = recognize(m, "x")
        assert (r.kind, r.channel_axis, r.over, r.weight_offset, r.tail) == want, type(m)
