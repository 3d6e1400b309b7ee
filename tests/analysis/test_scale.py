"""Scale invariance of weights feeding a normalization (book ch. 9), and ScaleTracker.

Everything runs in float64 with ``eps=1e-20``: the normalizations are then scale-invariant up to
``O(eps/σ²) ≈ 1e-20`` (σ² = O(1) pre-activation variance) plus float64 rounding (≈ 1e-15 per
element, a few 1e-15 on the norms), so the 1e-6 (outputs) and 1e-8 (cosine) bounds have many
orders of margin while the unnormalized model changes by O(1).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.analysis.scale import ScaleTracker, gradient_weight_inner_product, scale_invariance
from normkit.errors import ConfigError

F64 = torch.float64
EPS = 1e-20


def _normalized(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(model, scaled layer, inputs, targets) with ``layer → norm → tanh → head``."""
    g = torch.Generator().manual_seed(0)
    if kind == "bn":  # train-mode BN removes a per-channel bias, so keep it
        layer, norm, x = (
            nn.Linear(6, 5),
            nk.create("bn", 5, eps=EPS),
            torch.randn(16, 6, generator=g),
        )
    elif kind == "ln":
        layer, norm, x = (
            nn.Linear(6, 5, bias=False),
            nk.create("ln", 5, eps=EPS),
            torch.randn(16, 6, generator=g),
        )
    elif kind == "gn":
        layer = nn.Conv2d(3, 8, 3, bias=False)
        norm, x = nk.create("gn", 8, num_groups=4, eps=EPS), torch.randn(4, 3, 6, 6, generator=g)
    else:  # no normalization
        layer, norm, x = nn.Linear(6, 5), nn.Identity(), torch.randn(16, 6, generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(layer, norm, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(F64)
    x = x.to(F64)
    model(x)  # materialize the lazy head
    y = torch.randn(x.shape[0], 3, generator=g, dtype=F64)
    return model, layer, x, y


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k  # bit-exact


@pytest.mark.parametrize("kind", ["bn", "ln", "gn"])
def test_normalized_weight_is_scale_invariant(kind: str) -> None:
    model, layer, x, y = _normalized(kind)
    out = scale_invariance(model, layer, x, scales=(0.5, 2.0, 10.0))
    assert out["scales"] == [0.5, 2.0, 10.0] and out["mode"] == "train"
    assert out["max_relative_change"] < 1e-6
    loss = scale_invariance(model, layer, x, loss_fn=nn.functional.mse_loss, targets=y)
    assert loss["quantity"] == "loss" and loss["max_relative_change"] < 1e-6
    json.dumps(out)


def test_unnormalized_weight_is_not_scale_invariant() -> None:
    model, layer, x, _ = _normalized("none")
    out = scale_invariance(model, layer, x)
    assert min(out["relative_change"]) > 1e-2  # O(1) in fact; ≫ 1e-3
    assert out["max_relative_change"] > 1e-1


def test_eval_mode_bn_is_not_scale_invariant() -> None:
    model, layer, x, _ = _normalized("bn")
    assert scale_invariance(model, layer, x, train=False)["max_relative_change"] > 1e-2


@pytest.mark.parametrize("kind", ["bn", "ln", "gn"])
def test_gradient_orthogonal_to_invariant_weight(kind: str) -> None:
    model, layer, x, y = _normalized(kind)
    cos = gradient_weight_inner_product(model, layer, x, nn.functional.mse_loss, targets=y)
    assert abs(cos) <= 1e-8
    assert layer.weight.grad is None  # autograd.grad, no accumulation


def test_gradient_not_orthogonal_without_normalization() -> None:
    model, layer, x, y = _normalized("none")
    cos = gradient_weight_inner_product(model, layer, x, nn.functional.mse_loss, targets=y)
    assert abs(cos) > 1e-2


def test_invariant_sgd_step_grows_norm_by_pythagoras() -> None:
    # gradient ⟂ W ⇒ ‖W − ηg‖² = ‖W‖² + η²‖g‖² (the weight-norm growth of Arora et al. 2019)
    model, layer, x, y = _normalized("ln")
    nn.functional.mse_loss(model(x), y).backward()
    w, g = layer.weight.detach().clone(), layer.weight.grad.clone()
    torch.optim.SGD([layer.weight], lr=0.5).step()
    expected = w.norm() ** 2 + 0.25 * g.norm() ** 2
    assert torch.allclose(layer.weight.detach().norm() ** 2, expected, rtol=1e-12)


@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_model_unchanged_after_calls(kind: str) -> None:
    model, layer, x, y = _normalized(kind)
    model.eval()
    snap, rng = _snapshot(model), torch.get_rng_state()
    scale_invariance(model, layer, x)  # runs in train mode: would update BN running stats
    gradient_weight_inner_product(model, layer, x, nn.functional.mse_loss, targets=y)
    _assert_same(model, snap)
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert layer.weight.requires_grad and layer.weight.grad is None


class _FailsOnSecondCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nk.create("bn", 3, eps=EPS)).to(F64)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.body(x)
        if self.calls >= 2:
            raise RuntimeError("boom")
        return out


def test_model_unchanged_when_forward_raises() -> None:
    model = _FailsOnSecondCall()
    x = torch.randn(8, 4, dtype=F64)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):  # raises after the weight was scaled
        scale_invariance(model, model.body[0], x, scales=(3.0,))
    _assert_same(model, snap)
    assert model.training
    model.calls = -10  # forward succeeds (updating BN running stats), then the loss raises

    def bad_loss(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bad loss")

    with pytest.raises(RuntimeError, match="bad loss"):
        gradient_weight_inner_product(model, "body.0", x, bad_loss)
    _assert_same(model, snap)


def test_bad_arguments() -> None:
    model, layer, x, _ = _normalized("ln")
    with pytest.raises(ConfigError, match="positive"):
        scale_invariance(model, layer, x, scales=(2.0, -1.0))
    with pytest.raises(ConfigError, match="not a sub-module"):
        scale_invariance(model, nn.Linear(2, 2), x)
    with pytest.raises(ConfigError, match="no sub-module"):
        scale_invariance(model, "nope", x)
    with pytest.raises(ConfigError, match="nn.Parameter"):
        scale_invariance(model, "2", x)  # Tanh has no weight
    with pytest.raises(ConfigError, match="scalar"):
        gradient_weight_inner_product(model, layer, x, lambda out: out)


def test_tracker_hand_computed_sgd_step() -> None:
    lin = nn.Linear(2, 1, bias=False, dtype=F64)
    model = nn.Sequential(lin)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = ScaleTracker(model)  # default: every Linear / Conv
    assert tracker.layers == ["0"]
    # step 1: W = [3, 4] − 0.1·[0, 10] = [3, 3]; angle = atan(4/3) − π/4; η/‖W‖² = 0.1/18
    lin.weight.grad = torch.tensor([[0.0, 10.0]], dtype=F64)
    opt.step()
    tracker.update(model, opt)
    # step 2 (lr 0.05): W = [3, 3] − 0.05·[60, 0] = [0, 3]; angle = π/4; η/‖W‖² = 0.05/9
    opt.param_groups[0]["lr"] = 0.05
    lin.weight.grad = torch.tensor([[60.0, 0.0]], dtype=F64)
    opt.step()
    tracker.update(model, opt)
    h = tracker.history["0"]
    assert h["weight_norm"] == pytest.approx([3 * math.sqrt(2), 3.0], rel=1e-12)
    assert h["lr"] == [0.1, 0.05]
    assert h["effective_lr"] == pytest.approx([0.1 / 18, 0.05 / 9], rel=1e-12)
    assert h["angular_update"] == pytest.approx(
        [math.atan(4 / 3) - math.pi / 4, math.pi / 4], rel=1e-12
    )
    assert json.loads(json.dumps(tracker.history)) == tracker.history


def test_tracker_small_angle_is_accurate() -> None:
    # arccos of a cosine near 1 loses half the digits; the atan2 form keeps them
    lin = nn.Linear(2, 1, bias=False, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    tracker = ScaleTracker(lin, layers=[""])
    lin.weight.grad = torch.tensor([[0.0, -1e-9]], dtype=F64)
    opt.step()
    tracker.update(lin, opt)
    assert tracker.history[""]["angular_update"][0] == pytest.approx(math.atan(1e-9), rel=1e-9)


def test_tracker_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    tracker = ScaleTracker(model, layers=["1"])
    with pytest.raises(ConfigError, match="param group"):
        tracker.update(model, opt)
    with pytest.raises(ConfigError, match="no layer"):
        ScaleTracker(nn.Sequential(nn.Tanh()))
