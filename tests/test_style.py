"""Style transfer on feature maps: ``normkit.apply.style.adain`` and ``wct``.

References are the formulas written out here in float64 (numpy's ``eigh`` for the matrix square
roots), independent of normkit's whitening code. Statistics are the biased ones over positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normkit.apply.style import adain, feature_moments, wct
from normkit.errors import ConfigError, ShapeError

D = torch.float64


def _features(n: int, c: int, size: tuple[int, ...], *, seed: int, offset: float = 0.0):
    """Correlated features ``(n, c, *size)``: a random channel mixing of Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    m = 1
    for s in size:
        m *= s
    mix = torch.randn(n, c, c, generator=g, dtype=D)
    x = mix @ torch.randn(n, c, m, generator=g, dtype=D) + offset
    return x.reshape(n, c, *size)


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).std(-1, correction=0)


def _np_power(cov: np.ndarray, p: float) -> np.ndarray:
    lam, u = np.linalg.eigh(cov)
    return (u * lam**p) @ u.T


# ----------------------------------------------------------------------------------------- AdaIN
@pytest.mark.parametrize("style_batch", [1, 3])
def test_adain_matches_style_mean_and_std(style_batch: int) -> None:
    c = _features(3, 4, (6, 5), seed=0)
    s = 3.0 * _features(style_batch, 4, (7, 7), seed=1, offset=2.0)
    y = adain(c, s, eps=1e-12)
    s = s.expand(3, -1, -1, -1)
    # biased std of the output = σ(s)·√(σ²(c)/(σ²(c)+ε)): σ(s) to ε/σ²(c) ≈ 1e-12 (relative)
    torch.testing.assert_close(y.flatten(2).mean(-1), s.flatten(2).mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(_std(y), _std(s), rtol=1e-6, atol=0)
    mu_c, sd_c = c.flatten(2).mean(-1)[..., None, None], _std(c)[..., None, None]
    ref = _std(s)[..., None, None] * (c - mu_c) / sd_c + s.flatten(2).mean(-1)[..., None, None]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_adain_eps_is_on_the_content_variance_only() -> None:
    c, s = _features(2, 3, (4, 4), seed=2), _features(2, 3, (5, 5), seed=3)
    eps = 0.5
    y = adain(c, s, eps=eps)
    var_c = _std(c) ** 2
    torch.testing.assert_close(_std(y), _std(s) * (var_c / (var_c + eps)).sqrt(), rtol=1e-12, atol=0)


def test_adain_alpha_blend_and_zero() -> None:
    c, s = _features(2, 3, (4, 4), seed=4), _features(1, 3, (3, 3), seed=5)
    assert torch.equal(adain(c, s, alpha=0.0), c)
    full = adain(c, s)
    torch.testing.assert_close(adain(c, s, alpha=0.25), 0.25 * full + 0.75 * c, rtol=1e-12, atol=1e-12)


def test_adain_float32_dtype_and_1d_features() -> None:
    c, s = torch.randn(2, 3, 10), torch.randn(2, 3, 7) * 2 + 1
    y = adain(c, s, eps=1e-8)
    assert y.dtype == torch.float32 and y.shape == c.shape
    torch.testing.assert_close(_std(y), _std(s), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- WCT
def _wct_reference(c: torch.Tensor, s: torch.Tensor, eps: float) -> torch.Tensor:
    out = []
    for i in range(c.shape[0]):
        fc = c[i].flatten(1).numpy()
        fs = s[min(i, s.shape[0] - 1)].flatten(1).numpy()
        mc, ms = fc.mean(1, keepdims=True), fs.mean(1, keepdims=True)
        cov_c = (fc - mc) @ (fc - mc).T / fc.shape[1] + eps * np.eye(fc.shape[0])
        cov_s = (fs - ms) @ (fs - ms).T / fs.shape[1]
        out.append(_np_power(cov_s, 0.5) @ _np_power(cov_c, -0.5) @ (fc - mc) + ms)
    return torch.from_numpy(np.stack(out)).reshape(c.shape)


@pytest.mark.parametrize("style_batch", [1, 2])
def test_wct_zca_matches_style_covariance_and_mean(style_batch: int) -> None:
    c = _features(2, 5, (6, 6), seed=6, offset=-1.0)
    s = _features(style_batch, 5, (8, 7), seed=7, offset=3.0)
    y = wct(c, s, eps=0.0)
    mean_y, cov_y = feature_moments(y)
    mean_s, cov_s = feature_moments(s)
    torch.testing.assert_close(cov_y, cov_s.expand(2, 5, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean_y, mean_s.expand(2, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(y, _wct_reference(c, s, 0.0), rtol=1e-9, atol=1e-9)


def test_wct_eps_formula() -> None:
    c, s = _features(1, 4, (5, 5), seed=8), _features(1, 4, (6, 6), seed=9)
    eps = 0.3
    y = wct(c, s, eps=eps)
    torch.testing.assert_close(y, _wct_reference(c, s, eps), rtol=1e-9, atol=1e-9)
    _, cov_c = feature_moments(c)
    _, cov_s = feature_moments(s)
    root = torch.from_numpy(_np_power(cov_s[0].numpy(), 0.5))
    expect = cov_s[0] - eps * root @ torch.linalg.inv(cov_c[0] + eps * torch.eye(4, dtype=D)) @ root
    torch.testing.assert_close(feature_moments(y)[1][0], expect, rtol=0, atol=1e-10)


def test_wct_newton_schulz_reaches_style_covariance() -> None:
    """Newton–Schulz on Σ_c/tr Σ_c: here λ_min/tr ≈ 3e-3, so ~log(tr/λ_min)/log 2.25 ≈ 7 steps of
    growth then quadratic convergence: T = 20 is exact to rounding, T = 5 is far off."""
    c = _features(3, 6, (7, 7), seed=10) * torch.linspace(0.3, 3.0, 6, dtype=D)[:, None, None]
    s = _features(1, 6, (8, 8), seed=11, offset=5.0)
    _, cov_s = feature_moments(s)
    err = {}
    for t in (5, 10, 20):
        y = wct(c, s, eps=0.0, whitening="newton", iterations=t)
        err[t] = (feature_moments(y)[1] - cov_s).abs().max().item()
    assert err[5] > err[10] > err[20]
    assert err[5] > 1e-2 and err[20] < 1e-6
    y = wct(c, s, eps=0.0, whitening="newton_schulz", iterations=20)
    mean_y, cov_y = feature_moments(y)
    torch.testing.assert_close(cov_y, cov_s.expand(3, 6, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean_y, feature_moments(s)[0].expand(3, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(y, wct(c, s, eps=0.0), rtol=1e-8, atol=1e-8)


def test_wct_of_content_with_itself_is_identity_and_alpha() -> None:
    c, s = _features(2, 4, (5, 5), seed=12, offset=1.0), _features(1, 4, (6, 6), seed=13)
    torch.testing.assert_close(wct(c, c, eps=0.0), c, rtol=1e-9, atol=1e-9)
    assert torch.equal(wct(c, s, alpha=0.0), c)
    full = wct(c, s)
    torch.testing.assert_close(wct(c, s, alpha=0.6), 0.6 * full + 0.4 * c, rtol=1e-12, atol=1e-12)


def test_wct_float32_keeps_dtype_and_is_close() -> None:
    c, s = _features(2, 4, (6, 6), seed=14), _features(1, 4, (6, 6), seed=15)
    y32 = wct(c.float(), s.float(), eps=1e-6)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), wct(c, s, eps=1e-6), rtol=1e-4, atol=1e-4)


def test_empty_batch() -> None:
    c, s = torch.randn(0, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert adain(c, s).shape == c.shape and wct(c, s).shape == c.shape


# ----------------------------------------------------------------------------------- gradients
def test_gradcheck_adain_and_wct() -> None:
    c = _features(2, 3, (3, 3), seed=16).requires_grad_()
    s = _features(1, 3, (4, 4), seed=17).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: adain(a, b, alpha=0.7), (c, s))
    assert torch.autograd.gradcheck(lambda a, b: wct(a, b, alpha=0.7), (c, s))
    assert torch.autograd.gradcheck(
        lambda a, b: wct(a, b, whitening="newton", iterations=15), (c, s))


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [adain, wct])
def test_shape_errors(fn) -> None:  # type: ignore[no-untyped-def]
    c = torch.randn(2, 3, 4, 4)
    with pytest.raises(ShapeError, match=r"content must be feature maps .* got \(2, 3\)"):
        fn(torch.randn(2, 3), c)
    with pytest.raises(ShapeError, match=r"style has 4 channels, content 3"):
        fn(c, torch.randn(2, 4, 4, 4))
    with pytest.raises(ShapeError, match=r"style batch must be 1 .* content's 2, got 3"):
        fn(c, torch.randn(3, 3, 4, 4))
    with pytest.raises(ShapeError, match=r"style has rank 3 \(\(2, 3, 16\)\), content rank 4"):
        fn(c, torch.randn(2, 3, 16))
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\].*got 1.5"):
        fn(c, c, alpha=1.5)


def test_config_errors() -> None:
    c = torch.randn(2, 3, 4, 4)
    with pytest.raises(ConfigError, match=r"whitening must be 'zca' or 'newton'.*got 'pca'"):
        wct(c, c, whitening="pca")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"iterations must be an int in \[1, 64\], got 0"):
        wct(c, c, whitening="newton", iterations=0)
    with pytest.raises(ConfigError, match=r"wct got iterations=10, but whitening='zca' does not "
                                          r"iterate.*whitening='newton'"):
        wct(c, c, iterations=10)  # ZCA: would be ignored
    with pytest.raises(ConfigError, match=r"eps must be >= 0, got -1"):
        wct(c, c, eps=-1.0)
    with pytest.raises(ConfigError, match=r"eps=0 with Standardize"):
        adain(c, c, eps=0.0)
    with pytest.raises(ShapeError, match=r"expected feature maps \(N, C, \*spatial\), got \(3, 4\)"):
        feature_moments(torch.randn(3, 4))
