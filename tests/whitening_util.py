"""Shared helpers of the whitening tests (``tests/test_whitening*.py``): the presets, float64 test
data, the shared float64 reference formula and the one-thread fixture.

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
The test files import the presets from here, never from :mod:`normkit.methods.whitening` directly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

import normkit as nk
from normkit._bench.reference import whitening_matrix
from normkit.functional import whiten as W

_SNAPSHOT = dict(nk.registry._METHODS), dict(nk.registry._KEYS)
from normkit.methods.whitening import (  # noqa: E402, F401  (registers them; tests import them here)
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


def running_name(estimate: str) -> str:
    return "running_matrix" if estimate == "matrix" else "running_cov"


def outputs_and_grads(m: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple:
    """``(y, ∂x, ∂θ...)`` of ``m`` on a fresh leaf copy of ``x`` for the cotangent ``g``: what the
    fused-vs-plain tests compare."""
    xi = x.detach().clone().requires_grad_()
    y = m(xi)
    return (y, *torch.autograd.grad(y, [xi, *m.parameters()], g))
