"""Generic tests over the case table (see ``tests/test_generic.py``): running statistics (EMA,
cumulative average, momentum extremes, reset, tracking off or toggled), eval never mutating
state, serialization (``state_dict`` round trip and ``_version`` migration, ``torch.load(
weights_only=True)``, deepcopy / pickle) and ``folded()``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from cases import (
    Case,
    from_layout,
    to_layout,
)
from generic_util import (
    BATCH_STEP,
    BATCH_STEP_RUNNING,
    F32,
    F64,
    ROWS,
    RUNNING,
    TIGHT,
    assert_same_module,
    assert_state_equal,
    build,
    fwd_bwd,
    initial_running,
    layout_x,
    logical_x,
    over,
    running,
    state,
    trained,
)


# ----------------------------------------------------------------------------- buffers
@over(BATCH_STEP_RUNNING)
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


@over(BATCH_STEP_RUNNING)
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
@over(RUNNING)
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


@over(RUNNING)
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


@over(BATCH_STEP)
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
@over(BATCH_STEP_RUNNING)
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


@over(ROWS)
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


@over(ROWS)
def test_state_dict_round_trip(case: Case) -> None:
    m = trained(case)
    sd = m.state_dict()
    assert sd._metadata[""]["version"] == type(m)._version  # type: ignore[attr-defined]
    fresh = build(case, randomize=False)
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_module(m, fresh, case)


@over(RUNNING)
def test_state_dict_version_1_migration(case: Case) -> None:
    """A checkpoint from before ``num_batches_tracked`` (torch BN ``_version`` 1) loads strictly
    and starts the counter at 0, as torch does."""
    m = trained(case)
    sd = m.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    fresh = build(case, randomize=False)
    fresh.load_state_dict(sd, strict=True)
    assert int(fresh.num_batches_tracked) == 0
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k


@over(ROWS)
def test_torch_load_weights_only(case: Case) -> None:
    m = trained(case)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = build(case, randomize=False)
    fresh.load_state_dict(sd, strict=True)
    assert_same_module(m, fresh, case)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@over(ROWS)
def test_deepcopy_and_pickle(case: Case, how: str) -> None:
    m = trained(case)
    clone = copy.deepcopy(m) if how == "deepcopy" else pickle.loads(pickle.dumps(m))
    assert type(clone) is type(m) and repr(clone) == repr(m)
    before = state(m)
    clone(layout_x(case, case.shapes[0], seed=60, dtype=F32))  # the clone shares no storage
    assert_state_equal(state(m), before)
    clone.load_state_dict(before)
    assert_same_module(m, clone, case)


@over(RUNNING)
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


@over([c for c in ROWS if not c.running])
def test_folded_refuses_without_running_statistics(case: Case) -> None:
    with pytest.raises(nk.ConfigError, match="no running statistics to fold"):
        build(case).folded()
