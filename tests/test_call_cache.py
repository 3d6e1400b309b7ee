"""The per-call shortcuts of Normalization (normkit._call_cache): the remembered spread check
notices every change it keys on, reads no data, and the direct buffer/parameter reads see what
``getattr`` would."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normkit as nk
from normkit import _pipeline as P
from normkit.errors import ShapeError


class _Ops(TorchDispatchMode):
    """Records the aten ops dispatched inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_spread_check_after_a_passed_shape_still_refuses_a_new_one() -> None:
    bn = nk.create("bn", 3).train()
    bn(torch.randn(4, 3, 5))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    for _ in range(2):  # a failing shape is never remembered
        with pytest.raises(ShapeError, match=r"got input of shape \(1, 3\)"):
            bn(torch.randn(1, 3))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]  # refused before any state changes
    bn(torch.randn(4, 3, 5))  # the remembered shape passes again, the counter moves
    assert int(bn.num_batches_tracked) == before[2] + 1


def test_spread_check_notices_a_new_operation_and_partition() -> None:
    m = nk.Normalization(4, nap=nk.nap.Batch(), nop=nk.nop.Center(), track_running_stats=False)
    x = torch.randn(1, 4)
    m(x)  # centering needs no spread: one sample per statistic is fine
    m.register_buffer("running_var", None)  # what Standardize's untracked module holds
    m.nop = nk.nop.Standardize()
    with pytest.raises(ShapeError, match="more than 1"):
        m(x)
    g = nk.Normalization(4, nap=nk.nap.Group(num_groups=2), track_running_stats=False)
    g(x)  # two channels per group statistic
    g.nap = nk.nap.Group(num_groups=2)  # an equal new partition: checked again, passes
    g(x)
    g.nap = nk.nap.Group(num_groups=4)  # one channel per group: one value
    g.groups = g.nap.groups(4)
    with pytest.raises(ShapeError, match="more than 1"):
        g(x)


def test_spread_check_notices_eval_without_running_statistics_and_channel_axis() -> None:
    ln = nk.Normalization(3, nap=nk.nap.Group(num_groups=1), channel_axis=-1)
    ln(torch.randn(2, 5, 3))
    with pytest.raises(ShapeError, match=r"got input of shape \(2, 1\)"):
        nk.Normalization(1, nap=nk.nap.Group(num_groups=1), channel_axis=-1)(torch.randn(2, 1))
    inorm = nk.Normalization(3, nap=nk.nap.Instance())
    inorm(torch.randn(2, 3, 4))
    with pytest.raises(ShapeError, match=r"got input of shape \(2, 3, 1\)"):
        inorm.eval()(torch.randn(2, 3, 1))  # eval without running estimates: batch statistics


def test_check_batch_reads_only_the_shape() -> None:
    # every other row: canonical_view's reshape of it (S = H·W) would copy the whole input
    x = torch.randn(6, 6, 10, 12)[:, :, ::2]
    with _Ops() as mode:
        P.check_batch(x, (1, 6), 1, 0, nk.nap.Group(num_groups=1), nk.nop.Standardize())
    assert set(mode.ops) <= {"aten.new_empty.default", "aten.expand.default"}, mode.ops
    with pytest.raises(ShapeError, match=r"got input of shape \(6, 1, 1, 1\)"):
        P.check_batch(x[:, :1, :1, :1], (1, 1), 1, 0, nk.nap.Group(num_groups=1),
                      nk.nop.Standardize())


def test_direct_reads_see_reassigned_buffers_and_parameters() -> None:
    bn = nk.create("bn", 3).train()
    new_mean = torch.full((3,), 2.0)
    bn.running_mean = new_mean  # a new buffer tensor
    assert bn._running()["mean"] is new_mean
    bn.weight = nn.Parameter(torch.full((3,), 3.0))
    bn.bias = nn.Parameter(torch.full((3,), -1.0))
    x = torch.randn(4, 3, 5)
    ref = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, 1e-5)
    torch.testing.assert_close(bn(x), ref)
    torch.testing.assert_close(bn.running_mean, 0.9 * 2.0 + 0.1 * x.mean((0, 2)))
    bn.running_var = None  # no running estimates any more: batch statistics in eval (torch)
    assert bn._running() is None
    torch.testing.assert_close(bn.eval()(x), ref)


def test_remembered_check_stays_out_of_state_dict_and_copies() -> None:
    bn = nk.create("bn", 3).train()
    bn(torch.randn(4, 3, 5))
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                    "num_batches_tracked"}
    for twin in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        with pytest.raises(ShapeError):
            twin(torch.randn(1, 3))
        torch.testing.assert_close(twin(torch.ones(2, 3)), bn(torch.ones(2, 3)))
