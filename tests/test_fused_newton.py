"""IterNorm's Newton–Schulz forward with its iterates kept and its reverse on them
(``normkit.functional.fused_newton``) against the composition's autograd.

Numerics: the forward runs the composition's own operations (``W`` bitwise equal). The reverse
reassociates autograd's products and drops the transposes of the (symmetric in exact arithmetic)
iterates: a few roundings of O(κ) values, ``κ ≲ 1e3`` for the random covariances here, so
1e-9 relative in float64; ``κ ≈ 1e6`` (a near-singular covariance) still agrees to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.errors import ConfigError
from normkit.functional.fused_batch_whiten import batch_whiten_apply, batch_whiten_fit
from normkit.functional.fused_newton import newton_fit, newton_input_term
from normkit.functional.whiten import newton_schulz_matrix

F64 = torch.float64
CLOSE = dict(rtol=1e-9, atol=1e-10)


def _cov(g: int, d: int, seed: int, condition: float = 1.0) -> torch.Tensor:
    """Random ``(g, d, d)`` covariances; ``condition > 1`` shrinks one direction by it."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(g, d, 3 * d, generator=gen, dtype=F64)
    a[:, 0] = a[:, 1] + a[:, 0] / condition
    return a @ a.mT / (3 * d)


def _autograd_term(cov: torch.Tensor, gw: torch.Tensor, eps: float, steps: int,
                   m: int) -> torch.Tensor:
    s = cov.clone().requires_grad_()
    (ds,) = torch.autograd.grad(newton_schulz_matrix(s, steps, eps), s, gw)
    return (ds + ds.mT) / m


@pytest.mark.parametrize("steps", [1, 2, 5, 9])
def test_fit_is_the_composition(steps: int) -> None:
    """``W`` of the kept-iterates forward is the composition's, bit for bit; the stack holds
    ``Y_k, Z_k, T_{k+1}`` of each step and the trace."""
    cov = _cov(3, 5, seed=steps)
    w, saved, scale = newton_fit(cov, 1e-3, steps)
    assert torch.equal(w, newton_schulz_matrix(cov, steps, 1e-3))
    assert saved.shape == (3 * steps, 3, 5, 5) and scale.shape == (2, 3, 1, 1)
    eye = torch.eye(5, dtype=F64)
    a = cov + 1e-3 * eye
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert_close(scale[0].flatten(), trace, **CLOSE)
    assert torch.equal(scale[1], torch.ones_like(scale[1]))
    assert_close(saved[0], a / trace[:, None, None], **CLOSE)  # Y_0
    assert torch.equal(saved[1], eye.expand(3, 5, 5))  # Z_0
    assert_close(saved[2], 1.5 * eye - 0.5 * saved[0], **CLOSE)  # T_1


@pytest.mark.parametrize("steps", [1, 2, 5, 9])
def test_input_term_is_autograds(steps: int) -> None:
    """The reverse on the kept iterates equals autograd through the composition (float64)."""
    cov = _cov(2, 6, seed=10 + steps)
    gw = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(20 + steps), dtype=F64)
    w, saved, scale = newton_fit(cov, 1e-3, steps)
    got = newton_input_term(saved, scale, w, gw, 11)
    assert_close(got, _autograd_term(cov, gw, 1e-3, steps, 11), **CLOSE)


def test_input_term_ill_conditioned() -> None:
    """A near-singular covariance (κ ≈ 1e6, eps 1e-9): still autograd's gradient, to the
    rounding of O(κ) values."""
    cov = _cov(2, 4, seed=3, condition=1e3)
    gw = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    w, saved, scale = newton_fit(cov, 1e-9, 5)
    ref = _autograd_term(cov, gw, 1e-9, 5, 3)
    assert_close(newton_input_term(saved, scale, w, gw, 3), ref, rtol=1e-6,
                 atol=1e-6 * float(ref.abs().max()))


def test_clamped_trace_has_no_trace_gradient() -> None:
    """``Σ = 0``, ``ε = 0``: the trace is clamped at ``tiny`` (``live = 0``) and the gradient is
    autograd's through the clamp (no trace term)."""
    cov = torch.zeros(1, 3, 3, dtype=F64)
    gw = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(5), dtype=F64) * 1e-160
    w, saved, scale = newton_fit(cov, 0.0, 5)
    assert float(scale[1]) == 0.0
    ref = _autograd_term(cov, gw, 0.0, 5, 2)
    assert torch.isfinite(ref).all()
    assert_close(newton_input_term(saved, scale, w, gw, 2), ref, **CLOSE)


def test_backward_without_the_iterates() -> None:
    """Statistics without the kept iterates (``U = f = None``): the backward runs the iteration
    again, with the same gradients."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    grad = torch.randn(5, 2, 3, 4, generator=gen, dtype=F64)
    mu, cov, scale, saved, w = batch_whiten_fit(x.detach(), "newton", 1e-3)
    grads = [torch.autograd.grad(batch_whiten_apply(x, (mu, cov, u, f, w), method="newton",
                                                    eps=1e-3), x, grad)[0]
             for u, f in ((saved, scale), (None, None))]
    assert_close(*grads, **CLOSE)


def test_gradcheck_module() -> None:
    """float64 gradcheck and gradgradcheck of the fused IterNorm module (T = 3, 2 groups)."""
    m = nk.create("iternorm", 4, group_size=2, iterations=3, dtype=F64)
    x = torch.randn(6, 4, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert gradcheck(m, (x.requires_grad_(),))
    assert gradgradcheck(m, (x,))


def test_bad_iterations_raise() -> None:
    with pytest.raises(ConfigError, match="got 0"):
        newton_fit(_cov(1, 2, seed=8), 1e-3, 0)
