"""Generic-table rows of the standardization, scaling and local families (BN, batch-group, GN,
LN, IN, PN, RMS, ScaleNorm, mean-only / L1 / range BN, LCN, LRN, divisive normalization);
appended to ``cases.CASES``, with the float64 formulas of their running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from cases import (
    S4,
    SP4,
    Case,
    ErrorInput,
    _bn_stats,
    _common_errors,
    _eval_ref,
    _group_errors,
    _per_channel,
)
from normkit import ConfigError

Stats = dict[str, Tensor]


# --------------------------------------------------------- float64 reference statistics
def _mean_stats(x: Tensor) -> Stats:
    return {"mean": _per_channel(x).mean(1)}


def _l1_stats(x: Tensor) -> Stats:
    xc = _per_channel(x)
    mean = xc.mean(1)
    return {"mean": mean, "scale": math.sqrt(math.pi / 2) * (xc - mean[:, None]).abs().mean(1)}


def _range_stats(x: Tensor) -> Stats:
    xc = _per_channel(x)
    m = xc.shape[1]
    scale = (xc.amax(1) - xc.amin(1)) / math.sqrt(2 * math.log(m))
    return {"mean": xc.mean(1), "scale": scale}


def _batch_group_stats(num_groups: int) -> Callable[[Tensor], Stats]:
    def stats(x: Tensor) -> Stats:
        xg = x.reshape(x.shape[0], num_groups, -1).transpose(0, 1).reshape(num_groups, -1)
        return {"mean": xg.mean(1), "var": xg.var(1, correction=1)}

    return stats


def _per_sample_group_stats(num_groups: int) -> Callable[[Tensor], Stats]:
    """Per-sample statistics of each group (unbiased variance), averaged over the batch (torch's
    InstanceNorm rule for tracked per-sample statistics)."""

    def stats(x: Tensor) -> Stats:
        xg = x.reshape(x.shape[0], num_groups, -1)
        return {"mean": xg.mean(2).mean(0), "var": xg.var(2, correction=1).mean(0)}

    return stats


def _over_error() -> ErrorInput:
    return ErrorInput("over_unknown", ConfigError,
                      r"over must be 'all', 'channels' or None, got 'rows'", ctor={"over": "rows"})



# ------------------------------------------------------------------------------- table
SP6 = ((3, 6, 7), (2, 6, 4, 5), (2, 6, 3, 3, 3))

CASES: list[Case] = [
    # ---------------------------------------------------------------- standardization
    Case(
        name="bn", method="bn", num_features=4, kwargs={}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native="batch_norm",
        degenerate_shapes=((1, 4), (1, 4, 1, 1)), edge_shapes=((1, 4, 3), (2, 4, 1, 1), (2, 4, 1)),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1), inductor=True,
    ),
    Case(
        name="bn_noaffine_cma", method="bn", num_features=4,
        kwargs={"affine": False, "momentum": None, "eps": 1e-3}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "var"), params=(), takes_affine=True,
        native="batch_norm", degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 2),),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="bn_channels_last", method="bn", num_features=4, kwargs={"channel_axis": -1},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=True, native="batch_norm", channel_axis=-1,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), -1),
    ),
    Case(  # torch's bias=False: γ only, still the native kernel
        name="bn_nobias", method="bn", num_features=4, kwargs={"bias": False}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"), params=("weight",),
        takes_affine=True, native="batch_norm", degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 3),), batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="batch_group_norm", method="batch_group_norm", num_features=6,
        kwargs={"num_groups": 3}, shapes=((5, 6), (3, 6, 4), (2, 6, 3, 3), (2, 6, 2, 2, 2)),
        grad_shape=(3, 6, 2), batch_dependent=True, running=("mean", "var"),
        # training: one fused standardization (functional/fused_batch_group), no torch kernel
        params=("weight", "bias"), takes_affine=True, native=None, native_eval=False,
        edge_shapes=((1, 6), (2, 6, 1, 1)),  # 2 channels per group: batch 1 has 2 values
        batch_stats=_batch_group_stats(3), eval_ref=_eval_ref("std"),
        errors=_common_errors(6, (3, 6, 4), 1) + _group_errors(6),
    ),
    Case(
        name="batch_group_norm_gs1", method="batch_group_norm", num_features=6,
        kwargs={"group_size": 1}, shapes=((5, 6), (3, 6, 4)), grad_shape=(3, 6, 2),
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native=None, native_eval=False, degenerate_shapes=((1, 6),), edge_shapes=((1, 6, 2),),
        batch_stats=_batch_group_stats(6), eval_ref=_eval_ref("std"),
    ),
    Case(
        name="gn", method="gn", num_features=6, kwargs={"num_groups": 3},
        shapes=((5, 6), (3, 6, 4), (2, 6, 3, 3), (2, 6, 2, 2, 2)), grad_shape=(3, 6, 2),
        batch_dependent=False, running=(), params=("weight", "bias"), takes_affine=True,
        native="group_norm", edge_shapes=((1, 6), (1, 6, 1, 1)),
        errors=_common_errors(6, (3, 6, 4), 1) + _group_errors(6), inductor=True,
    ),
    Case(
        name="gn_group_size1", method="gn", num_features=6, kwargs={"group_size": 1},
        shapes=((3, 6, 4), (2, 6, 3, 3)), grad_shape=(2, 6, 3), batch_dependent=False,
        running=(), params=("weight", "bias"), takes_affine=True, native="group_norm",
        degenerate_shapes=((2, 6), (2, 6, 1, 1)), edge_shapes=((1, 6, 3),),
    ),
    Case(
        name="gn_tracked", method="gn", num_features=6,
        kwargs={"num_groups": 2, "track_running_stats": True, "momentum": 0.2},
        shapes=((5, 6), (3, 6, 4), (2, 6, 3, 3)), grad_shape=(3, 6, 2), batch_dependent=False,
        running=("mean", "var"), params=("weight", "bias"), takes_affine=True, native=None,
        edge_shapes=((1, 6), (1, 6, 1)),
        batch_stats=_per_sample_group_stats(2), eval_ref=_eval_ref("std"),
    ),
    Case(
        name="ln", method="ln", num_features=4, kwargs={"over": "all"}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native="group_norm", edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + (_over_error(),), inductor=True,
    ),
    Case(
        name="ln_channels_last", method="ln", num_features=4, kwargs={"channel_axis": -1},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=False, running=(),
        params=("weight", "bias"), takes_affine=True, native="layer_norm", channel_axis=-1,
        axis_swap_kwargs={"over": "channels"}, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), -1) + (_over_error(),),
    ),
    Case(  # torch's LayerNorm(4, bias=False) on (…, 4) (test_torch_parity: elementwise_affine)
        name="ln_nobias_channels_last", method="ln", num_features=4,
        kwargs={"channel_axis": -1, "bias": False}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=False, running=(), params=("weight",), takes_affine=True,
        native="layer_norm", channel_axis=-1, axis_swap_kwargs={"over": "channels"},
        edge_shapes=((1, 4), (1, 4, 1, 1)),
    ),
    Case(
        name="in", method="in", num_features=4, kwargs={}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=(), takes_affine=True,
        native="instance_norm", degenerate_shapes=((2, 4), (2, 4, 1), (2, 4, 1, 1)),
        edge_shapes=((1, 4, 3), (1, 4, 1, 2)),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="in_affine_tracked", method="in", num_features=4,
        kwargs={"affine": True, "track_running_stats": True}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native="instance_norm", degenerate_shapes=((2, 4, 1),),
        edge_shapes=((1, 4, 3),),
        batch_stats=_per_sample_group_stats(4), eval_ref=_eval_ref("std"),
    ),
    Case(
        name="pn", method="pn", num_features=4, kwargs={}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=(), takes_affine=True, native="layer_norm",
        edge_shapes=((1, 4, 1), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="pn_affine", method="pn", num_features=4, kwargs={"affine": True}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native="layer_norm", edge_shapes=((1, 4, 1),),
    ),
    # ------------------------------------------------------------------------ scaling
    Case(
        name="rms_norm", method="rms_norm", num_features=4, kwargs={"over": "all"}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=False, running=(), params=("weight",),
        takes_affine=True, native=None, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + (_over_error(),), inductor=True,
    ),
    Case(
        name="rms_norm_channels_last", method="rms_norm", num_features=4,
        kwargs={"channel_axis": -1, "eps": 1e-6}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=False, running=(), params=("weight",), takes_affine=True,
        native=None, channel_axis=-1, axis_swap_kwargs={"over": "channels"},
        edge_shapes=((1, 4), (1, 4, 1)),
        errors=_common_errors(4, (3, 4, 5), -1),
    ),
    Case(
        name="scale_norm", method="scale_norm", num_features=4, kwargs={"over": "all"},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=False, running=(), params=("weight",),
        takes_affine=False, native=None, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1, affine=False) + (_over_error(),),
    ),
    Case(
        name="mean_only_bn", method="mean_only_bn", num_features=4, kwargs={}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean",), params=("bias",),
        takes_affine=True, native=None,
        edge_shapes=((1, 4), (1, 4, 1, 1)),  # centering needs no spread: batch 1 is defined
        batch_stats=_mean_stats, eval_ref=_eval_ref("center"),
        errors=_common_errors(4, (3, 4, 5), 1, uses_eps=False),
    ),
    Case(
        name="l1_bn", method="l1_bn", num_features=4, kwargs={}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "scale"), params=("weight", "bias"),
        takes_affine=True, native=None, degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_l1_stats, eval_ref=_eval_ref("inv"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="range_bn", method="range_bn", num_features=4, kwargs={}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "scale"),
        params=("weight", "bias"), takes_affine=True, native=None,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_range_stats, eval_ref=_eval_ref("inv"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    # -------------------------------------------------------------------------- local
    Case(
        name="lcn", method="lcn", num_features=6, kwargs={"num_groups": 3, "window": 3},
        shapes=SP6, grad_shape=(2, 6, 3), batch_dependent=False, running=(),
        params=("weight", "bias"), takes_affine=True, native=None,
        edge_shapes=((1, 6, 1), (1, 6, 1, 1)),  # 2 channels per group: spatial 1 has 2 values
        errors=_common_errors(6, (3, 6, 7), 1) + (
            ErrorInput("groups_not_dividing", ConfigError,
                       r"num_features \(6\) must be divisible by num_groups \(4\)",
                       ctor={"num_groups": 4}),
            ErrorInput("groups_zero", ConfigError, r"num_groups must be a positive int, got 0",
                       ctor={"num_groups": 0}),
            ErrorInput("window_zero", ConfigError, r"window sizes must be positive ints, got 0",
                       ctor={"window": 0}),
            ErrorInput("window_rank_mismatch", ConfigError,
                       r"window \(3, 3\) has 2 sizes but the input has 1 spatial dimensions",
                       ctor={"window": (3, 3)}, shape=(3, 6, 7)),
            ErrorInput("track_running_stats", ConfigError, r"cannot be tracked",
                       ctor={"track_running_stats": True}),
        ),
    ),
    Case(
        name="lrn", method="lrn", num_features=6,
        kwargs={"size": 3, "alpha": 0.5, "beta": 0.75, "k": 1.0}, shapes=SP6,
        grad_shape=(2, 6, 4), batch_dependent=False, running=(), params=(),
        takes_affine=False, native=None, edge_shapes=((1, 6, 1), (1, 6, 1, 1)),  # fused: no kernel
        errors=_common_errors(6, (3, 6, 7), 1, uses_eps=False, affine=False) + (
            ErrorInput("size_zero", ConfigError, r"window sizes must be positive ints, got 0",
                       ctor={"size": 0}),
            ErrorInput("k_zero", ConfigError, r"k > 0 .*got k=0\.0, alpha=0\.5",
                       ctor={"k": 0.0}),
            ErrorInput("alpha_negative", ConfigError, r"alpha >= 0 .*got k=1\.0, alpha=-1\.0",
                       ctor={"alpha": -1.0}),
        ),
    ),
    Case(
        name="divisive_norm", method="divisive_norm", num_features=4,
        kwargs={"window": 3, "channel_window": 1, "sigma": 0.5}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)),  # 1 channel × 1 position per window
        edge_shapes=((1, 4, 3),),
        errors=_common_errors(4, (3, 4, 5), 1, uses_eps=False) + (
            ErrorInput("sigma_zero", ConfigError, r"k > 0 .*got k=0\.0", ctor={"sigma": 0.0}),
            ErrorInput("channel_window_zero", ConfigError,
                       r"window sizes must be positive ints, got 0", ctor={"channel_window": 0}),
        ),
    ),
    Case(
        name="divisive_norm_channels", method="divisive_norm", num_features=6,
        kwargs={"window": (3, 1), "channel_window": 3, "sigma": 1.0}, shapes=((2, 6, 4, 3),),
        grad_shape=(1, 6, 3, 2), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native=None, edge_shapes=((1, 6, 1, 1),),
    ),
]
