"""Generic tests over the case table of ``tests/cases.py`` (TESTING.md, standardization family):
the table itself, the module each row builds (parameters, buffers, kernel dispatch), shapes and
dtypes, train vs eval, hygiene (``repr``, ``.to()``, ``reset_parameters``) and the bad inputs.

Neighbours: ``test_generic_state.py`` (running statistics, serialization, folding),
``test_generic_gradients.py`` (gradcheck, native vs generic, ``torch.compile``),
``test_generic_layout.py`` (strides, channel axis, edge shapes, ``affine=False``). Helpers,
tolerances and the row selections (each test runs over the rows a declared property of
:class:`cases.Case` selects) are in ``tests/generic_util.py``.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from cases import (
    CASE_IDS,
    CASES,
    ERROR_IDS,
    ERROR_PARAMS,
    STATEFUL,
    Case,
    from_layout,
    to_layout,
)
from generic_util import (
    F32,
    F32_TOL,
    F64,
    FORWARD_STATE,
    KERNELS,
    ROWS,
    TABLE,
    TIGHT,
    assert_buffers_close,
    assert_state_equal,
    build,
    initial_running,
    layout_x,
    logical_x,
    make,
    over,
    state,
    trained,
)


# ---------------------------------------------------------------------------- the table
def test_every_registered_method_has_a_case() -> None:
    missing = sorted(set(nk.list_methods()) - {c.method for c in CASES})
    assert not missing, f"registered methods without a row in tests/cases.py: {missing}"


def test_case_table_is_well_formed() -> None:
    assert len(set(CASE_IDS)) == len(CASE_IDS), "case names must be unique"
    for c in CASES:
        assert nk.info(c.method).name == c.method, f"{c.name}: use the canonical method name"
        assert c.errors or any(o.method == c.method and o.errors for o in CASES), (
            f"method {c.method} has no error inputs")
        assert bool(c.running) == (c.batch_stats is not None) == (c.eval_ref is not None), (
            f"{c.name}: cases with running statistics need batch_stats and eval_ref formulas")
        for s in (*c.shapes, *c.edge_shapes, *c.degenerate_shapes, c.grad_shape):
            assert s[1] == c.num_features, f"{c.name}: logical shape {s} is not (N, C, *)"
    assert len({c.name for c in STATEFUL}) == len(STATEFUL), "stateful row names must be unique"
    for c in STATEFUL:
        assert c.stateful and c.name not in CASE_IDS, f"{c.name}: a stateful row outside CASES"
        assert nk.info(c.method).name == c.method, f"{c.name}: use the canonical method name"
    assert not any(c.stateful for c in CASES), "stateful rows belong in cases.STATEFUL"
    inductor = [c.method for c in CASES if c.inductor]
    assert len(inductor) <= 4, "inductor compiles C++ on CPU: keep it to a few cases"


@over(TABLE)
def test_case_matches_module(case: Case) -> None:
    """The kind flags of the row describe the module: parameters, buffers (torch's names), axis."""
    m = build(case, randomize=False)
    assert type(m) is nk.info(case.method).cls or (  # a factory builds a test subclass
        case.factory is not None and isinstance(m, nk.info(case.method).cls))
    assert m.nap.batch_dependent == case.batch_dependent
    assert {n for n, _ in m.named_parameters()} == set(case.params)
    expected = {f"running_{s}" for s in case.running}
    if case.running:
        expected.add("num_batches_tracked")
    assert {n for n, _ in m.named_buffers()} == expected
    assert m.track_running_stats == bool(case.running)
    assert m.channel_axis == case.channel_axis
    assert m.num_features == case.num_features
    if case.takes_affine:
        assert m.affine == bool(case.params)
    for s, v in initial_running(case, m).items():
        buf = getattr(m, f"running_{s}")
        assert buf.dtype == F32
        assert torch.equal(buf, v), f"running_{s} must start at {v}"
    if case.running:
        assert m.num_batches_tracked.dtype == torch.long and int(m.num_batches_tracked) == 0


# Methods whose evaluation with running estimates is one call of BN's kernel
# (Operation.eval_moments, normkit/_eval_kernel.py), whatever their training runs.
EVAL_BN = {"bn", "batch_group_norm", "gn", "in", "mean_only_bn", "l1_bn", "range_bn",
           "online_norm", "power_norm", "batch_renorm", "ghost_bn", "momentum_bn",
           "cross_iteration_bn", "mabn", "kalman_norm"}


@over(ROWS)
def test_native_dispatch(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """``native=True`` calls the expected torch kernel in train and eval (BN's in eval with running
    estimates for :data:`EVAL_BN`); ``native=False`` and methods without a kernel call none (so native/generic parity below compares two paths)."""
    calls: Counter[str] = Counter()
    for name in KERNELS:
        orig = getattr(torch.nn.functional, name)

        def wrapper(*args: Any, _orig: Any = orig, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _orig(*args, **kw)

        monkeypatch.setattr(torch.nn.functional, name, wrapper)
    x = layout_x(case, case.shapes[0], dtype=F32)
    m = build(case)
    m(x)
    m.eval()
    m(x)
    expected: Counter[str] = Counter()
    if case.native:
        expected[case.native] += 1
    if case.running and case.method in EVAL_BN:
        expected["batch_norm"] += 1
    elif case.native and case.native_eval:
        expected[case.native] += 1
    assert dict(calls) == dict(expected)
    calls.clear()
    m = build(case, native=False)
    m(x)
    m.eval()
    m(x)
    assert dict(calls) == {}


# ------------------------------------------------------------------------ shape & dtype
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@over(ROWS)
def test_shape_and_dtype_kept(case: Case, dtype: torch.dtype) -> None:
    """Output has the input's shape and dtype for every rank; float32 matches float64."""
    m, ref = build(case, dtype=dtype), build(case, dtype=F64)
    for train in (True, False):
        m.train(train)
        ref.train(train)
        for i, shape in enumerate(case.shapes):
            x = layout_x(case, shape, seed=i, dtype=dtype)
            y = m(x)
            assert y.shape == x.shape and y.dtype == dtype
            assert torch.isfinite(y).all()
            y_ref = ref(x.to(F64))
            assert_close(y.to(F64), y_ref, **(TIGHT if dtype == F64 else F32_TOL))
        for name, b in m.named_buffers():
            assert b.dtype == (torch.long if name == "num_batches_tracked" else dtype), name
        assert_buffers_close(m, copy.deepcopy(ref).to(dtype), **(TIGHT if dtype == F64 else F32_TOL))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@over(FORWARD_STATE)
def test_low_precision(case: Case, dtype: torch.dtype) -> None:
    """Half/bfloat16 input on a float32 module: output in the input dtype, close to the same
    module run in float32 on the upcast input; statistics (buffers) in float32."""
    m = build(case)
    m(layout_x(case, case.shapes[0], seed=1, dtype=F32))  # running stats away from their init
    ref = copy.deepcopy(m)
    # Input values are exactly representable in both runs, so the only differences are roundings
    # of the output and of intermediates kept in `dtype` by torch kernels: ≤ eps/2 relative to
    # the largest intermediate (|x − μ|, |y| ≤ max|y_ref|). Two eps (bf16 7.8e-3, fp16 9.8e-4)
    # relative plus two eps of the output range absolute covers both.
    eps = torch.finfo(dtype).eps
    for train in (True, False):
        m.train(train)
        ref.train(train)
        for i, shape in enumerate(case.shapes):
            x = layout_x(case, shape, seed=10 + i, dtype=dtype).requires_grad_()
            y = m(x)
            y_ref = ref(x.detach().float())
            assert y.dtype == dtype and y.shape == x.shape
            assert_close(y.float(), y_ref, rtol=2 * eps,
                         atol=2 * eps * max(1.0, y_ref.abs().max().item()))
            y.backward(torch.ones_like(y))
            assert x.grad is not None and x.grad.dtype == dtype
            assert torch.isfinite(x.grad).all()
            for p in m.parameters():
                assert p.dtype == F32 and p.grad is not None and p.grad.dtype == F32
        for name, b in m.named_buffers():
            assert b.dtype == (torch.long if name == "num_batches_tracked" else F32), name
        # Statistics are taken in float32 from the same values: only summation order differs.
        assert_buffers_close(m, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- train vs eval
@over(ROWS)
def test_train_vs_eval(case: Case) -> None:
    """Eval uses the running buffers where they exist (the formula of the row), else it equals
    training (batch statistics)."""
    m = build(case, dtype=F64)
    x1 = logical_x(case, case.shapes[0], seed=1)
    x2 = logical_x(case, case.shapes[0], seed=2)
    m(to_layout(x1, case.channel_axis))
    y_train = from_layout(m(to_layout(x2, case.channel_axis)), case.channel_axis)
    m.eval()
    before = state(m)
    y_eval = from_layout(m(to_layout(x2, case.channel_axis)), case.channel_axis)
    assert_state_equal(state(m), before)
    if case.running:
        assert case.eval_ref is not None
        assert_close(y_eval, case.eval_ref(m, x2), **TIGHT)
        assert (y_eval - y_train).abs().max() > 1e-3, "eval output ignores the running statistics"
    else:
        assert torch.equal(y_eval, y_train)


# ------------------------------------------------------------------------------ hygiene
@over(ROWS)
def test_repr(case: Case) -> None:
    m = build(case)
    r = repr(m).replace("\n  ", "")  # a module with submodules (SPADE's convs) prints lines
    assert r.startswith(f"{type(m).__name__}({case.num_features},"), r
    assert f"eps={m.eps}" in r


@over(ROWS)
def test_to_float64(case: Case) -> None:
    m = trained(case)
    ref = copy.deepcopy(m)
    before = state(m)
    assert m.to(F64) is m
    for name, t in (*m.named_parameters(), *m.named_buffers()):
        if name == "num_batches_tracked":
            assert t.dtype == torch.long
        else:
            assert t.dtype == F64, name
            assert torch.equal(t, before[name].to(F64)), f"{name} changed value"
    x = layout_x(case, case.shapes[0], seed=130, dtype=F32)  # the same values in both runs
    for train in (False, True):
        m.train(train)
        ref.train(train)
        y = m(x.double())
        assert y.dtype == F64
        assert_close(y, ref(x).double(), **F32_TOL)


@over(ROWS)
def test_reset_parameters(case: Case) -> None:
    m = trained(case)
    trained_state = state(m)
    m.reset_parameters()
    after, fresh = state(m), state(build(case, randomize=False))
    # submodules (SPADE's convs) are re-drawn at random, like torch's layers: they must change
    sub = [k for k in after if "." in k]
    assert all(not torch.equal(after[k], trained_state[k]) for k in sub)
    assert_state_equal({k: v for k, v in after.items() if k not in sub},
                       {k: v for k, v in fresh.items() if k not in sub})


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("case", "err"), ERROR_PARAMS, ids=ERROR_IDS)
def test_error_inputs(case: Case, err: Any) -> None:
    """Each bad input raises the declared type with a message naming the values."""
    c = case.num_features if err.num_features is None else err.num_features
    kwargs = {**case.kwargs, **err.ctor}
    if err.shape is None:
        with pytest.raises(err.exc, match=err.match):
            make(case, c, **kwargs)
        return
    m = make(case, c, **kwargs)
    m.train(err.training)
    x = torch.randn(err.shape) if err.shape else torch.tensor(1.0)
    before = state(m)
    with pytest.raises(err.exc, match=err.match):
        m(x)
    assert_state_equal(state(m), before)


def test_error_types_are_value_errors() -> None:
    """User-facing errors stay catchable as ValueError (errors.py's contract)."""
    for _, err in ERROR_PARAMS:
        assert issubclass(err.exc, ValueError) or err.exc is TypeError
