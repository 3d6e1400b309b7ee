"""normkit.apply.fold: evaluation-mode normalizations folded into the Linear/Conv before them.

Outputs before and after are compared in float32 relative to the output's scale,
``max|Δ| ≤ 1e-5 · max|y|``: folding reorders the same arithmetic (``(M W) x`` instead of
``M (W x)``, products formed in float64 and rounded once to float32), so the difference is a few
float32 ulps amplified by the condition of the whitening matrices (≲ 10 here).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.apply.convert import is_normalization
from normkit.apply.fold import fold
from normkit.errors import ConfigError

Factory = Callable[[int], nn.Module]
NORMS: dict[str, Factory] = {
    "torch_bn": lambda c: nn.BatchNorm2d(c),
    "bn": lambda c: nk.create("bn", c),
    "batch_renorm": lambda c: nk.create("batch_renorm", c),
    "dbn": lambda c: nk.create("dbn", c, group_size=4),
    "dbn_cov": lambda c: nk.create("dbn", c, group_size=4, estimate="covariance"),
    "iternorm": lambda c: nk.create("iternorm", c, group_size=4),
    "cd_bw": lambda c: nk.create("cd_bw", c, group_size=4),
    "pca_bw_ragged": lambda c: nk.create("pca_bw", c, group_size=5),  # last group smaller
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _warm(model: nn.Module, make_x: Callable[[], torch.Tensor], steps: int = 4) -> nn.Module:
    """Random γ, β and running statistics away from their initial values, then eval."""
    with torch.no_grad():
        for m in model.modules():
            if is_normalization(m) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        model.train()
        for _ in range(steps):
            model(make_x())
    return model.eval()


def _conv_model(norm: Factory) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), norm(12), nn.ReLU(),
                         nn.Conv2d(12, 8, 3, bias=False), norm(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10), _bn1d(norm, 10))


def _bn1d(norm: Factory, c: int) -> nn.Module:
    return nn.BatchNorm1d(c) if norm is NORMS["torch_bn"] else norm(c)


@pytest.mark.parametrize("name", list(NORMS))
def test_fold_keeps_eval_outputs_and_removes_every_norm(name: str) -> None:
    torch.manual_seed(0)
    model = _warm(_conv_model(NORMS[name]), lambda: torch.randn(16, 3, 8, 8) * 2 + 1)
    x = torch.randn(8, 3, 8, 8)
    y = model(x)
    folded = fold(model)
    assert not any(is_normalization(m) for m in folded.modules())
    assert [type(m) for m in folded][1:5:3] == [nn.Identity, nn.Identity]
    assert folded[3].bias is not None  # created for the bias-free conv
    assert _rel_err(folded(x), y) <= 1e-5
    assert folded.fold_report.folded == ["1", "4", "8"] and folded.fold_report.adjacency == "fx"
    assert is_normalization(model[1])  # the original is untouched (inplace=False)


@pytest.mark.parametrize("name", ["bn", "dbn", "iternorm", "cd_bw"])
def test_fold_after_linear_layers(name: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), NORMS[name](16), nn.Tanh(), nn.Linear(16, 8),
                          NORMS[name](8))
    model = _warm(model, lambda: torch.randn(64, 6) * 3 - 1)
    x = torch.randn(32, 6)
    y = model(x)
    folded = fold(model, inplace=True)
    assert folded is model and not any(is_normalization(m) for m in folded.modules())
    assert _rel_err(folded(x), y) <= 1e-5


def test_fold_in_a_residual_network_with_fx() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nk.IterNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    torch.manual_seed(2)
    model = _warm(nn.Sequential(Block(), Block()), lambda: torch.randn(8, 8, 6, 6))
    x = torch.randn(4, 8, 6, 6)
    folded = fold(model)
    assert len(folded.fold_report.folded) == 4
    assert _rel_err(folded(x), model(x)) <= 1e-5


def test_grouped_conv_and_tracked_instance_norm() -> None:
    torch.manual_seed(3)
    ok = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nk.create("dbn", 8, group_size=4),
                       nn.Conv2d(8, 6, 1), nn.InstanceNorm2d(6, affine=True, track_running_stats=True))
    ok = _warm(ok, lambda: torch.randn(8, 4, 7, 7))
    x = torch.randn(2, 4, 7, 7)
    assert _rel_err(fold(ok)(x), ok(x)) <= 1e-5
    bad = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nk.create("dbn", 8, group_size=4)).eval()
    with pytest.raises(ConfigError, match=r"'1' \(DecorrelatedBatchNorm\): its whitening groups "
                                          r"of 4 channels mix outputs of different groups"):
        fold(bad)


# ----------------------------------------------------------------------------- refusals
class _Conditional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nk.create("cbn", 4, num_classes=3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x), y)


def test_conditional_norm_is_refused_with_path_and_reason() -> None:
    with pytest.raises(ConfigError, match=r"'norm' \(ConditionalBatchNorm\): .*depend on each "
                                          r"input or condition"):
        fold(_Conditional().eval())


def test_training_mode_and_per_sample_norms_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"'1' \(BatchNorm2d\): it is in training mode.*eval"):
        fold(model)
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1),
                       nk.create("ln", 4)).eval()
    with pytest.raises(ConfigError, match=r"cannot fold 2 normalization layer\(s\): '1' "
                                          r"\(GroupNorm\): GroupNorm normalizes each sample with "
                                          r"its own statistics.*'3' \(LayerNorm\): LayerNorm has no "
                                          r"running statistics.*strict=False"):
        fold(gn)


def test_adjacency_refusals_and_strict_false() -> None:
    class Twice(nn.Module):  # the conv's output also feeds the residual
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.bn(h) + h

    with pytest.raises(ConfigError, match=r"'bn' \(BatchNorm2d\): the output of 'conv' is used "
                                          r"elsewhere"):
        fold(Twice().eval())
    pre = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                        nn.BatchNorm2d(4)).eval()
    with pytest.raises(ConfigError, match=r"'2' \(BatchNorm2d\): its input is not the output of "
                                          r"a Linear/Conv"):
        fold(pre)
    x = torch.randn(2, 3, 5, 5)
    part = fold(pre, strict=False)
    assert part.fold_report.folded == ["4"] and part.fold_report.left == ["2"]
    assert isinstance(part[2], nn.BatchNorm2d) and isinstance(part[4], nn.Identity)
    assert "left: its input is not" in str(part.fold_report)
    assert _rel_err(part(x), pre(x)) <= 1e-5


def test_untraceable_model_falls_back_to_sequential_order() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nk.create("iternorm", 8), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.body(x)

    torch.manual_seed(4)
    model = _warm(Dynamic(), lambda: torch.randn(8, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    folded = fold(model)
    assert folded.fold_report.adjacency == "sequential"
    assert isinstance(folded.body[1], nn.Identity)
    assert _rel_err(folded(x), model(x)) <= 1e-5


def test_shared_and_twice_called_modules_say_what_is_wrong() -> None:
    """Both are in eval mode: the message names the sharing / the calls and their fix, not
    "put the model in eval mode"."""
    shared = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared).eval()
    with pytest.raises(ConfigError) as info:
        fold(net)
    msg = str(info.value)
    assert "'1' (BatchNorm2d): the same module is registered at ['1', '3'] (shared)" in msg
    assert "copy.deepcopy" in msg and "eval" not in msg

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv2(self.bn(self.conv1(x))))

    with pytest.raises(ConfigError) as info:
        fold(Twice().eval())
    msg = str(info.value)
    assert "'bn' (BatchNorm2d): it is called 2 times in forward()" in msg
    assert "give each call its own module" in msg and "eval" not in msg


def test_a_fold_that_would_change_the_output_is_not_counted(monkeypatch) -> None:
    """The report's folds are measured: a wrong affine map (a simulated bug) leaves the layer."""
    import importlib

    fold_module = importlib.import_module("normkit.apply.fold")
    real = fold_module._affine_map

    def off_by_one(m, rec):
        a, b = real(m, rec)
        return a, b + 1

    monkeypatch.setattr(fold_module, "_affine_map", off_by_one)
    model = _warm(_conv_model(NORMS["torch_bn"]), lambda: torch.randn(16, 3, 8, 8))
    part = fold(model, strict=False)
    assert part.fold_report.folded == [] and part.fold_report.left == ["1", "4", "8"]
    assert "would change the output by max|Δ| = 1" in part.fold_report.layers[0].reason
    assert is_normalization(part[1])
