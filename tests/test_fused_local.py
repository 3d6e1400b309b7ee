"""The hand-derived backward of local normalization (``normkit.functional.fused_local``: LCN, LRN,
divisive normalization) against the plain autograd composition, and the window sums it uses.

The Function must give the composition's output and every gradient (float64, tight), pass
``gradcheck`` and ``gradgradcheck``, and the modules must run it by default and the composition
with ``native=False``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.functional import statistics as S
from normkit.functional.fused_local import (
    LocalMoments,
    Window,
    local_divisive,
    local_divisive_plain,
)

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def rand(*shape: int, seed: int, grad: bool = True, offset: float = 0.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) + offset
    return t.requires_grad_(grad)


# (view (N, A, B), spatial, window, centred, k, alpha, beta)
CASES = {
    "lcn": ((2, 2, 3), (4, 5), Window((4, 5), (2,), (3, 4), (3, 3), False), True, 1e-5, 1.0, 0.5),
    "lcn_one_channel": ((2, 3, 1), (4, 5), Window((4, 5), (2,), (3, 4), (3, 3), False), True, 1e-5,
                        1.0, 0.5),
    "lcn_even_1d": ((2, 1, 4), (7,), Window((7,), (2,), (3,), (4,), False), True, 1e-3, 1.0, 0.5),
    "lrn": ((2, 1, 6), (3, 3), Window((3, 3), (), (2, 3, 4), (3, 1, 1), True), False, 2.0, 0.1,
            0.75),
    "divisive": ((2, 1, 3), (5, 4), Window((5, 4), (), (2, 3, 4), (1, 3, 3), False), True, 1.0,
                 1.0, 0.5),
    "divisive_channels_3d": ((1, 1, 4), (3, 2, 3),
                             Window((3, 2, 3), (), (2, 3, 4, 5), (2, 3, 5, 2), False), True, 0.5,
                             0.3, 0.6),
    "uncentred_pad_even": ((2, 1, 3), (6,), Window((6,), (), (2, 3), (2, 4), True), False, 1.0,
                           1.0, 1.0),
}


def _fused(case: tuple[Any, ...]) -> Any:
    _, _, w, center, k, alpha, beta = case

    def fn(v: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
        with torch.no_grad():  # as the modules hand them over: computed once, no graph
            x = v.reshape(*v.shape[:3], *w.spatial)
            mean, second = S.local_moments(x, w.full, w.dims, w.windows, w.include_pad,
                                           center=center)
            flat = (*mean.shape[:3], -1)
            stats = (LocalMoments(w, mean=mean.reshape(flat), var=second.reshape(flat)) if center
                     else LocalMoments(w, ms=second.reshape(flat)))
        return local_divisive(v, stats, weight=weight, bias=bias, k=k, alpha=alpha, beta=beta)

    return fn


def _plain(case: tuple[Any, ...]) -> Any:
    _, _, w, center, k, alpha, beta = case
    return lambda v, weight, bias: local_divisive_plain(v, weight, bias, w, k, alpha, beta, center)


def _inputs(case: tuple[Any, ...], seed: int, affine: bool) -> tuple[Any, ...]:
    (n, a, b), spatial = case[0], case[1]
    s = 1
    for d in spatial:
        s *= d
    v = rand(n, a, b, s, seed=seed)
    if not affine:
        return v, None, None
    return v, rand(1, a, b, 1, seed=seed + 1), rand(1, a, b, 1, seed=seed + 2)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_composition(name: str, affine: bool) -> None:
    case = CASES[name]
    args = _inputs(case, 0, affine)
    y, ref = _fused(case)(*args), _plain(case)(*args)
    assert_close(y, ref, **TIGHT)
    assert "LocalDivisive" in type(y.grad_fn).__name__
    g = rand(*y.shape, seed=9, grad=False)
    wanted = [t for t in args if t is not None]
    for got, want in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(ref, wanted, g),
                         strict=True):
        assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_and_gradgradcheck(name: str) -> None:
    case = CASES[name]
    args = _inputs(case, 3, True)
    fn = _fused(case)
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


def test_large_offset_and_constant_windows() -> None:
    """The statistics and the backward are taken around a per-sample shift: an offset of 1e4
    leaves float32 gradients close to the float64 ones; a constant window (variance clamped at
    0) has the composition's gradient."""
    case = CASES["divisive"]
    v64 = rand(2, 1, 3, 20, seed=4, offset=1e4)
    g = rand(2, 1, 3, 20, seed=5, grad=False)
    want = torch.autograd.grad(_plain(case)(v64, None, None), v64, g)[0]
    v32 = v64.detach().float().requires_grad_()
    got = torch.autograd.grad(_fused(case)(v32, None, None), v32, g.float())[0]
    assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    flat = torch.ones(1, 1, 2, 20, dtype=F64, requires_grad=True)
    y, ref = _fused(case)(flat, None, None), _plain(case)(flat, None, None)
    gf = torch.ones_like(y)
    assert_close(torch.autograd.grad(y, flat, gf)[0], torch.autograd.grad(ref, flat, gf)[0],
                 **TIGHT)


@pytest.mark.parametrize("windows", [(3, 3), (4, 1), (2, 5), (9, 2)])
@pytest.mark.parametrize("include_pad", [True, False])
def test_box_sum_is_the_window_sum_and_flip_its_adjoint(windows: tuple[int, int],
                                                        include_pad: bool) -> None:
    x, y = rand(2, 3, 5, 4, seed=6, grad=False), rand(2, 3, 5, 4, seed=7, grad=False)
    got = S.box_sum(x, (2, 3), windows) * S.inverse_count(x.shape, (2, 3), windows,
                                                          include_pad, x)
    want = S.box_mean(x.requires_grad_(), (2, 3), windows, include_pad)  # the pooling path
    assert_close(got, want.detach(), **TIGHT)
    lhs = (S.box_sum(x.detach(), (2, 3), windows) * y).sum()
    rhs = (x.detach() * S.box_sum(y, (2, 3), windows, flip=True)).sum()
    assert_close(lhs, rhs, **TIGHT)


def test_box_mean_without_grad_is_avg_pool() -> None:
    x = rand(2, 3, 6, 5, seed=8, grad=False)
    assert_close(S.box_mean(x, (2, 3), (3, 3), False),
                 F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), **TIGHT)


MODULES = {
    "lcn": dict(num_groups=2, window=3),
    "divisive_norm": dict(window=3, channel_window=3),
    "lrn": dict(size=3),
}


@pytest.mark.parametrize("method", list(MODULES))
def test_modules_run_the_function_and_native_false_the_composition(method: str) -> None:
    torch.manual_seed(0)
    fused = nk.create(method, 4, **MODULES[method]).double()
    plain = nk.create(method, 4, native=False, **MODULES[method]).double()
    plain.load_state_dict(fused.state_dict())
    for p in fused.parameters():  # non-trivial γ, β
        p.data.uniform_(0.5, 1.5)
    plain.load_state_dict(fused.state_dict())
    x = rand(2, 4, 5, 6, seed=10)
    y, ref = fused(x), plain(x)
    assert_close(y, ref, **TIGHT)
    names = []
    node = [y.grad_fn]
    while node:
        fn = node.pop()
        if fn is not None:
            names.append(type(fn).__name__)
            node.extend(f for f, _ in fn.next_functions)
    assert any("LocalDivisive" in n for n in names)
    g = rand(*y.shape, seed=11, grad=False)
    params = [x, *fused.parameters()]
    params_ref = [x, *plain.parameters()]
    for got, want in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params_ref, g),
                         strict=True):
        assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("flip", [False, True])
def test_box_sum_custom_op(flip: bool) -> None:
    """``normkit::box_sum`` (the window sum under ``torch.compile``): fake kernel, registered
    derivative (the flipped sum) and schema pass torch's ``opcheck``; it equals the eager sum."""
    from normkit.functional.statistics import _box_sum_op

    x = rand(2, 3, 5, 4, seed=12)
    torch.library.opcheck(_box_sum_op, (x, [2, 3], [3, 2], flip))
    assert_close(_box_sum_op(x, [2, 3], [3, 2], flip),
                 S.box_sum(x.detach(), (2, 3), (3, 2), flip=flip), **TIGHT)


def test_compiled_module_equals_eager() -> None:
    """Under ``torch.compile(fullgraph=True)`` (aot_eager: AOTAutograd traces the Function and
    the window-sum op) the module gives eager's output and gradients."""
    torch._dynamo.reset()
    m = nk.create("divisive_norm", 4, window=3, channel_window=2).double()
    x = rand(2, 4, 5, 6, seed=13)
    g = rand(2, 4, 5, 6, seed=14, grad=False)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y, ref = compiled(x), m(x)
    assert_close(y, ref, **TIGHT)
    for got, want in zip(torch.autograd.grad(y, [x, *m.parameters()], g),
                         torch.autograd.grad(ref, [x, *m.parameters()], g), strict=True):
        assert_close(got, want, **TIGHT)
    torch._dynamo.reset()
