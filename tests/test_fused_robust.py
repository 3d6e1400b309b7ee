"""The hand-derived backwards of ``normkit.functional.fused_robust`` against their plain
compositions: L1/range standardization (``robust_scale``), Online Normalization's control
process with the recovery (``online_affine``), and the moments and standardization that the
robust operations blend statistics between (``moments``, ``standardize_affine``).

Each Function must give the plain autograd composition's output and every gradient (float64,
tight), pass ``gradcheck`` and ``gradgradcheck`` where it is differentiable twice, and the modules
must run it by default and the composition with ``native=False``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.functional.fused_robust import (
    moments,
    moments_plain,
    online_affine,
    robust_scale,
    robust_scale_plain,
    standardize_affine,
    standardize_affine_plain,
)
from normkit.functional.online import online_control_backward

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
DIMS = (0, 3)


def rand(*shape: int, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)


def _scaled(kind: str, c: float = 0.7) -> Any:
    def fused(x: torch.Tensor, w: Any, b: Any) -> torch.Tensor:
        with torch.no_grad():  # as the modules hand them over: computed once, no graph
            mean = x.mean(DIMS, keepdim=True)
            rho = ((x - mean).abs().mean(DIMS, keepdim=True) if kind == "l1"
                   else x.amax(DIMS, keepdim=True) - x.amin(DIMS, keepdim=True))
        return robust_scale(x, DIMS, kind=kind, mean=mean, scale=c * rho, c=c, weight=w,
                            bias=b, eps=1e-5)

    def plain(x: torch.Tensor, w: Any, b: Any) -> torch.Tensor:
        return robust_scale_plain(x, w, b, 1e-5, DIMS, kind, c)

    return fused, plain


@pytest.mark.parametrize("kind", ["l1", "range"])
@pytest.mark.parametrize("affine", [True, False])
def test_robust_scale_equals_the_composition(kind: str, affine: bool) -> None:
    fused, plain = _scaled(kind)
    x = rand(4, 3, 1, 5, seed=0)
    w, b = (rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)) if affine else (None, None)
    y, ref = fused(x, w, b), plain(x, w, b)
    assert_close(y, ref, **TIGHT)
    tensors = [t for t in (x, w, b) if t is not None]
    cot = rand(*y.shape, seed=9, grad=False)
    for u, v in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(u, v, **TIGHT)


@pytest.mark.parametrize("kind", ["l1", "range"])
def test_robust_scale_gradcheck_and_second_derivatives(kind: str) -> None:
    fused, _ = _scaled(kind)
    args = (rand(4, 2, 1, 3, seed=0), rand(1, 2, 1, 1, seed=1), rand(1, 2, 1, 1, seed=2))
    assert gradcheck(fused, args)
    assert gradgradcheck(fused, args)


def test_range_ties_share_the_gradient_as_amax_does() -> None:
    """After a ReLU the minimum (0) is taken many times: every tie gets an equal share, as
    autograd's ``amin`` gives it."""
    fused, plain = _scaled("range")
    x = rand(4, 3, 1, 5, seed=3).detach().relu().requires_grad_()
    assert int((x == 0).sum()) > 6
    cot = rand(4, 3, 1, 5, seed=9, grad=False)
    (gx,) = torch.autograd.grad(fused(x, None, None), x, cot)
    (ref,) = torch.autograd.grad(plain(x, None, None), x, cot)
    assert_close(gx, ref, **TIGHT)


def test_robust_scale_half_input_computes_in_float32() -> None:
    x = rand(4, 3, 1, 5, seed=0).detach().to(torch.bfloat16).requires_grad_()
    y = robust_scale(x, DIMS, kind="l1", mean=x.float().mean(DIMS, keepdim=True),
                     scale=x.float().std(DIMS, keepdim=True), c=1.0, weight=None, bias=None,
                     eps=1e-5)
    assert y.dtype == torch.float32
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.dtype == torch.bfloat16


def _nodes(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``y`` depends on."""
    seen: dict[int, str] = {}
    todo = [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = type(fn).__name__
            todo.extend(f for f, _ in fn.next_functions)
    return set(seen.values())


def _blended(x: torch.Tensor, w: Any, b: Any, fused: bool) -> torch.Tensor:
    """A blend of the batch moments with constants (as momentum and cross-iteration BN do),
    then the standardization."""
    mean, var = (moments if fused else moments_plain)(x, DIMS)
    mix_mean = 0.4 * mean + 0.3
    mix_var = 0.6 * var + 0.2 + 0.5 * (mean - 0.3).square()
    if fused:
        return standardize_affine(x, mix_mean, mix_var, weight=w, bias=b, eps=1e-5)
    return standardize_affine_plain(x, mix_mean, mix_var, w, b, 1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_moments_and_standardize_equal_the_composition(per_sample: bool) -> None:
    x = rand(4, 3, 1, 5, seed=0, scale=2.0)
    w, b = rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)
    cot = rand(4, 3, 1, 5, seed=9, grad=False)
    if per_sample:  # statistics per sample and channel (ghost batches, TaskNorm's blend)
        pairs = [(standardize_affine(x, *moments(x, (3,)), weight=w, bias=b, eps=1e-5),
                  standardize_affine_plain(x, *moments_plain(x, (3,)), w, b, 1e-5))]
    else:
        pairs = [(_blended(x, w, b, True), _blended(x, w, b, False))]
    for y, ref in pairs:
        assert_close(y, ref, **TIGHT)
        for u, v in zip(torch.autograd.grad(y, (x, w, b), cot),
                        torch.autograd.grad(ref, (x, w, b), cot), strict=True):
            assert_close(u, v, **TIGHT)


def test_moments_and_standardize_gradcheck_and_second_derivatives() -> None:
    args = (rand(3, 2, 1, 4, seed=0), rand(1, 2, 1, 1, seed=1), rand(1, 2, 1, 1, seed=2))

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _blended(x, w, b, True)

    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


_MODULES = [
    ("l1_bn", "_RobustScaleBackward", False, {}),
    ("range_bn", "_RobustScaleBackward", False, {}),
    ("range_bn", "_RobustScaleBackward", True, {}),
    ("online_norm", "_OnlineAffineBackward", False, {"backward_momentum": 0.3, "momentum": 0.2}),
    ("momentum_bn", "_StandardizeAffineBackward", False, {}),
    ("cross_iteration_bn", "_StandardizeAffineBackward", False, {}),
    ("ghost_bn", "_StandardizeAffineBackward", False, {"virtual_batch_size": 2}),
    ("task_norm", "_StandardizeAffineBackward", False, {}),
]


@pytest.mark.parametrize(("method", "node", "relu", "kw"), _MODULES,
                         ids=[f"{m[0]}{'-relu' if m[2] else ''}" for m in _MODULES])
def test_modules_use_the_fused_backward_and_native_false_the_composition(
        method: str, node: str, relu: bool, kw: dict[str, Any]) -> None:
    """Three training steps (the state buffers included: momentum statistics, the history of
    cross-iteration BN), then evaluation."""
    fused = nk.create(method, 3, dtype=F64, **kw)
    plain = nk.create(method, 3, dtype=F64, native=False, **kw)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 2.0)
        fused.bias.normal_()
    plain.load_state_dict(fused.state_dict())
    for step in range(3):
        x = rand(4, 3, 5, seed=step) * 2 + 1
        x = (x.relu() if relu else x).detach().requires_grad_()
        y, ref = fused(x), plain(x)
        assert node in _nodes(y) and node not in _nodes(ref)
        assert_close(y, ref, **TIGHT)
        cot = rand(4, 3, 5, seed=10 + step, grad=False)
        got = torch.autograd.grad(y, (x, *fused.parameters()), cot)
        want = torch.autograd.grad(ref, (x, *plain.parameters()), cot)
        for u, v in zip(got, want, strict=True):
            assert_close(u, v, **TIGHT)
        for (k, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items(),
                                  strict=True):
            assert_close(a, b, **TIGHT, msg=k)
    fused.eval()
    plain.eval()
    x = rand(2, 3, 5, seed=7)
    assert_close(fused(x), plain(x), **TIGHT)


def test_online_affine_is_the_control_process_then_the_recovery() -> None:
    """Against :func:`online_control_backward` on ``x̂`` and autograd of ``γ x̂ + β``."""
    x = rand(5, 3, 1, 6, seed=0, scale=2.0)
    w, b = rand(1, 3, 1, 1, seed=1), rand(1, 3, 1, 1, seed=2)
    mean = rand(5, 3, 1, 1, seed=3, grad=False)
    scale = rand(5, 3, 1, 1, seed=4, grad=False).abs() + 0.5
    u0, v0 = rand(3, seed=5, grad=False), rand(3, seed=6, grad=False)
    sv, sm = torch.var_mean(x.detach(), 3, correction=0, keepdim=True)
    u, v = u0.clone(), v0.clone()
    y = online_affine(x, mean, scale, sample_mean=sm, sample_var=sv, weight=w, bias=b,
                      grad_mean=u, grad_proj=v, k=0.2)
    cot = rand(5, 3, 1, 6, seed=9, grad=False)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), cot)
    xhat = ((x - mean) * scale).detach().requires_grad_()
    ref = xhat * w + b
    assert_close(y, ref, **TIGHT)
    g_xhat, rw, rb = torch.autograd.grad(ref, (xhat, w, b), cot)
    rx, ru, rv = online_control_backward(g_xhat, xhat.detach(), scale, u0.reshape(3, 1, 1),
                                         v0.reshape(3, 1, 1), 0.2)
    for got, want in ((gx, rx), (gw, rw), (gb, rb), (u, ru.reshape(-1)), (v, rv.reshape(-1))):
        assert_close(got, want, **TIGHT)


def test_online_affine_is_first_order() -> None:
    x = rand(2, 3, 1, 4, seed=0)
    sv, sm = torch.var_mean(x.detach(), 3, correction=0, keepdim=True)
    y = online_affine(x, sm, torch.ones_like(sm), sample_mean=sm, sample_var=sv, weight=None,
                      bias=None, grad_mean=torch.zeros(3, dtype=F64),
                      grad_proj=torch.zeros(3, dtype=F64), k=0.1)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("method", ["power_norm", "mabn", "momentum_bn", "l1_bn", "range_bn",
                                    "online_norm"])
def test_evaluation_runs_bn_kernel_and_equals_the_composition(method: str) -> None:
    """Evaluation with the running estimates (constants) runs BN's evaluation kernel (one
    ``native_batch_norm`` call) and gives the composition's output and input gradient."""
    fused, plain = nk.create(method, 3, dtype=F64), nk.create(method, 3, dtype=F64, native=False)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 2.0)
        fused.bias.normal_()
    plain.load_state_dict(fused.state_dict())
    for step in range(2):
        x = (rand(4, 3, 5, seed=step, grad=False) * 2 + 1).requires_grad_()
        fused(x).sum().backward()
        plain(x).sum().backward()
    fused.eval()
    plain.eval()
    x = rand(2, 3, 5, seed=7)
    y, ref = fused(x), plain(x)
    assert "NativeBatchNormBackward0" in _nodes(y)
    assert "NativeBatchNormBackward0" not in _nodes(ref)
    assert_close(y, ref, **TIGHT)
    cot = rand(2, 3, 5, seed=8, grad=False)
    for u, v in zip(torch.autograd.grad(y, (x, fused.weight), cot),
                    torch.autograd.grad(ref, (x, plain.weight), cot), strict=True):
        assert_close(u, v, **TIGHT)
