"""Compatibility of every case of ``tests/cases.py`` with the ways models run normalization layers
(DESIGN.md §3): an in-place op after the layer, ``torch.export``, ``torch.autocast`` and integer
or bool input. ``torch.compile(fullgraph=True)`` parity is ``test_compile_matches_eager`` in
``tests/test_generic_gradients.py`` (over the stateful configurations too).

Helpers (``build``, ``fwd_bwd``, ...) are those of ``tests/generic_util.py``; every test runs in
training and in evaluation (after one training step, so running buffers differ from their
initial values).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

import normkit as nk
from cases import CASE_IDS, CASES, Case
from generic_util import F32, assert_buffers_close, assert_same_run, build, fwd_bwd, layout_x

cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
EXACT = {"rtol": 0.0, "atol": 0.0}
# torch.export keeps the aten ops of the eager forward (training IR, no decomposition): only
# op-order noise of float32 (eps32 ≈ 1.2e-7) on O(10) values, as test_compile_matches_eager.
EXPORT_TOL = {"rtol": 1e-6, "atol": 1e-6}


def _main_shape(case: Case) -> tuple[int, ...]:
    return case.shapes[1] if len(case.shapes) > 1 else case.shapes[0]


def _warm(m: nn.Module, case: Case) -> None:
    """One training step, so running buffers (and streaming state) leave their initial values."""
    m.train()
    fwd_bwd(m, layout_x(case, _main_shape(case), seed=3, dtype=F32), channel_axis=case.channel_axis)


# --------------------------------------------------------------------------- in-place after
@cases
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inplace_op_after(case: Case, train: bool) -> None:
    """``nn.ReLU(inplace=True)`` after the layer (every ResNet block) works with autograd and
    equals the out-of-place ReLU: outputs, input and parameter gradients, buffers; under
    ``no_grad`` too. Fails when an output is a view of a custom autograd Function's output."""
    m = build(case)
    _warm(m, case)
    ref = copy.deepcopy(m)
    m.train(train)
    ref.train(train)
    for step in range(2):
        x = layout_x(case, _main_shape(case), seed=20 + step, dtype=F32)
        got = fwd_bwd(nn.Sequential(m, nn.ReLU(inplace=True)), x, channel_axis=case.channel_axis)
        want = fwd_bwd(nn.Sequential(ref, nn.ReLU()), x, channel_axis=case.channel_axis)
        assert_same_run(got, want, **EXACT)
        assert_buffers_close(m, ref, **EXACT)
    with torch.no_grad():
        x = layout_x(case, _main_shape(case), seed=30, dtype=F32)
        assert_close(torch.relu_(m(x)), torch.relu(ref(x)), **EXACT)
    assert_buffers_close(m, ref, **EXACT)


# -------------------------------------------------------------------------------- export
@cases
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_export_matches_eager(case: Case, train: bool) -> None:
    """``torch.export.export`` in training and evaluation: the exported program's module gives
    the eager outputs and, in training, the same running-buffer updates — as torch's own
    ``BatchNorm2d`` exported in training mode, whose buffer mutations stay in the program."""
    eager = build(case)
    _warm(eager, case)
    eager.train(train)
    x = layout_x(case, _main_shape(case), seed=40, dtype=F32)
    exported = torch.export.export(copy.deepcopy(eager), (x,)).module()
    for step in range(2):
        x = layout_x(case, _main_shape(case), seed=40 + step, dtype=F32)
        with torch.no_grad():
            assert_close(exported(x), eager(x), **EXPORT_TOL)
        got = dict(exported.named_buffers())
        for name, buf in eager.named_buffers():
            assert_close(got[name], buf, **EXPORT_TOL, msg=lambda s, n=name: f"buffer {n}: {s}")


# ------------------------------------------------------------------------------ autocast
def _channel_linear(case: Case) -> nn.Linear:
    """A ``C → C`` Linear applied along the case's channel axis: under autocast its output is
    the low-precision activation a normalization layer meets in a model."""
    lin = nn.Linear(case.num_features, case.num_features)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        lin.weight.copy_(torch.eye(case.num_features) + 0.2 * torch.randn(lin.weight.shape, generator=g))
        lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
    return lin


def _apply_channels(lin: nn.Linear, x: Tensor, channel_axis: int) -> Tensor:
    return lin(x) if channel_axis == -1 else lin(x.movedim(1, -1)).movedim(-1, 1)


@cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast(case: Case, dtype: torch.dtype, train: bool) -> None:
    """Under ``torch.autocast("cpu", dtype)`` behind a Linear (so the input is ``dtype``): the
    output keeps the input's dtype (as torch's BatchNorm, GroupNorm, LayerNorm, InstanceNorm and
    RMSNorm do under CPU autocast), is finite and close to the same module run in float32 on
    the same (upcast) values; parameters, their gradients and the running statistics stay
    float32, the statistics equal to the float32 run's up to summation order."""
    m = build(case)
    _warm(m, case)
    ref = copy.deepcopy(m)
    m.train(train)
    ref.train(train)
    lin = _channel_linear(case)
    eps = torch.finfo(dtype).eps
    for step in range(2):
        x = layout_x(case, _main_shape(case), seed=50 + step, dtype=F32)
        with torch.autocast("cpu", dtype=dtype):
            h = _apply_channels(lin, x, case.channel_axis)
            assert h.dtype == dtype
            h = h.detach().requires_grad_()
            y = m(h)
        h_ref = h.detach().float().requires_grad_()
        y_ref = ref(h_ref)
        assert y.dtype == dtype and y.shape == h.shape
        assert torch.isfinite(y).all()
        # The input values are exact in both runs; the autocast run rounds its output and the
        # intermediates kept in `dtype` (statistics are float32): the bound of test_low_precision,
        # two eps relative plus two eps of the output range absolute.
        assert_close(y.float(), y_ref, rtol=2 * eps, atol=2 * eps * max(1.0, y_ref.abs().max().item()))
        y.backward(torch.ones_like(y))
        y_ref.backward(torch.ones_like(y_ref))  # backward-updated state (online_norm) as well
        assert h.grad is not None and h.grad.dtype == dtype and torch.isfinite(h.grad).all()
        for name, p in m.named_parameters():
            assert p.dtype == F32, name
            assert p.grad is None or (p.grad.dtype == F32 and torch.isfinite(p.grad).all()), name
        for name, b in m.named_buffers():
            assert b.dtype == (torch.long if name == "num_batches_tracked" else F32), name
        assert_buffers_close(m, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- integer input
@cases
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool],
                         ids=["int64", "int32", "uint8", "bool"])
def test_integer_and_bool_input_refused(case: Case, dtype: torch.dtype) -> None:
    """Integer and bool inputs raise :class:`normkit.DTypeError` (a ``ValueError``) naming the
    dtype and the fix, in training and evaluation, before any state changes — torch's kernels
    refuse them too (``"batch_norm" not implemented for 'Long'``); a silent integer-truncated
    output would be garbage. (The check is the shared input check, so whitening rows run too.)"""
    m = build(case)
    _warm(m, case)
    x = (layout_x(case, _main_shape(case), seed=60) * 3).round().to(dtype)
    for train in (True, False):
        m.train(train)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(nk.DTypeError, match=rf"floating-point input, got dtype {dtype}.*\.float\(\)"):
            m(x)
        after = m.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_dtype_error_is_value_error() -> None:
    assert issubclass(nk.DTypeError, ValueError) and issubclass(nk.DTypeError, nk.NormkitError)


def test_online_cumulative_average_compiles(dynamo_reset: None) -> None:
    """Online Normalization's ``momentum=None`` (weights ``1/t`` from the step counter, a Python
    float in eager mode) compiles in one graph through the partitioned AOT pipeline and gives
    the eager outputs, gradients and running estimates (the table's row uses a fixed momentum).
    """
    eager = nk.create("online_norm", 4, momentum=None)
    target = copy.deepcopy(eager)
    compiled = torch.compile(target, backend="aot_eager_decomp_partition", fullgraph=True)
    for step in range(3):
        x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(step))
        # the same aten ops after decomposition: float32 op-order noise on O(1) values
        assert_same_run(fwd_bwd(compiled, x), fwd_bwd(eager, x), rtol=1e-5, atol=1e-5)
        assert_buffers_close(target, eager, rtol=1e-5, atol=1e-5)
    assert int(target.num_batches_tracked) == 9
