"""Generic-table rows of the robust-estimation presets of ``methods/online.py`` (book ch. 6):
``eval_norm``, ``kalman_norm``, ``online_norm``; appended to ``cases.CASES``.

The float64 references here are written from the formulas, independently of normkit:
example weighting as raw second moments (``σ² = αE[x²] + (1−α)(σ²_pop + μ²_pop) − μ²``, the
implementation uses the equivalent deviation form), Online Normalization's recursion sample by
sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cases import S4, Case, ErrorInput, _bn_stats, _common_errors, _eval_ref
from normkit import ConfigError

Stats = dict[str, Tensor]


def _example_weighted_ref(m: Any, x: Tensor) -> Tensor:
    """Evaluation of ``eval_norm``: the moments of ``α·(example) + (1 − α)·(population)`` per
    channel, from the example's values over its positions and the running buffers."""
    n, c = x.shape[:2]
    a = m.alpha
    xs = x.reshape(n, c, -1)
    mp = m.running_mean.detach().double().view(1, c, 1)
    vp = m.running_var.detach().double().view(1, c, 1)
    mean = a * xs.mean(2, keepdim=True) + (1 - a) * mp
    second = a * (xs * xs).mean(2, keepdim=True) + (1 - a) * (vp + mp * mp)
    y = (xs - mean) / torch.sqrt(second - mean * mean + m.eps)
    y = y * m.weight.detach().double().view(1, c, 1) + m.bias.detach().double().view(1, c, 1)
    return y.reshape(x.shape)


def online_step_ref(state: Stats, x: Tensor, momentum: float) -> Stats:
    """Online Normalization's forward recursion on the samples of ``x`` (float64), one after
    another: ``σ²_t = α σ²_{t−1} + (1−α) var(x_t) + α(1−α)(mean(x_t) − μ_{t−1})²``,
    ``μ_t = α μ_{t−1} + (1−α) mean(x_t)`` with ``α = 1 − momentum``, per channel over the
    sample's positions. Stats other than ``mean``/``var`` pass through."""
    a = 1 - momentum
    mean, var = state["mean"].double(), state["var"].double()
    for xt in x:
        vals = xt.reshape(xt.shape[0], -1)
        mx, vx = vals.mean(1), vals.var(1, correction=0)
        var = a * var + (1 - a) * vx + a * (1 - a) * (mx - mean) ** 2
        mean = a * mean + (1 - a) * mx
    return {**state, "mean": mean, "var": var}


def _online_single_sample_stats(x: Tensor) -> Stats:
    """What one sample contributes with weight 1 (the stream after ``momentum=1``): its own mean
    and biased variance over its positions; the control buffers are untouched by a forward.
    (With ``momentum < 1`` the variance update has the cross term of :func:`online_step_ref`,
    which an EMA of per-batch values cannot express.)"""
    if x.shape[0] != 1:
        raise ValueError("online_norm rows use batches of one sample")
    vals = x[0].reshape(x.shape[1], -1)
    zero = torch.zeros(x.shape[1], dtype=x.dtype)
    return {"mean": vals.mean(1), "var": vals.var(1, correction=0), "grad_mean": zero,
            "grad_proj": zero}


_ALPHA_ERRORS = (
    ErrorInput("alpha_1.5", ConfigError, r"alpha must be a number in \[0, 1\] .*got 1\.5",
               ctor={"alpha": 1.5}),
    ErrorInput("alpha_negative", ConfigError, r"alpha must be a number in \[0, 1\] .*got -0\.1",
               ctor={"alpha": -0.1}),
    ErrorInput("alpha_nan", ConfigError, r"alpha must be a number in \[0, 1\] .*got nan",
               ctor={"alpha": float("nan")}),
)

# batch size 1, Online Normalization's use ((1, 4) is an edge shape: its "transposed" layout is
# still contiguous)
_ONE = ((1, 4, 5), (1, 4, 3, 3), (1, 4, 2, 3, 2), (1, 4, 2))

CASES: list[Case] = [
    Case(
        name="eval_norm", method="eval_norm", num_features=4, kwargs={"alpha": 0.25}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=True, native="batch_norm", native_eval=False,
        degenerate_shapes=((1, 4), (1, 4, 1, 1)), edge_shapes=((1, 4, 3), (2, 4, 1, 1), (2, 4, 1)),
        batch_stats=_bn_stats, eval_ref=_example_weighted_ref, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1) + _ALPHA_ERRORS,
    ),
    Case(  # α = 0 is BN: its kernel in evaluation too, and it folds
        name="eval_norm_alpha0", method="eval_norm", num_features=4,
        kwargs={"alpha": 0.0, "momentum": None}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native="batch_norm", degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 2),), batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
    ),
    Case(  # drop-in: without the previous layer's statistics Kalman normalization is BN
        name="kalman_norm", method="kalman_norm", num_features=4, kwargs={}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=True, native="batch_norm",
        degenerate_shapes=((1, 4), (1, 4, 1, 1)), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("prev_features_zero", ConfigError,
                       r"prev_features must be a positive int .*got 0", ctor={"prev_features": 0}),
            ErrorInput("gain_one", ConfigError, r"gain must be a number in \(0, 1\) .*got 1\.0",
                       ctor={"gain": 1.0}),
        ),
    ),
    Case(
        name="online_norm", method="online_norm", num_features=4,
        kwargs={"momentum": 0.2, "backward_momentum": 0.1}, shapes=_ONE, grad_shape=(1, 4, 3),
        batch_dependent=True, running=("mean", "var", "grad_mean", "grad_proj"),
        params=("weight", "bias"), takes_affine=True, native=None,
        edge_shapes=((1, 4), (1, 4, 1, 1)), batch_stats=_online_single_sample_stats,
        eval_ref=_eval_ref("std"), double_backward=False, streaming=True,
        errors=_common_errors(4, (1, 4, 5), 1) + (
            ErrorInput("track_running_stats_false", ConfigError,
                       r"track_running_stats=False is not available \(got False\)",
                       ctor={"track_running_stats": False}),
            ErrorInput("backward_momentum_2", ConfigError,
                       r"backward_momentum must be a number in \[0, 1\] .*got 2",
                       ctor={"backward_momentum": 2}),
        ),
    ),
]
