"""Effective rank, correlation, collapse and feature_hook (book ch. 9, representation).

Tolerances come from random-matrix theory for N Gaussian samples of d features: the singular
values of the centred matrix spread as √N(1 ± √(d/N)) (Marchenko–Pastur), so the effective rank
of isotropic features falls short of d by ≈ d²/(8N) (second-order entropy deficit) and the top
variance share exceeds 1/d by ≈ 2√(d/N)/d; each sample correlation is ≈ N(0, 1/N). The bounds
below are several times these predictions; constructed (exact-rank) cases are checked to 1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normkit.analysis.representation import (
    collapse_indicator,
    correlation_matrix,
    effective_rank,
    feature_hook,
    mean_abs_correlation,
)
from normkit.errors import ConfigError, ShapeError

F64 = torch.float64
N, D = 4000, 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _equal_rank(n: int, d: int, r: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """(n, d) features with r equal non-zero singular values after centring, plus a mean."""
    g = _gen(1)
    z = torch.randn(n, r, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # centred orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=F64))
    return (3.0 * q @ v.T + torch.randn(1, d, generator=g, dtype=F64)).to(dtype)


def test_effective_rank_isotropic_is_d() -> None:
    x = torch.randn(N, D, generator=_gen(), dtype=F64)
    er = effective_rank(x)
    assert er <= D
    assert D - er <= D * D / N  # predicted deficit ≈ D²/(8N) = 0.008; bound 0.064


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("r", [1, 5])
def test_effective_rank_of_equal_rank_r_is_r(r: int, dtype: torch.dtype) -> None:
    tol = 1e-9 if dtype == F64 else 1e-4  # float32: sub-threshold rounding of the r values
    assert effective_rank(_equal_rank(200, 12, r, dtype)) == pytest.approx(r, abs=tol)


def test_effective_rank_bounds_for_generic_rank_r() -> None:
    g = _gen(2)
    x = torch.randn(300, 4, generator=g, dtype=F64) @ torch.randn(4, 10, generator=g, dtype=F64)
    assert 1.0 < effective_rank(x) <= 4.0 + 1e-9


def test_effective_rank_rank_one_and_constant() -> None:
    g = _gen(3)
    x = torch.randn(100, 1, generator=g) * torch.randn(1, 8, generator=g)  # float32
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(torch.ones(10, 4)) == 0.0


def test_correlation_of_independent_features_is_small() -> None:
    x = torch.randn(N, 8, generator=_gen(4), dtype=F64)
    c = correlation_matrix(x)
    torch.testing.assert_close(c, torch.corrcoef(x.T), rtol=1e-12, atol=1e-12)
    off = c[~torch.eye(8, dtype=torch.bool)]
    assert off.abs().max() <= 5 / math.sqrt(N)  # each ρ ≈ N(0, 1/N); 5 sd
    assert mean_abs_correlation(x) <= 2 / math.sqrt(N)  # expected √(2/(πN)) ≈ 0.8/√N


def test_correlation_of_duplicated_features_is_one() -> None:
    z = torch.randn(500, 1, generator=_gen(5), dtype=F64)
    x = torch.cat([z, z, 2 * z + 3, -z], dim=1)
    assert correlation_matrix(x).abs().sub(1).abs().max() <= 1e-12
    assert mean_abs_correlation(x) == pytest.approx(1.0, abs=1e-12)


def test_constant_feature_convention() -> None:
    z = torch.randn(50, 1, generator=_gen(6), dtype=F64)
    c = correlation_matrix(torch.cat([z, torch.full_like(z, 2.0)], dim=1))
    assert torch.equal(c, torch.eye(2, dtype=F64))


def test_collapse_indicator() -> None:
    iso = torch.randn(N, D, generator=_gen(7), dtype=F64)
    predicted = (2 * math.sqrt(D / N) + D / N) / (D - 1)  # ≈ 0.009
    assert collapse_indicator(iso) <= 3 * predicted
    assert collapse_indicator(_equal_rank(200, 12, 1)) == pytest.approx(1.0, abs=1e-9)
    noisy = _equal_rank(200, 12, 1) + 1e-3 * torch.randn(200, 12, generator=_gen(8), dtype=F64)
    assert collapse_indicator(noisy) >= 0.99
    # r equal directions out of m = 12: λ₁/Σλ = 1/r ⇒ c = (m/r − 1)/(m − 1)
    assert collapse_indicator(_equal_rank(200, 12, 4)) == pytest.approx((12 / 4 - 1) / 11, abs=1e-9)
    assert collapse_indicator(torch.ones(10, 3)) == 1.0


def test_bad_shapes() -> None:
    with pytest.raises(ShapeError, match="2-D"):
        effective_rank(torch.randn(10))
    with pytest.raises(ShapeError, match="N ≥ 2"):
        collapse_indicator(torch.randn(1, 4))
    with pytest.raises(ShapeError, match="d ≥ 2"):
        mean_abs_correlation(torch.randn(10, 1))


def test_feature_hook_captures_layer_output_and_removes_itself() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    x1, x2 = torch.randn(4, 5), torch.randn(3, 5)
    with feature_hook(model, model[1]) as cap:
        model(x1)
        model(x2)
    assert len(cap.outputs) == 2 and not cap.outputs[0].requires_grad
    torch.testing.assert_close(cap.features, torch.relu(model[0](torch.cat([x1, x2]))))
    assert len(model[1]._forward_hooks) == 0
    model(x1)
    assert len(cap.outputs) == 2  # nothing captured after exit


def test_feature_hook_removed_on_error_and_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(RuntimeError, match="inside"), feature_hook(model, "0"):
        raise RuntimeError("inside")
    assert len(model[0]._forward_hooks) == 0


def test_feature_hook_flatten_modes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(2, 3, 6, 5)
    y = model[0](x).detach()  # (2, 4, 4, 3)
    for how, expected in [
        ("sample", y.reshape(2, 48)),
        ("channel", y.permute(0, 2, 3, 1).reshape(24, 4)),
        ("none", y),
    ]:
        with feature_hook(model, "0", flatten=how) as cap:
            model(x)
        torch.testing.assert_close(cap.features, expected)


def test_feature_hook_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="flatten"), feature_hook(model, "0", flatten="pixel"):
        pass
    with pytest.raises(ConfigError, match="not a sub-module"), feature_hook(model, nn.ReLU()):
        pass
    with pytest.raises(ConfigError, match="no sub-module"), feature_hook(model, "5"):
        pass
    with feature_hook(model, "0") as cap, pytest.raises(ShapeError, match="no output"):
        _ = cap.features
