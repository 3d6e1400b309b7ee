"""Batch-group normalization's fused training step (``normkit.functional.fused_batch_group``)
against BN's kernel over the group view and against the module's plain composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.functional.fused_batch_group import batch_group_moments, batch_group_standardize

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def rand(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_(grad)


def _reference(x: torch.Tensor, g: int, w: torch.Tensor | None, b: torch.Tensor | None,
               running: tuple[torch.Tensor, torch.Tensor] | None, factor: float) -> torch.Tensor:
    """BN's kernel over ``(N, g, C/g·S)``, then the per-channel affine (the former path)."""
    n, c = x.shape[:2]
    rm, rv = (None, None) if running is None else running
    y = F.batch_norm(x.reshape(n, g, -1), rm, rv, None, None, True, factor, 1e-5)
    y = y.reshape(n, c, -1)
    if w is not None:
        y = y * w.reshape(1, c, 1)
    if b is not None:
        y = y + b.reshape(1, c, 1)
    return y.reshape(x.shape)


@pytest.mark.parametrize("affine", [True, False])
def test_equals_bn_kernel_over_the_groups(affine: bool) -> None:
    x = rand(3, 6, 2, 5, seed=0)
    w, b = (rand(6, seed=1), rand(6, seed=2)) if affine else (None, None)
    ours_run = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    ref_run = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    y = batch_group_standardize(x, (3, 2), w, b, 1e-5, ours_run, 0.1)
    ref = _reference(x, 3, w, b, ref_run, 0.1)
    assert_close(y, ref, **TIGHT)
    for a, r in zip(ours_run, ref_run, strict=True):  # the running estimates, variance unbiased
        assert_close(a, r, **TIGHT)
    tensors = [t for t in (x, w, b) if t is not None]
    cot = rand(*y.shape, seed=9, grad=False)
    for a, r in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(a, r, **TIGHT)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_second_derivatives(affine: bool) -> None:
    x = rand(3, 4, 5, seed=0)
    w, b = (rand(4, seed=1), rand(4, seed=2)) if affine else (None, None)

    def f(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        return batch_group_standardize(x, (2, 2), w, b, 1e-5)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_moments_are_exact_under_a_large_offset() -> None:
    """Two passes around each row's mean, pooled: no cancellation of E[x²] − μ² in float32."""
    vf = (rand(4, 2, 3, 7, seed=0, grad=False) + 1e4).float()
    mean, var = batch_group_moments(vf)
    v = vf.double()  # the float32 values, exactly
    assert_close(var.double(), v.var((0, 2, 3), correction=0, keepdim=True), rtol=1e-3, atol=0)
    assert_close(mean.double(), v.mean((0, 2, 3), keepdim=True), rtol=1e-6, atol=0)


@pytest.mark.parametrize("group_size", [1, 2])
def test_module_equals_its_plain_composition(group_size: int) -> None:
    fused = nk.create("batch_group_norm", 6, group_size=group_size, dtype=F64)
    plain = nk.create("batch_group_norm", 6, group_size=group_size, dtype=F64, native=False)
    with torch.no_grad():
        fused.weight.copy_(rand(6, seed=1, grad=False))
        fused.bias.copy_(rand(6, seed=2, grad=False))
    plain.load_state_dict(fused.state_dict())
    x = rand(4, 6, 3, 3, seed=0)
    y, ref = fused(x), plain(x)
    assert_close(y, ref, **TIGHT)
    params = [x, fused.weight, fused.bias]
    cot = rand(*y.shape, seed=9, grad=False)
    for a, r in zip(torch.autograd.grad(y, params, cot),
                    torch.autograd.grad(ref, [x, plain.weight, plain.bias], cot), strict=True):
        assert_close(a, r, **TIGHT)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(fused, name), getattr(plain, name), **TIGHT)
    assert y.grad_fn is not None
    names = {type(y.grad_fn).__name__, *(type(f).__name__ for f, _ in y.grad_fn.next_functions)}
    assert "_StandardizeAffineBackward" in names  # the fused Function, not BN's kernel


def test_one_value_per_group_is_refused_as_by_the_kernel() -> None:
    m = nk.create("batch_group_norm", 6, group_size=1)
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 6))
