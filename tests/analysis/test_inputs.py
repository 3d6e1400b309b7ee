"""Chapter-2 tools: conditioning of a linear model per input preprocessing, and K-FAC factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from normkit.analysis.conditioning import conv_patches, layer_statistics
from normkit.analysis.inputs import (
    drop_constant_features,
    input_conditioning,
    kfac_factors,
    linear_hessian,
)
from normkit.errors import ConfigError, ShapeError
from normkit.experiments.data import load_inputs
from normkit.input_norm import InputNormalizer

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    x, y = load_inputs("digits")
    return x, y, input_conditioning(x, y)


def test_digits_condition_number_and_gd_steps_fall_raw_to_whitened(digits):
    x, _, rows = digits
    by = {r.preprocessing: r for r in rows}
    assert list(by) == ["raw", "centred", "standardized", "whitened"]
    conds = [r.cond for r in rows]
    steps = [r.steps for r in rows]
    assert all(s is not None for s in steps)
    assert conds[0] > conds[1] > conds[2] > conds[3] and steps[0] > steps[1] > steps[2] > steps[3]
    # whitened: H = blockdiag(Σ(Σ + εI)⁻¹, 1), so κ = 1 + ε/λ_min(Σ) exactly (ε = 1e-10; the
    # eigenvalues of H ~ 1 carry ~1e-15 of round-off)
    xk, _ = drop_constant_features(x)
    lam_min = float(torch.linalg.eigvalsh(torch.cov(xk.T, correction=0)).min())
    assert by["whitened"].cond == pytest.approx(1 + 1e-10 / lam_min, abs=1e-9)
    assert by["whitened"].cond < 1 + 1e-4 and by["whitened"].steps == 1
    # the optimum is the same model class for every (invertible, affine) preprocessing
    opt = by["raw"].optimum_loss
    for r in rows:
        assert r.optimum_loss == pytest.approx(opt, rel=1e-9)
        assert opt <= r.final_loss <= r.target == pytest.approx(1.01 * opt)
    # κ of the raw Hessian is the reference one of X̃ᵀX̃/n
    lam = torch.linalg.eigvalsh(linear_hessian(xk))
    assert by["raw"].cond == pytest.approx(float(lam.max() / lam.min()), rel=1e-6)
    assert by["raw"].step_size == pytest.approx(float(2 / (lam.max() + lam.min())), rel=1e-9)


def test_closed_form_gd_equals_iterating_gd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 3, generator=g, dtype=F64) @ torch.tensor(
        [[1.0, 0, 0], [2, 0.5, 0], [0, 1, 3]], dtype=F64) + 2
    y = torch.randint(0, 3, (80,), generator=g)
    (row,) = input_conditioning(x, y, preprocessings=("raw",), curve_points=400)
    xt = torch.cat([x, torch.ones(80, 1, dtype=F64)], 1)
    y1 = F.one_hot(y, 3).to(F64)
    w = torch.zeros(4, 3, dtype=F64)
    losses = []
    for _ in range(int(row.steps) + 1):
        losses.append(float((xt @ w - y1).square().sum() / 160))
        w -= row.step_size * xt.T @ (xt @ w - y1) / 80
    for t, value in zip(row.curve_steps.tolist(), row.curve_loss.tolist(), strict=True):
        if t < len(losses):
            assert value == pytest.approx(losses[t], rel=1e-9, abs=1e-12)
    assert losses[row.steps] <= row.target < losses[row.steps - 1]


def test_logistic_whitened_conditions_and_converges_faster():
    x, y = load_inputs("digits", subset=300)
    rows = input_conditioning(x, y, loss="logistic", max_steps=400, target_loss=0.3)
    ls = input_conditioning(x, y, max_steps=10)
    by = {r.preprocessing: r for r in rows}
    # the Hessian at W = 0 is H ⊗ (I − 11ᵀ/K)/K: same κ as least squares on its non-null space
    for r, q in zip(rows, ls, strict=True):
        assert r.cond == pytest.approx(q.cond, rel=1e-9)
        assert r.step_size == pytest.approx(2 / r.lambda_max)
    assert by["whitened"].steps is not None and by["raw"].steps is not None
    assert by["whitened"].steps < by["standardized"].steps < by["raw"].steps
    assert all(r.final_loss <= 0.3 for r in rows)


def test_helpers_and_errors():
    assert_close(linear_hessian(torch.tensor([[1.0], [3.0]])),
                 torch.tensor([[5.0, 2.0], [2.0, 1.0]], dtype=F64))
    assert_close(linear_hessian(torch.tensor([[1.0], [3.0]]), bias=False),
                 torch.tensor([[5.0]], dtype=F64))
    kept, keep = drop_constant_features(torch.tensor([[0.0, 1.0, 5.0], [0.0, 2.0, 5.0]]))
    assert keep.tolist() == [False, True, False] and kept.shape == (2, 1)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ShapeError, match=r"expected inputs \(n, d\), got shape \(10,\)"):
        linear_hessian(torch.randn(10))
    with pytest.raises(ConfigError, match=r"preprocessings must be among .*'pca'"):
        input_conditioning(x, y, preprocessings=("pca",))
    with pytest.raises(ConfigError, match=r"loss must be .*'hinge'"):
        input_conditioning(x, y, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"pass the labels y"):
        input_conditioning(x)
    with pytest.raises(ShapeError, match=r"got \(10, 3\) and \(9,\)"):
        input_conditioning(x, y[:9])
    with pytest.raises(ConfigError, match=r"max_steps must be >= 1, got 0"):
        input_conditioning(x, y, max_steps=0)


# ----------------------------------------------------------------------------------- K-FAC
def _data(n: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[3.0, 0, 0, 0], [1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 0.2]], dtype=F64)
    x = torch.randn(n, 4, generator=g, dtype=F64) @ mix + torch.tensor([1.0, -2, 0, 3], dtype=F64)
    return x, torch.randint(0, 3, (n,), generator=g)


def test_whitening_a_layer_input_makes_its_kfac_input_factor_identity():
    x, y = _data()
    torch.manual_seed(0)
    raw = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    a_raw, _ = kfac_factors(raw, x, y)["0"]
    assert_close(a_raw, x.T @ x / 500)  # A = E[a aᵀ], uncentred: far from I
    assert (a_raw - torch.eye(4, dtype=F64)).abs().max() > 1
    norm = InputNormalizer(4, method="zca", eps=1e-12, dtype=F64).fit(x)
    model = nn.Sequential(norm, *raw)
    for bias in (False, True):
        a, g = kfac_factors(model, x, y, bias=bias)["1"]
        # the fit and the factor use the same 500 rows: A = Σ(Σ + εI)⁻¹ = I − O(ε/λ_min)
        # (λ_min ≈ 0.04 here) up to float64 round-off
        assert_close(a, torch.eye(4 + bias, dtype=F64), rtol=0, atol=1e-9)
        assert g is not None and g.shape == (5, 5)


def test_kfac_factors_match_their_definitions():
    x, y = _data(n=64, seed=3)
    torch.manual_seed(1)
    lin = nn.Linear(4, 3).to(F64)
    a, g = kfac_factors(nn.Sequential(lin), x, y, bias=True)["0"]
    xt = torch.cat([x, torch.ones(64, 1, dtype=F64)], 1)
    assert_close(a, xt.T @ xt / 64)
    delta = torch.softmax(lin(x), 1) - F.one_hot(y, 3).to(F64)  # ∂ℓ_n/∂h_n of mean CE
    assert_close(g, delta.T @ delta / 64)
    # the same numbers layer_statistics reports: one set of hooks
    lc = layer_statistics(nn.Sequential(lin), x, y)["0"]
    assert_close(lc.kfac_factors()[0], lc.input.cov) and lc.kfac_factors()[1] is lc.grad.cov
    conv = nn.Conv2d(2, 3, 3, padding=1).to(F64)
    img = torch.randn(4, 2, 5, 5, dtype=F64)
    a_conv, g_conv = kfac_factors(conv, img, bias=True)[""]
    patches = torch.cat([conv_patches(conv, img), torch.ones(100, 1, dtype=F64)], 1)
    assert_close(a_conv, patches.T @ patches / 100) and g_conv is None


def test_kfac_factors_need_the_covariances():
    lc = layer_statistics(nn.Sequential(nn.Linear(2, 2)), torch.randn(5, 2),
                          keep_covariances=False)["0"]
    with pytest.raises(ConfigError, match=r"keep_covariances=True"):
        lc.kfac_factors()


def test_old_load_inputs_path_is_a_deprecated_alias(digits):
    import normkit.analysis.inputs as inputs

    with pytest.warns(DeprecationWarning, match="normkit.experiments.data.load_inputs"):
        old = inputs.load_inputs
    assert old is load_inputs
    x, y, rows = digits
    with pytest.warns(DeprecationWarning, match="pass x, y"):
        default = input_conditioning(preprocessings=("whitened",), max_steps=10)
    assert default[0].cond == pytest.approx(rows[-1].cond, rel=1e-9)
