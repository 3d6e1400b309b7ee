"""normkit.apply.convert: model surgery on a plain torch ResNet-18-style model (built here).

Tensors carried over are asserted *equal* (they are copied or reused, no arithmetic). Output
equivalences run in float32 with ~1e-6 tolerances: both sides compute the same formula in a
different reduction order (BN: torch's kernel both ways; DBN/Cholesky from diag(var): the
whitening of a diagonal covariance, exact to float32 round-off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit as nk
import normkit.methods.ibn  # noqa: F401  (registers "ibn")
from normkit.apply.convert import ConversionReport, convert, is_normalization
from normkit.errors import ConfigError, UnknownMethodError
from normkit.functional.whiten import whitening_matrix


# ------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (stem + 4 stages of 2 BasicBlocks), narrow for speed."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 16, 32), classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def _trained(seed: int = 0, dtype: torch.dtype = torch.float32) -> ResNet18:
    """A ResNet with random γ, β and running statistics away from their initial values."""
    torch.manual_seed(seed)
    model = ResNet18().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12, dtype=dtype) * 2 + 0.5)
    return model.eval()


def _bn_paths(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ conversions
def test_resnet_to_gn_keeps_affine_and_reports_every_layer() -> None:
    model = _trained()
    old = _bn_paths(model)
    assert len(old) == 20  # stem + 8 blocks × 2 + 3 downsamples
    gn = convert(model, "gn:num_groups=4")
    report = gn.conversion_report
    assert isinstance(report, ConversionReport) and [r.path for r in report] == list(old)
    for path, bn in old.items():
        new = gn.get_submodule(path)
        assert isinstance(new, nk.GroupNorm) and new.num_groups == 4
        assert torch.equal(new.weight, bn.weight) and torch.equal(new.bias, bn.bias)
        row = report[path]
        assert row.old == "BatchNorm2d" and row.kept == ("weight", "bias")
        assert dict(row.dropped) == {k: "GroupNorm keeps no running statistics"
                                     for k in ("running_mean", "running_var", "num_batches_tracked")}
        assert not new.training  # eval mode carried over
    text = str(report)
    assert all(p in text for p in old) and "GroupNorm(" in text
    assert all(isinstance(m, nn.BatchNorm2d) for m in _bn_paths(model).values())  # not inplace
    assert gn(X).shape == (4, 5)


def test_resnet_to_ln_is_layer_norm_over_channels_and_positions() -> None:
    """On (N, C, H, W), "ln" is the book's LN: statistics over C·H·W per sample (= GN(1)), with a
    per-channel γ, β — so every BN's γ, β maps."""
    model = _trained()
    ln = convert(model, "ln")
    layer = ln.get_submodule("layer2.0.bn1")
    bn = model.get_submodule("layer2.0.bn1")
    assert isinstance(layer, nk.LayerNorm)
    assert torch.equal(layer.weight, bn.weight) and torch.equal(layer.bias, bn.bias)
    h = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(layer(h), F.group_norm(h, 1, bn.weight, bn.bias, 1e-5),
                               rtol=1e-6, atol=1e-6)
    assert len(ln.conversion_report) == 20


@pytest.mark.parametrize("spec, method", [("dbn:group_size=4", "zca"),
                                          ("cd_bw:group_size=4", "cholesky")])
def test_bn_to_exact_whitening_keeps_the_evaluation_output(spec: str, method: str) -> None:
    """running_matrix ← W(diag(running_var)) = diag(1/√(σ² + ε)) for ZCA and Cholesky: the
    converted model computes exactly BN's evaluation map."""
    model = _trained()
    out = convert(model, spec)
    for path, bn in _bn_paths(model).items():
        new = out.get_submodule(path)
        assert torch.equal(new.running_mean, bn.running_mean)
        assert torch.equal(new.weight, bn.weight) and torch.equal(new.bias, bn.bias)
        diag = torch.diagonal(new.running_matrix, dim1=-2, dim2=-1).reshape(-1)
        torch.testing.assert_close(diag, torch.rsqrt(bn.running_var + bn.eps), rtol=1e-6, atol=0)
        off = new.running_matrix - torch.diag_embed(torch.diagonal(new.running_matrix, 0, -2, -1))
        assert off.abs().max() == 0
        assert "running_matrix←W(diag(running_var))" in out.conversion_report[path].kept
    torch.testing.assert_close(out(X), model(X), rtol=1e-5, atol=1e-5)


def test_resnet_to_iternorm_and_back_to_bn() -> None:
    model = _trained()
    it = convert(model, "iternorm:group_size=4")
    for path, bn in _bn_paths(model).items():
        new = it.get_submodule(path)
        assert isinstance(new, nk.IterNorm)
        assert torch.equal(new.weight, bn.weight) and torch.equal(new.bias, bn.bias)
        assert torch.equal(new.running_mean, bn.running_mean)
        assert int(new.num_batches_tracked) == int(bn.num_batches_tracked) == 3
        cov = torch.diag_embed(bn.running_var.double().reshape(-1, 4))
        ref = whitening_matrix(cov, "newton", eps=1e-5, iterations=5)
        torch.testing.assert_close(new.running_matrix, ref.float(), rtol=1e-6, atol=1e-7)
    back = convert(it, "bn")
    for path, bn in _bn_paths(model).items():
        new = back.get_submodule(path)
        assert isinstance(new, nk.BatchNorm)
        for name in ("weight", "bias", "running_mean"):
            assert torch.equal(getattr(new, name), getattr(bn, name)), (path, name)
        assert "recalibrate" in dict(back.conversion_report[path].dropped)["running_matrix"]
        assert "running_var" in back.conversion_report[path].fresh


def test_bn_round_trip_through_covariance_whitening_keeps_every_statistic() -> None:
    """With estimate='covariance' the variances survive: running_cov = diag(running_var) and
    back running_var = diag(running_cov)."""
    model = _trained()
    there = convert(model, "iternorm:group_size=4,estimate='covariance'")
    back = convert(there, nn.BatchNorm2d)
    for path, bn in _bn_paths(model).items():
        new = back.get_submodule(path)
        assert type(new) is nn.BatchNorm2d
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(new, name), getattr(bn, name)), (path, name)
        assert "running_var←diag(running_cov)" in back.conversion_report[path].kept
    torch.testing.assert_close(back(X), model(X), rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True])
def test_torch_bn_to_normkit_bn_is_equivalent(training: bool) -> None:
    model = _trained(dtype=torch.float64).train(training)
    ours = convert(model, "bn")
    assert all(type(m) is nk.BatchNorm and m.training == training
               for p, m in ours.named_modules() if p in _bn_paths(model))
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    x = X.double()
    torch.testing.assert_close(ours(x), model(x), rtol=1e-9, atol=1e-10)
    for path, bn in _bn_paths(model).items():  # training forwards update both alike
        torch.testing.assert_close(ours.get_submodule(path).running_var, bn.running_var,
                                   rtol=1e-9, atol=1e-10)


def test_subclass_of_batchnorm_is_converted() -> None:
    class MyBN(nn.BatchNorm2d):  # what other libraries do
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyBN(8), nn.ReLU())
    out = convert(model, "gn:num_groups=2")
    assert isinstance(out[1], nk.GroupNorm) and out.conversion_report["1"].old == "MyBN"


def test_ibn_through_convert() -> None:
    model = _trained()
    out = convert(model, "ibn:ratio=0.5", match="layer1.*")
    paths = [r.path for r in out.conversion_report]
    assert paths == [p for p in _bn_paths(model) if p.startswith("layer1.")]
    layer, bn = out.get_submodule("layer1.0.bn1"), model.get_submodule("layer1.0.bn1")
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(layer, name), getattr(bn, name))
    h = torch.randn(3, 8, 5, 5)
    ref = torch.cat([F.instance_norm(h[:, :4], weight=bn.weight[:4], bias=bn.bias[:4]),
                     bn(h)[:, 4:]], 1)
    torch.testing.assert_close(layer(h), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(out.get_submodule("layer2.0.bn1"), nn.BatchNorm2d)


# ----------------------------------------------------------------------------- matching
def test_match_by_glob_type_and_callable() -> None:
    model = _trained()
    by_glob = convert(model, "gn:num_groups=4", match="layer3.*")
    assert {r.path for r in by_glob.conversion_report} == {
        p for p in _bn_paths(model) if p.startswith("layer3.")}
    by_call = convert(model, "gn:num_groups=4", match=lambda p, m: p.endswith("bn2"))
    assert len(by_call.conversion_report) == 8
    assert isinstance(by_call.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)
    by_type = convert(model, "bn", match=nn.BatchNorm2d)
    assert len(by_type.conversion_report) == 20


def test_explicit_type_match_on_a_non_normalization_layer_errors() -> None:
    model = _trained()
    with pytest.raises(ConfigError, match=r"selects 'conv1' \(Conv2d\), which is not a "
                                          r"normalization layer.*narrow match="):
        convert(model, "bn", match=(nn.BatchNorm2d, nn.Conv2d))
    with pytest.raises(ConfigError, match=r"selects no normalization layer.*'layer1.0.bn1'"):
        convert(model, "bn", match="nothing.*")


# ------------------------------------------------------------------------- errors, state
def test_unconvertible_layer_names_its_path_and_nothing_changes_inplace() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 12, 3),
                          nn.BatchNorm2d(12))
    params = list(model.parameters())
    with pytest.raises(ConfigError, match=r"cannot convert layer '3' .*12 channels.*"
                                          r"num_features \(12\) must be divisible by num_groups "
                                          r"\(8\).*match="):
        convert(model, "gn:num_groups=8", inplace=True)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.BatchNorm2d)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    with pytest.raises(UnknownMethodError, match="unknown normalization method 'gnn'"):
        convert(model, "gnn")


def test_layer_norm_over_more_than_channels_is_refused_with_its_path() -> None:
    """No registry method has a (C, H, W) γ, β: left as it is with a warning and a report entry
    (match=None), an error when selected explicitly."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm((4, 6, 6)))
    with pytest.warns(UserWarning, match=r"1 module\(s\) that look like normalization.*2: layer "
                                         r"'2' \(LayerNorm\): it normalizes over \(4, 6, 6\)"):
        out = convert(model, "ln")
    assert type(out[2]) is nn.LayerNorm and isinstance(out[1], nk.LayerNorm)
    assert [r.path for r in out.conversion_report] == ["1"]
    assert "more than the channel axis" in dict(out.conversion_report.refused)["2"]
    assert "refused 2: layer '2'" in str(out.conversion_report)
    with pytest.raises(ConfigError, match=r"layer '2' .*normalizes over \(4, 6, 6\), more than "
                                          r"the channel axis.*Fix"):
        convert(model, "ln", match=nn.LayerNorm)


def test_channels_last_layer_norm_maps_to_channel_axis_minus_one() -> None:
    """torch LayerNorm(C)/RMSNorm(C) on (B, T, C): the replacement normalizes the last axis."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.RMSNorm(16))
    with torch.no_grad():
        for m in (model[1], model[3]):
            m.weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    out = convert(model, "ln", match=nn.LayerNorm)
    assert out[1].channel_axis == -1
    assert torch.equal(out[1].weight, model[1].weight) and torch.equal(out[1].bias, model[1].bias)
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    rms = convert(model, "rms_norm", match=nn.RMSNorm)
    assert rms[3].channel_axis == -1 and torch.equal(rms[3].weight, model[3].weight)
    torch.testing.assert_close(rms(x), model(x), rtol=1e-5, atol=1e-5)


def test_inplace_semantics_and_shared_layers() -> None:
    model = _trained()
    copy_ = convert(model, "bn")
    assert copy_ is not model and isinstance(model.bn1, nn.BatchNorm2d)
    assert copy_.bn1.weight is not model.bn1.weight
    weight = model.bn1.weight
    same = convert(model, "bn", inplace=True)
    assert same is model and isinstance(model.bn1, nk.BatchNorm)
    assert model.bn1.weight is weight  # the same Parameter: an optimizer holding it still works
    shared = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    out = convert(net, "gn:num_groups=2")
    assert out[1] is out[3] and isinstance(out[1], nk.GroupNorm)
    assert [r.path for r in out.conversion_report] == ["1", "3"]


def test_callable_target_and_root_layer() -> None:
    model = _trained(dtype=torch.float64)
    out = convert(model, lambda c: nn.GroupNorm(2, c), match="layer4.*")
    layer = out.get_submodule("layer4.1.bn2")
    assert type(layer) is nn.GroupNorm and layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, model.get_submodule("layer4.1.bn2").weight)
    root = convert(nn.BatchNorm2d(4).eval(), "bn")
    assert isinstance(root, nk.BatchNorm) and not root.training
    assert not any(is_normalization(m) and isinstance(m, nn.BatchNorm2d) for m in root.modules())


@pytest.mark.parametrize("old, spec", [
    (lambda: nn.BatchNorm2d(4, track_running_stats=False), "bn"),  # batch statistics in eval too
    (lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), "in"),  # running in eval
    (lambda: nn.InstanceNorm2d(4), "in"),
])
def test_same_kind_keeps_track_running_stats_and_is_verified(old, spec: str) -> None:
    torch.manual_seed(0)
    layer = old()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    model(torch.randn(8, 3, 5, 5) * 2 + 1)  # running statistics (where kept) away from init
    model.eval()
    out = convert(model, spec)
    row = out.conversion_report["1"]
    assert out[1].track_running_stats == layer.track_running_stats
    assert f"track_running_stats={layer.track_running_stats}" in row.new
    assert row.equivalent and row.verified and row.max_diff <= 1e-5
    x = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
