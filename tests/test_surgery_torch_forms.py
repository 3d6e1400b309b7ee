"""Model surgery (fold, convert) on torch's newer layer forms: ``bias=False`` (no β) on BN, GN, IN,
LN, and LayerNorm/RMSNorm over several trailing dimensions.

Outputs are compared in float32 relative to the output's scale (``1e-5·max|y|``, as the surgery's
own probe check): folding and conversion reorder the same arithmetic; a missing or wrong β, or a
wrong reduction axis, changes outputs by O(1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.apply.convert import convert, layer_layout
from normkit.apply.fold import fold
from normkit.apply.recognize import recognize
from normkit.errors import ConfigError

RTOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a - b).abs().max()) <= RTOL * float(b.abs().max())


def _warm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random γ (β where there is one) and running statistics away from their initial values."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 1 and "conv" not in name.lower():
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_()
    model.train()
    for _ in range(3):
        model(x * 2 + 1)
    return model.eval()


# ------------------------------------------------------------------------------ fold, bias=False
@pytest.mark.parametrize("norm", [
    lambda: nn.BatchNorm2d(8, bias=False),
    lambda: nn.InstanceNorm2d(8, affine=True, bias=False, track_running_stats=True),
    lambda: nk.BatchNorm(8, bias=False),
    lambda: nk.Normalization(8, nap=nk.nap.Batch(group_size=4), nop=nk.nop.Whiten(),
                             nrr=nk.nrr.Affine(bias=False)),
], ids=["torch_bn", "torch_in_tracked", "nk_bn", "nk_whitening"])
def test_fold_treats_a_missing_beta_as_zero(norm) -> None:
    x = torch.randn(6, 3, 7, 7)
    model = _warm(nn.Sequential(nn.Conv2d(3, 8, 3), norm(), nn.ReLU()), x)
    assert model[1].bias is None
    out = fold(model)
    assert isinstance(out[1], nn.Identity) and out.fold_report.folded == ["1"]
    assert out.fold_report.layers[0].verified  # fold's own float64 probe check
    _close(out(x), model(x))


def test_fold_bias_free_bn_after_bias_free_linear() -> None:
    """Neither the Linear nor the BN has a bias: the folded Linear gets one, ``−a·μ_run``."""
    x = torch.randn(16, 5)
    model = _warm(nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4, bias=False)), x)
    out = fold(model)
    assert out[0].bias is not None and isinstance(out[1], nn.Identity)
    _close(out(x), model(x))
