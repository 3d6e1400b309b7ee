"""The hand-derived per-sample ZCA and switchable-whitening backwards
(``normkit.functional.fused_whiten``) against the plain autograd composition (``native=False``)
and the float64 reference whitening matrix.

Numerics: both paths whiten with ``eigh`` of the same float64 covariance; the plain one
differentiates with divided differences ``(f_i − f_j)/(λ_i − λ_j)`` (its own rounding, relative
``~u·κ`` with ``κ`` the condition number of the tiny covariances here, < 1e3), the fused one with
the closed form ``(f_i f_j)²/(f_i + f_j)``: agreement to 1e-9 relative in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

import normkit as nk
from normkit._bench.reference import whitening_matrix
from normkit.functional.fused_switch_whiten import switch_whiten_apply, switch_whiten_fit
from normkit.functional.fused_whiten import inv_sqrt_eigh, sample_zca_apply, sample_zca_fit
from whitening_util import outputs_and_grads

F64 = torch.float64
CLOSE = dict(rtol=1e-9, atol=1e-10)
ROWS = [("instance_whitening", {"group_size": 2}), ("instance_whitening", {"group_size": 4}),
        ("group_whitening", {"num_groups": 2})]
IDS = ["iw_g2", "iw_g4", "gw"]
INSTANCE = ("G", "G", "D", "M")


def rand(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_(grad)


def _pair(name: str, kw: dict, affine: bool) -> tuple[nk.Normalization, nk.Normalization]:
    fused = nk.create(name, 4, affine=affine, dtype=F64, **kw)
    if affine:
        with torch.no_grad():
            fused.weight.copy_(rand(4, seed=7, grad=False))
            fused.bias.copy_(rand(4, seed=8, grad=False))
    plain = nk.create(name, 4, affine=affine, dtype=F64, native=False, **kw)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("name", "kw"), ROWS, ids=IDS)
def test_module_matches_the_composition(name: str, kw: dict, affine: bool) -> None:
    """Output, input gradient and γ, β gradients equal ``native=False``'s (float64)."""
    fused, plain = _pair(name, kw, affine)
    x = rand(3, 4, 5, 6, seed=1)
    g = rand(3, 4, 5, 6, seed=2, grad=False)
    outs = [outputs_and_grads(m, x, g) for m in (fused, plain)]
    assert len(outs[0]) == (4 if affine else 2)
    for a, b in zip(*outs, strict=True):
        assert_close(a, b, **CLOSE)


def test_module_matches_the_float64_reference() -> None:
    """Instance whitening of 4 channels is ``W_n (x_n − μ_n)`` with the reference ZCA matrix of
    each sample's biased covariance (``normkit._bench.reference``)."""
    x = rand(3, 4, 5, 6, seed=3, grad=False)
    y = nk.create("instance_whitening", 4, dtype=F64)(x)
    xs = x.reshape(3, 4, 30)
    xc = xs - xs.mean(-1, keepdim=True)
    w = whitening_matrix(xc @ xc.mT / 30, "zca", 1e-5, 0)
    assert_close(y, (w @ xc).reshape(x.shape), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck(affine: bool) -> None:
    """float64 gradcheck of fit + apply w.r.t. the input and the per-row γ, β."""
    x = rand(2, 2, 3, 5, seed=4)
    w = rand(1, 2, 3, 1, seed=5) if affine else None
    b = rand(1, 2, 3, 1, seed=6) if affine else None

    def f(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            _, _, xc, fv, u, wm = sample_zca_fit(x, INSTANCE, 1e-3)
        return sample_zca_apply(x, (xc, fv, u, wm), roles=INSTANCE, weight=w, bias=b)

    assert gradcheck(f, (x, w, b))


def test_gradcheck_recovery_after_the_matrix() -> None:
    """float64 gradcheck with a per-channel γ, β that varies within each sample's matrix (group
    whitening: 2 group-vectors of 2 channels × 4 positions), applied inside the op."""
    roles = ("G", "D", "M", "M")
    x = rand(3, 2, 2, 4, seed=14)
    w, b = rand(1, 2, 2, 1, seed=15), rand(1, 2, 2, 1, seed=16)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, _, xc, fv, u, wm = sample_zca_fit(x, roles, 1e-3)
        return sample_zca_apply(x, (xc, fv, u, wm), roles=roles, post_weight=w, post_bias=b)

    assert gradcheck(f, (x, w, b))


def test_equal_eigenvalues_give_the_exact_gradient() -> None:
    """Repeated eigenvalues (orthogonal rows of equal norm: ``Σ = I``): the closed form needs no
    mask and gives the composition's gradient."""
    a = rand(6, 6, seed=9, grad=False)
    a[:, 0] = 1.0
    q = torch.linalg.qr(a)[0].mT[1:]  # 5 orthonormal rows orthogonal to 1: zero mean
    x = torch.stack([q[:3], 2 * q[2:]]).unsqueeze(1).requires_grad_()  # (2, 1, 3, 6)
    with torch.no_grad():
        _, cov, xc, fv, u, wm = sample_zca_fit(x, INSTANCE, 1e-5)
    evals = torch.linalg.eigvalsh(cov.flatten(0, 1))
    assert_close(evals, evals[:, :1].expand_as(evals), rtol=1e-12, atol=0)  # repeated
    y = sample_zca_apply(x, (xc, fv, u, wm), roles=INSTANCE)
    g = rand(*y.shape, seed=10, grad=False)
    got = torch.autograd.grad(y, x, g)[0]
    m = nk.create("instance_whitening", 3, dtype=F64, native=False)
    ref = torch.autograd.grad(m(x.squeeze(1)), x, g.squeeze(1))[0]
    assert torch.isfinite(got).all()
    assert_close(got, ref, **CLOSE)


def test_second_derivative_raises() -> None:
    x = rand(2, 4, 3, 3, seed=11)
    y = nk.create("instance_whitening", 4, dtype=F64)(x)
    with pytest.raises(RuntimeError, match="first-order only.*native=False"):
        torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)


def test_non_finite_input_gives_nan_not_an_error() -> None:
    """A NaN or Inf sample whitens to NaN (its own matrix only); the others are unaffected."""
    x = rand(3, 4, 3, 3, seed=12, grad=False)
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 1, 1] = float("inf")
    y = nk.create("instance_whitening", 4, dtype=F64)(x)
    assert torch.isnan(y[:2]).all()
    clean = nk.create("instance_whitening", 4, dtype=F64)(x[2:])
    assert_close(y[2:], clean, rtol=0, atol=0)


def test_inv_sqrt_eigh_whitens() -> None:
    """``W (Σ + εI) W = I`` with ``W = U diag(f) Uᵀ``; a rank-deficient ``Σ`` is clamped at ε."""
    a = rand(4, 3, 2, seed=13, grad=False)  # rank 2 of 3
    cov = a @ a.mT
    f, u, w = inv_sqrt_eigh(cov, 1e-4)
    eye = torch.eye(3, dtype=F64)
    assert_close(w @ (cov + 1e-4 * eye) @ w, eye.expand(4, 3, 3), rtol=1e-8, atol=1e-8)
    assert_close(u @ torch.diag_embed(f) @ u.mT, w, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ switchable whitening
MODES = [("bw", "iw", "bn", "in"), ("bw",), ("iw", "in"), ("bn", "iw")]


@pytest.mark.parametrize("modes", MODES, ids=["all", "bw", "iw_in", "bn_iw"])
def test_switchable_matches_the_composition(modes: tuple[str, ...]) -> None:
    """Output, input gradient, γ, β and both mixture logits' gradients and the running
    estimates equal ``native=False``'s (float64; logits away from uniform)."""
    fused = nk.create("switchable_whitening", 4, group_size=2, modes=modes, dtype=F64)
    with torch.no_grad():
        for i, p in enumerate(fused.parameters()):
            p.copy_(rand(*p.shape, seed=20 + i, grad=False))
    plain = nk.create("switchable_whitening", 4, group_size=2, modes=modes, dtype=F64,
                      native=False)
    plain.load_state_dict(fused.state_dict())
    x = rand(3, 4, 5, 6, seed=30)
    g = rand(3, 4, 5, 6, seed=31, grad=False)
    outs = [outputs_and_grads(m, x, g) for m in (fused, plain)]
    assert len(outs[0]) == 6
    for a, b in zip(*outs, strict=True):
        assert_close(a, b, **CLOSE)
    for name in ("running_mean", "running_cov"):
        assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-12, atol=1e-12)


def test_switchable_gradcheck() -> None:
    """float64 gradcheck of fit + apply w.r.t. the input, the mixture weights and γ, β."""
    x = rand(3, 2, 2, 4, seed=32)
    a_b = torch.tensor(0.3, dtype=F64, requires_grad=True)
    coef = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64, requires_grad=True)
    w, b = rand(1, 2, 2, 1, seed=33), rand(1, 2, 2, 1, seed=34)

    def f(x: torch.Tensor, a_b: torch.Tensor, coef: torch.Tensor, w: torch.Tensor,
          b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xt, ci, delta, _, cb, fv, u, wm = switch_whiten_fit(x, coef, 1e-3)
        return switch_whiten_apply(x, (xt, ci, delta, cb, fv, u, wm), a_b, coef, weight=w,
                                   bias=b)

    assert gradcheck(f, (x, a_b, coef, w, b))


@pytest.mark.parametrize("shape", [(6, 32), (4, 32, 2, 2), (8, 32, 5, 5)])
def test_batch_whitening_keeps_its_own_fused_ops(shape: tuple[int, ...]) -> None:
    """Only per-sample whitening runs the per-sample op; batch whitening (dbn), in either layout
    (few positions: the matrix view; many: in place), keeps its checked custom ops."""
    seen: list[str] = []

    def spy(func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        seen.append(str(func))
        return func(*args, **(kwargs or {}))

    x = torch.randn(*shape, requires_grad=True)
    m = nk.create("dbn", 32)
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return spy(func, types, args, kwargs)

    with Spy():
        m(x)
    ops = " ".join(seen)
    in_place = len(shape) == 4 and shape[2] * shape[3] >= 16  # S ≥ d (dbn's group size 16)
    assert "whiten_sample" not in ops
    assert ("whiten_batch_stats" if in_place else "whiten_moments") in ops


@pytest.mark.filterwarnings(  # torch's own: inductor imports torch.utils.mkldnn
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["instance_whitening", "group_whitening", "switchable_whitening"])
def test_inductor_compiles_the_fused_ops(name: str) -> None:
    """Inductor checks every custom op's output strides against its fake kernel: eigh's
    column-major eigenvectors must come out contiguous (they did not, and compiling failed)."""
    torch._dynamo.reset()
    m = nk.create(name, 32)
    compiled = torch.compile(m, backend="inductor", fullgraph=True)
    x = torch.randn(4, 32, 3, 3, requires_grad=True)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = m(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
