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
    a, b = a.detach(), b.detach()
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


# --------------------------------------------------------------------------- convert, bias=False
@pytest.mark.parametrize("make, spec, shape", [
    (lambda: nn.BatchNorm2d(8, bias=False), "bn", (6, 8, 5, 5)),
    (lambda: nn.GroupNorm(2, 8, bias=False), "gn:num_groups=2", (6, 8, 5, 5)),
    (lambda: nn.InstanceNorm2d(8, affine=True, bias=False, track_running_stats=True), "in",
     (6, 8, 5, 5)),
    (lambda: nn.LayerNorm(8, bias=False), "ln", (6, 3, 8)),
    (lambda: nk.BatchNorm(8, bias=False), "gn:num_groups=4", (6, 8, 5, 5)),
], ids=["bn", "gn", "in", "ln", "nk_bn_to_gn"])
def test_convert_keeps_beta_absent(make, spec, shape) -> None:
    """``bias=False`` is inherited like ``affine``: γ carried over, β still absent."""
    x = torch.randn(*shape)
    model = _warm(nn.Sequential(make()), x)
    out = convert(model, spec)
    row = out.conversion_report["0"]
    assert out[0].bias is None and "bias" not in out[0].state_dict()
    assert "bias=False" in row.new and "weight" in row.kept and "bias" not in row.fresh
    assert out[0].weight is model[0].weight or torch.equal(out[0].weight, model[0].weight)
    if isinstance(model[0], nk.BatchNorm):  # BN → GN: another function, and said so
        assert not row.equivalent and row.verified is False
        return
    assert row.equivalent and row.verified  # the same kind: the same function
    _close(out(x), model(x))


def test_convert_to_a_method_without_bias_gives_beta_zero() -> None:
    """An absent β is 0: a target that has one starts there (``fresh``) and the output is kept
    exactly where the map is (BN → DBN: ``W(diag(σ²))`` is BN's scaling); the report says
    verified, and equivalent only where it is the same computation."""
    x = torch.randn(6, 8, 5, 5)
    model = _warm(nn.Sequential(nn.BatchNorm2d(8, bias=False)), x)
    out = convert(model, "dbn:group_size=4")
    row = out.conversion_report["0"]
    assert torch.equal(out[0].bias, torch.zeros(8)) and "bias" in row.fresh
    assert row.verified and not row.equivalent
    _close(out(x), model(x))
    same = convert(model, lambda c: nk.BatchNorm(c))  # a callable: β=0 where none was
    row = same.conversion_report["0"]
    assert "bias" in row.fresh and row.equivalent and row.verified


def test_convert_dropping_a_trained_beta_is_not_called_equivalent() -> None:
    """The other way round, β cannot be carried: the report says not equivalent and not verified
    (and convert does not raise as for a replacement meant to be the same function)."""
    x = torch.randn(6, 8, 5, 5)
    model = _warm(nn.Sequential(nn.BatchNorm2d(8)), x)
    out = convert(model, lambda c: nk.BatchNorm(c, bias=False))
    row = out.conversion_report["0"]
    assert [n for n, _ in row.dropped] == ["bias"]
    assert not row.equivalent and row.verified is False and row.max_diff > 0.1


# ------------------------------------------------------------- LN / RMS over several trailing dims
@pytest.mark.parametrize("make, spec, shape", [
    (lambda: nn.LayerNorm((4, 6, 6)), "ln", (3, 4, 6, 6)),
    (lambda: nn.LayerNorm([5, 8], bias=False), "ln", (3, 5, 8)),
    (lambda: nn.LayerNorm([5, 8], elementwise_affine=False), "layer_norm", (3, 5, 8)),
    (lambda: nn.RMSNorm([5, 8], eps=1e-6), "rms_norm", (3, 5, 8)),
], ids=["ln_chw", "ln_tc_nobias", "ln_tc_plain", "rms_tc"])
def test_convert_norm_over_several_dims_to_torch_form(make, spec, shape) -> None:
    x = torch.randn(*shape)
    model = _warm(nn.Sequential(make()), x)
    old = model[0]
    out = convert(model, spec)
    new, row = out[0], out.conversion_report["0"]
    assert isinstance(new, nk.LayerNorm if isinstance(old, nn.LayerNorm) else nk.RMSNorm)
    assert new.normalized_shape == old.normalized_shape and new.eps == old.eps
    assert new.state_dict().keys() == old.state_dict().keys()
    for k, v in old.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    assert row.new.startswith(f"{type(new).__name__}({list(old.normalized_shape)}")
    assert row.equivalent and row.verified
    assert f"over the last {len(old.normalized_shape)} dims" in row.recognized
    _close(out(x), model(x))
    r = recognize(old, "0")
    assert (r.kind, r.num_features, r.channel_axis, r.normalized_shape) == (
        "layer" if isinstance(old, nn.LayerNorm) else "rms", new.num_features, -1,
        old.normalized_shape)


def test_norm_over_several_dims_to_another_method_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm([3, 8]), nn.RMSNorm([3, 8]))
    for spec in ("rms_norm", "gn:num_groups=2", lambda c: nn.LayerNorm(c)):
        with pytest.warns(UserWarning, match=r"left as they are: 1: layer '1' \(LayerNorm\): it "
                                             r"normalizes over \(3, 8\), the last 2 dimensions"):
            out = convert(model, spec, match=None)
        assert type(out[1]) is nn.LayerNorm
        assert "only to='ln'" in dict(out.conversion_report.refused)["1"]
    with pytest.raises(ConfigError, match=r"cannot convert layer '2' \(RMSNorm\): it normalizes "
                                          r"over \(3, 8\).*only to='rms_norm'.*not 'ln'.*match="):
        convert(model, "ln", match=nn.RMSNorm)
    with pytest.raises(ConfigError, match=r"layer '1' \(LayerNorm\): it normalizes over \(3, 8\)"):
        layer_layout("1", model[1])  # no (C, channel_axis) layout to give
    folded = fold(model.eval(), strict=False)
    assert "LN over the last 2 dims (3, 8)" in folded.fold_report.layers[0].reason
