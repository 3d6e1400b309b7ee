"""Generic tests over the case table (see ``tests/test_generic.py``): float64 gradcheck and
gradgradcheck, the native kernel against the generic path, two forwards then one backward, and
``torch.compile(fullgraph=True)`` against eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from cases import (
    Case,
)
from generic_util import (
    COMPILE,
    COMPILE_IDS,
    DEGENERATE,
    F32,
    F64,
    FORWARD_STATE,
    GRADCHECK,
    PARTITIONED,
    ROWS,
    TIGHT,
    assert_buffers_close,
    assert_same_run,
    build,
    fwd_bwd,
    gen,
    layout_x,
    over,
)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@over(GRADCHECK)
def test_gradcheck(case: Case, native: bool) -> None:
    """float64 gradcheck and gradgradcheck w.r.t. the input and the parameters, in training;
    gradcheck in eval where running statistics make eval a different function."""
    m = build(case, dtype=F64, native=native)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = layout_x(case, case.grad_shape).requires_grad_()

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert gradcheck(f, (x, *params))
    if case.double_backward and not (native and case.fused_first_order):
        assert gradgradcheck(f, (x, *params))
    else:  # first-order backwards (ZCA's divided differences, fused whitening) say so
        with pytest.raises(RuntimeError, match="first-order only"):
            gradgradcheck(f, (x, *params))
    if case.running:
        m.eval()
        assert gradcheck(f, (x, *params))


@over(ROWS)
def test_native_matches_generic(case: Case) -> None:
    """``native=True`` and ``native=False`` with the same state: same outputs, gradients and
    buffer updates in train and eval, for every shape."""
    a, b = build(case, dtype=F64, native=True), build(case, dtype=F64, native=False)
    for train in (True, False):
        a.train(train)
        b.train(train)
        for i, shape in enumerate(case.shapes):
            x = layout_x(case, shape, seed=70 + i)
            assert_same_run(fwd_bwd(a, x), fwd_bwd(b, x), **TIGHT)
            assert_buffers_close(a, b, **TIGHT)


NON_RUNNING_DEGENERATE = [(c, s) for c, s in DEGENERATE if not c.running]


@pytest.mark.parametrize(("case", "shape"), NON_RUNNING_DEGENERATE,
                         ids=[f"{c.name}-{'x'.join(map(str, s))}" for c, s in NON_RUNNING_DEGENERATE])
def test_native_matches_generic_one_value_eval(case: Case, shape: tuple[int, ...]) -> None:
    """Eval without running statistics on one value per statistic (batch statistics, no
    training check): both paths must behave alike, the same numbers or the same error."""
    x = layout_x(case, shape, seed=5)
    results = []
    for native in (True, False):
        m = build(case, dtype=F64, native=native).eval()
        try:
            results.append(m(x))
        except ValueError as e:
            results.append(e)
    a, b = results
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        assert_close(a, b, **TIGHT)
    else:
        assert type(a) is type(b), f"native path: {a!r}; generic path: {b!r}"


@over(FORWARD_STATE)
def test_two_forwards_one_backward(case: Case) -> None:
    """Backward through two training forwards (buffers updated in between) gives the sum of the
    separate gradients; then an eval forward before the backward."""
    m0 = build(case, dtype=F64)
    x1 = layout_x(case, case.shapes[0], seed=80).requires_grad_()
    x2 = layout_x(case, case.shapes[-1], seed=81).requires_grad_()
    c1 = torch.randn(x1.shape, generator=gen(1), dtype=F64)
    c2 = torch.randn(x2.shape, generator=gen(2), dtype=F64)
    for eval_second in (False, True):
        m = copy.deepcopy(m0)
        y1 = m(x1)
        m.train(not eval_second)
        y2 = m(x2)
        params = list(m.parameters())
        g = torch.autograd.grad((y1 * c1).sum() + (y2 * c2).sum(), [x1, x2, *params])
        ma, mb = copy.deepcopy(m0), copy.deepcopy(m0)
        ga = torch.autograd.grad((ma(x1) * c1).sum(), [x1, *ma.parameters()])
        mb(x1.detach())
        mb.train(not eval_second)
        gb = torch.autograd.grad((mb(x2) * c2).sum(), [x2, *mb.parameters()])
        assert_close(g[0], ga[0], **TIGHT)
        assert_close(g[1], gb[0], **TIGHT)
        for gp, pa, pb in zip(g[2:], ga[1:], gb[1:], strict=True):
            assert_close(gp, pa + pb, **TIGHT)


# ------------------------------------------------------------------------------ compile


@pytest.mark.parametrize(("case", "backend"), COMPILE, ids=COMPILE_IDS)
def test_compile_matches_eager(case: Case, backend: str, dynamo_reset: None) -> None:
    """``torch.compile(fullgraph=True)`` — one graph, no break — gives the eager outputs,
    gradients and buffer updates, train and eval."""
    # backend="eager" runs the traced aten ops unchanged: only op-order noise (eps32 ≈ 1.2e-7).
    # Inductor's decompositions reassociate float32 reductions (≤ 60 values: tens of eps32 on
    # O(1) values); inductor itself also fuses them (Welford vs two-pass): a few hundred eps32
    # on O(10) values.
    tol = {"eager": {"rtol": 1e-6, "atol": 1e-6}, PARTITIONED: {"rtol": 1e-5, "atol": 1e-5}}.get(
        backend, {"rtol": 1e-4, "atol": 1e-5})
    eager = build(case)
    target = copy.deepcopy(eager)
    compiled = torch.compile(target, backend=backend, fullgraph=True)
    captured = counters["stats"]["calls_captured"]
    shape = case.shapes[1] if len(case.shapes) > 1 else case.shapes[0]
    for train in (True, False):
        eager.train(train)
        compiled.train(train)
        for step in range(2):
            x = layout_x(case, shape, seed=90 + step, dtype=F32)
            assert_same_run(fwd_bwd(compiled, x), fwd_bwd(eager, x), **tol)
            assert_buffers_close(target, eager, **tol)
    if case.running:
        assert int(target.num_batches_tracked) == 2
    assert counters["stats"]["calls_captured"] > captured, "dynamo captured no operation"
