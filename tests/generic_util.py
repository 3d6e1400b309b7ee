"""Shared helpers and row selections of the generic tests (``tests/test_generic*.py``), which run
over the case table of ``tests/cases.py`` (TESTING.md, standardization family).

Every generic test is parametrized over rows of the table (ids = case names), each test over the
rows a declared property of :class:`cases.Case` selects (see the selections below): the
stateless rows of ``CASES`` and the stateful configurations of ``STATEFUL`` alike. Conventions:

* ``fwd_bwd`` runs a forward and a backward with a fixed random cotangent (a plain ``y.sum()``
  has a zero gradient through standardization, which would hide wrong gradients).
* Comparisons of two computations of the same float64 formula use ``rtol = atol = 1e-10``
  (float64 eps is 2.2e-16; a few hundred roundings of O(10) values stay far below 1e-10).
* Modules get random parameters (weight in [0.5, 1.5), bias ~ N(0, 0.25)) and inputs a
  per-channel offset, so running statistics, affine parameters and batch statistics all differ
  from their defaults and a test that ignores one of them fails.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

import normkit as nk
from cases import CASES, STATEFUL, Case, from_layout, to_layout

# Inductor (and its decompositions, PARTITIONED) imports torch/utils/mkldnn.py, which calls the
# deprecated torch.jit.script_method at import time (torch's own code, not normkit's): import it
# here, ignoring only that warning, so no test that compiles meets it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
    import torch.utils.mkldnn  # noqa: F401

F64 = torch.float64
F32 = torch.float32
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
# float32 vs float64 of the same formula on the same (float32) input values: eps32 = 1.2e-7.
# Reductions over ≤ 100 values cost a few eps relative. The worst term is x − μ: its absolute
# rounding error eps32·|μ| (|μ| ≲ 3 for these inputs, ≈ 4e-7) is multiplied by 1/√(σ² + ε),
# up to 1/√ε ≈ 316 for small groups (2 values) whose σ² ≪ ε = 1e-5: ≈ 1.2e-4 absolute.
F32_TOL = {"rtol": 1e-5, "atol": 1.5e-4}


# ---------------------------------------------------------------------------- selections
# Each generic test runs over the rows a property of Case selects (no name lists): every row of
# the battery, stateless table rows and stateful configurations alike, unless the property says
# the test's assumption fails for it (see Case.streaming, Case.stateful, Case.backward_state).
ROWS: list[Case] = CASES + STATEFUL
TABLE = [c for c in ROWS if not c.stateful]  # every buffer a running statistic (== CASES)
RUNNING = [c for c in ROWS if c.running]
AFFINE = [c for c in ROWS if c.takes_affine]
# training step with no state besides EMA-type running statistics (see Case.streaming)
BATCH_STEP = [c for c in ROWS if not c.streaming]
BATCH_STEP_RUNNING = [c for c in BATCH_STEP if c.running]
# buffers change in forwards only (see Case.backward_state)
FORWARD_STATE = [c for c in BATCH_STEP if not c.backward_state]
# a training forward that is a function of the batch alone: gradcheck may call it many times
GRADCHECK = [c for c in BATCH_STEP if not c.stateful]
DEGENERATE = [(c, s) for c in ROWS for s in c.degenerate_shapes]
DEGENERATE_IDS = [f"{c.name}-{'x'.join(map(str, s))}" for c, s in DEGENERATE]
EDGE = [(c, s) for c in ROWS for s in c.edge_shapes]
EDGE_IDS = [f"{c.name}-{'x'.join(map(str, s))}" for c, s in EDGE]
# Rows whose training step updates buffers run through AOTAutograd with inductor's
# decompositions and min-cut partitioner (no code generation): it may recompute in the backward
# a value read from a buffer the forward then updates (pytorch/pytorch#197039), which the plain
# "eager" backend (dynamo only) never shows. Inductor itself for a few rows.
PARTITIONED = "aot_eager_decomp_partition"
COMPILE = ([(c, PARTITIONED if c.running else "eager") for c in ROWS]
           + [(c, "inductor") for c in ROWS if c.inductor])
COMPILE_IDS = [f"{c.name}-{b}" for c, b in COMPILE]
KERNELS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "local_response_norm")


def over(rows: list[Case]) -> pytest.MarkDecorator:
    """Parametrize a test's ``case`` over these rows, ids = case names."""
    return pytest.mark.parametrize("case", rows, ids=[c.name for c in rows])


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
            channel_axis: int = 1, cond: Any = None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients (in ``m.parameters()`` order) for a fixed
    random cotangent, drawn in the logical ``(N, C, *)`` layout of ``x`` (so the same logical
    element gets the same cotangent whatever ``channel_axis``); ``cond``: the second forward
    argument of a conditional method."""
    x = x.detach().clone().requires_grad_(True)
    y = m(x) if cond is None else m(x, cond)
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


def assert_same_step(a: torch.nn.Module, b: torch.nn.Module, x: Tensor, *, seed: int = 7,
                     cond: Any = None, **tol: float) -> None:
    """One training step of ``a`` and of ``b`` (e.g. ``torch.compile`` of a copy of ``a``) on
    ``x``: the same output, input and parameter gradients (:func:`fwd_bwd`, one cotangent) and
    buffers afterwards (a compiled module's own, not its wrapper's names)."""
    assert_same_run(fwd_bwd(b, x, seed, cond=cond), fwd_bwd(a, x, seed, cond=cond), **tol)
    assert_buffers_close(getattr(b, "_orig_mod", b), getattr(a, "_orig_mod", a), **tol)


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


def trained(case: Case, dtype: torch.dtype = F32) -> nk.Normalization:
    """The case's module after two training steps (running buffers away from their init)."""
    m = build(case, dtype=dtype, seed=3)
    for step, shape in enumerate(case.shapes[:2]):
        m(layout_x(case, shape, seed=40 + step, dtype=dtype))
    return m


def assert_same_module(a: torch.nn.Module, b: torch.nn.Module, case: Case) -> None:
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
