"""The model-integration table: model families × what normkit does to them.

Rows are model families built offline from configs (torchvision ResNet, timm ResNet / EfficientNet
/ RegNet / ConvNeXt / ViT, Hugging Face Llama / BERT / ViT), at tiny sizes. Columns:

=============  ===========================================================================
column         what the cell does and asserts
=============  ===========================================================================
norm_layer     the family's ``norm_layer=`` with a normkit method; trains (loss falls), and
               where the method is the default's function, loads the default model's
               state_dict (strict) and gives its eval output (≤ 1e-5 relative)
same           ``nk.convert`` to the kind the model has (bn / ln / rms_norm): eval output
               unchanged (≤ 1e-5 relative), then trains
gn, iternorm,  ``nk.convert`` to another method: trains
dbn
fold           ``nk.fold`` in eval: output unchanged (≤ 1e-5 relative), or a clear
               ``ConfigError`` where the model has nothing fixed to fold (LN / RMS only)
compile        the model converted to the same kind (normkit bn / ln / rms_norm) under
               ``torch.compile(fullgraph=True, backend="aot_eager")``: train and eval
               outputs equal to eager (≤ 1e-5 relative)
compile_       the same, converted to iternorm
iternorm
state_dict     the model converted to dbn, one step, ``torch.save`` → ``torch.load(
               weights_only=True)`` → a fresh conversion (strict): identical eval output
=============  ===========================================================================

Every convert cell also asserts that nothing changed silently: one report row per norm layer
of the model, and as many activation modules as before. The sync column (2 gloo processes) lives
in ``tests/test_models_sync.py``. :func:`run_cell` returns the figures; :func:`check` asserts.
``benchmarks/models_table.py`` prints the table.
"""

from __future__ import annotations

import copy
import functools
import importlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import normkit as nk

STEPS, LR, BATCH, REL_TOL = 4, 1e-3, 4, 1e-5
COLUMNS = ("norm_layer", "same", "gn", "iternorm", "dbn", "fold", "compile", "compile_iternorm",
           "state_dict")
SPECS = {"gn": "gn:num_groups=8", "iternorm": "iternorm:group_size=8", "dbn": "dbn:group_size=8"}
_NORM_NAME = re.compile(r"(Batch|Group|Layer|RMS|Rms)Norm")
_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)


@dataclass(frozen=True)
class Family:
    """One row: how to build the model (with an optional ``norm_layer=``), a batch, a loss and
    the output compared for exactness."""

    name: str
    requires: str  # the package the family needs
    build: Callable[[Any], nn.Module]  # build(norm_layer or None)
    same: str  # convert spec of the kind the model already has
    norm_layer: Callable[[], Any] | None = None  # the normkit norm_layer= (None: not taken)
    norm_layer_exact: bool = False  # it computes what the default does: state_dict + output
    kind: str = "image"  # "image" (N, 3, 32, 32) → 10 classes, "lm" tokens, "cls" tokens
    foldable: bool = True  # has a norm with fixed statistics after a conv/linear
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    """What a cell measured."""

    family: str
    column: str
    kind: str = ""  # "trains", "exact+trains", "exact", "raises"
    losses: tuple[float, ...] = ()
    rel: float | None = None  # max |Δ| / max |ref| of eval outputs
    layers: int | None = None  # layers converted / folded
    error: str = ""
    seconds: float = 0.0

    def figures(self) -> str:
        parts = []
        if self.rel is not None:
            parts.append(f"rel {self.rel:.1e}")
        if self.losses:
            parts.append(f"loss {self.losses[0]:.3f}→{self.losses[-1]:.3f}")
        if self.layers is not None:
            parts.append(f"{self.layers} layers")
        if self.error:
            parts.append(self.error[:60])
        return ", ".join(parts)


# ------------------------------------------------------------------------------ families
def _tv_resnet18(norm_layer: Any) -> nn.Module:
    import torchvision

    kw = {} if norm_layer is None else {"norm_layer": norm_layer}
    return torchvision.models.resnet18(num_classes=10, **kw)


def _timm(name: str, **extra: Any) -> Callable[[Any], nn.Module]:
    def build(norm_layer: Any) -> nn.Module:
        import timm

        kw = {} if norm_layer is None else {"norm_layer": norm_layer}
        return timm.create_model(name, pretrained=False, num_classes=10, **extra, **kw)

    return build


_HF_SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}


def _hf(kind: str) -> Callable[[Any], nn.Module]:
    def build(norm_layer: Any) -> nn.Module:
        import transformers as tf

        if kind == "llama":
            cfg = tf.LlamaConfig(**_HF_SIZE, num_key_value_heads=2, vocab_size=64,
                                 max_position_embeddings=64)
            return tf.LlamaForCausalLM(cfg)
        if kind == "bert":
            cfg = tf.BertConfig(**_HF_SIZE, vocab_size=64, max_position_embeddings=64,
                                num_labels=3)
            return tf.BertForSequenceClassification(cfg)
        cfg = tf.ViTConfig(**_HF_SIZE, image_size=32, patch_size=8, num_labels=10)
        return tf.ViTForImageClassification(cfg)

    return build


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("tv_resnet18", "torchvision", _tv_resnet18, "bn",
           lambda: nk.partial("bn"), norm_layer_exact=True),
    Family("timm_resnet26d", "timm", _timm("resnet26d"), "bn",
           lambda: nk.partial("gn", num_groups=8)),
    Family("timm_efficientnet_b0", "timm", _timm("efficientnet_b0"), "bn",
           lambda: nk.norm_act("iternorm", group_size=8, act_layer="silu")),
    Family("timm_regnetx_002", "timm", _timm("regnetx_002"), "bn",
           lambda: nk.norm_act("dbn", group_size=8, act_layer="relu")),
    Family("timm_convnext_atto", "timm", _timm("convnext_atto"), "ln:over='channels'",
           lambda: nk.partial("ln", over="channels", eps=1e-6), norm_layer_exact=True,
           foldable=False),
    Family("timm_vit_tiny", "timm", _timm("vit_tiny_patch16_224", img_size=32, depth=4), "ln",
           lambda: nk.partial("ln", channel_axis=-1, eps=1e-6), norm_layer_exact=True,
           foldable=False),
    Family("hf_llama", "transformers", _hf("llama"), "rms_norm", kind="lm", foldable=False),
    Family("hf_bert", "transformers", _hf("bert"), "ln", kind="cls", foldable=False),
    Family("hf_vit", "transformers", _hf("vit"), "ln", foldable=False),
]}


# compiling costs seconds per model on one core: these rows only
COMPILE_ROWS = {"compile": ("tv_resnet18", "timm_vit_tiny", "hf_llama", "hf_bert"),
                "compile_iternorm": ("hf_bert",)}


def cells() -> list[tuple[str, str]]:
    """Every (family, column) of the table (norm_layer only where the family takes one)."""
    return [(f, c) for f, fam in FAMILIES.items() for c in COLUMNS
            if (c != "norm_layer" or fam.norm_layer is not None)
            and (c not in COMPILE_ROWS or f in COMPILE_ROWS[c])]


# ------------------------------------------------------------------------- model plumbing
def batch(fam: Family, seed: int = 0) -> tuple[Any, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if fam.kind == "lm":
        ids = torch.randint(0, 64, (BATCH, 16), generator=g)
        return ids, ids
    if fam.kind == "cls":
        return torch.randint(0, 64, (BATCH, 16), generator=g), torch.randint(0, 3, (BATCH,),
                                                                               generator=g)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def output(fam: Family, model: nn.Module, x: Any) -> Tensor:
    if fam.requires != "transformers":
        return model(x)
    key = "pixel_values" if fam.kind == "image" else "input_ids"
    return model(**{key: x}).logits


def loss_of(fam: Family, model: nn.Module, x: Any, y: Tensor) -> Tensor:
    logits = output(fam, model, x)
    if fam.kind == "lm":  # next-token prediction
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           y[:, 1:].reshape(-1))
    return nn.functional.cross_entropy(logits, y)


def train(fam: Family, model: nn.Module, steps: int = STEPS, seed: int = 0) -> tuple[float, ...]:
    """AdamW on one fixed batch: the losses of each step."""
    torch.manual_seed(1)
    model.train()
    x, y = batch(fam, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        loss = loss_of(fam, model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return tuple(losses)


def rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def eval_rel(fam: Family, new: nn.Module, ref: nn.Module) -> float:
    x, _ = batch(fam, seed=2)
    return rel_diff(output(fam, new.eval(), x), output(fam, ref.eval(), x))


@functools.cache
def _base_state(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[name].build(None)
    # a few training steps (on another batch) so the running statistics are not (0, 1)
    train(FAMILIES[name], model, steps=2, seed=7)
    return model.eval()


def base(name: str) -> nn.Module:
    """The family's default model (trained two steps, eval mode), a fresh copy each call."""
    importlib.import_module(FAMILIES[name].requires)
    return copy.deepcopy(_base_state(name))


def norm_count(model: nn.Module) -> int:
    """Norm layers by class name, outermost only (a norm+act layer counts once)."""
    paths = [p for p, m in model.named_modules() if _NORM_NAME.search(type(m).__name__)
             and not isinstance(m, nk.NormAct)]
    return sum(not any(p.startswith(q + ".") for q in paths) for p in paths)


def act_count(model: nn.Module) -> int:
    return sum(isinstance(m, _ACTS) for m in model.modules())


def convert(name: str, spec: str, model: nn.Module | None = None) -> nn.Module:
    """``nk.convert`` of the base model to ``spec``, asserting that nothing changed silently."""
    model = base(name) if model is None else model
    out = nk.convert(model, to=spec)
    assert len(out.conversion_report) == norm_count(model), (
        f"converted {len(out.conversion_report)} of the {norm_count(model)} norm layers:\n"
        f"{out.conversion_report}")
    assert act_count(out) == act_count(model), (
        f"activations {act_count(model)} → {act_count(out)}: conversion dropped some")
    return out


# ---------------------------------------------------------------------------------- cells
def _norm_layer(fam: Family, r: Result) -> None:
    assert fam.norm_layer is not None
    torch.manual_seed(0)
    model = fam.build(fam.norm_layer())
    n = sum(isinstance(m, nk.Normalization) for m in model.modules())
    assert n == norm_count(base(fam.name)), (n, norm_count(base(fam.name)))
    r.layers = n
    if fam.norm_layer_exact:
        model.load_state_dict(base(fam.name).state_dict(), strict=True)
        r.rel = eval_rel(fam, model, base(fam.name))
    r.losses = train(fam, model)


def _same(fam: Family, r: Result) -> None:
    ref = base(fam.name)
    new = convert(fam.name, fam.same, ref)
    r.layers = len(new.conversion_report)
    r.rel = eval_rel(fam, new, ref)
    r.losses = train(fam, new)


def _other(fam: Family, r: Result) -> None:
    new = convert(fam.name, SPECS[r.column], base(fam.name).train())
    r.layers = len(new.conversion_report)
    r.losses = train(fam, new)


def _fold(fam: Family, r: Result) -> None:
    ref = base(fam.name)
    if not fam.foldable:
        try:
            nk.fold(ref)
        except nk.ConfigError as e:
            assert re.search(r"nothing fixed to fold", str(e)), str(e)
            r.error = "ConfigError: …" + str(e)[str(e).index("nothing fixed") - 40:][:60]
            return
        raise AssertionError("fold of a model with per-sample norms only did not refuse")
    new = nk.fold(ref)
    r.layers = len(new.fold_report.layers)
    r.rel = eval_rel(fam, new, ref)


def _compile(fam: Family, r: Result) -> None:
    torch._dynamo.reset()
    spec = SPECS["iternorm"] if r.column == "compile_iternorm" else fam.same
    eager = convert(fam.name, spec, base(fam.name).train())
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x, _ = batch(fam)
    torch.manual_seed(3)
    a = output(fam, eager.train(), x)
    torch.manual_seed(3)
    b = output(fam, fn.train(), x)
    rels = [rel_diff(b, a)]
    with torch.no_grad():
        rels.append(rel_diff(output(fam, fn.eval(), x), output(fam, eager.eval(), x)))
    r.rel = max(rels)
    torch._dynamo.reset()


def _state_dict(fam: Family, r: Result) -> None:
    model = convert(fam.name, SPECS["dbn"], base(fam.name).train())
    train(fam, model, steps=1)  # parameters and running statistics away from their initial values
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = convert(fam.name, SPECS["dbn"])
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    r.rel = eval_rel(fam, fresh, model)
    r.layers = len(model.conversion_report)


_CELLS = {"norm_layer": _norm_layer, "same": _same, "gn": _other, "iternorm": _other,
          "dbn": _other, "fold": _fold, "compile": _compile, "compile_iternorm": _compile,
          "state_dict": _state_dict}


def run_cell(family: str, column: str) -> Result:
    """Run one cell; its assertions raise (an ``AssertionError`` or the error it hit)."""
    fam = FAMILIES[family]
    r = Result(family, column)
    t = time.perf_counter()
    _CELLS[column](fam, r)
    r.seconds = time.perf_counter() - t
    check(r)
    return r


def check(r: Result) -> None:
    """The figures every cell must meet: exact maps within ``REL_TOL``, the loss falling."""
    if r.rel is not None:
        tol = 0.0 if r.column == "state_dict" else REL_TOL
        assert r.rel <= tol, f"{r.family}/{r.column}: eval outputs differ, rel {r.rel:.2e}"
    if r.losses:
        assert all(map(torch.isfinite, map(torch.tensor, r.losses))), r.losses
        assert r.losses[-1] < r.losses[0], f"{r.family}/{r.column}: loss did not fall {r.losses}"
    r.kind = ("raises" if r.error else
              "exact+trains" if r.rel is not None and r.losses and r.column != "state_dict" else
              "exact" if r.rel is not None else "trains")
