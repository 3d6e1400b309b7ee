"""Generic-table rows of PowerNorm (Shen et al. 2020); appended to ``cases.CASES``.

The generic tests call a training forward many times on one module (gradcheck perturbs the input
hundreds of times) and require every buffer to be a running statistic (``running_ms`` here). Past
its warm-up, PowerNorm normalizes with the running quadratic mean left by the previous steps
(the output depends on the state, not on the batch alone), and with ``alpha_bkw < 1`` it keeps a
backward statistic ``grad_nu`` updated by backward passes. Neither is what ``Case.streaming``
describes (sample-by-sample updates inside a batch, with no per-batch EMA formula), so no flag is
used: the rows of ``CASES`` are the configurations whose training step is a function of the batch
alone — the warm-up phase (a warm-up longer than any test runs) with ``alpha_bkw=1`` (no
``grad_nu``) — which is RMS batch normalization through PowerNorm's own module and operation.

``STATEFUL`` holds the configurations past the warm-up and with ``grad_nu`` (``Case.stateful``,
``Case.backward_state``); the generic battery runs them, minus the generic tests that assume a
stateless training step, which ``tests/test_power.py`` replaces (see its module docstring).

The float64 formulas are written from the paper's equations with plain tensor operations on the
logical ``(N, C, *spatial)`` input, never by calling normkit.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from cases import S4, Case, ErrorInput, _common_errors, _per_channel
from normkit import ConfigError

Stats = dict[str, Tensor]

WARMUP_FOREVER = 10**9  # longer than any test runs: the batch's quadratic mean every step


def power_stats(x: Tensor) -> Stats:
    """The value ``running_ms`` tracks per step: the batch's ``E[x²]`` per channel (biased)."""
    return {"ms": _per_channel(x).square().mean(1)}


def power_eval(m: Any, x: Tensor) -> Tensor:
    """Evaluation: ``γ·x/√(ψ² + ε) + β`` with ``ψ²`` = ``running_ms``."""
    view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    y = x / (m.running_ms.detach().double().view(view) + m.eps).sqrt()
    if getattr(m, "weight", None) is not None:
        y = y * m.weight.detach().double().view(view) + m.bias.detach().double().view(view)
    return y


_COMMON = {"num_features": 4, "shapes": S4, "grad_shape": (3, 4, 3), "batch_dependent": True,
           "running": ("ms",), "params": ("weight", "bias"), "takes_affine": True,
           "native": None, "batch_stats": power_stats, "eval_ref": power_eval,
           # E[x²] needs no spread: one value per channel is defined (as mean-only BN)
           "edge_shapes": ((1, 4), (1, 4, 1, 1), (1, 4, 3))}

_ERRORS = (
    ErrorInput("alpha_fwd_1.5", ConfigError, r"alpha_fwd must be a number in \[0, 1\] .*got 1\.5",
               ctor={"alpha_fwd": 1.5}),
    ErrorInput("alpha_fwd_nan", ConfigError, r"alpha_fwd must be a number in \[0, 1\] .*got nan",
               ctor={"alpha_fwd": float("nan")}),
    ErrorInput("alpha_fwd_bool", ConfigError, r"alpha_fwd must be a number in \[0, 1\] .*got True",
               ctor={"alpha_fwd": True}),
    ErrorInput("alpha_bkw_negative", ConfigError,
               r"alpha_bkw must be a number in \[0, 1\] .*got -0\.1", ctor={"alpha_bkw": -0.1}),
    ErrorInput("alpha_bkw_str", ConfigError, r"alpha_bkw must be a number in \[0, 1\] .*got '0\.9'",
               ctor={"alpha_bkw": "0.9"}),
    ErrorInput("warmup_negative", ConfigError, r"warmup_steps must be an int >= 0, got -1",
               ctor={"warmup_steps": -1}),
    ErrorInput("warmup_float", ConfigError, r"warmup_steps must be an int >= 0, got 2\.5",
               ctor={"warmup_steps": 2.5}),
    ErrorInput("alpha_fwd_and_momentum", ConfigError,
               r"give alpha_fwd \(0\.8\) or momentum \(0\.1\), not both",
               ctor={"alpha_fwd": 0.8, "momentum": 0.1}),
)

CASES: list[Case] = [
    Case(name="power_norm", method="power_norm",
         kwargs={"warmup_steps": WARMUP_FOREVER, "alpha_bkw": 1.0}, **_COMMON,
         errors=_common_errors(4, (3, 4, 5), 1) + _ERRORS),
]
# No channels-last row here: test_single_vector_channels_last requires every batch-dependent
# method to refuse training on a single (C,) vector, but E[x²] over one value is defined (as for
# mean-only BN), and PowerNorm trains on it (tests/test_power.py). channel_axis=-1 is covered by
# test_channel_axis_last_equals_first on the row above and by the "power_norm_transformer"
# configuration below.

# Configurations with state across training steps (cases.STATEFUL: the generic battery runs them;
# tests/test_power.py replaces the generic tests they skip). A warm-up of one
# step: every battery test of two or more steps covers both phases, and the first step of a fresh
# module uses batch statistics, as training with the tracking switched off does.
STATEFUL: list[Case] = [
    # past the warm-up, exact gradient of x/√(ψ²_{t−1} + ε) (ν = 0): plain autograd
    Case(name="power_norm_exact_backward", method="power_norm",
         kwargs={"warmup_steps": 1, "alpha_bkw": 1.0}, **_COMMON, stateful=True),
    # the paper's approximate backward (α_bkw = 0.9): one first-order autograd Function
    Case(name="power_norm_paper", method="power_norm", kwargs={"warmup_steps": 1}, **_COMMON,
         double_backward=False, stateful=True, backward_state=True),
    # a transformer's (B, T, D) activations: logical (B, D, T), statistics over B·T per feature
    Case(name="power_norm_transformer", method="power_norm",
         kwargs={"warmup_steps": 1, "alpha_bkw": 0.5, "channel_axis": -1}, channel_axis=-1,
         double_backward=False, stateful=True, backward_state=True,
         **{**_COMMON, "num_features": 6, "shapes": ((4, 6, 5), (2, 6, 7), (3, 6)),
            "grad_shape": (2, 6, 3), "edge_shapes": ((1, 6, 2), (1, 6))}),
]

# extra buffers each stateful configuration keeps besides running_ms and num_batches_tracked
STATE_BUFFERS: dict[str, tuple[str, ...]] = {
    "power_norm_exact_backward": (),
    "power_norm_paper": ("grad_nu",),
    "power_norm_transformer": ("grad_nu",),
}
