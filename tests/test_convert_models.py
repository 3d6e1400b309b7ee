"""convert / fold on models whose norms are not torch's own classes: norm+act layers,
channels-first LayerNorm2d, Hugging Face RMSNorms — first on the look-alikes of
tests/norm_lookalikes.py (no extra library), then on timm and transformers models built from
configs (no weights).

Equivalences are float32 outputs compared to ``1e-5 · max|y|``: the same formula computed by
another kernel (normkit's BN/LN/RMS vs the original), a few ulps apart; folds reorder
``γ/σ · (W x)`` into ``(γ/σ · W) x``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import normkit as nk
from norm_lookalikes import (
    BNAct,
    DoubledBN,
    FrozenBatchNorm2d,
    GemmaStyleRMSNorm,
    LayerNorm2d,
    LlamaStyleRMSNorm,
)
from normkit.apply.convert import convert
from normkit.apply.fold import fold
from normkit.apply.recognize import NormAct
from normkit.errors import ConfigError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """γ, β and running statistics away from their initial values (and Gemma's zero gain)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)):
                if m.__class__.__name__.endswith(("Linear", "Conv2d", "Embedding")):
                    continue
                if name in ("weight", "running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name in ("bias", "running_mean"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model


def _cnn() -> nn.Module:
    return _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), BNAct(8, nn.SiLU(), nn.Dropout(0.2)),
                                    nn.Conv2d(8, 8, 3), LayerNorm2d(8), nn.Conv2d(8, 4, 1),
                                    BNAct(4, nn.ReLU()))).eval()


X = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------- norm+act, LN2d
def test_the_issue_case_fold_keeps_the_activation() -> None:
    m = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), BNAct(8, nn.ReLU()))).eval()
    f = fold(m)
    assert isinstance(f[1], NormAct) and isinstance(f[1].norm, nn.Identity)
    assert f(X).min() >= 0 and _rel(f(X), m(X)) <= 1e-5
    row = f.fold_report.layers[0]
    assert (row.into, row.tail, row.verified) == ("0", ("act=ReLU",), True) and row.max_diff < 1e-12
    assert "then act=ReLU kept" in str(f.fold_report)


def test_convert_keeps_act_and_drop_and_verifies() -> None:
    model = _cnn()
    silu = model[1].act
    y = model(X)
    out = convert(model, "bn", match=BNAct, inplace=True)
    assert isinstance(out[1], NormAct) and out[1].tail_names == ("drop", "act")
    assert out[1].act is silu and isinstance(out[1].drop, nn.Dropout)  # moved, not copied
    assert isinstance(out[1].norm, nk.BatchNorm) and type(out[3]) is LayerNorm2d
    assert type(out[5]) is NormAct and out[5].tail_names == ("act",)
    r = out.conversion_report
    assert r["1"].tail == ("drop=Dropout", "act=SiLU") and r["1"].recognized == "BN + drop, act (probe)"
    assert all(row.equivalent and row.verified and row.max_diff <= 1e-5 for row in r)
    assert _rel(out(X), y) <= 1e-5


def test_layer_norm_2d_to_ln_is_channels_first_per_position() -> None:
    model = _cnn()
    out = convert(model, "ln", match=LayerNorm2d)
    layer = out[3]
    assert layer.channel_axis == 1 and type(layer.nap).__name__ == "Position"
    assert torch.equal(layer.weight, model[3].weight)
    assert _rel(out(X), model(X)) <= 1e-5


def test_convert_to_another_kind_keeps_the_tail_and_says_it_is_not_the_same() -> None:
    model = _cnn()
    out = convert(model, "gn:num_groups=2", match=BNAct)
    r = out.conversion_report
    assert [row.path for row in r] == ["1", "5"]
    assert r["5"].tail == ("act=ReLU",) and out(X).min() >= 0  # the ReLU is still last
    assert not r["1"].equivalent and r["1"].verified is False and r["1"].max_diff > 1e-2
    assert "no (max|Δ|" in str(r)


def test_fold_of_a_whole_norm_act_model() -> None:
    model = _cnn()
    f = fold(model, strict=False)
    assert f.fold_report.folded == ["1", "5"] and f.fold_report.left == ["3"]
    assert "normalizes each sample with its own statistics (LN over dim 1)" in \
        f.fold_report.layers[1].reason
    assert _rel(f(X), model(X)) <= 1e-5


def test_frozen_batch_norm_folds_in_any_mode_and_converts() -> None:
    """torchvision's FrozenBatchNorm2d (statistics as buffers, never updated) is a fixed affine
    map: it folds even in train mode; to "bn" it keeps its tensors but is not the same layer
    in training (equivalent=False), though the evaluation outputs agree (verified)."""
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU()))
    f = fold(model.train())
    assert f.fold_report.folded == ["1"] and _rel(f(X), model(X)) <= 1e-5
    out = convert(model.eval(), "bn")
    row = out.conversion_report["1"]
    assert row.recognized == "frozen BN (probe)" and not row.equivalent and row.verified
    assert row.kept == ("weight", "bias", "running_mean", "running_var")
    assert _rel(out(X), model(X)) <= 1e-5


def test_unrecognised_subclass_is_refused_not_replaced() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DoubledBN(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"1: layer '1' \(DoubledBN\) has its own forward"):
        out = convert(model, "gn:num_groups=2")
    assert type(out[1]) is DoubledBN and [row.path for row in out.conversion_report] == ["3"]
    with pytest.raises(ConfigError, match=r"layer '1' \(DoubledBN\).*matches none of: BN"):
        convert(model, "gn:num_groups=2", match=DoubledBN)
    f = fold(model.eval(), strict=False)
    assert f.fold_report.folded == ["3"] and type(f[1]) is DoubledBN
    assert "matches none of" in f.fold_report.layers[0].reason


def test_a_replacement_meant_to_be_equivalent_is_checked(monkeypatch) -> None:
    """The report's "equivalent" is measured: a transfer that loses the running statistics (a
    simulated bug) makes BN → "bn" raise, the model untouched."""
    model = _cnn()
    convert_module = importlib.import_module("normkit.apply.convert")
    real = convert_module._transfer

    def lossy(old, new, c, offset=0.0):
        kept = real(old, new, c, offset)
        if hasattr(new, "running_var"):
            new.running_var.fill_(1.0)
        return kept

    monkeypatch.setattr(convert_module, "_transfer", lossy)
    with pytest.raises(ConfigError, match=r"converting layer '1' \(BNAct, BN \+ drop, act\) to "
                                          r"BatchNorm.*should keep its output.*differ by"):
        convert(model, "bn", inplace=True)
    assert type(model[1]) is BNAct


# ------------------------------------------------------------------- RMSNorm look-alikes
class TinyDecoder(nn.Module):
    def __init__(self, norm: type, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.layers = nn.ModuleList(nn.ModuleDict({"norm": norm(d), "mlp": nn.Linear(d, d)})
                                    for _ in range(2))
        self.final = norm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = h + layer["mlp"](layer["norm"](h))
        return self.final(h)


IDS = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", [LlamaStyleRMSNorm, GemmaStyleRMSNorm])
def test_hf_style_rms_norms_are_converted_never_an_empty_report(norm: type) -> None:
    model = _randomize(TinyDecoder(norm))
    out = convert(model, "rms_norm")
    r = out.conversion_report
    assert [row.path for row in r] == ["layers.0.norm", "layers.1.norm", "final"]
    layer = out.final
    assert isinstance(layer, nk.RMSNorm) and layer.channel_axis == -1 and layer.eps == 1e-6
    offset = 1.0 if norm is GemmaStyleRMSNorm else 0.0
    torch.testing.assert_close(layer.weight, model.final.weight + offset, rtol=0, atol=0)
    assert r["final"].kept == (("weight←1+weight",) if offset else ("weight",))
    assert all(row.equivalent and row.verified for row in r)
    assert _rel(out(IDS), model(IDS)) <= 1e-5
    ln = convert(model, "ln")  # another kind: converted, trained from there
    assert all(isinstance(ln.get_submodule(row.path), nk.LayerNorm) for row in r)
    assert all(not row.equivalent for row in ln.conversion_report)


def test_callable_target_gets_the_layers_the_layout_check_used_to_refuse() -> None:
    model = _cnn()
    out = convert(model, lambda c: nk.create("ln", c, over="channels"), match=LayerNorm2d)
    row = out.conversion_report["3"]
    assert row.equivalent and row.verified and _rel(out(X), model(X)) <= 1e-5
    wrong = convert(model, lambda c: nk.create("ln", c), match=LayerNorm2d)  # over C·H·W
    assert not wrong.conversion_report["3"].equivalent
    assert wrong.conversion_report["3"].verified is False
    rms = convert(TinyDecoder(LlamaStyleRMSNorm), lambda c: nn.RMSNorm(c, eps=1e-6))
    assert all(row.verified for row in rms.conversion_report)


# ------------------------------------------------------------------- timm, transformers
def test_efficientnet_b0_convert_and_fold_keep_every_silu() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomize(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    silu = sum(isinstance(m, nn.SiLU) for m in model.modules())
    assert silu == 49
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    bn = convert(model, "bn")
    assert sum(isinstance(m, nn.SiLU) for m in bn.modules()) == 49
    assert len(bn.conversion_report) == 49 and all(r.verified for r in bn.conversion_report)
    assert _rel(bn(x), y) <= 1e-5
    fresh = convert(timm.create_model("efficientnet_b0", num_classes=10), "bn")
    fresh.load_state_dict(model.state_dict())  # a timm checkpoint loads into the converted model
    assert torch.equal(fresh.eval()(x), bn(x))
    folded = fold(model)
    assert sum(isinstance(m, nn.SiLU) for m in folded.modules()) == 49
    assert len(folded.fold_report.folded) == 49
    assert _rel(folded(x), y) <= 1e-5


def _train_loss_falls(model: nn.Module, x: torch.Tensor, steps: int = 6) -> tuple[float, float]:
    t = torch.arange(x.shape[0]) % 5
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


@pytest.mark.parametrize("name, kw", [
    ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
])
def test_convnext_and_vit_convert_and_train(name: str, kw: dict) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kw)
    x = torch.randn(4, 3, 32, 32)
    same = convert(model.eval(), "ln")
    assert all(r.equivalent and r.verified for r in same.conversion_report)
    assert _rel(same(x), model(x)) <= 1e-5
    axes = {r.recognized.split(" (")[0] for r in same.conversion_report}
    assert axes == ({"LN over dim 1"} if name.startswith("convnext")  # conv_mlp: LayerNorm2d
                    else {"LN over the last dim"})
    for spec in ("ln", "rms_norm", "gn:num_groups=4"):
        out = convert(model, spec).train()
        assert out.conversion_report.refused == ()
        first, last = _train_loss_falls(out, x)
        assert last < first, (spec, first, last)


@pytest.mark.parametrize("family", ["llama", "gemma", "t5"])
def test_transformers_rms_norms(family: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=50, num_hidden_layers=2, num_attention_heads=2)
    if family == "t5":
        model = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    else:
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaModel),
               "gemma": (transformers.GemmaConfig, transformers.GemmaModel)}[family]
        model = cls[1](cls[0](hidden_size=16, intermediate_size=32, num_key_value_heads=2,
                              head_dim=8, **cfg))
    model = _randomize(model).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    y = model(input_ids=ids).last_hidden_state
    out = convert(model, "rms_norm")
    r = out.conversion_report
    assert len(r) == 5 and r.refused == ()  # 2 layers × 2 norms + the final norm
    assert all(row.equivalent and row.verified and "RMS over the last dim" in row.recognized
               for row in r)
    assert _rel(out(input_ids=ids).last_hidden_state, y) <= 1e-5
