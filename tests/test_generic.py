"""Generic tests over the case table of ``tests/cases.py`` (TESTING.md, standardization family).

Every test is parametrized over the cases (ids = case names). Conventions:

* ``fwd_bwd`` runs a forward and a backward with a fixed random cotangent (a plain ``y.sum()``
  has a zero gradient through standardization, which would hide wrong gradients).
* Comparisons of two computations of the same float64 formula use ``rtol = atol = 1e-10``
  (float64 eps is 2.2e-16; a few hundred roundings of O(10) values stay far below 1e-10).
* Modules get random parameters (weight in [0.5, 1.5), bias ~ N(0, 0.25)) and inputs a
  per-channel offset, so running statistics, affine parameters and batch statistics all differ
  from their defaults and a test that ignores one of them fails.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from cases import (
    CASE_IDS,
    CASES,
    ERROR_IDS,
    ERROR_PARAMS,
    Case,
    from_layout,
    layout_shape,
    to_layout,
)
from normkit import ShapeError

F64 = torch.float64
F32 = torch.float32
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
# float32 vs float64 of the same formula on the same (float32) input values: eps32 = 1.2e-7.
# Reductions over ≤ 100 values cost a few eps relative. The worst term is x − μ: its absolute
# rounding error eps32·|μ| (|μ| ≲ 3 for these inputs, ≈ 4e-7) is multiplied by 1/√(σ² + ε),
# up to 1/√ε ≈ 316 for small groups (2 values) whose σ² ≪ ε = 1e-5: ≈ 1.2e-4 absolute.
F32_TOL = {"rtol": 1e-5, "atol": 1.5e-4}

RUNNING = [c for c in CASES if c.running]
RUNNING_IDS = [c.name for c in RUNNING]
AFFINE = [c for c in CASES if c.takes_affine]
AFFINE_IDS = [c.name for c in AFFINE]
DEGENERATE = [(c, s) for c in CASES for s in c.degenerate_shapes]
DEGENERATE_IDS = [f"{c.name}-{'x'.join(map(str, s))}" for c, s in DEGENERATE]
EDGE = [(c, s) for c in CASES for s in c.edge_shapes]
EDGE_IDS = [f"{c.name}-{'x'.join(map(str, s))}" for c, s in EDGE]
# Rows whose training step updates buffers run through AOTAutograd with inductor's
# decompositions and min-cut partitioner (no code generation): it may recompute in the backward
# a value read from a buffer the forward then updates (pytorch/pytorch#197039), which the plain
# "eager" backend (dynamo only) never shows. Inductor itself for a few rows.
PARTITIONED = "aot_eager_decomp_partition"
COMPILE = ([(c, PARTITIONED if c.running else "eager") for c in CASES]
           + [(c, "inductor") for c in CASES if c.inductor])
COMPILE_IDS = [f"{c.name}-{b}" for c, b in COMPILE]
KERNELS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "local_response_norm")

cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
running_cases = pytest.mark.parametrize("case", RUNNING, ids=RUNNING_IDS)
# rows whose training step has no state besides EMA-type running statistics (see Case.streaming)
STATELESS = [c for c in CASES if not c.streaming]
STATELESS_RUNNING = [c for c in RUNNING if not c.streaming]
stateless_cases = pytest.mark.parametrize("case", STATELESS, ids=[c.name for c in STATELESS])
stateless_running_cases = pytest.mark.parametrize(
    "case", STATELESS_RUNNING, ids=[c.name for c in STATELESS_RUNNING])


# ------------------------------------------------------------------------------ helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(case: Case, num_features: int, **kwargs: Any) -> nk.Normalization:
    """The case's module with these constructor arguments (its ``factory`` where it has one)."""
    if case.factory is not None:
        return case.factory(num_features, **kwargs)
    return nk.create(case.method, num_features, **kwargs)


def build(case: Case, *, dtype: torch.dtype = F32, seed: int = 0, randomize: bool = True,
          **overrides: Any) -> nk.Normalization:
    """The case's module (``overrides`` replace constructor kwargs), with random parameters."""
    m = make(case, case.num_features, **{**case.kwargs, **overrides})
    if randomize:
        g = gen(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name == "bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                else:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return m.to(dtype)


def logical_x(case: Case, shape: tuple[int, ...], seed: int = 0,
              dtype: torch.dtype = F64) -> Tensor:
    """Random ``(N, C, *)`` input with per-channel offsets (mean ≠ 0, variance ≠ 1)."""
    x = torch.randn(shape, generator=gen(1000 + seed), dtype=F64) * 1.5 + 0.5
    if len(shape) >= 2:
        x = x + 0.3 * torch.arange(shape[1], dtype=F64).view(1, -1, *([1] * (len(shape) - 2)))
    return x.to(dtype)


def layout_x(case: Case, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = F64,
             axis: int | None = None) -> Tensor:
    """:func:`logical_x` in the case's layout (channels last for ``channel_axis=-1``)."""
    return to_layout(logical_x(case, shape, seed, dtype), case.channel_axis if axis is None else axis)


def fwd_bwd(m: torch.nn.Module, x: Tensor, seed: int = 7,
            channel_axis: int = 1) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients (in ``m.parameters()`` order) for a fixed
    random cotangent, drawn in the logical ``(N, C, *)`` layout of ``x`` (so the same logical
    element gets the same cotangent whatever ``channel_axis``)."""
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    logical = from_layout(torch.empty(y.shape, device="meta"), channel_axis).shape
    cot = to_layout(torch.randn(logical, generator=gen(seed), dtype=F64), channel_axis)
    cot = cot.to(y.dtype)
    params = list(m.parameters())
    grads = torch.autograd.grad(y, [x, *params], cot, allow_unused=True)
    assert all(g is not None for g in grads), "an input or parameter got no gradient"
    return y.detach(), grads[0], list(grads[1:])


def state(m: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_state_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed: {a[k]} vs {b[k]}"


def assert_same_run(a: tuple, b: tuple, **tol: float) -> None:
    """Compare two :func:`fwd_bwd` results."""
    assert_close(a[0], b[0], **tol, msg=lambda s: f"outputs differ: {s}")
    assert_close(a[1], b[1], **tol, msg=lambda s: f"input gradients differ: {s}")
    assert len(a[2]) == len(b[2])
    for ga, gb in zip(a[2], b[2], strict=True):
        assert_close(ga, gb, **tol, msg=lambda s: f"parameter gradients differ: {s}")


def assert_buffers_close(a: torch.nn.Module, b: torch.nn.Module, **tol: float) -> None:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert_close(ba[k], bb[k], **tol, msg=lambda s, k=k: f"buffer {k} differs: {s}")


def running(m: torch.nn.Module, case: Case) -> dict[str, Tensor]:
    return {s: getattr(m, f"running_{s}").detach().clone() for s in case.running}


def initial_running(case: Case, m: torch.nn.Module) -> dict[str, Tensor]:
    """Initial buffers: mean 0, variance-like 1, whitening matrix / covariance the identity."""
    out = {}
    for s in case.running:
        buf = getattr(m, f"running_{s}").detach()
        if s in ("matrix", "cov"):
            out[s] = torch.eye(buf.shape[-1], dtype=buf.dtype).expand_as(buf).clone()
        else:
            out[s] = torch.full_like(buf, 1.0 if s in ("var", "scale", "ms") else 0.0)
    return out


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
    inductor = [c.method for c in CASES if c.inductor]
    assert len(inductor) <= 4, "inductor compiles C++ on CPU: keep it to a few cases"


@cases
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


@cases
def test_native_dispatch(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """``native=True`` calls the expected torch kernel in train and eval; ``native=False`` and
    methods without a kernel call none (so native/generic parity below compares two paths)."""
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
    expected = 2 if case.native_eval else 1
    assert dict(calls) == ({case.native: expected} if case.native else {})
    calls.clear()
    m = build(case, native=False)
    m(x)
    m.eval()
    m(x)
    assert dict(calls) == {}


# ------------------------------------------------------------------------ shape & dtype
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@cases
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
@stateless_cases
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
@cases
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


# ----------------------------------------------------------------------------- buffers
@stateless_running_cases
def test_running_ema(case: Case) -> None:
    """``running ← (1 − m)·running + m·batch`` with the unbiased variance, two steps of different
    batch sizes; ``num_batches_tracked`` counts training forwards."""
    mom = 0.3
    m = build(case, dtype=F64, momentum=mom)
    expected = initial_running(case, m)
    shapes = [case.shapes[0], case.shapes[-1]]
    for step, shape in enumerate(shapes, start=1):
        x = logical_x(case, shape, seed=step)
        m(to_layout(x, case.channel_axis))
        assert case.batch_stats is not None
        batch = case.batch_stats(x)
        expected = {s: (1 - mom) * expected[s] + mom * batch[s] for s in case.running}
        got = running(m, case)
        for s in case.running:
            assert_close(got[s], expected[s], **TIGHT, msg=lambda e, s=s: f"running_{s}: {e}")
        assert int(m.num_batches_tracked) == step


@stateless_running_cases
def test_running_cumulative_average(case: Case) -> None:
    """``momentum=None``: the running statistics are the plain average of the batches seen."""
    m = build(case, dtype=F64, momentum=None)
    batches = []
    for step in range(3):
        x = logical_x(case, case.shapes[step % len(case.shapes)], seed=20 + step)
        m(to_layout(x, case.channel_axis))
        assert case.batch_stats is not None
        batches.append(case.batch_stats(x))
    got = running(m, case)
    for s in case.running:
        assert_close(got[s], sum(b[s] for b in batches) / 3, **TIGHT)
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("mom", [0.0, 1.0])
@running_cases
def test_running_momentum_extremes(case: Case, mom: float) -> None:
    """Momentum 0 keeps the initial estimates; momentum 1 keeps only the last batch."""
    m = build(case, dtype=F64, momentum=mom)
    for step in range(2):
        x = logical_x(case, case.shapes[0], seed=30 + step)
        m(to_layout(x, case.channel_axis))
    assert case.batch_stats is not None
    last = case.batch_stats(x)
    got = running(m, case)
    for s, init in initial_running(case, m).items():
        want = init if mom == 0.0 else last[s]
        assert_close(got[s], want, **TIGHT)


@running_cases
def test_reset_running_stats(case: Case) -> None:
    m = build(case)
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    for step in range(2):
        m(layout_x(case, case.shapes[0], seed=step, dtype=F32))
    m.reset_running_stats()
    fresh = build(case, randomize=False)
    for name, b in fresh.named_buffers():
        assert torch.equal(getattr(m, name), b), name
    for n, p in m.named_parameters():
        assert torch.equal(p, params[n]), f"reset_running_stats changed parameter {n}"


@stateless_cases
def test_track_running_stats_false(case: Case) -> None:
    """No buffers, nothing in the state_dict but parameters, and eval uses batch statistics."""
    m = build(case, dtype=F64, track_running_stats=False)
    assert all(getattr(m, f"running_{s}") is None for s in m.nop.stat_names)
    assert list(m.buffers()) == []
    assert set(m.state_dict()) == set(case.params)
    x = layout_x(case, case.shapes[0])
    y_train = m(x)
    m.eval()
    assert torch.equal(m(x), y_train)


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@stateless_running_cases
def test_track_running_stats_toggled_off(case: Case, native: bool) -> None:
    """torch's rule when ``track_running_stats`` is switched off after construction: training
    uses batch statistics — as a module built without tracking — and leaves the buffers (and
    any state of a stateful operation) alone; eval still uses the buffers."""
    m = build(case, dtype=F64, native=native)
    x = logical_x(case, case.shapes[0], seed=1)
    m(to_layout(x, case.channel_axis))
    m.track_running_stats = False
    before = state(m)
    y_train = m(to_layout(x, case.channel_axis))
    assert_state_equal(state(m), before)
    untracked = build(case, dtype=F64, native=native, track_running_stats=False)
    assert_close(y_train, untracked(to_layout(x, case.channel_axis)), **TIGHT)  # batch statistics
    m.eval()
    assert case.eval_ref is not None
    assert_close(from_layout(m(to_layout(x, case.channel_axis)), case.channel_axis),
                 case.eval_ref(m, x), **TIGHT)


@cases
def test_eval_never_mutates_state(case: Case) -> None:
    m = build(case)
    m(layout_x(case, case.shapes[0], seed=1, dtype=F32))
    m.eval()
    before = state(m)
    with torch.no_grad():
        m(layout_x(case, case.shapes[0], seed=2, dtype=F32))
    assert_state_equal(state(m), before)
    fwd_bwd(m, layout_x(case, case.shapes[-1], seed=3, dtype=F32))
    assert_state_equal(state(m), before)


# ------------------------------------------------------------------------ serialization
def _trained(case: Case, dtype: torch.dtype = F32) -> nk.Normalization:
    m = build(case, dtype=dtype, seed=3)
    for step, shape in enumerate(case.shapes[:2]):
        m(layout_x(case, shape, seed=40 + step, dtype=dtype))
    return m


def _assert_same_module(a: torch.nn.Module, b: torch.nn.Module, case: Case) -> None:
    """Same state and bitwise-identical outputs in eval, then in one training step."""
    assert_state_equal(state(a), state(b))
    x = layout_x(case, case.shapes[0], seed=50, dtype=F32)
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))
    a.train()
    b.train()
    assert torch.equal(a(x), b(x))
    assert_state_equal(state(a), state(b))


@cases
def test_state_dict_round_trip(case: Case) -> None:
    m = _trained(case)
    sd = m.state_dict()
    assert sd._metadata[""]["version"] == type(m)._version  # type: ignore[attr-defined]
    fresh = build(case, randomize=False)
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_module(m, fresh, case)


@running_cases
def test_state_dict_version_1_migration(case: Case) -> None:
    """A checkpoint from before ``num_batches_tracked`` (torch BN ``_version`` 1) loads strictly
    and starts the counter at 0, as torch does."""
    m = _trained(case)
    sd = m.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    fresh = build(case, randomize=False)
    fresh.load_state_dict(sd, strict=True)
    assert int(fresh.num_batches_tracked) == 0
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k


@cases
def test_torch_load_weights_only(case: Case) -> None:
    m = _trained(case)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = build(case, randomize=False)
    fresh.load_state_dict(sd, strict=True)
    _assert_same_module(m, fresh, case)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@cases
def test_deepcopy_and_pickle(case: Case, how: str) -> None:
    m = _trained(case)
    clone = copy.deepcopy(m) if how == "deepcopy" else pickle.loads(pickle.dumps(m))
    assert type(clone) is type(m) and repr(clone) == repr(m)
    before = state(m)
    clone(layout_x(case, case.shapes[0], seed=60, dtype=F32))  # the clone shares no storage
    assert_state_equal(state(m), before)
    clone.load_state_dict(before)
    _assert_same_module(m, clone, case)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@stateless_cases
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


@cases
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


@stateless_cases
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
# Inductor (and its decompositions, PARTITIONED) imports torch/utils/mkldnn.py, which calls the
# deprecated torch.jit.script_method at import time (torch's own code, not normkit's): import it
# here, ignoring only that warning, so no test (nor a replay from another file) meets it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
    import torch.utils.mkldnn  # noqa: F401


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


# ------------------------------------------------------------------------------- layout
def _strided_variants(x: Tensor) -> dict[str, Tensor]:
    """The values of ``x`` with non-contiguous or channels-last strides."""
    out = {"transposed_view": x.transpose(0, -1).contiguous().transpose(0, -1)}
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    big[..., ::2] = x
    out["step_slice"] = big[..., ::2]
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        out["channels_last_3d"] = x.contiguous(memory_format=torch.channels_last_3d)
    return out


@cases
def test_non_contiguous_and_channels_last_input(case: Case) -> None:
    # float64: a different stride order may only reorder reductions (≈ 1e-15 relative).
    m0 = build(case, dtype=F64)
    for i, shape in enumerate(case.shapes):
        x = layout_x(case, shape, seed=100 + i)
        for train in (True, False):
            ref_m = copy.deepcopy(m0).train(train)
            ref = fwd_bwd(ref_m, x)
            for name, xv in _strided_variants(x).items():
                assert torch.equal(xv, x)
                assert not xv.is_contiguous(), f"{name} variant of {tuple(x.shape)} is contiguous"
                mv = copy.deepcopy(m0).train(train)
                got = fwd_bwd(mv, xv)
                assert_same_run(got, ref, **TIGHT)
                assert_buffers_close(mv, ref_m, **TIGHT)


@cases
def test_channel_axis_last_equals_first(case: Case) -> None:
    """``channel_axis=-1`` on the permuted input equals ``channel_axis=1`` (same area: ``over`` is
    fixed by ``axis_swap_kwargs``), outputs, gradients and buffers, train and eval."""
    first = build(case, dtype=F64, channel_axis=1, **case.axis_swap_kwargs)
    last = build(case, dtype=F64, channel_axis=-1, **case.axis_swap_kwargs)
    for train in (True, False):
        first.train(train)
        last.train(train)
        for i, shape in enumerate(case.shapes):
            x = logical_x(case, shape, seed=110 + i)
            ya, gxa, gpa = fwd_bwd(first, x)
            yb, gxb, gpb = fwd_bwd(last, x.movedim(1, -1), channel_axis=-1)
            assert yb.shape == x.movedim(1, -1).shape
            assert_same_run((ya, gxa, gpa), (yb.movedim(-1, 1), gxb.movedim(-1, 1), gpb), **TIGHT)
            assert_buffers_close(first, last, **TIGHT)


# ------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(("case", "shape"), DEGENERATE, ids=DEGENERATE_IDS)
def test_one_value_per_statistic_raises_in_training(case: Case, shape: tuple[int, ...]) -> None:
    """Training with one value per statistic raises ShapeError naming the shape and leaves the
    module untouched; eval works where running statistics exist."""
    m = build(case, dtype=F64)
    m(layout_x(case, case.shapes[0], seed=1))
    before = state(m)
    x = logical_x(case, shape, seed=2)
    xl = to_layout(x, case.channel_axis)
    with pytest.raises(ShapeError, match=re.escape(str(layout_shape(shape, case.channel_axis)))):
        m(xl)
    assert_state_equal(state(m), before)
    if case.running:
        m.eval()
        assert case.eval_ref is not None
        assert_close(from_layout(m(xl), case.channel_axis), case.eval_ref(m, x), **TIGHT)


@pytest.mark.parametrize(("case", "shape"), EDGE, ids=EDGE_IDS)
def test_batch_one_and_spatial_one(case: Case, shape: tuple[int, ...]) -> None:
    """Batch 1 / spatial size 1 shapes with more than one value per statistic: finite output and
    gradients in training; eval follows the running-statistics formula (or equals training)."""
    m = build(case, dtype=F64)
    x = logical_x(case, shape, seed=3)
    xl = to_layout(x, case.channel_axis)
    y, gx, gp = fwd_bwd(m, xl)
    assert y.shape == xl.shape
    assert all(torch.isfinite(t).all() for t in (y, gx, *gp))
    m.eval()
    y_eval = m(xl)
    if case.running:
        assert case.eval_ref is not None
        assert_close(from_layout(y_eval, case.channel_axis), case.eval_ref(m, x), **TIGHT)
    else:
        assert torch.equal(y_eval, y)


@pytest.mark.parametrize("case", [c for c in CASES if c.channel_axis == -1],
                         ids=[c.name for c in CASES if c.channel_axis == -1])
def test_single_vector_channels_last(case: Case) -> None:
    """With ``channel_axis=-1`` a single ``(C,)`` vector is one sample (as torch's LayerNorm):
    the same as a batch of one. Batch-dependent methods cannot train on it: ShapeError naming
    the shape the caller passed, module untouched; eval works."""
    m = build(case, dtype=F64)
    m(layout_x(case, case.shapes[0], seed=1))
    v = logical_x(case, (1, case.num_features), seed=2)[0]
    if case.batch_dependent:
        before = state(m)
        with pytest.raises(ShapeError, match=re.escape(f"shape {tuple(v.shape)}")):
            m(v)
        assert_state_equal(state(m), before)
        m.eval()
    y = m(v)
    assert y.shape == v.shape
    assert_close(y, m(v[None])[0], **TIGHT)


@cases
def test_zero_batch(case: Case) -> None:
    """N = 0: empty output of the input's shape and dtype, zero parameter gradients, buffers
    (and the batch counter) unchanged, in train and eval."""
    m = build(case)
    m(layout_x(case, case.shapes[0], seed=1, dtype=F32))
    before = state(m)
    for train in (True, False):
        m.train(train)
        for shape in case.shapes:
            x = layout_x(case, (0, *shape[1:]), dtype=F32)
            y, gx, gp = fwd_bwd(m, x)
            assert y.shape == x.shape and y.dtype == x.dtype and y.numel() == 0
            assert gx.shape == x.shape
            assert all(torch.equal(g, torch.zeros_like(g)) for g in gp)
            assert_state_equal(state(m), before)


@pytest.mark.parametrize("case", AFFINE, ids=AFFINE_IDS)
def test_affine_false(case: Case) -> None:
    """``affine=False``: no recovery parameters (an operation's own, e.g. switchable mixing
    weights, stay), and the same function as ``affine=True`` at its initialization
    (γ = 1, β = 0)."""
    plain = build(case, dtype=F64, randomize=False, affine=False)
    init = build(case, dtype=F64, randomize=False, affine=True)
    own = [p for p in case.params if p not in ("weight", "bias")]
    assert [n for n, _ in plain.named_parameters()] == own and not plain.affine
    assert len(list(init.parameters())) > 0 and init.affine
    for train in (True, False):
        plain.train(train)
        init.train(train)
        for i, shape in enumerate(case.shapes):
            x = layout_x(case, shape, seed=120 + i)
            ya, gxa, _ = fwd_bwd(plain, x)
            yb, gxb, _ = fwd_bwd(init, x)
            assert_close(ya, yb, **TIGHT)
            assert_close(gxa, gxb, **TIGHT)
            assert_buffers_close(plain, init, **TIGHT)


# ------------------------------------------------------------------------------ hygiene
@cases
def test_repr(case: Case) -> None:
    m = build(case)
    r = repr(m).replace("\n  ", "")  # a module with submodules (SPADE's convs) prints lines
    assert r.startswith(f"{type(m).__name__}({case.num_features},"), r
    assert f"eps={m.eps}" in r


@cases
def test_to_float64(case: Case) -> None:
    m = _trained(case)
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


@cases
def test_reset_parameters(case: Case) -> None:
    m = _trained(case)
    trained = state(m)
    m.reset_parameters()
    after, fresh = state(m), state(build(case, randomize=False))
    # submodules (SPADE's convs) are re-drawn at random, like torch's layers: they must change
    sub = [k for k in after if "." in k]
    assert all(not torch.equal(after[k], trained[k]) for k in sub)
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


@running_cases
def test_folded_equals_eval(case: Case) -> None:
    """``folded()`` is the evaluation transform as one affine map: per channel ``y = a·x + b``,
    or per group ``y = M x + b`` for whitening; methods mixing in each input's own statistics
    (switchable whitening) refuse to fold."""
    m = build(case, dtype=F64)
    m(layout_x(case, case.shapes[0], seed=1))  # running statistics away from their initial values
    m.eval()
    x = logical_x(case, case.shapes[0], seed=2)
    y = from_layout(m(to_layout(x, case.channel_axis)), case.channel_axis)
    if not case.foldable:
        with pytest.raises(nk.ConfigError, match="nothing fixed to fold"):
            m.folded()
        return
    a, b = m.folded()
    c = case.num_features
    xc = x.transpose(0, 1).reshape(c, -1)
    if a.dim() == 1:  # per channel
        ref = a[:, None] * xc + b[:, None]
    else:  # block-diagonal: a is (C/d, d, d)
        g, d = a.shape[0], a.shape[1]
        ref = (a @ xc.reshape(g, d, -1)).reshape(c, -1) + b[:, None]
    ref = ref.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)
    assert_close(y, ref, **TIGHT)


@pytest.mark.parametrize("case", [c for c in CASES if not c.running],
                         ids=[c.name for c in CASES if not c.running])
def test_folded_refuses_without_running_statistics(case: Case) -> None:
    with pytest.raises(nk.ConfigError, match="no running statistics to fold"):
        build(case).folded()


# --------------------------------------------------------- replays for stateful configurations
# The generic tests that a stateful configuration (one whose training step reads state beyond
# the running statistics, see Case.streaming and tests/test_robust.py) replays by calling them
# directly, with their parametrizations; gradcheck and test_case_matches_module are replaced
# there by versions that freeze or list the extra state.
REPLAYS: list[tuple[str, dict[str, Any]]] = [
    ("native_dispatch", {"monkeypatch": None}),
    ("shape_and_dtype_kept", {"dtype": torch.float32}),
    ("shape_and_dtype_kept", {"dtype": F64}),
    ("low_precision", {"dtype": torch.bfloat16}),
    ("low_precision", {"dtype": torch.float16}),
    ("train_vs_eval", {}),
    ("running_ema", {}),
    ("running_cumulative_average", {}),
    ("running_momentum_extremes", {"mom": 0.0}),
    ("running_momentum_extremes", {"mom": 1.0}),
    ("reset_running_stats", {}),
    ("track_running_stats_false", {}),
    ("track_running_stats_toggled_off", {"native": True}),
    ("track_running_stats_toggled_off", {"native": False}),
    ("eval_never_mutates_state", {}),
    ("state_dict_round_trip", {}),
    ("state_dict_version_1_migration", {}),
    ("torch_load_weights_only", {}),
    ("deepcopy_and_pickle", {"how": "deepcopy"}),
    ("deepcopy_and_pickle", {"how": "pickle"}),
    ("native_matches_generic", {}),
    ("two_forwards_one_backward", {}),
    ("compile_matches_eager", {"backend": PARTITIONED, "dynamo_reset": None}),
    ("non_contiguous_and_channels_last_input", {}),
    ("channel_axis_last_equals_first", {}),
    ("zero_batch", {}),
    ("affine_false", {}),
    ("repr", {}),
    ("to_float64", {}),
    ("reset_parameters", {}),
    ("folded_equals_eval", {}),
]
