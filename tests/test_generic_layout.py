"""Generic tests over the case table (see ``tests/test_generic.py``): non-contiguous and
channels-last strides, ``channel_axis=-1``, one value per statistic, batch 1 / spatial size 1, a
single channels-last vector, the zero batch and ``affine=False``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from cases import (
    Case,
    from_layout,
    layout_shape,
    to_layout,
)
from generic_util import (
    AFFINE,
    DEGENERATE,
    DEGENERATE_IDS,
    EDGE,
    EDGE_IDS,
    F32,
    F64,
    ROWS,
    TABLE,
    TIGHT,
    assert_buffers_close,
    assert_same_run,
    assert_state_equal,
    build,
    fwd_bwd,
    layout_x,
    logical_x,
    over,
    state,
)
from normkit import ShapeError


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


@over(ROWS)
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


@over(ROWS)
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


# (table rows: the stateful PowerNorm row trains on one vector, E[x²] needs no spread; test_power)
@over([c for c in TABLE if c.channel_axis == -1])
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


@over(ROWS)
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


@over(AFFINE)
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
