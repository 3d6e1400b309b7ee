"""Generic-table rows of the robust family (book ch. 6); appended to cases.CASES.

The generic tests call a training forward many times on one module (gradcheck perturbs the input
hundreds of times) and require every buffer to be a running statistic, so the rows of ``CASES``
are configurations whose training output is a function of the input alone and whose only buffers
are BN's: batch renormalization with frozen running statistics (``momentum=0``) and limits tight
enough that ``r`` and ``d`` are clipped for every input below (its stop-gradient is then exact),
ghost BN (stateless), and the one-iteration configurations of momentum / cross-iteration /
moving-average BN (BN itself, through their own code paths).

``STATEFUL`` holds configurations that keep state across training steps (extra buffers, history;
``Case.stateful``); the generic battery runs them, minus the generic tests that assume a
training step with no state, which ``tests/test_robust.py`` replaces (see its module docstring).

The float64 reference formulas are written from the papers' equations with plain tensor
operations on the logical ``(N, C, *spatial)`` input, never by calling normkit.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from cases import S4, Case, ErrorInput, _bn_stats, _common_errors, _eval_ref, _per_channel
from normkit import ConfigError, ShapeError

Stats = dict[str, Tensor]


def ghost_stats(virtual_batch_size: int) -> Callable[[Tensor], Stats]:
    """Running values tracked per step by ghost BN: the batch mean and the pooled within-ghost
    variance ``Σ_k Σ_{i∈k} (x_i − μ_k)² / (m − l)`` (``m`` values in ``l`` ghosts)."""

    def stats(x: Tensor) -> Stats:
        chunks = x.split(virtual_batch_size, 0)
        ss = sum(((_per_channel(c) - _per_channel(c).mean(1, keepdim=True)) ** 2).sum(1)
                 for c in chunks)
        xc = _per_channel(x)
        return {"mean": xc.mean(1), "var": ss / (xc.shape[1] - len(chunks))}

    return stats


def _fixed_limits(**kw: float) -> dict[str, float]:
    return {"warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0, **kw}


_BRN_ERRORS = (
    ErrorInput("r_max_below_1", ConfigError, r"r_max must be a finite number >= 1 .*got 0\.5",
               ctor={"r_max": 0.5}),
    ErrorInput("r_max_nan", ConfigError, r"r_max must be a finite number >= 1 .*got nan",
               ctor={"r_max": float("nan")}),
    ErrorInput("d_max_negative", ConfigError, r"d_max must be a finite number >= 0 .*got -1\.0",
               ctor={"d_max": -1.0}),
    ErrorInput("warmup_negative", ConfigError, r"warmup_steps must be an int >= 0, got -1",
               ctor={"warmup_steps": -1}),
    ErrorInput("steps_float", ConfigError, r"r_max_steps must be an int >= 0, got 2\.5",
               ctor={"r_max_steps": 2.5}),
    ErrorInput("ramp_before_warmup", ConfigError,
               r"d_max_steps \(0\) must be >= warmup_steps \(10\)",
               ctor={"warmup_steps": 10, "r_max_steps": 20}),
)

_WINDOW_ERRORS = (
    ErrorInput("window_zero", ConfigError, r"window must be an int >= 1, got 0", ctor={"window": 0}),
    ErrorInput("window_bool", ConfigError, r"window must be an int >= 1, got True",
               ctor={"window": True}),
    ErrorInput("warmup_negative", ConfigError, r"warmup_steps must be an int >= 0, got -2",
               ctor={"warmup_steps": -2}),
)

_BN_LIKE = {"shapes": S4, "grad_shape": (3, 4, 3), "batch_dependent": True,
            "running": ("mean", "var"), "params": ("weight", "bias"), "takes_affine": True,
            "native": None, "batch_stats": _bn_stats, "eval_ref": _eval_ref("std")}

CASES: list[Case] = [
    Case(
        # running statistics frozen at (0, 1): r = clip(σ_B) and d = clip(μ_B). For the gradcheck
        # input (grad_shape, seed 0) σ_B ∈ [1.11, 1.59] and μ_B ∈ [0.64, 1.31] per channel: both
        # sit on their limits (1.05, 0.25), where the stop-gradient is the exact derivative
        name="batch_renorm", method="batch_renorm", num_features=4,
        kwargs=_fixed_limits(r_max=1.05, d_max=0.25, momentum=0.0),
        **{**_BN_LIKE, "native": "batch_norm"}, native_eval=False,  # training: BN's kernel
        degenerate_shapes=((1, 4), (1, 4, 1, 1)), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + _BRN_ERRORS,
    ),
    Case(
        name="ghost_bn", method="ghost_bn", num_features=4, kwargs={"virtual_batch_size": 2},
        shapes=S4, grad_shape=(3, 4, 3),  # 3 samples: ghosts of 2 and 1 (× 3 positions)
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native=None,
        # (3, 4): the last ghost batch holds one sample and no positions
        degenerate_shapes=((1, 4), (3, 4), (3, 4, 1, 1)),
        edge_shapes=((1, 4, 3), (3, 4, 2), (2, 4, 1)),
        batch_stats=ghost_stats(2), eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("vbs_zero", ConfigError, r"virtual_batch_size must be an int >= 1, got 0",
                       ctor={"virtual_batch_size": 0}),
            ErrorInput("vbs_float", ConfigError,
                       r"virtual_batch_size must be an int >= 1, got 2\.0",
                       ctor={"virtual_batch_size": 2.0}),
            ErrorInput("ragged_one_value", ShapeError,
                       r"Expected more than 1 value per statistic .*\(5, 4\)", shape=(5, 4)),
        ),
    ),
    Case(
        name="momentum_bn", method="momentum_bn", num_features=4, kwargs={"lambda_": 0.0},
        **_BN_LIKE, degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("lambda_one", ConfigError, r"lambda_ must be a number in \[0, 1\).*got 1\.0",
                       ctor={"lambda_": 1.0}),
            ErrorInput("lambda_negative", ConfigError,
                       r"lambda_ must be a number in \[0, 1\).*got -0\.1", ctor={"lambda_": -0.1}),
            ErrorInput("ideal_batch_size_zero", ConfigError,
                       r"ideal_batch_size must be an int >= 1, got 0",
                       ctor={"ideal_batch_size": 0}),
            ErrorInput("total_steps_one", ConfigError, r"total_steps must be an int >= 2, got 1",
                       ctor={"total_steps": 1}),
        ),
    ),
    Case(
        name="cross_iteration_bn", method="cross_iteration_bn", num_features=4,
        kwargs={"window": 1}, **_BN_LIKE, degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + _WINDOW_ERRORS,
    ),
    Case(
        name="mabn", method="mabn", num_features=4, kwargs={"window": 1}, **_BN_LIKE,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        double_backward=False,  # one autograd Function, first-order only
        errors=_common_errors(4, (3, 4, 5), 1) + _WINDOW_ERRORS[:2],
    ),
]

# Configurations with state across training steps (cases.STATEFUL: the generic battery runs them;
# tests/test_robust.py replaces the generic tests they skip).
STATEFUL: list[Case] = [
    Case(
        name="batch_renorm_schedule", method="batch_renorm", num_features=4,
        kwargs={"r_max": 1.5, "d_max": 0.5, "warmup_steps": 1, "r_max_steps": 3,
                "d_max_steps": 2},
        **{**_BN_LIKE, "native": "batch_norm"}, native_eval=False,  # training: BN's kernel
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),), stateful=True,
    ),
    Case(
        name="momentum_bn_fixed", method="momentum_bn", num_features=4, kwargs={"lambda_": 0.6},
        **_BN_LIKE, degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),), stateful=True,
    ),
    Case(
        name="momentum_bn_dynamic", method="momentum_bn", num_features=4,
        kwargs={"ideal_batch_size": 8, "total_steps": 3},
        **_BN_LIKE, degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),), stateful=True,
    ),
    Case(
        name="cross_iteration_bn_window3", method="cross_iteration_bn", num_features=4,
        kwargs={"window": 3}, **_BN_LIKE, degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 3),), stateful=True,
    ),
    Case(
        name="mabn_window3", method="mabn", num_features=4, kwargs={"window": 3}, **_BN_LIKE,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),), double_backward=False,
        stateful=True, backward_state=True,  # the backward reads and records a history
    ),
]

# extra buffers each stateful configuration keeps besides BN's
STATE_BUFFERS: dict[str, tuple[str, ...]] = {
    "batch_renorm_schedule": (),
    "momentum_bn_fixed": ("momentum_mean", "momentum_var"),
    "momentum_bn_dynamic": ("momentum_mean", "momentum_var"),
    "cross_iteration_bn_window3": ("history", "history_weight"),
    "mabn_window3": ("history", "history_weight", "grad_history", "grad_weight"),
}
