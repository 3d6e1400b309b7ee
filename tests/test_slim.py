"""Network slimming (normkit.apply.slim): γ-L1 penalty and hook, channel pruning that rebuilds
the neighbouring layers; removing channels whose γ is exactly 0 keeps the function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.apply.slim import SlimReport, add_gamma_l1, gamma_l1, is_slimmable, slim
from normkit.errors import ConfigError
from normkit.experiments.models import build_model

ATOL = 1e-5  # float32


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _settle(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few train-mode forwards so running statistics leave their initial values; eval."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


@torch.no_grad()
def _zero(bn: nn.Module, channels: list[int], beta: float | None = None) -> None:
    """γ = 0 on ``channels`` (β random in [-1, 1] unless given); other γ ∈ [0.5, 1.5]."""
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-1, 1)
    bn.weight[channels] = 0.0
    if beta is not None:
        bn.bias[channels] = beta


def mlp(bn: type = nn.BatchNorm1d) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 8), bn(8), nn.ReLU(), nn.Linear(8, 6), bn(6), nn.ReLU(),
                         nn.Linear(6, 3))


def test_mlp_zero_gamma_exact_and_param_count() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 5)
    net = _settle(mlp(), x)
    _zero(net[1], [0, 3, 5])          # β ≠ 0: act(β)·W folded into the next Linear's bias
    _zero(net[4], [2, 4])
    small, report = slim(net, 5 / 14, example_input=x)
    assert isinstance(report, SlimReport) and report.removed == 5 and report.threshold == 0.0
    assert [small[i].weight.shape for i in (0, 3, 6)] == [(5, 5), (4, 5), (3, 4)]
    assert small[1].num_features == 5 and small[1].running_mean.shape == (5,)
    torch.testing.assert_close(small(x), net(x), atol=ATOL, rtol=0)
    # Linear(5,8)->(5,5): 3·6; BN: 3·2; Linear(8,6)->(5,4): 3·6 + 2·(5+1); BN: 2·2; Linear 2·3
    expected = 3 * 6 + 3 * 2 + 3 * 6 + 2 * 6 + 2 * 2 + 2 * 3
    assert report.params_before - report.params_after == expected == _count(net) - _count(small)
    assert report.inexact == () and _count(net) == report.params_before


def test_mlp_beta_zero_without_compensation() -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 5)
    net = _settle(mlp(), x)
    _zero(net[1], [1, 2], beta=0.0)
    _zero(net[4], [0], beta=-0.7)     # relu(β) = 0: nothing to fold either
    small, _ = slim(net, 3 / 14, example_input=x, compensate=False)
    torch.testing.assert_close(small(x), net(x), atol=ATOL, rtol=0)


def conv_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 4))


def test_conv_flatten_linear_exact_and_param_count() -> None:
    torch.manual_seed(2)
    x = torch.randn(8, 3, 6, 6)
    net = _settle(conv_net(), x)
    _zero(net[1], [0, 5], beta=0.0)    # before a zero-padded conv: exact only with β = 0
    _zero(net[4], [1, 2, 3])           # before flatten → Linear: exact fold of the 9 columns
    small, report = slim(net, 5 / 14, example_input=x)
    assert small[0].out_channels == 6 and small[3].weight.shape == (3, 6, 3, 3)
    assert small[8].weight.shape == (4, 27)
    torch.testing.assert_close(small(x), net(x), atol=ATOL, rtol=0)
    expected = (2 * (27 + 1) + 2 * 2 + 2 * 6 * 9             # conv1 rows, BN, conv2 columns
                + 3 * (6 * 9 + 1) + 3 * 2 + 3 * 9 * 4)         # conv2 rows, BN, Linear columns
    assert _count(net) - _count(small) == expected == report.params_before - report.params_after
    assert report.inexact == ()


def test_conv_global_pool_linear_nonzero_beta_exact() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.GELU(), nn.Conv2d(6, 5, 3),
                        nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(5, 3))
    x = torch.randn(8, 2, 9, 9)
    net = _settle(net, x)
    _zero(net[1], [2])                 # unpadded conv consumer: the fold is exact
    _zero(net[4], [0, 4])              # global pool → Linear
    small, report = slim(net, 3 / 11, example_input=x)
    assert (small[3].in_channels, small[8].in_features) == (5, 3)
    torch.testing.assert_close(small(x), net(x), atol=ATOL, rtol=0)
    assert report.inexact == ()


def test_zero_padded_conv_fold_exact_in_the_interior() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1)).eval()
    _zero(net[1], [1], beta=0.8)
    x = torch.randn(2, 2, 7, 7)
    small, report = slim(net, 0.25, example_input=x)
    assert report.inexact == ("3",)
    torch.testing.assert_close(small(x)[..., 1:-1, 1:-1], net(x)[..., 1:-1, 1:-1], atol=ATOL,
                               rtol=0)
    assert (small(x) - net(x)).abs()[..., 0, :].max() > 1e-3  # the border differs (documented)


def test_bias_free_consumer_folds_into_next_bn() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv1d(2, 6, 3, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                        nn.Conv1d(6, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Flatten(2), MeanLast(), nn.Linear(4, 2))
    x = torch.randn(8, 2, 12)
    net = _settle(net, x)
    _zero(net[1], [0, 1, 4])
    small, _ = slim(net, 3 / 10, example_input=x)
    assert small[3].bias is None and small[3].in_channels == 3
    torch.testing.assert_close(small(x), net(x), atol=ATOL, rtol=0)


class MeanLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1)


def test_normkit_bn_and_experiment_models() -> None:
    torch.manual_seed(6)
    x = torch.randn(8, 40)
    net = _settle(build_model("cnn1d", (40,), 10, "bn", channels=(8, 8, 8)), x)
    norms = [m for m in net.modules() if isinstance(m, nk.BatchNorm)]
    for i, bn in enumerate(norms):  # zero-padded conv consumers: exact with β = 0 only
        _zero(bn, [3, 6], beta=0.0 if i < 2 else None)
    small, report = slim(net, 6 / 24, example_input=x)
    new = [m for m in small.modules() if isinstance(m, nk.BatchNorm)]
    assert [m.num_features for m in new] == [6, 6, 6] and new[0].running_var.shape == (6,)
    assert all(is_slimmable(m) for m in new)
    torch.testing.assert_close(small(x), net(x), atol=ATOL, rtol=0)
    assert report.inexact == ()
    _zero(norms[0], [3, 6], beta=0.5)
    assert slim(net, 6 / 24, example_input=x)[1].inexact == ("net.4",)
    mlp_net = _settle(mlp(nk.BatchNorm), torch.randn(16, 5))
    _zero(mlp_net[1], [0])
    assert slim(mlp_net, 1 / 14, example_input=torch.randn(4, 5))[0][1].num_features == 7


def test_residual_layers_are_kept_and_listed() -> None:
    torch.manual_seed(7)
    x = torch.randn(4, 40)
    net = build_model("resnet", (40,), 10, nn.BatchNorm1d, widths=(8, 8)).eval()
    small, report = slim(net, 0.3, example_input=x)
    pruned = {r.path for r in report.layers if not r.reason}
    assert pruned == {"net.4.norm1", "net.5.norm1"}
    assert all("residual addition" in r.reason for r in report.layers
               if r.path.endswith(("norm2", "shortcut.1")))
    assert small(x).shape == (4, 10) and _count(small) < _count(net)


def test_scope_clamp_and_inplace() -> None:
    torch.manual_seed(8)
    net = mlp().eval()
    with torch.no_grad():
        net[1].weight.fill_(1.0)
        net[4].weight.fill_(1e-3)       # globally all the smallest
    x = torch.randn(4, 5)
    small, report = slim(net, 0.5, example_input=x)
    assert small[4].num_features == 1 and report.layers[1].clamped
    assert small[1].num_features == 8 - 1 and net[4].num_features == 6   # original untouched
    _, per_layer = slim(net, 0.5, example_input=x, scope="layer")
    assert [r.kept for r in per_layer.layers] == [4, 3]
    same, _ = slim(net, 0.0, example_input=x, inplace=True)
    assert same is net


def test_slimmed_model_trains() -> None:
    torch.manual_seed(9)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    small, _ = slim(conv_net(), 0.5, example_input=x)
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    before = copy.deepcopy(small.state_dict())
    loss = nn.functional.cross_entropy(small(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before["0.weight"], small[0].weight)
    assert type(small[0]) is nn.Conv2d and type(small[1]) is nn.BatchNorm2d


def test_gamma_l1_value() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nk.BatchNorm(4), nn.LayerNorm(4))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, -2.0, 0.0, 0.5]))
        net[2].weight.copy_(torch.tensor([-0.25, 0.25, 3.0, 0.0]))
    assert gamma_l1(net).item() == pytest.approx(3.5 + 3.5)
    assert gamma_l1(net, modules=[net[2]]).item() == pytest.approx(3.5)
    gamma_l1(net).backward()
    assert net[1].weight.grad.tolist() == [1.0, -1.0, 0.0, 1.0]


def test_hook_changes_only_gamma_grad() -> None:
    torch.manual_seed(10)
    a = mlp()
    b = copy.deepcopy(a)
    with torch.no_grad():
        a[1].weight[2] = 0.0
        b[1].weight[2] = 0.0
        a[4].weight[0] = b[4].weight[0] = -0.3
    s, x = 0.01, torch.randn(8, 5)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.0)
    handle = add_gamma_l1(opt_a, a, s)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in b.named_parameters()}
    opt_a.step()
    for n, p in a.named_parameters():
        want = plain[n] + s * torch.sign(p.detach()) if n in ("1.weight", "4.weight") else plain[n]
        torch.testing.assert_close(p.grad, want, atol=1e-7, rtol=0)
    assert a[1].weight.grad[2] == plain["1.weight"][2]        # sign(0) = 0
    # equals the gradient of the loss helper
    c = copy.deepcopy(b)
    c.zero_grad()
    (c(x).square().sum() + s * gamma_l1(c)).backward()
    for n, p in c.named_parameters():
        torch.testing.assert_close(p.grad, dict(a.named_parameters())[n].grad, atol=1e-6, rtol=0)
    handle.remove()


def test_errors() -> None:
    net, x = mlp(), torch.randn(4, 5)
    for bad in (-0.1, 1.0, True, "0.5"):
        with pytest.raises(ConfigError, match=r"ratio must be a fraction of channels in \[0, 1\)"):
            slim(net, bad, example_input=x)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scope must be 'global' or 'layer', got 'all'"):
        slim(net, 0.5, example_input=x, scope="all")  # type: ignore[arg-type]
    plain = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="has no normalization layer with a per-channel γ"):
        slim(plain, 0.5, example_input=x)
    with pytest.raises(ConfigError, match="has no normalization layer with a per-channel γ"):
        gamma_l1(plain)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.body(t) if t.sum() > 0 else -self.body(t)

    with pytest.raises(ConfigError, match="Branchy cannot be traced"):
        slim(Branchy(), 0.5, example_input=x)
    last = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="'1': its channels reach the model's output"):
        slim(last, 0.5, example_input=x)

    class Hardcoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Linear(12, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(t))).reshape(-1, 12))

    with pytest.raises(ConfigError, match="fails on example_input .*hard-codes a channel count"):
        slim(Hardcoded(), 0.5, example_input=torch.randn(3, 1, 5))
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="holds none of the model's γ"):
        add_gamma_l1(opt, net, 1e-4)
    with pytest.raises(ConfigError, match="strength must be a finite number >= 0, got -1"):
        add_gamma_l1(torch.optim.SGD(net.parameters(), lr=0.1), net, -1)
