"""torch compatibility: state_dicts both ways (strict), old checkpoints, weights_only loading,
``_version`` on every module and ``track_running_stats`` toggled after construction.

float64 throughout; after a strict load both modules hold bit-identical tensors and compute the
same math, so outputs agree to float64 round-off (TOL is far above it, far below any real
difference such as a missing running buffer, which changes outputs by O(1)).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import normkit as nk
from cases import CASES, layout_shape

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def _x(shape, seed, loc=0.4, scale=1.9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale + loc


def _train(m: nn.Module, shape, steps=3, seed=0) -> nn.Module:
    """Give a module non-trivial parameters and running buffers."""
    g = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    m.train()
    for s in range(steps):
        m(_x(shape, seed + s))
    return m


PAIRS = {
    "bn1d": (lambda: nk.BatchNorm(5, dtype=DT), lambda: nn.BatchNorm1d(5, dtype=DT), (6, 5, 4)),
    "bn1d_flat": (lambda: nk.BatchNorm(5, dtype=DT), lambda: nn.BatchNorm1d(5, dtype=DT), (6, 5)),
    "bn2d": (lambda: nk.BatchNorm(5, dtype=DT), lambda: nn.BatchNorm2d(5, dtype=DT), (3, 5, 4, 2)),
    "ln": (lambda: nk.LayerNorm(6, channel_axis=-1, dtype=DT), lambda: nn.LayerNorm(6, dtype=DT),
           (3, 4, 6)),
    "gn": (lambda: nk.GroupNorm(6, num_groups=3, dtype=DT), lambda: nn.GroupNorm(3, 6, dtype=DT),
           (3, 6, 4)),
    "in": (lambda: nk.InstanceNorm(4, affine=True, track_running_stats=True, dtype=DT),
           lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=DT), (3, 4, 3, 3)),
}


def _outputs_match(a: nn.Module, b: nn.Module, shape):
    for mode in (False, True):  # eval first: it must use the loaded running buffers
        a.train(mode), b.train(mode)
        x = _x(shape, 77 + mode)
        torch.testing.assert_close(a(x), b(x), **TOL)


def _same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), (list(sa), list(sb))
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("case", list(PAIRS))
def test_torch_to_ours(case):
    make_ours, make_ref, shape = PAIRS[case]
    ref = _train(make_ref(), shape)
    ours = make_ours()
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _same_state(ours, ref)
    _outputs_match(ours, ref, shape)


@pytest.mark.parametrize("case", list(PAIRS))
def test_ours_to_torch(case):
    make_ours, make_ref, shape = PAIRS[case]
    ours = _train(make_ours(), shape, seed=10)
    ref = make_ref()
    ref.load_state_dict(ours.state_dict(), strict=True)
    _same_state(ours, ref)
    _outputs_match(ours, ref, shape)


@pytest.mark.parametrize("case", list(PAIRS))
def test_state_dict_keys_and_shapes_equal_torch(case):
    make_ours, make_ref, _ = PAIRS[case]
    so, sr = make_ours().state_dict(), make_ref().state_dict()
    assert {k: tuple(v.shape) for k, v in so.items()} == {k: tuple(v.shape) for k, v in sr.items()}
    assert {k: v.dtype for k, v in so.items()} == {k: v.dtype for k, v in sr.items()}


def test_old_bn_checkpoint_without_num_batches_tracked():
    ref = _train(nn.BatchNorm2d(5, dtype=DT), (3, 5, 2, 2))
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # a checkpoint from before torch added the counter
    ours = nk.BatchNorm(5, dtype=DT)
    ours.load_state_dict(sd, strict=True)
    assert ours.num_batches_tracked.dtype == torch.long
    assert int(ours.num_batches_tracked) == 0
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=0)
    # torch itself accepts the same old checkpoint the same way
    again = nn.BatchNorm2d(5, dtype=DT)
    again.load_state_dict(sd, strict=True)
    assert int(again.num_batches_tracked) == int(ours.num_batches_tracked)


def test_old_bn_checkpoint_nested_prefix():
    # Migration must use the module's own prefix inside a bigger model.
    ref = nn.Sequential(nn.Conv2d(2, 5, 1), nn.BatchNorm2d(5)).double()
    _train(ref, (3, 2, 2, 2))
    sd = ref.state_dict()
    del sd["1.num_batches_tracked"]
    sd._metadata["1"]["version"] = 1
    ours = nn.Sequential(nn.Conv2d(2, 5, 1), nk.BatchNorm(5)).double()
    ours.load_state_dict(sd, strict=True)
    assert int(ours[1].num_batches_tracked) == 0


def test_current_checkpoint_missing_counter_is_an_error():
    # Only pre-version-2 checkpoints may omit the counter: a strict load of a version-2 one fails.
    sd = nn.BatchNorm2d(5).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        nk.BatchNorm(5).load_state_dict(sd, strict=True)


def _first_case(name):
    """The method's first row of the generic case table (its constructor arguments, layout and,
    for conditional methods, the subclass that supplies a condition)."""
    return next(c for c in CASES if c.method == name)


def _build(name, **kw):
    case = _first_case(name)
    factory = case.factory or (lambda c, **k: nk.create(name, c, **k))
    return factory(case.num_features, **case.kwargs, **kw), case


@pytest.mark.parametrize("name", sorted(nk.list_methods()))
def test_every_module_has_version(name):
    cls = nk.get(name)
    assert isinstance(getattr(cls, "_version", None), int)
    m, _ = _build(name)
    assert m.state_dict()._metadata[""]["version"] == cls._version


@pytest.mark.parametrize("name", sorted(nk.list_methods()))
def test_weights_only_checkpoint_round_trip(name, tmp_path):
    m, case = _build(name, dtype=DT)
    shape = layout_shape(case.shapes[-1], case.channel_axis)
    _train(m, shape, steps=2)
    path = tmp_path / f"{name}.pt"
    torch.save(m.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    fresh, _ = _build(name, dtype=DT)
    fresh.load_state_dict(sd, strict=True)
    _same_state(fresh, m)
    _outputs_match(fresh, m, shape)


def test_weights_only_checkpoint_of_a_model_with_torch_and_ours():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nk.BatchNorm(4), nk.GroupNorm(4, num_groups=2)).double()
    _train(model, (2, 3, 4, 4))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 1), nk.BatchNorm(4), nk.GroupNorm(4, num_groups=2)).double()
    fresh.load_state_dict(sd, strict=True)
    _outputs_match(fresh, model, (2, 3, 4, 4))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_track_running_stats_turned_off_after_construction(native, momentum):
    ours = nk.BatchNorm(5, momentum=momentum, native=native, dtype=DT)
    ref = nn.BatchNorm2d(5, momentum=momentum, dtype=DT)
    shape = (4, 5, 2, 3)
    _train(ref, shape, steps=2)
    ours.load_state_dict(ref.state_dict())
    ours.track_running_stats = ref.track_running_stats = False
    for step in range(2):
        ours.train(), ref.train()
        x = _x(shape, 200 + step)
        torch.testing.assert_close(ours(x), ref(x), **TOL)  # batch statistics
        _same_state(ours, ref)  # no buffer update, counter unchanged
        ours.eval(), ref.eval()
        x = _x(shape, 300 + step)
        torch.testing.assert_close(ours(x), ref(x), **TOL)  # torch: eval still uses the buffers
        _same_state(ours, ref)
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("native", [True, False])
def test_track_running_stats_turned_on_after_construction(native):
    ours = nk.BatchNorm(5, track_running_stats=False, native=native, dtype=DT)
    ref = nn.BatchNorm2d(5, track_running_stats=False, dtype=DT)
    ours.track_running_stats = ref.track_running_stats = True
    shape = (4, 5, 2, 3)
    for mode in (True, False):  # no buffers exist: batch statistics in train and eval, as torch
        ours.train(mode), ref.train(mode)
        x = _x(shape, 5 + mode)
        torch.testing.assert_close(ours(x), ref(x), **TOL)
        assert ours.running_mean is None and ours.num_batches_tracked is None
        _same_state(ours, ref)
