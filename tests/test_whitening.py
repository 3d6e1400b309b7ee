"""Whitening: the pure math of ``normkit.functional.whiten`` and the presets of
``normkit.methods.whitening`` (TESTING.md "whitening" rows, METHODS.md ch. 4.2).

Numerics behind the tolerances (each test repeats the part it uses):

* float64 identities on ``d ≤ 8`` matrices with condition number ``κ ≲ 1e3`` hold to
  ``κ·d·2⁻⁵² ≲ 1e-12``; they are checked to 1e-9 (matrix level) or 1e-8 (data level, where sums
  over a few thousand samples add ``√m·2⁻⁵²``).
* ``W Σ Wᵀ = I − ε W Wᵀ``: with ``ε = 1e-9`` and ``λ_min(Σ) ≳ 0.05`` the ε-bias is ≲ 2e-8,
  hence 1e-6 for whitened covariances.
* float32 / half: only finiteness, boundedness (``W Σ Wᵀ ⪯ I`` ⇒ ``|x̂| ≤ √m``) and dtype.

The presets are imported from :mod:`normkit.methods.whitening`, whose import registers them. Where
``normkit`` does not export (hence register) them yet, that import would change
``nk.list_methods()`` for the other test files of the session (which assert the exact list), so the
registry is snapshot before the import and restored right after (a no-op once they are exported).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import normkit as nk
from normkit._bench.reference import whitening_matrix
from normkit.functional import whiten as W

_SNAPSHOT = dict(nk.registry._METHODS), dict(nk.registry._KEYS)
from normkit.methods.whitening import (  # noqa: E402  (registers the presets)
    BatchWhitening,
    CholeskyBatchWhitening,
    DecorrelatedBatchNorm,
    GroupWhitening,
    InstanceWhitening,
    IterNorm,
    PCABatchWhitening,
)

_REGISTERED = set(nk.registry._METHODS)  # after the import (the presets may be exported already)
nk.registry._METHODS.clear()
nk.registry._METHODS.update(_SNAPSHOT[0])
nk.registry._KEYS.clear()
nk.registry._KEYS.update(_SNAPSHOT[1])

DT = torch.float64
FUNCS = {
    "zca": W.zca_matrix,
    "pca": W.pca_matrix,
    "cholesky": W.cholesky_matrix,
    "newton": lambda s, eps=1e-5: W.newton_schulz_matrix(s, 5, eps),
}
EXACT_METHODS = ("zca", "pca", "cholesky")
PRESETS = {
    "dbn": (DecorrelatedBatchNorm, "zca"),
    "pca_bw": (PCABatchWhitening, "pca"),
    "cd_bw": (CholeskyBatchWhitening, "cholesky"),
    "iternorm": (IterNorm, "newton"),
}
ESTIMATES = ("matrix", "covariance")
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Every tensor here is tiny; with 2 intra-op threads a batched ``torch.linalg.cholesky`` on
    (2, 4, 4) takes ~16 ms on this machine (thread hand-off) against ~10 µs with one. Restored
    after this module, so other test files see the setting they started with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(g: int, d: int, seed: int, spectrum=None, dtype=DT) -> torch.Tensor:
    """``(g, d, d)`` SPD matrices ``Q diag(spectrum) Qᵀ`` with random orthogonal ``Q``."""
    gen = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(g, d, d, generator=gen, dtype=DT))
    lam = (torch.linspace(0.5, 3.0, d, dtype=DT) if spectrum is None
           else torch.as_tensor(spectrum, dtype=DT)).expand(g, d)
    return ((q * lam.unsqueeze(-2)) @ q.transpose(-1, -2)).to(dtype)


def _sym_psd(a: torch.Tensor) -> torch.Tensor:
    """A symmetric PD function of an unconstrained matrix: finite differences on ``a`` then move
    ``Σ`` symmetrically (``eigh`` reads one triangle only, so perturbing ``Σ`` entrywise would not)."""
    d = a.shape[-1]
    return a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=a.dtype)


def _eye(d: int, dtype=DT) -> torch.Tensor:
    return torch.eye(d, dtype=dtype)


def ref_matrix(sigma: torch.Tensor, method: str, eps: float, iterations: int = 5) -> torch.Tensor:
    """Whitening matrix of ``Σ + εI`` by the textbook formula, in float64 (the shared reference;
    PCA with the documented sign convention: each eigenvector's largest-magnitude entry positive)."""
    return whitening_matrix(sigma.to(DT), method, eps, iterations)


def correlated(n: int, c: int, seed: int, *spatial: int, dtype=DT) -> torch.Tensor:
    """``(n, c, *spatial)`` data with correlated channels (a random channel mixing) and offsets."""
    gen = _gen(seed)
    z = torch.randn(n, *spatial, c, generator=gen, dtype=DT)
    mix = torch.randn(c, c, generator=gen, dtype=DT) + 2 * _eye(c)
    off = torch.randn(c, generator=gen, dtype=DT)
    return (z @ mix + off).movedim(-1, 1).contiguous().to(dtype)


def batch_groups(y: torch.Tensor, d: int) -> torch.Tensor:
    """Batch-whitening groups of ``(N, C, *S)`` as ``(C/d, d, N·S)``."""
    c = y.shape[1]
    return y.transpose(0, 1).reshape(c // d, d, -1)


def cov_rows(rows: torch.Tensor) -> torch.Tensor:
    """Biased covariance of the rows of ``(..., d, m)`` (test-side, centred here)."""
    xc = rows - rows.mean(-1, keepdim=True)
    return xc @ xc.transpose(-1, -2) / rows.shape[-1]


def make_preset(name: str, c: int, d: int, **kw) -> BatchWhitening:
    cls, _ = PRESETS[name]
    if name == "iternorm":
        kw.setdefault("iterations", 5)
    return cls(c, group_size=d, **kw)


def randomize_affine(mod: torch.nn.Module, seed: int) -> None:
    gen = _gen(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT).to(p.dtype))


# ============================================================================ pure functions
def test_covariance_is_biased_outer_product():
    x = torch.randn(3, 4, 50, generator=_gen(0), dtype=DT)
    xc = x - x.mean(-1, keepdim=True)
    expected = torch.stack([torch.cov(xi, correction=0) for xi in x])
    torch.testing.assert_close(W.covariance(xc), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
def test_whitening_matrix_gradcheck(method):
    # Σ = AAᵀ + I/2 has distinct, well separated eigenvalues for random A (the PCA/eigh gradient
    # is only defined there); float64 central differences, gradcheck's default tolerances.
    a = torch.randn(2, 4, 4, generator=_gen(1), dtype=DT, requires_grad=True)
    f = FUNCS[method]
    assert torch.autograd.gradcheck(lambda a: f(_sym_psd(a), eps=1e-3), (a,))


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_custom_eigh_backward_equals_plain_autograd(method):
    # Well separated spectrum (1..5): the Daleckii–Krein backward of _InvSqrtEigh and the masked
    # backward of _SafeEigh must equal autograd through torch.linalg.eigh exactly (the same
    # formulas, float64 round-off ~ κ·2⁻⁵² ≈ 1e-15; checked to 1e-10).
    sigma = _spd(3, 5, seed=2, spectrum=[1.0, 2.0, 3.0, 4.0, 5.0]).requires_grad_()
    upstream = torch.randn(3, 5, 5, generator=_gen(3), dtype=DT)  # non-symmetric on purpose
    eps = 1e-3
    got = torch.autograd.grad((FUNCS[method](sigma, eps=eps) * upstream).sum(), sigma)[0]
    ref = torch.autograd.grad((ref_matrix(sigma, method, eps) * upstream).sum(), sigma)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-2])
def test_exact_methods_whiten_the_regularized_covariance(method, eps):
    if method == "cholesky" and eps == 0:
        eps = 1e-12
    sigma = _spd(4, 6, seed=4, spectrum=torch.logspace(-2, 1, 6))  # κ = 1e3
    w = FUNCS[method](sigma, eps=eps)
    white = w @ (sigma + eps * _eye(6)) @ w.transpose(-1, -2)
    # κ·d·2⁻⁵² ≈ 1e-12
    torch.testing.assert_close(white, _eye(6).expand(4, 6, 6), rtol=0, atol=1e-9)


def test_cholesky_matrix_is_lower_triangular():
    sigma = _spd(3, 6, seed=5)
    w = W.cholesky_matrix(sigma, eps=1e-5)
    assert torch.equal(w.triu(1), torch.zeros_like(w))
    assert (w.diagonal(dim1=-2, dim2=-1) > 0).all()
    # L⁻¹ with LLᵀ = Σ + εI
    chol = torch.linalg.cholesky(sigma + 1e-5 * _eye(6))
    torch.testing.assert_close(w @ chol, _eye(6).expand(3, 6, 6), rtol=0, atol=1e-12)


def test_pca_is_a_rotation_of_zca():
    sigma = _spd(3, 5, seed=6, spectrum=torch.logspace(-1, 1, 5))
    w_pca, w_zca = W.pca_matrix(sigma, eps=1e-4), W.zca_matrix(sigma, eps=1e-4)
    r = w_pca @ torch.linalg.inv(w_zca)  # = Uᵀ
    torch.testing.assert_close(r @ r.transpose(-1, -2), _eye(5).expand(3, 5, 5), rtol=0, atol=1e-10)
    # and the eigenvalues come out ascending, as documented: row i of W_pca has norm λ_i^{-1/2}
    norms = w_pca.norm(dim=-1)
    assert (norms[:, :-1] >= norms[:, 1:]).all()


def test_pca_eigenvector_sign_is_fixed():
    # documented: each eigenvector's largest-magnitude entry is positive, so W_pca does not flip
    # sign between nearby covariances (a 1e-9 perturbation moves W by ~1e-9·κ, not by 2|W|)
    sigma = _spd(3, 5, seed=41, spectrum=torch.linspace(0.5, 3.0, 5))
    w = W.pca_matrix(sigma, eps=1e-5)
    pivot = w.gather(-1, w.abs().argmax(-1, keepdim=True))
    assert (pivot > 0).all()
    bump = 1e-9 * _sym_psd(torch.randn(3, 5, 5, generator=_gen(42), dtype=DT))
    torch.testing.assert_close(W.pca_matrix(sigma + bump, eps=1e-5), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(W.pca_matrix(sigma.float(), eps=1e-5).double(), w, rtol=0, atol=1e-4)


def test_zca_is_rotation_equivariant():
    # data level: ZCA(Qx) = Q·ZCA(x) for orthogonal Q (εI is rotation invariant, so exact with ε > 0)
    d, m = 5, 2000
    x = correlated(m, d, 7).T.unsqueeze(0)  # (1, d, m)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(8), dtype=DT))

    def zca(x):
        xc = x - x.mean(-1, keepdim=True)
        return W.zca_matrix(W.covariance(xc), eps=1e-5) @ xc

    torch.testing.assert_close(zca(q @ x), q @ zca(x), rtol=0, atol=1e-10)
    # the same through the module (samples as rows)
    dbn = DecorrelatedBatchNorm(d, group_size=d, dtype=DT)
    xs = x[0].T
    torch.testing.assert_close(dbn(xs @ q.T), dbn(xs) @ q.T, rtol=0, atol=1e-10)


def test_coloring_is_the_inverse_of_zca():
    sigma = _spd(3, 5, seed=9, spectrum=torch.logspace(-2, 1, 5))
    for eps in (0.0, 1e-3):
        c, w = W.coloring_matrix(sigma, eps=eps), W.zca_matrix(sigma, eps=eps)
        torch.testing.assert_close(c @ w, _eye(5).expand(3, 5, 5), rtol=0, atol=1e-10)
        torch.testing.assert_close(c @ c, sigma + eps * _eye(5), rtol=0, atol=1e-10)


def test_newton_whitening_error_falls_monotonically():
    sigma = _spd(2, 6, seed=10, spectrum=torch.linspace(0.2, 2.0, 6))  # κ = 10
    errors = []
    for t in range(1, 11):
        w = W.newton_schulz_matrix(sigma, t, eps=0.0)
        errors.append((w @ sigma @ w.transpose(-1, -2) - _eye(6)).norm().item())
    # per eigenvalue x_{k+1} = x_k(3 − x_k)²/4 rises strictly towards 1 on (0, 1): a strict fall
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("iterations", range(1, 9))
def test_newton_matches_the_naive_formula(iterations):
    sigma = _spd(3, 5, seed=11)
    got = W.newton_schulz_matrix(sigma, iterations, eps=1e-3)
    # the coupled form equals P_T in exact arithmetic; float64 drift after ≤ 8 steps ≪ 1e-10
    torch.testing.assert_close(got, whitening_matrix(sigma, "newton", 1e-3, iterations),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_stays_converged_at_max_iterations(dtype):
    # regression: the uncoupled P³Σ_N form drifts to NaN by T ≈ 40 once converged
    sigma = _spd(4, 8, seed=12, spectrum=torch.linspace(0.3, 3.0, 8), dtype=dtype)
    w = W.newton_schulz_matrix(sigma, W.MAX_ITERATIONS, eps=1e-5)
    assert w.dtype == dtype and torch.isfinite(w).all()
    white = w @ (sigma + 1e-5 * torch.eye(8, dtype=dtype)) @ w.transpose(-1, -2)
    tol = 1e-4 if dtype == torch.float32 else 1e-10  # κ·2⁻²⁴ ≈ 6e-7 per step, not amplified
    torch.testing.assert_close(white, torch.eye(8, dtype=dtype).expand(4, 8, 8), rtol=0, atol=tol)
    torch.testing.assert_close(w.to(DT), ref_matrix(sigma, "zca", 1e-5), rtol=0, atol=10 * tol)


@pytest.mark.parametrize("iterations", [0, -1, 65, 2.0])
def test_newton_iterations_out_of_range_raise(iterations):
    with pytest.raises(nk.ConfigError, match=r"iterations.*\[1, 64\]"):
        W.newton_schulz_matrix(_spd(1, 3, seed=0), iterations)
    with pytest.raises(nk.ConfigError, match="iterations"):
        IterNorm(4, group_size=2, iterations=iterations)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
def test_functions_compute_in_at_least_float32(method):
    sigma = _spd(2, 4, seed=13)
    w16 = W.whitening_matrix(sigma.half(), method, eps=1e-3)
    assert w16.dtype == torch.float32
    ref = W.whitening_matrix(sigma.half().float(), method, eps=1e-3)
    torch.testing.assert_close(w16, ref, rtol=0, atol=0)
    # the dispatcher is the direct function
    torch.testing.assert_close(W.whitening_matrix(sigma, method, eps=1e-3),
                               FUNCS[method](sigma, eps=1e-3), rtol=0, atol=0)


def test_function_errors():
    with pytest.raises(nk.ConfigError, match="'svd'"):
        W.whitening_matrix(_spd(1, 3, seed=0), "svd")
    with pytest.raises(nk.ConfigError, match="eps > 0"):
        W.cholesky_matrix(_spd(1, 3, seed=0), eps=0.0)
    with pytest.raises(nk.ConfigError, match="eps must be >= 0"):
        W.zca_matrix(_spd(1, 3, seed=0), eps=-1.0)
    with pytest.raises(nk.ConfigError, match=r"\(G, D, D\)"):
        W.zca_matrix(torch.eye(3, dtype=DT))


# ============================================================================ modules
def test_import_registers_the_presets():
    assert {"dbn", "pca_bw", "cd_bw", "iternorm", "group_whitening", "instance_whitening"} <= _REGISTERED


@pytest.mark.parametrize("name", ["dbn", "pca_bw", "cd_bw"])
def test_batch_whitened_covariance_is_identity(name):
    c, d = 8, 4
    x = correlated(512, c, 14, 2, 2)  # m = 2048 ≫ d per group
    mod = make_preset(name, c, d, eps=1e-9, dtype=DT)
    y = mod(x)
    # λ_min(Σ) ≈ 0.3 here: ε-bias ε/λ_min ≈ 3e-9; float64 round-off ≪ 1e-10
    torch.testing.assert_close(cov_rows(batch_groups(y, d)), _eye(d).expand(c // d, d, d),
                               rtol=0, atol=1e-6)
    if name == "cd_bw":  # the transform itself is lower-triangular: row i uses channels ≤ i
        xg = batch_groups(x, d)
        xc = xg - xg.mean(-1, keepdim=True)
        m = torch.linalg.lstsq(xc.transpose(-1, -2), batch_groups(y, d).transpose(-1, -2)).solution
        torch.testing.assert_close(m.transpose(-1, -2).triu(1), torch.zeros(c // d, d, d, dtype=DT),
                                   rtol=0, atol=1e-8)


def test_iternorm_whitens_with_enough_iterations():
    c, d = 8, 4
    x = correlated(512, c, 15, 2, 2)
    y = IterNorm(c, group_size=d, iterations=40, eps=1e-9, dtype=DT)(x)
    torch.testing.assert_close(cov_rows(batch_groups(y, d)), _eye(d).expand(c // d, d, d),
                               rtol=0, atol=1e-6)
    # and only approximately with few iterations, the error falling with T
    errs = [(cov_rows(batch_groups(IterNorm(c, group_size=d, iterations=t, eps=1e-9, dtype=DT)(x), d))
             - _eye(d)).norm().item() for t in (1, 2, 3, 5, 8)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[0] > 1e-2


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_group_size_one_equals_batch_norm(method, estimate):
    x = correlated(16, 4, 16, 3, 3)
    wb = BatchWhitening(4, group_size=1, method=method, estimate=estimate, dtype=DT)
    bn = nk.BatchNorm(4, dtype=DT)
    randomize_affine(wb, 17)
    randomize_affine(bn, 17)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = wb(xa), bn(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    g = torch.randn(ya.shape, generator=_gen(18), dtype=DT)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(wb.weight.grad, bn.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(wb.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    if estimate == "covariance":  # running Σ of a 1×1 group is BN's (unbiased) running_var
        assert wb.running_cov.shape == (4, 1, 1)
        torch.testing.assert_close(wb.running_cov.flatten(), bn.running_var, rtol=1e-12, atol=1e-12)
        wb.eval()
        bn.eval()
        torch.testing.assert_close(wb(x), bn(x), rtol=1e-10, atol=1e-10)


def test_group_whitening_one_group_equals_layer_norm():
    x = correlated(3, 8, 19, 4, 4)
    gw = GroupWhitening(8, num_groups=1, affine=False, dtype=DT)
    torch.testing.assert_close(gw(x), nk.LayerNorm(8, affine=False, dtype=DT)(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
def test_instance_whitening_group_size_one_equals_instance_norm(method):
    x = correlated(3, 4, 20, 5, 5)
    iw = InstanceWhitening(4, group_size=1, method=method, dtype=DT)
    torch.testing.assert_close(iw(x), nk.InstanceNorm(4, dtype=DT)(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_group_whitening_whitens_the_group_vectors_per_sample(method):
    n, c, g = 3, 8, 4
    x = correlated(n, c, 21, 16, 16)  # (C/g)·HW = 512 ≫ g
    y = GroupWhitening(c, num_groups=g, method=method, eps=1e-9, dtype=DT)(x)
    rows = y.reshape(n, g, -1)  # group a = channels a·C/g … (a+1)·C/g − 1, all positions
    torch.testing.assert_close(cov_rows(rows), _eye(g).expand(n, g, g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_instance_whitening_whitens_each_sample(method):
    n, c, d = 2, 8, 4
    x = correlated(n, c, 22, 16, 16)
    y = InstanceWhitening(c, group_size=d, method=method, eps=1e-9, dtype=DT)(x)
    rows = y.reshape(n, c // d, d, -1)
    torch.testing.assert_close(cov_rows(rows), _eye(d).expand(n, c // d, d, d), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_running_estimates_and_eval_follow_the_formulas(name, estimate):
    c, d, eps, mom = 6, 3, 1e-3, 0.1
    _, method = PRESETS[name]
    mod = make_preset(name, c, d, estimate=estimate, eps=eps, momentum=mom, dtype=DT)
    randomize_affine(mod, 23)
    x1 = correlated(10, c, 24, 3)
    mod(x1)
    xg = batch_groups(x1, d)
    m = xg.shape[-1]
    sigma_b = cov_rows(xg)
    torch.testing.assert_close(mod.running_mean, mom * x1.mean((0, 2)), rtol=1e-12, atol=1e-12)
    if estimate == "matrix":
        expected = (1 - mom) * _eye(d) + mom * ref_matrix(sigma_b, method, eps)
        torch.testing.assert_close(mod.running_matrix, expected, rtol=1e-9, atol=1e-9)
    else:
        expected = (1 - mom) * _eye(d) + mom * sigma_b * m / (m - 1)  # unbiased, as BN's var
        torch.testing.assert_close(mod.running_cov, expected, rtol=1e-12, atol=1e-12)
    assert int(mod.num_batches_tracked) == 1
    for seed in (25, 26):  # a few more batches
        mod(correlated(10, c, seed, 3))
    mod.eval()
    x = correlated(4, c, 27, 3)
    before = {k: b.clone() for k, b in mod.named_buffers()}
    y = mod(x)
    for k, b in mod.named_buffers():  # eval never updates
        assert torch.equal(b, before[k]), k
    mat = (mod.running_matrix if estimate == "matrix"
           else ref_matrix(mod.running_cov, method, eps))
    mean = mod.running_mean.reshape(c // d, d, 1)
    expected = mat @ (batch_groups(x, d) - mean)  # (C/d, d, N·S)
    expected = expected.reshape(c, x.shape[0], -1).transpose(0, 1).reshape(x.shape)
    expected = expected * mod.weight[:, None] + mod.bias[:, None]
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("estimate", ESTIMATES)
def test_momentum_one_eval_reproduces_train(estimate):
    # momentum 1: the running statistics are the last batch's, so eval repeats the train transform
    # (the covariance estimate is unbiased: Σ·m/(m−1), which changes W unless m is large).
    x = correlated(2000, 4, 28)
    mod = DecorrelatedBatchNorm(4, group_size=4, estimate=estimate, momentum=1.0, eps=1e-9, dtype=DT)
    y_train = mod(x)
    mod.eval()
    scale = 1.0 if estimate == "matrix" else math.sqrt((2000 - 1) / 2000)
    torch.testing.assert_close(mod(x), y_train * scale, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("estimate", ESTIMATES)
def test_buffer_shapes_and_reset(estimate):
    c, d = 12, 4
    mod = DecorrelatedBatchNorm(c, group_size=d, estimate=estimate)
    key = "running_matrix" if estimate == "matrix" else "running_cov"
    bufs = dict(mod.named_buffers())
    assert set(bufs) == {"running_mean", key, "num_batches_tracked"}
    assert bufs["running_mean"].shape == (c,)
    assert bufs[key].shape == (c // d, d, d)
    assert torch.equal(bufs[key], torch.eye(d).expand(c // d, d, d))
    for seed in range(3):
        mod(correlated(8, c, seed, 2, dtype=torch.float32))
    assert not torch.equal(mod.running_mean, torch.zeros(c))
    assert not torch.equal(getattr(mod, key), torch.eye(d).expand(c // d, d, d))
    mod.reset_running_stats()
    assert torch.equal(mod.running_mean, torch.zeros(c))
    assert torch.equal(getattr(mod, key), torch.eye(d).expand(c // d, d, d))
    assert int(mod.num_batches_tracked) == 0


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_state_dict_round_trip(name, estimate):
    c, d = 8, 4
    a = make_preset(name, c, d, estimate=estimate, dtype=DT)
    randomize_affine(a, 29)
    for seed in range(3):
        a(correlated(6, c, seed, 3))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "num_batches_tracked",
                       "running_matrix" if estimate == "matrix" else "running_cov"}
    b = make_preset(name, c, d, estimate=estimate, dtype=DT)
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]), k
    a.eval()
    b.eval()
    x = correlated(5, c, 30, 3)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    c2 = copy.deepcopy(a)
    torch.testing.assert_close(c2(x), a(x), rtol=0, atol=0)


def test_channels_last_equals_channels_first():
    x = correlated(6, 8, 31, 5)
    a = DecorrelatedBatchNorm(8, group_size=4, dtype=DT)
    b = DecorrelatedBatchNorm(8, group_size=4, channel_axis=-1, dtype=DT)
    torch.testing.assert_close(b(x.movedim(1, -1)), a(x).movedim(1, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.running_matrix, a.running_matrix, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_folded_matches_eval(name):
    c, d = 8, 4
    mod = make_preset(name, c, d, dtype=DT)
    randomize_affine(mod, 32)
    mod(correlated(16, c, 33, 2))
    mod.eval()
    mat, b = mod.folded()
    assert mat.shape == (c // d, d, d) and b.shape == (c,)
    x = correlated(3, c, 34, 2)
    expected = (mat @ batch_groups(x, d)).reshape(c, 3, -1).transpose(0, 1).reshape(x.shape)
    torch.testing.assert_close(mod(x), expected + b[:, None], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c", [3, 12, 24, 40, 48, 96])
def test_default_group_size_divides_any_channel_count(c):
    # registry contract: every preset is constructible as cls(num_features) (norm_layer=...)
    for cls in (DecorrelatedBatchNorm, PCABatchWhitening, CholeskyBatchWhitening, IterNorm):
        mod = cls(c)
        d = mod.groups[1]
        assert c % d == 0 and d <= 16
        mod(torch.randn(8, c, 4, 4))
    assert c % GroupWhitening(c).groups[0] == 0


# ---------------------------------------------------------------------------- gradcheck
MODULES = {
    "dbn": lambda: DecorrelatedBatchNorm(4, group_size=2, dtype=DT),
    "pca_bw": lambda: PCABatchWhitening(4, group_size=4, dtype=DT),
    "cd_bw": lambda: CholeskyBatchWhitening(4, group_size=4, dtype=DT),
    "iternorm": lambda: IterNorm(4, group_size=2, iterations=3, dtype=DT),
    "dbn_cov": lambda: DecorrelatedBatchNorm(4, group_size=4, estimate="covariance", dtype=DT),
    "group_whitening": lambda: GroupWhitening(4, num_groups=2, affine=True, dtype=DT),
    "instance_whitening": lambda: InstanceWhitening(4, group_size=2, affine=True, dtype=DT),
    "instance_whitening_pca": lambda: InstanceWhitening(4, group_size=2, method="pca", dtype=DT),
}


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_gradcheck(name, mode):
    mod = MODULES[name]()
    randomize_affine(mod, 35)
    x = correlated(6, 4, 36, 2)  # (6, 4, 2): 12 samples per batch group, 2 positions per instance
    if mode == "eval":
        if mod.running_mean is not None:  # per-sample methods have no eval state
            for seed in range(2):
                mod(correlated(6, 4, seed, 2))
        mod.eval()
    params = tuple(mod.parameters())

    names = [n for n, _ in mod.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), (x,))

    inputs = (x.requires_grad_(), *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------- errors
def test_group_count_must_divide_channels():
    with pytest.raises(nk.ConfigError, match=r"\(6\).*\(4\)"):
        GroupWhitening(6, num_groups=4)
    with pytest.raises(nk.ConfigError, match=r"group_size \(7\) must be at most num_features \(6\)"):
        DecorrelatedBatchNorm(6, group_size=7)
    # standardization has no use for a smaller last group: Batch(group_size) must divide there
    with pytest.raises(nk.ConfigError, match="only whitening allows a smaller last group"):
        nk.Normalization(6, nap=nk.nap.Batch(group_size=4), nop=nk.nop.Standardize())


# ------------------------------------------------------------------ a smaller last group
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ["matrix", "covariance"])
@pytest.mark.parametrize("shape", [(40, 10, 3), (60, 10)], ids=["in_place", "matrix_layout"])
def test_smaller_last_group_equals_a_separate_module(name, estimate, shape):
    """C = 10, d = 4: groups of 4, 4 and 2. Each group, the last included, gives exactly what a
    module over its channels alone gives — train output, running estimates and eval — and the
    padding never shows: output and running mean have C channels, eval folds to C."""
    c, d = 10, 4
    mod = make_preset(name, c, d, estimate=estimate, dtype=DT)
    randomize_affine(mod, 3)
    parts = [make_preset(name, 4, 4, estimate=estimate, dtype=DT) for _ in range(2)]
    parts.append(make_preset(name, 2, 2, estimate=estimate, dtype=DT))
    with torch.no_grad():
        for i, p in enumerate(parts):
            p.weight.copy_(mod.weight[4 * i: 4 * i + p.num_features])
            p.bias.copy_(mod.bias[4 * i: 4 * i + p.num_features])
    spans = [slice(0, 4), slice(4, 8), slice(8, 10)]
    for seed in range(2):
        x = correlated(shape[0], c, 60 + seed, *shape[2:])
        y = mod(x)
        assert y.shape == x.shape and y.is_contiguous()
        for p, sl in zip(parts, spans, strict=True):
            torch.testing.assert_close(y[:, sl], p(x[:, sl]), rtol=1e-9, atol=1e-9)
    assert mod.running_mean.shape == (c,)
    running = getattr(mod, f"running_{'matrix' if estimate == 'matrix' else 'cov'}")
    assert running.shape == (3, d, d)
    torch.testing.assert_close(mod.running_mean[8:], parts[2].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running[2, :2, :2], getattr(parts[2], running_name(estimate))[0],
                               rtol=1e-12, atol=1e-12)
    mod.eval()
    for p in parts:
        p.eval()
    x = correlated(7, c, 70, *shape[2:])
    y = mod(x)
    for p, sl in zip(parts, spans, strict=True):
        torch.testing.assert_close(y[:, sl], p(x[:, sl]), rtol=1e-9, atol=1e-9)
    mat, shift = mod.folded()
    assert mat.shape == (3, d, d) and shift.shape == (c,)
    full = torch.block_diag(*mat)[:c, :c]
    xf = x.movedim(1, -1)
    torch.testing.assert_close((xf @ full.T + shift).movedim(-1, 1), y, rtol=1e-9, atol=1e-9)


def running_name(estimate: str) -> str:
    return "running_matrix" if estimate == "matrix" else "running_cov"


@pytest.mark.parametrize("native", [True, False], ids=["fused", "composition"])
def test_smaller_last_group_gradcheck(native):
    mod = DecorrelatedBatchNorm(5, group_size=2, dtype=DT, native=native)  # groups 2, 2, 1
    randomize_affine(mod, 4)
    names = [n for n, _ in mod.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mod.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), (x,))

    x = correlated(6, 5, 5, 2).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, *params))


def test_smaller_last_group_instance_whitening_and_stateless():
    x = correlated(3, 5, 8, 12)
    y = InstanceWhitening(5, group_size=3, dtype=DT)(x)
    torch.testing.assert_close(y[:, 3:], InstanceWhitening(2, group_size=2, dtype=DT)(x[:, 3:]),
                               rtol=1e-9, atol=1e-9)
    z = nk.functional.normalize(x, nap=nk.nap.Batch(group_size=3), nop=nk.nop.Whiten(), eps=1e-5)
    torch.testing.assert_close(z[:, 3:], nk.functional.normalize(
        x[:, 3:], nap=nk.nap.Batch(group_size=2), nop=nk.nop.Whiten(), eps=1e-5),
        rtol=1e-9, atol=1e-9)


def test_invalid_method_estimate_iterations():
    with pytest.raises(nk.ConfigError, match="'svd'"):
        BatchWhitening(4, group_size=2, method="svd")
    with pytest.raises(nk.ConfigError, match="'svd'"):
        GroupWhitening(4, num_groups=2, method="svd")
    with pytest.raises(nk.ConfigError, match="'svd'"):
        InstanceWhitening(4, method="svd")
    with pytest.raises(nk.ConfigError, match="'running'"):
        DecorrelatedBatchNorm(4, group_size=2, estimate="running")
    with pytest.raises(nk.ConfigError, match="iterations"):
        IterNorm(4, group_size=2, iterations=0)
    with pytest.raises(nk.ConfigError, match="iterations"):
        BatchWhitening(4, group_size=2, method="newton", iterations=65)
    with pytest.raises(nk.ConfigError, match="eps"):
        DecorrelatedBatchNorm(4, group_size=2, eps=0.0)


def test_training_needs_more_than_one_value():
    with pytest.raises(nk.ShapeError, match="more than 1"):
        DecorrelatedBatchNorm(4, group_size=2)(torch.randn(1, 4))


# ---------------------------------------------------------------------------- torch.compile
# torch's own dynamo instantiates the base ``torch.autograd.function.Function`` to trace any custom
# Function (torch/_dynamo/side_effects.py, track_object_new), which warns DeprecationWarning; the
# project turns torch's DeprecationWarnings into errors. Only that exact message (naming torch's
# base class, not a normkit Function) is ignored.
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize("name", ["dbn", "iternorm"])
def test_compile_parity(name, dynamo_reset):
    eager = make_preset(name, 8, 4, dtype=torch.float32)
    randomize_affine(eager, 37)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, backend="eager", fullgraph=False)
    x = correlated(16, 8, 38, 3, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), compiled(xb)
    # same kernels in the same order (eager backend): float32 bit-for-bit up to reassociation
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn(ya.shape, generator=_gen(39)).float()
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (n, pa), (_, pb) in zip(eager.named_parameters(), compiled_mod.named_parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, ba), (_, bb) in zip(eager.named_buffers(), compiled_mod.named_buffers(), strict=True):
        torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-6, msg=n)
    eager.eval()
    compiled_mod.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


# ============================================================================ faults (fuzz)
# Every fault runs every method: the four batch presets in both estimate modes, and the two
# per-sample presets. Inputs are laid out so that each whitening problem (a d × m matrix) gets
# the fault: ``layout(rows)`` maps problems ``(P, d, m)`` to the module's input.
FAULT_CASES = [(n, e) for n in PRESETS for e in ESTIMATES] + [
    ("group_whitening", None), ("instance_whitening", None)]
FAULT_IDS = [f"{n}-{e}" if e else n for n, e in FAULT_CASES]
fault_params = pytest.mark.parametrize(("name", "estimate"), FAULT_CASES, ids=FAULT_IDS)
C = 8


def fault_module(name, estimate, d, method=None):
    if name == "group_whitening":
        return GroupWhitening(C, num_groups=d, affine=True)
    if name == "instance_whitening":
        return InstanceWhitening(C, group_size=d, affine=True)
    # momentum 1: eval then uses this very batch's statistics, so the eval path meets the same
    # ill-conditioned matrices as training (with 0.1 the identity initial estimate hides them).
    return make_preset(name, C, d, estimate=estimate, momentum=1.0)


def layout(name, rows, n):
    """Problems ``(P, d, m)`` as the input ``(n, C, S)`` of ``name`` (inverse of the matrix view)."""
    p, d, m = rows.shape
    if name == "group_whitening":  # P = n, d = g, m = (C/g)·S
        return rows.reshape(n, C, -1)
    if name == "instance_whitening":  # P = n·C/d, m = S
        return rows.reshape(n, C, m)
    # batch: P = C/d, m = n·S
    return rows.reshape(C, n, -1).transpose(0, 1).contiguous()


def shape_for(name, d, m):
    """``(P, n)`` for problems of ``m`` samples."""
    if name == "group_whitening":
        return 2, 2  # n = 2 samples, each one problem; (C/d)·S = m
    if name == "instance_whitening":
        return 2 * C // d, 2
    return C // d, m  # batch: n = m samples, S = 1


def group_size_for(name):
    # d = 4: C/d = 2 groups (batch/instance); group whitening: g = 8 groups of one channel each,
    # so that its m = (C/g)·S can be any number of positions
    return 8 if name == "group_whitening" else 4


def run_fault(name, estimate, x, m):
    """Train and eval forward + backward; finite outputs, gradients and buffers, dtype kept,
    ``|y| ≤ √m`` (W(Σ+εI)Wᵀ = I ⇒ WΣWᵀ ⪯ I, so each whitened coordinate has mean square ≤ 1)."""
    d = group_size_for(name)
    mod = fault_module(name, estimate, d)
    modes = ("train", "eval") if name in PRESETS else ("train",)
    bound = math.sqrt(m) * 1.05 + 0.05  # 5 %: half rounding of y (2⁻⁸) and mean error at 1e4
    for mode in modes:
        mod.train(mode == "train")
        xi = x.clone().requires_grad_()
        y = mod(xi)
        assert y.dtype == x.dtype, mode
        assert torch.isfinite(y).all(), f"{mode}: non-finite output"
        assert y.abs().max().item() <= bound, f"{mode}: |y| = {y.abs().max().item():.3g} > {bound:.3g}"
        g = torch.randn(y.shape, generator=_gen(40)).to(y.dtype)
        (y.float() * g.float()).sum().backward()
        assert torch.isfinite(xi.grad).all(), f"{mode}: non-finite input gradient"
        for n, p in mod.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"{mode}: non-finite {n}.grad"
        for n, b in mod.named_buffers():
            assert not b.is_floating_point() or torch.isfinite(b).all(), f"non-finite {n}"
        mod.zero_grad()
    return mod


@fault_params
@FUZZ
@given(m=st.integers(2, 3), scale=st.sampled_from([1.0, 10.0, 1e3, 1e-3]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
@example(m=3, scale=100.0, dtype=torch.float32, seed=0)
def test_fault_rank_deficient(name, estimate, m, scale, dtype, seed):
    # m < d = 4 samples per problem: Σ has rank m − 1, only ε keeps Σ + εI invertible
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    rows = torch.randn(p, d, m, generator=_gen(seed), dtype=DT) * scale
    run_fault(name, estimate, layout(name, rows, n).to(dtype), m)


@fault_params
@FUZZ
@given(pattern=st.sampled_from(["all", "pairs", "constant", "zero"]),
       scale=st.sampled_from([1.0, 1e-2, 1e2]), m=st.sampled_from([8, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_fault_repeated_eigenvalues(name, estimate, pattern, scale, m, dtype, seed):
    # already-white rows (all eigenvalues equal), pairwise equal eigenvalues, constant input (Σ = 0)
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    gen = _gen(seed)
    if pattern in ("constant", "zero"):
        value = 0.0 if pattern == "zero" else scale * 0.7
        rows = torch.full((p, d, m), value, dtype=DT)
    else:
        a = torch.randn(p, m, d, generator=gen, dtype=DT)
        q, _ = torch.linalg.qr(a - a.mean(1, keepdim=True))  # orthonormal, zero-mean columns
        spread = torch.ones(d, dtype=DT) if pattern == "all" else torch.tensor([1.0, 3.0]).repeat(d // 2)
        rows = (q * spread).transpose(-1, -2) * math.sqrt(m) * scale
    run_fault(name, estimate, layout(name, rows, n).to(dtype), m)


@fault_params
@FUZZ
@given(offset=st.sampled_from([1e4, -1e4, 3e3]), spread=st.sampled_from([1.0, 1e-1, 10.0]),
       m=st.sampled_from([8, 16, 64]), seed=st.integers(0, 2**16))
def test_fault_large_mean_offset_float32(name, estimate, offset, spread, m, seed):
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    gen = _gen(seed)
    mix = _eye(d) + 0.3 * torch.randn(d, d, generator=gen, dtype=DT)  # well conditioned
    rows = mix @ torch.randn(p, d, m, generator=gen, dtype=DT) * spread + offset
    x = layout(name, rows, n).float()
    mod = run_fault(name, estimate, x, m)
    if name in PRESETS and name != "iternorm":
        # Still white. The float32 mean of m values near |offset| is off by at most δ_c ≤
        # ulp(m·|offset|)/2 per channel (summation error; x − μ itself is exact, Sterbenz), which
        # adds δδᵀ (|δ|² ≤ d·δ_c²) to Σ; with ε that biases W Σ Wᵀ by ≲ (ε + |δ|²)/λ_min (λ_min of
        # the batch covariance of the float32 values, in float64). Float32 eigen round-off adds
        # ≲ κ·1e-7 ≪ 1e-3. (A one-pass E[x²] − E[x]² would be off by ulp(1e8) ≈ 8: not white.)
        mod.train()
        y = batch_groups(mod(x).double(), d)
        lam_min = torch.linalg.eigvalsh(cov_rows(batch_groups(x.double(), d)))[:, 0]
        delta2 = d * (2.0 ** (math.floor(math.log2(m * abs(offset))) - 23) / 2) ** 2
        err = (cov_rows(y) - _eye(d)).abs().amax((-1, -2))
        assert (err <= 2 * (mod.eps + delta2) / lam_min + 1e-3).all(), (err, lam_min)


@fault_params
@FUZZ
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), m=st.sampled_from([5, 16, 64]),
       scale=st.sampled_from([1.0, 1e-2, 30.0]), seed=st.integers(0, 2**16))
def test_fault_half_input_statistics_in_float32(name, estimate, dtype, m, scale, seed):
    d = group_size_for(name)
    p, n = shape_for(name, d, m)
    gen = _gen(seed)
    rows = torch.randn(d, d, generator=gen, dtype=DT) @ torch.randn(p, d, m, generator=gen, dtype=DT)
    x = layout(name, rows * scale, n).to(dtype)
    mod = run_fault(name, estimate, x, m)
    # statistics in float32: the half input gives exactly the float32 computation on the same
    # (exactly upcast) values, rounded once to the half dtype at the end
    ref = copy.deepcopy(mod)
    mod.train()
    ref.train()
    y = mod(x)
    y_ref = ref(x.float())
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=0, atol=0)
    for (k, a), (_, b) in zip(mod.named_buffers(), ref.named_buffers(), strict=True):
        assert a.dtype == b.dtype, k
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_nan_input_propagates_to_its_group_only(name, estimate):
    # TESTING.md: NaN/Inf input propagates to the output (no LAPACK error); groups are independent
    c, d = 8, 4
    x = correlated(16, c, 43, 2, dtype=torch.float32)
    clean = make_preset(name, c, d, estimate=estimate)
    ref = clean(x)
    bad = x.clone()
    bad[3, 1, 0] = float("nan")  # channel 1: group 0
    y = make_preset(name, c, d, estimate=estimate)(bad)
    assert torch.isnan(y[:, :d]).all()
    torch.testing.assert_close(y[:, d:], ref[:, d:], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_constant_input_gives_zero_in_float32(name):
    # Σ = 0: every method's W is then ε^{-1/2}·(orthogonal), x − μ is the float32 error of the mean
    # (≤ a few ulp(0.1) ≈ 1e-8), so |y| ≤ √d·316·1e-7 ≈ 1e-4 (bias 0)
    mod = make_preset(name, 8, 4)
    y = mod(torch.full((16, 8, 3), 0.1))
    assert y.abs().max().item() <= 1e-3


@pytest.mark.parametrize("name", ["dbn", "pca_bw", "cd_bw", "iternorm", "group_whitening",
                                  "instance_whitening", "switchable_whitening"])
@pytest.mark.parametrize("bad", [0, -4, True])
def test_default_grouping_rejects_bad_num_features(name, bad):
    # the default group size / count is derived from C: a bad C must get the usual message,
    # not a failure inside that derivation
    with pytest.raises(nk.ConfigError, match=rf"num_features must be a positive int, got {bad}"):
        nk.create(name, bad)


# ---------------------------------------------------------------------------- coloring recovery
def test_coloring_gives_back_the_covariance_gamma_gamma_t():
    """Whitened then colored: cov(y) = Γ (W Σ Wᵀ) Γᵀ = Γ Γᵀ − ε Γ W Wᵀ Γᵀ; with ε = 1e-9 and
    λ_min(Σ) ≳ 0.05 the ε-term is ≲ 1e-7 relative, checked at 1e-6."""
    mod = DecorrelatedBatchNorm(6, group_size=3, affine="coloring", eps=1e-9, dtype=DT)
    randomize_affine(mod, 11)
    y = mod(correlated(400, 6, 12, 3))
    groups = y.transpose(0, 1).reshape(2, 3, -1)
    cov = W.covariance(groups - groups.mean(-1, keepdim=True))
    gamma = mod.weight.detach()
    torch.testing.assert_close(cov, gamma @ gamma.transpose(-1, -2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(groups.mean(-1), mod.bias.detach().reshape(2, 3), rtol=0, atol=1e-9)


def test_coloring_with_diagonal_gamma_is_the_affine_recovery():
    x = correlated(20, 4, 13, 5)
    affine = DecorrelatedBatchNorm(4, group_size=2, dtype=DT)
    colored = DecorrelatedBatchNorm(4, group_size=2, affine="coloring", dtype=DT)
    randomize_affine(affine, 14)
    with torch.no_grad():
        colored.weight.copy_(torch.diag_embed(affine.weight.reshape(2, 2)))
        colored.bias.copy_(affine.bias)
    for train in (True, False):
        affine.train(train)
        colored.train(train)
        torch.testing.assert_close(colored(x), affine(x), rtol=1e-12, atol=1e-12)


def test_coloring_after_batch_norm_folds():
    """Coloring composes with a per-channel operation's fold: M = Γ diag(a), b' = Γ b + β."""
    mod = nk.Normalization(4, nap=nk.nap.Batch(), nop=nk.nop.Standardize(),
                           nrr=nk.nrr.Coloring(group_size=2), dtype=DT)
    randomize_affine(mod, 15)
    mod(correlated(16, 4, 16, 3))
    mod.eval()
    x = correlated(5, 4, 17, 3)
    mat, shift = mod.folded()
    y = torch.einsum("ij,njs->nis", torch.block_diag(*mat), x) + shift[:, None]
    torch.testing.assert_close(y, mod(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(nk.ConfigError, match="cannot fold Coloring"):
        nk.Normalization(4, nap=nk.nap.Batch(group_size=4), nop=nk.nop.Whiten(),
                         nrr=nk.nrr.Coloring(group_size=2)).eval().folded()


# ------------------------------------------------------------- cached evaluation fold
def _trained(name: str, c: int = 8, d: int = 4) -> nk.Normalization:
    mod = make_preset(name, c, d, dtype=DT)
    randomize_affine(mod, 35)
    mod(correlated(16, c, 36, 2))
    return mod.eval()


def _count_folds(monkeypatch: pytest.MonkeyPatch, mod: nk.Normalization) -> list[int]:
    calls = [0]
    original = type(mod).folded

    def counting(self):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(self)
    monkeypatch.setattr(type(mod), "folded", counting)
    return calls


@pytest.mark.parametrize("name", list(PRESETS))
def test_eval_fold_is_cached_until_state_changes(name, monkeypatch):
    """Evaluation without gradients folds once and reuses (M, b) until a parameter or buffer
    changes in place or is replaced; every output equals the plain composition's."""
    mod = _trained(name)
    plain = copy.deepcopy(mod)
    plain.native = False  # the generic path: recomputes W(Σ) and the fold on every call
    calls = _count_folds(monkeypatch, mod)
    x = correlated(3, 8, 37, 2)

    def check() -> None:
        with torch.no_grad():
            plain.load_state_dict(mod.state_dict())
            torch.testing.assert_close(mod(x), plain(x), rtol=1e-10, atol=1e-10)

    check()
    check()
    assert calls[0] == 1
    with torch.no_grad():
        mod.weight.mul_(1.5)  # in place: the version counter moves
    check()
    assert calls[0] == 2
    mod.running_mean.add_(0.25)
    check()
    assert calls[0] == 3
    mod.bias = torch.nn.Parameter(torch.randn(8, dtype=DT))  # a new tensor object
    check()
    assert calls[0] == 4
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in mod.state_dict().items()}
    mod.load_state_dict(state)
    check()
    assert calls[0] == 5


@pytest.mark.parametrize("spatial", [(), (1,), (3,), (9,), (3, 5)])
def test_eval_fold_matches_the_plain_composition_for_every_layout(spatial):
    """Both layouts of the folded product (per-position matmul when positions outnumber the
    group size d = 4, one (G, d, N·S) product otherwise) give the generic path's output."""
    mod = _trained("dbn")
    plain = copy.deepcopy(mod)
    plain.native = False
    x = correlated(5, 8, 40, *spatial)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), plain(x), rtol=1e-10, atol=1e-10)


def test_eval_fold_is_not_used_when_a_gradient_is_needed(monkeypatch):
    mod = _trained("dbn")
    calls = _count_folds(monkeypatch, mod)
    x = correlated(3, 8, 38, 2)
    y = mod(x)  # γ, β require grad: the generic path, differentiable
    assert y.grad_fn is not None and calls[0] == 0
    y.sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        z = mod(x)
    assert calls[0] == 1
    torch.testing.assert_close(z, y.detach(), rtol=1e-10, atol=1e-10)


def test_eval_fold_cache_survives_pickle_and_deepcopy(tmp_path):
    mod = _trained("iternorm")
    x = correlated(3, 8, 39, 2)
    with torch.no_grad():
        y = mod(x)
    twin = copy.deepcopy(mod)
    torch.save(mod, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        twin.weight.mul_(2.0)  # the copy's fold must not come from the original's cache
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
        torch.testing.assert_close(mod(x), y, rtol=0, atol=0)
        assert not torch.allclose(twin(x), y)
