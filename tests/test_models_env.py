"""The integration-test environment works: timm, torchvision and transformers import beside the
CPU torch and their models, built from configs (no weights), run forward and backward on CPU.

Skipped where the libraries are missing; failed in CI (``NORMKIT_REQUIRE_MODELS=1`` after
``.ci/install-integration``). See ``tests/models_util.py``.
"""

from __future__ import annotations

import pytest
import torch

from models_util import import_or_fail


@pytest.mark.models
def test_timm_efficientnet_b0_from_config_runs_on_cpu():
    timm = import_or_fail("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # timm's BN+act
    x = torch.randn(3, 3, 64, 64)

    model.train()
    y = model(x)
    assert y.shape == (3, 10)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()  # running statistics: each sample's output is independent of the others
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(model(x[1:2]), y[1:2], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(y).all()


@pytest.mark.models("transformers")
def test_tiny_llama_from_config_runs_on_cpu_and_is_causal():
    transformers = import_or_fail("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # an RMSNorm before attention and before the MLP in each layer, and one final
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * cfg.num_hidden_layers + 1

    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        other = model(input_ids=changed).logits
    assert logits.shape == (2, 12, cfg.vocab_size) and torch.isfinite(logits).all()
    # causal: a change at the last position moves only the last position's logits
    torch.testing.assert_close(other[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other[:, -1], logits[:, -1])
