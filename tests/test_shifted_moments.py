"""The compiled moments of small statistics (:func:`normkit.functional.statistics.shifted_moments`):
under ``torch.compile`` on CPU, :func:`~normkit.functional.statistics.moments` of at most 1024
values per statistic (where inductor would compute ``var_mean`` in two passes) takes the shifted
one-pass sums. Their values and derivatives equal the two-pass composition's in float64 (a mean
offset of 1e4 included), and a compiled positional norm (statistics over ``C = 6`` channels)
trains as eager does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from generic_util import assert_same_step
from normkit.functional.statistics import shifted_moments

F64 = torch.float64


def _two_pass(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).square().mean(dims, keepdim=True)


@pytest.mark.parametrize("dims", [(1, 2), (3,), (0, 3)], ids=["position", "instance", "batch"])
def test_shifted_moments_equal_two_pass(dims: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=gen, dtype=F64) * 3 + 1e4
    mean, var = shifted_moments(x, dims)
    ref_mean, ref_var = _two_pass(x, dims)
    assert_close(mean, ref_mean)
    assert_close(var, ref_var)
    # first and second derivatives (the shift is held constant: the moments do not depend on it)
    xs = (x - 1e4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: shifted_moments(t, dims), (xs,))
    assert torch.autograd.gradgradcheck(lambda t: shifted_moments(t, dims), (xs,))
    ga, gb = (torch.randn(mean.shape, generator=gen, dtype=F64) for _ in range(2))
    xe = x.clone().requires_grad_()
    assert_close(torch.autograd.grad(shifted_moments(xs, dims), xs, (ga, gb))[0],
                 torch.autograd.grad(_two_pass(xe, dims), xe, (ga, gb))[0])


def test_shifted_moments_of_constant_input_are_exact() -> None:
    """Constant areas: the shift is the value, the variance exactly 0 (never negative)."""
    x = torch.full((2, 3, 1, 4), 7.25)
    mean, var = shifted_moments(x, (1, 2))
    assert torch.equal(mean, torch.full_like(mean, 7.25))
    assert torch.equal(var, torch.zeros_like(var))


@pytest.mark.parametrize("affine", [False, True])
def test_compiled_positional_norm_matches_eager(affine: bool, dynamo_reset: None) -> None:
    """pn compiled (AOTAutograd, no code generation; the shifted sums as inductor gets them)
    against eager (torch's LayerNorm kernel over the moved channels): output, gradients of the
    input and the parameters, in float64 with a mean offset."""
    gen = torch.Generator().manual_seed(1)
    m = nk.create("pn", 6, affine=affine, dtype=F64)
    if affine:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    c = copy.deepcopy(m)
    compiled = torch.compile(c, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 6, 4, 5, generator=gen, dtype=F64) * 2 + 1e3
    assert_same_step(m, compiled, x)
