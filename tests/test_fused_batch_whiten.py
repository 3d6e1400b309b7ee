"""The one-op batch whitening step (``normkit.functional.fused_batch_whiten``: in place on the
canonical view, ``S ≥ d``) against the plain autograd composition (``native=False``).

Numerics: both paths compute the same float64 moments and the same ``W(Σ)``; the gradient through
``W(Σ)`` is the closed form here, autograd there. PCA (the same masked eigen backward), Cholesky
(``Wᵀ Ψ W``) and Newton–Schulz (the iteration in reverse) are the same products reassociated: a
few roundings of O(κ) values. ZCA's
``(f_i f_j)²/(f_i + f_j)`` and the plain divided differences ``(f_i − f_j)/(λ_i − λ_j)`` differ
by the latter's rounding, relative ``~u·κ``. ``κ < 1e3`` for the small random covariances here:
1e-9 relative in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.functional.fused_batch_whiten import batch_whiten_apply, batch_whiten_fit
from whitening_util import outputs_and_grads

F64 = torch.float64
CLOSE = dict(rtol=1e-9, atol=1e-10)
METHODS = {"dbn": "zca", "pca_bw": "pca", "cd_bw": "cholesky", "iternorm": "newton"}


def rand(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_(grad)


def _ops(m: nk.Normalization, x: torch.Tensor) -> str:
    seen: list[str] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        m(x)
    return " ".join(seen)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("name", list(METHODS))
def test_module_matches_the_composition(name: str, affine: bool) -> None:
    """Output, input gradient, γ, β gradients and running buffers equal ``native=False``'s
    (float64; 4 groups of 2 channels whitened in place: 6 positions ≥ 2)."""
    fused = nk.create(name, 8, group_size=2, affine=affine, dtype=F64)
    if affine:
        with torch.no_grad():
            fused.weight.copy_(rand(8, seed=7, grad=False))
            fused.bias.copy_(rand(8, seed=8, grad=False))
    plain = nk.create(name, 8, group_size=2, affine=affine, dtype=F64, native=False)
    plain.load_state_dict(fused.state_dict())
    x = rand(5, 8, 2, 3, seed=1) + 0.5
    assert "whiten_batch_apply" in _ops(copy.deepcopy(fused), x.detach())
    g = rand(5, 8, 2, 3, seed=2, grad=False)
    outs = [outputs_and_grads(m, x, g) for m in (fused, plain)]
    assert len(outs[0]) == (4 if affine else 2)
    for a, b in zip(*outs, strict=True):
        assert_close(a, b, **CLOSE)
    for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
        assert_close(a, b, **CLOSE, msg=key)


def _fit_apply(method: str):
    """fit + apply of ``method`` as a function of the input and the per-row γ, β."""

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mu, cov, fv, u, wm = batch_whiten_fit(x, method, 1e-3)  # type: ignore[arg-type]
        return batch_whiten_apply(x, (mu, cov, u, fv, wm), method=method,  # type: ignore[arg-type]
                                  eps=1e-3, weight=w, bias=b)

    return f


@pytest.mark.parametrize("method", list(METHODS.values()))
def test_gradcheck(method: str) -> None:
    """float64 gradcheck of fit + apply w.r.t. the input and the per-row γ, β (3 groups of 3
    features over 4 × 5 samples)."""
    x = rand(4, 3, 3, 5, seed=4)
    w, b = rand(1, 3, 3, 1, seed=5), rand(1, 3, 3, 1, seed=6)

    assert gradcheck(_fit_apply(method), (x, w, b))


@pytest.mark.parametrize("method", ["pca", "cholesky", "newton"])
def test_gradgradcheck(method: str) -> None:
    """A second derivative differentiates the plain composition (float64 gradgradcheck of fit +
    apply w.r.t. the input and γ, β)."""
    x = rand(4, 2, 2, 3, seed=40)
    w, b = rand(1, 2, 2, 1, seed=41), rand(1, 2, 2, 1, seed=42)

    assert gradgradcheck(_fit_apply(method), (x, w, b))


def test_zca_second_derivative_raises() -> None:
    """ZCA's plain composition is first order (divided differences), and says so."""
    x = rand(4, 4, 3, 3, seed=11)
    y = nk.create("dbn", 4, group_size=2, dtype=F64)(x)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("method", list(METHODS.values()))
def test_opcheck(method: str) -> None:
    """``torch.library.opcheck`` of the op and its backward op: schema, fake kernels against the
    real ones, the autograd registration, AOT dispatch with dynamic shapes."""
    x = rand(4, 2, 3, 5, seed=20) + 0.5
    mu, cov, fv, u, wm = batch_whiten_fit(x.detach(), method, 1e-3)  # type: ignore[arg-type]
    w, b = rand(1, 2, 3, 1, seed=21), rand(1, 2, 3, 1, seed=22)
    grad = rand(4, 2, 3, 5, seed=23, grad=False)
    ops = torch.ops.normkit
    calls = [
        (ops.whiten_batch_apply.default, (x, mu, cov, u, fv, wm, w, b, method, 1e-3, 5, F64)),
        (ops.whiten_batch_apply.default,
         (x, mu, cov, u, fv, wm, None, None, method, 1e-3, 5, F64)),
        (ops.whiten_batch_apply_backward.default,
         (grad, x.detach(), mu, cov, u, fv, wm, w.detach(), method, 1e-3, 5, F64, F64)),
    ]
    for op, args in calls:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match="got 'svd'"):
        batch_whiten_fit(torch.randn(4, 2, 2, 3), "svd", 1e-3)  # type: ignore[arg-type]


@pytest.mark.parametrize("iterations", [1, 7])
def test_newton_gradient_any_iterations(iterations: int) -> None:
    """The reversed Newton–Schulz steps for other step counts than the default (float64
    gradcheck)."""
    x = rand(6, 1, 3, 4, seed=30)

    def f(x: torch.Tensor) -> torch.Tensor:
        mu, cov, fv, u, wm = batch_whiten_fit(x, "newton", 1e-3, iterations=iterations)
        return batch_whiten_apply(x, (mu, cov, u, fv, wm), method="newton", eps=1e-3,
                                  iterations=iterations)

    assert gradcheck(f, (x,))


def test_non_finite_input_gives_nan_not_an_error() -> None:
    """A NaN in the batch whitens every sample of its group to NaN (shared statistics), the
    other group is unaffected, and the backward runs."""
    x = rand(4, 4, 3, 3, seed=12, grad=False)
    x[0, 1, 0, 0] = float("nan")
    x.requires_grad_()
    y = nk.create("dbn", 4, group_size=2, dtype=F64)(x)
    assert torch.isnan(y[:, :2]).all() and torch.isfinite(y[:, 2:]).all()
    (g,) = torch.autograd.grad(y[:, 2:].sum(), x)
    assert torch.isfinite(g[:, 2:]).all()
