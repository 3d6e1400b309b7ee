"""The one forward pipeline (``normkit._pipeline``) and what operations declare to the core.

- ``nk.normalize`` (the functional form) and ``Normalization`` in training run the same steps:
  equal outputs for every family of operation, with padded groups and channels-last inputs;
- ``nk.functional.normalize`` is a deprecated alias that still gives the same result;
- an operation's torch kernel and block evaluation fold are its own: a subclass has neither
  until it declares them (no ``type(op) is ...`` in the core);
- stateful operations get an explicit ``nop.State``: a plain ``Normalization`` with one of them
  is the registered preset (state buffers, outputs, gradients, state after several steps), and
  ``params`` carries learnable parameters only;
- the ``_statistics`` / ``_transform`` hooks are honoured on the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from normkit import nap, nop
from normkit._pipeline import Call

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


FUNCTIONAL_CASES = {
    "bn": (nap.Batch(), nop.Standardize(), 1),
    "gn": (nap.Group(num_groups=2), nop.Standardize(), 1),
    "rms_last": (nap.Position(), nop.Scale("rms"), -1),
    "l1_layer": (nap.Layer(), nop.L1(), 1),
    "range_instance": (nap.Instance(), nop.Range(), 1),
    "whiten_padded": (nap.Batch(group_size=4), nop.Whiten(), 1),  # 6 channels: groups 4 + 2
    "evo_s0": (nap.Group(num_groups=3), nop.EvoS0(), 1),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_CASES))
def test_functional_form_equals_the_module_in_training(name: str) -> None:
    partition, operation, axis = FUNCTIONAL_CASES[name]
    x = rand(16, 6, 5) if axis == 1 else rand(16, 5, 6)
    m = nk.Normalization(6, nap=partition, nop=operation, nrr=None, channel_axis=axis,
                         track_running_stats=False, dtype=F64)
    y = nk.normalize(x, nap=partition, nop=operation, eps=m.eps, channel_axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, m(x), **TIGHT)


def test_functional_form_with_weight_and_bias() -> None:
    x, w, b = rand(8, 4, 3), rand(4, seed=1), rand(4, seed=2)
    y = nk.normalize(x, nap=nap.Batch(), nop=nop.Standardize(), weight=w, bias=b)
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True), **TIGHT)


def test_functional_normalize_is_a_deprecated_alias() -> None:
    x = rand(4, 6, 5)
    with pytest.warns(DeprecationWarning, match="use normkit.normalize"):
        old = nk.functional.normalize(x, nap=nap.Layer(), nop=nop.Standardize())
    assert_close(old, nk.normalize(x, nap=nap.Layer(), nop=nop.Standardize()), **TIGHT)


def test_functional_form_refuses_a_single_value_per_statistic() -> None:
    with pytest.raises(nk.ShapeError, match=r"more than 1 value.*\(1, 3\)"):
        nk.normalize(rand(1, 3), nap=nap.Batch(), nop=nop.Standardize())


@dataclass(frozen=True, repr=False)
class _Shifted(nop.Standardize):
    """Standardization, then + 1: not what BN's kernel computes."""

    def coefficients(self, stats: Any, eps: float, m: int) -> Any:
        scale, shift = super().coefficients(stats, eps, m)
        return scale, shift + 1


@dataclass(frozen=True, repr=False)
class _OtherWhiten(nop.Whiten):
    pass


def test_kernels_and_eval_folds_are_not_inherited() -> None:
    assert nk.Normalization(4, nap=nap.Batch(), nop=nop.Standardize())._native == "batch_norm"
    m = nk.Normalization(4, nap=nap.Batch(), nop=_Shifted(), dtype=F64)
    assert m._native is None
    x = rand(8, 4, 3)
    assert_close(m(x), torch.nn.functional.batch_norm(x, None, None, training=True) + 1, **TIGHT)
    assert nop.Whiten.block_eval_fold and not _OtherWhiten.block_eval_fold
    assert not nop.SwitchableWhiten.block_eval_fold  # it mixes in per-input statistics
    assert nop.Renormalize.native_kernel is nop.Operation.native_kernel


def test_layout_decides_the_kernel() -> None:
    def layout(partition: nap.Partition, **kw: Any) -> nop.Layout:
        base: dict[str, Any] = dict(nap=partition, groups=partition.groups(8), channel_axis=1,
                                    tracking=False, recovery="affine")
        return nop.Layout(**{**base, **kw})

    std = nop.Standardize()
    assert std.native_kernel(layout(nap.Batch())) == "batch_norm"
    assert std.native_kernel(layout(nap.Group(num_groups=2))) == "group_norm"
    assert std.native_kernel(layout(nap.Group(num_groups=2), tracking=True)) is None
    assert std.native_kernel(layout(nap.Batch(), recovery="other")) is None
    assert nop.Scale("rms").native_kernel(layout(nap.Position(), channel_axis=-1,
                                                 recovery="weight")) == "rms_norm"
    assert nop.Scale("l2").native_kernel(layout(nap.Position(), channel_axis=-1)) is None
    weighted = nop.ExampleWeighted(alpha=0.5)
    assert weighted.native_kernel(layout(nap.Batch())) == "batch_norm"
    assert weighted.native_applies(True) and not weighted.native_applies(False)


STATEFUL = {
    "batch_renorm": (nop.Renormalize(r_max=2.0, d_max=1.0, warmup_steps=1, r_max_steps=2,
                                     d_max_steps=2),
                     dict(r_max=2.0, d_max=1.0, warmup_steps=1, r_max_steps=2, d_max_steps=2)),
    "momentum_bn": (nop.MomentumStandardize(lambda_=0.5), dict(lambda_=0.5)),
    "cross_iteration_bn": (nop.WindowStandardize(window=3), dict(window=3)),
    "mabn": (nop.MovingAverageStandardize(window=3), dict(window=3)),
    "power_norm": (nop.PowerScale(warmup_steps=1), dict(warmup_steps=1)),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_plain_normalization_with_a_stateful_operation_is_the_preset(name: str) -> None:
    operation, kw = STATEFUL[name]
    plain = nk.Normalization(3, nap=nap.Batch(), nop=operation, dtype=F64)
    preset = nk.create(name, 3, dtype=F64, **kw)
    assert [n for n, _ in plain.named_buffers()] == [n for n, _ in preset.named_buffers()]
    for step in range(4):
        x = rand(5, 3, 4, seed=step).requires_grad_()
        ya, yb = plain(x), preset(x)
        assert_close(ya, yb, **TIGHT)
        cot = rand(5, 3, 4, seed=10 + step)
        ga = torch.autograd.grad(ya, [x, *plain.parameters()], cot)
        gb = torch.autograd.grad(yb, [x, *preset.parameters()], cot)
        for a, b in zip(ga, gb, strict=True):
            assert_close(a, b, **TIGHT)
    for (na, a), (nb, b) in zip(plain.named_buffers(), preset.named_buffers(), strict=True):
        assert na == nb and torch.equal(a, b), na
    plain.reset_running_stats()
    fresh = nk.Normalization(3, nap=nap.Batch(), nop=operation, dtype=F64)
    for (na, a), (_, b) in zip(plain.named_buffers(), fresh.named_buffers(), strict=True):
        assert torch.equal(a, b), na


def test_state_is_given_only_while_tracking() -> None:
    """torch's rule for every stateful operation: with the tracking off (at construction or
    later) training uses the batch alone and leaves the state alone."""
    seen: list[Any] = []

    @dataclass(frozen=True, repr=False)
    class Spy(nop.Standardize):
        reads_state = True

        def fit(self, v: Any, nap: Any, spatial: Any, *, eps: float = 0.0, params: Any = None,
                state: Any = None) -> Any:
            seen.append((params, state))
            return super().fit(v, nap, spatial, eps=eps)

    m = nk.Normalization(3, nap=nap.Batch(), nop=Spy(), dtype=F64)
    m(rand(4, 3))
    params, state = seen[-1]
    assert params == {} and isinstance(state, nop.State)
    assert set(state.running) == {"mean", "var"} and int(state.step) == 1 and state.buffers == {}
    m.track_running_stats = False
    m(rand(4, 3))
    assert seen[-1][1] is None
    nk.Normalization(3, nap=nap.Batch(), nop=Spy(), track_running_stats=False)(rand(4, 3))
    assert seen[-1][1] is None


class _FixedStatistics(nk.Normalization):
    """A preset through the hooks: unit statistics, then the output doubled."""

    def forward(self, x: torch.Tensor, condition: Any = None) -> torch.Tensor:
        return self._run(x, condition, generic=True)

    def _statistics(self, call: Call) -> dict[str, torch.Tensor]:
        shape = call.nap.stat_view_shape(self.num_features)
        return {"mean": call.v.new_zeros(shape), "var": call.v.new_ones(shape) - call.eps}

    def _transform(self, call: Call, stats: Any, weight: Any, bias: Any) -> torch.Tensor:
        return 2 * super()._transform(call, stats, weight, bias)


def test_hooks_are_honoured_in_training_and_evaluation() -> None:
    m = _FixedStatistics(3, nap=nap.Batch(), nrr=None, dtype=F64)
    x = rand(4, 3, 2)
    assert_close(m(x), 2 * x, **TIGHT)
    assert_close(m.eval()(x), 2 * x, **TIGHT)
    assert int(m.num_batches_tracked) == 1  # the pipeline's counter still runs
