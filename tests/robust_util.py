"""Shared helpers of the robust-family tests (``tests/test_robust*.py``): float64 test data, the
BN formulas the references are written with, and the comparison against ``torch.nn`` BN.

Tolerances: two float64 computations of one formula agree to ``1e-10`` (eps64 = 2.2e-16; a few
hundred roundings of O(10) values); torch's BN kernel vs ours in float64 likewise.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from torch import Tensor
from torch.testing import assert_close

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
EPS = 1e-5
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0, scale: float = 1.5, offset: float = 0.5) -> Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=F64) * scale + offset


def per_channel(x: Tensor) -> Tensor:
    """``(C, N·S)``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def view(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def standardize(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return (x - mean.view(view(x))) / torch.sqrt(var.view(view(x)) + EPS)


def randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed)) * 0.5 + (1.0 if name == "weight" else 0.0))
    return m


def affine(m: torch.nn.Module, y: Tensor) -> Tensor:
    return y * m.weight.detach().view(view(y)) + m.bias.detach().view(view(y))


def grads(m: torch.nn.Module, x: Tensor, seed: int = 7) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients for a fixed random cotangent (the same
    values, rounded to the output dtype, whatever that dtype)."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    cot = torch.randn(y.shape, generator=gen(seed), dtype=F64).to(y.dtype)
    out = torch.autograd.grad(y, [x, *m.parameters()], cot)
    return y.detach(), out[0], list(out[1:])


def assert_same_as_bn(m: torch.nn.Module, shapes: list[tuple[int, ...]], **tol: float) -> None:
    """``m`` equals ``torch.nn.BatchNorm`` over several training steps (outputs, gradients,
    running statistics), then in eval."""
    bn = torch.nn.BatchNorm1d(m.num_features, eps=m.eps, momentum=m.momentum).double()
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if k in bn.state_dict()})
    tol = tol or TIGHT
    for step, shape in enumerate(shapes):
        x = rand(*shape, seed=step)
        bn_in = x.reshape(shape[0], shape[1], -1) if x.dim() > 3 else x
        a, b = grads(m, x), grads(bn, bn_in)
        assert_close(a[0], b[0].reshape(x.shape), **tol)
        assert_close(a[1], b[1].reshape(x.shape), **tol)
        for ga, gb in zip(a[2], b[2], strict=True):
            assert_close(ga, gb, **tol)
        assert_close(m.running_mean, bn.running_mean, **tol)
        assert_close(m.running_var, bn.running_var, **tol)
    m.eval()
    bn.eval()
    x = rand(*shapes[0], seed=99)
    assert_close(m(x), bn(x.reshape(shapes[0][0], shapes[0][1], -1)).reshape(x.shape), **tol)


BN_SHAPES = [(6, 4), (3, 4, 5), (2, 4, 3, 3), (4, 4, 2)]
