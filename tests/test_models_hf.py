"""Hugging Face models built offline from configs: normkit layers inside them by hand (HF's
forward, channels-last ``(B, T, C)``, bfloat16), and ``convert`` of Llama's RMSNorm to
``rms_norm`` (exact) then a few AdamW steps. The family × column table is tests/test_models.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models_table as mt
import normkit as nk
from models_util import import_or_fail


@pytest.fixture(autouse=True)
def _transformers() -> None:
    import_or_fail("transformers")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return mt.FAMILIES["hf_llama"].build(None).eval()


def test_llama_convert_to_rms_norm_is_exact_then_trains() -> None:
    ref = _llama()
    new = nk.convert(ref, to="rms_norm")
    rows = list(new.conversion_report)
    assert len(rows) == 5 and all(type(m).__name__ == "RMSNorm" and m.channel_axis == -1
                                  for p, m in new.named_modules() if p.endswith("norm"))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert mt.rel_diff(new(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5
    losses = mt.train(mt.FAMILIES["hf_llama"], new)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normkit_layers_by_hand_inside_llama(dtype: torch.dtype) -> None:
    """Replace every LlamaRMSNorm by ``nk.RMSNorm(C, channel_axis=-1, eps=…)`` with its weight:
    HF's forward runs on (B, T, C) hidden states; same logits in float32, close in bfloat16."""
    ref = _llama().to(dtype)
    mine = _llama().to(dtype)
    for path, m in list(mine.named_modules()):
        if type(m).__name__ == "LlamaRMSNorm":
            new = nk.RMSNorm(m.weight.numel(), channel_axis=-1, eps=m.variance_epsilon,
                             dtype=dtype)
            new.weight = m.weight
            parent, _, name = path.rpartition(".")
            setattr(mine.get_submodule(parent), name, new)
    assert not any(type(m).__name__ == "LlamaRMSNorm" for m in mine.modules())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        a, b = mine(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.dtype == dtype
    # float32: both compute x·rsqrt(mean x² + ε) in float32; bfloat16: rounding of the output
    assert mt.rel_diff(a.float(), b.float()) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_bert_convert_to_ln_is_exact() -> None:
    fam = mt.FAMILIES["hf_bert"]
    ref = mt.base("hf_bert")
    new = nk.convert(ref, to="ln")  # torch nn.LayerNorm → normkit LayerNorm(channel_axis=-1)
    assert all(isinstance(m, nk.LayerNorm) and m.channel_axis == -1
               for p, m in new.named_modules() if p.endswith("LayerNorm"))
    assert mt.eval_rel(fam, new, ref) <= 1e-5


@pytest.mark.parametrize(("family", "spec"), [("hf_llama", "ln"), ("hf_bert", "rms_norm"),
                                              ("hf_vit", "rms_norm")])
def test_convert_to_the_other_kind_trains(family: str, spec: str) -> None:
    """RMS ↔ LN is not the same function (the table's gn/iternorm/dbn columns cover the rest):
    every norm converted, and the loss falls."""
    fam, ref = mt.FAMILIES[family], mt.base(family)
    new = mt.convert(family, spec, ref.train())
    assert len(new.conversion_report) == 5
    losses = mt.train(fam, new)
    assert losses[-1] < losses[0], losses
