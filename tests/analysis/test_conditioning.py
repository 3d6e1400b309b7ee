"""Layer-wise conditioning (Huang et al., ECCV 2020): covariances, spectra, condition numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit
from normkit.analysis.conditioning import (
    ConditioningTracker,
    condition_numbers,
    conv_patches,
    layer_statistics,
)
from normkit.errors import ConfigError

f64 = torch.float64


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------- Σ_x, Linear
def test_input_covariance_matches_population() -> None:
    # x = L z with z ~ N(0, I): E[x xᵀ] = L Lᵀ. The sample second moment's (i, j) entry has
    # standard error sqrt((Σ_ii Σ_jj + Σ_ij²)/n) (Isserlis); 5 of them is a 6e-7 two-sided miss
    # per entry, and the seed is fixed anyway.
    g = torch.Generator().manual_seed(0)
    n, d = 20_000, 4
    L = torch.randn(d, d, generator=g, dtype=f64)
    x = torch.randn(n, d, generator=g, dtype=f64) @ L.T
    sigma = L @ L.T
    stats = layer_statistics(nn.Linear(d, 3, dtype=f64), x)[""]
    se = ((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma**2) / n).sqrt()
    assert stats.n_rows == n and stats.kind == "linear"
    assert ((stats.input.cov - sigma).abs() <= 5 * se).all()


def test_input_spectrum_exact_for_orthogonal_columns() -> None:
    # X = Q diag(s) with orthonormal columns Q: XᵀX = diag(s²) exactly, so eig(Σ_x) = s²/N.
    g = torch.Generator().manual_seed(1)
    n, s = 50, torch.tensor([3.0, 0.5, 2.0, 1.0, 7.0], dtype=f64)
    q, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=f64))
    x = (q * s).reshape(5, 10, s.numel())  # leading dims are flattened into rows
    st = layer_statistics(nn.Linear(s.numel(), 2, dtype=f64), x)[""].input
    expected = torch.sort(s**2 / n, descending=True).values
    torch.testing.assert_close(st.spectrum, expected, rtol=1e-12, atol=1e-14)
    assert st.cond == pytest.approx(49.0 / 0.25, rel=1e-12)


# --------------------------------------------------------------------------------- Σ_δ, Linear
@pytest.mark.parametrize("reduce, factor", [("sum", "n2"), ("mean", "one")])
def test_grad_covariance_constant_cotangent(reduce: str, factor: str) -> None:
    # loss = Σ_n (W x_n)·c has g_n = c for every row, so Σ_δ = N·Σ_n c cᵀ = N² c cᵀ; the
    # mean-reduced loss has g_n = c/N and gives the per-sample second moment c cᵀ.
    n, c = 12, torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    model = nn.Linear(4, 3, dtype=f64)
    x = torch.randn(n, 4, dtype=f64)

    def loss_fn(out: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
        per_row = out @ c
        return per_row.sum() if reduce == "sum" else per_row.mean()

    st = layer_statistics(model, x, loss_fn=loss_fn)[""].grad
    assert st is not None
    scale = n**2 if factor == "n2" else 1.0
    torch.testing.assert_close(st.cov, scale * torch.outer(c, c), rtol=1e-14, atol=1e-14)
    assert st.metrics["rank"] == 1 and st.cond == math.inf
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, not .backward()


def test_grad_covariance_default_cross_entropy() -> None:
    # Mean CE: ∂ℓ_n/∂h_n = softmax(h_n) − e_{y_n}; Σ_δ is its mean outer product.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7, dtype=f64), nn.Tanh(), nn.Linear(7, 4, dtype=f64))
    x, y = torch.randn(30, 5, dtype=f64), torch.randint(0, 4, (30,))
    stats = layer_statistics(model, x, y)
    with torch.no_grad():
        delta = torch.softmax(model(x), -1) - F.one_hot(y, 4).to(f64)
    torch.testing.assert_close(stats["2"].grad.cov, delta.T @ delta / 30, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------- conv
def test_conv2d_im2col_matches_unfold() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=f64)
    x = torch.randn(2, 3, 5, 5, dtype=f64)
    cotangent = torch.randn(2, 4, 3, 3, dtype=f64)
    st = layer_statistics(conv, x, loss_fn=lambda out, _: (out * cotangent).sum())[""]
    p = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)  # (2·9, 27)
    assert st.n_rows == 18 and st.kind == "conv2d"
    torch.testing.assert_close(st.input.cov, p.T @ p / 18, rtol=1e-12, atol=1e-14)
    gr = cotangent.permute(0, 2, 3, 1).reshape(-1, 4)  # one row per output position
    torch.testing.assert_close(st.grad.cov, 18 * gr.T @ gr, rtol=1e-12, atol=1e-12)
    # the rows are what weight.flatten(1) multiplies
    y = (p @ conv.weight.flatten(1).T + conv.bias).reshape(2, 9, 4).transpose(1, 2)
    torch.testing.assert_close(y, conv(x).flatten(2))


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize(
    "padding, mode, dilation", [(2, "circular", 1), ("same", "zeros", 1), ("same", "reflect", 2),
                                (0, "zeros", 2)]
)
def test_conv1d_patches_reproduce_output(padding: int | str, mode: str, dilation: int) -> None:
    # kernel 4 with padding="same" pads asymmetrically (1 left, 2 right at dilation 1)
    torch.manual_seed(4)
    conv = nn.Conv1d(2, 3, 4, padding=padding, padding_mode=mode, dilation=dilation, dtype=f64)
    x = torch.randn(3, 2, 9, dtype=f64)
    p = conv_patches(conv, x)
    out = conv(x)
    y = (p @ conv.weight.flatten(1).T + conv.bias).reshape(3, -1, 3).transpose(1, 2)
    torch.testing.assert_close(y, out)
    st = layer_statistics(conv, x)[""]
    torch.testing.assert_close(st.input.cov, p.T @ p / p.shape[0])


# ------------------------------------------------------------------------- condition numbers
def test_kappa_count_and_fraction() -> None:
    lam = 2.0 ** -torch.arange(8, dtype=f64)  # 1, 1/2, …, 1/128: κ_k = 2^(k−1)
    m = condition_numbers(lam.flip(0), ks=(1, 3, 8, 0.5, 0.3, 1.0))  # any order
    assert m["lambda_max"] == 1.0 and m["lambda_min"] == 2.0**-7
    assert m["kappa_1"] == 1.0 and m["kappa_3"] == 4.0 and m["kappa_8"] == m["cond"] == 128.0
    assert m["kappa_0.5"] == 8.0  # k = ⌈0.5·8⌉ = 4
    assert m["kappa_0.3"] == 4.0  # k = ⌈2.4⌉ = 3
    assert m["kappa_1.0"] == 128.0
    assert condition_numbers(torch.ones(10), ks=(0.3,))["kappa_0.3"] == 1.0  # 0.3·10 → k = 3
    assert math.isnan(condition_numbers(torch.zeros(3))["cond"])
    for bad in (0, 9, 0.0, 1.5, True):
        with pytest.raises(ConfigError):
            condition_numbers(lam, ks=(bad,))


def test_rank_deficient_inputs() -> None:
    # N = 6 < d = 16: Σ_x has rank 6. Its zero eigenvalues come out at ~1e-16·λ_1 (below the
    # 1e-10 floor) so cond = inf, while κ_k for k ≤ 6 equals σ_1²/σ_k² of X.
    torch.manual_seed(5)
    x = torch.randn(6, 16)
    st = layer_statistics(nn.Linear(16, 2), x, ks=(6, 7, 0.25))[""].input
    sv = torch.linalg.svdvals(x.double())
    assert abs(st.lambda_min) <= 1e-12 * st.lambda_max
    assert st.cond == math.inf and st.metrics["rank"] == 6
    assert st.metrics["kappa_6"] == pytest.approx(float(sv[0] ** 2 / sv[5] ** 2), rel=1e-10)
    assert st.metrics["kappa_0.25"] == pytest.approx(float(sv[0] ** 2 / sv[3] ** 2), rel=1e-10)
    assert st.metrics["kappa_7"] == math.inf


# ------------------------------------------------------------------------------------- hooks
class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_hooks_removed_on_success_and_error() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    layer_statistics(model, x, y)
    assert _no_hooks(model)
    bad = nn.Sequential(nn.Linear(3, 4), _Boom())
    with pytest.raises(RuntimeError, match="boom"):
        layer_statistics(bad, x, y)
    assert _no_hooks(bad)
    with pytest.raises(ValueError, match="scalar"):  # loss that is not a scalar
        layer_statistics(model, x, loss_fn=lambda out, _: out)
    assert _no_hooks(model)


def test_layer_selection_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    x = torch.randn(5, 3)
    assert list(layer_statistics(model, x, layers=["2"])) == ["2"]
    with pytest.raises(ConfigError, match="no module named 'nope'"):
        layer_statistics(model, x, layers=["nope"])
    with pytest.raises(ConfigError, match="ReLU"):
        layer_statistics(model, x, layers=["1"])
    unused = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    unused.forward = lambda t: unused["a"](t)  # type: ignore[method-assign]
    assert list(layer_statistics(unused, x)) == ["a"]
    with pytest.raises(ConfigError, match="not called"):
        layer_statistics(unused, x, layers=["b"])


# ----------------------------------------------------------------------------------- tracker
def test_tracker_records_every_k_steps_json() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = ConditioningTracker(every=3, ks=(2, 0.5))
    for step in range(8):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        entry = tracker.maybe_record(step, model, x, y)
        assert (entry is None) == (step % 3 != 0)
    assert [h["step"] for h in tracker.history] == [0, 3, 6]
    assert {"0/x/cond", "2/x/kappa_2", "2/delta/kappa_0.5", "0/n_rows"} <= set(tracker.history[0])
    assert json.loads(json.dumps(tracker.history)) == tracker.history
    with pytest.raises(ConfigError):
        ConditioningTracker(every=0)


# -------------------------------------------------------------------------------------- demo
def test_demo_bn_before_last_linear_improves_conditioning() -> None:
    # Measured over seeds 0–4: without BN the last layer's input (uncentred ReLU features) has
    # κ_0.5 ≈ 55–75 and cond ≈ 380–640; with BN before it κ_0.5 ≈ 10–16 and cond ≈ 90–140. We
    # assert only a 2× gap in κ_0.5 (measured ≥ 4.6×) and BN's exact unit diagonal.
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    out = {}
    for bn in (False, True):
        torch.manual_seed(100)
        norm = [normkit.create("bn", 32)] if bn else []
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), *norm, nn.Linear(32, 2))
        out[bn] = layer_statistics(model, x, y)[str(len(model) - 1)].input
    # BN output is centred with biased variance var/(var+eps) ≈ 1 per feature
    torch.testing.assert_close(out[True].cov.diagonal(), torch.ones(32, dtype=f64), atol=1e-3,
                               rtol=0)
    assert out[True].metrics["kappa_0.5"] * 2 < out[False].metrics["kappa_0.5"]
