r"""Operations of the robust-estimation family whose statistics average over training iterations
(book ch. 6): cross-iteration BN (:class:`WindowStandardize`) and moving-average BN
(:class:`MovingAverageStandardize`, with its moving-average backward).

Both keep a shift register of the last ``window − 1`` iterations' statistics in buffers of the
module (:meth:`~normkit.nop.RobustStandardize.state_buffers`) and pool them with the current
batch's by the law of total variance (:func:`~normkit.functional.merging.pool_moments`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..functional import statistics as S
from ..functional.fused_running import moving_average_standardize, push_history, with_history
from ..functional.merging import pool_moments
from ..nap import Partition
from ._base import State, StateSpec, Stats
from ._robust import _BlendedStandardize, _int, batch_moments
from ._standard import Standardize

__all__ = ["WindowStandardize", "MovingAverageStandardize"]


@dataclass(frozen=True, repr=False)
class WindowStandardize(_BlendedStandardize):
    r"""Statistics averaged over the last ``window`` training iterations (cross-iteration BN,
    Yao et al. 2020, without its weight-change compensation):

    .. math::
        \bar\mu = \frac{1}{n}\sum_{\tau} \mu_\tau,\qquad
        \bar\sigma^2 = \frac{1}{n}\sum_\tau \max(\nu_\tau, \mu_\tau^2) - \bar\mu^2,\qquad
        \nu_\tau = \mathrm{E}_\tau[x^2]

    over the current batch and up to ``window − 1`` earlier ones (``n`` of them; fewer right after
    a reset). Earlier statistics are constants (the gradient flows through the current batch's).
    The history stores each batch's ``(μ_τ, σ_τ²)`` and the variance is computed as
    ``mean(σ_τ²) + mean((μ_τ − μ̄)²)`` (:func:`~normkit.functional.merging.pool_moments`), equal
    to the ``E[x²]`` form without its cancellation
    (``max(ν, μ²) = ν`` holds for uncompensated statistics). Up to ``warmup_steps`` (the paper's
    burn-in) it normalizes with the batch statistics while the history fills.
    """

    window: int = 8
    warmup_steps: int = 0
    #: training runs the moments and the standardization as Functions with hand-derived
    #: backwards (:mod:`normkit.functional.fused_robust`); the pooling stays autograd's
    fused: bool = field(default=True, repr=False)
    eval_moments = Standardize.eval_moments  # evaluation: BN's, with the running estimates

    def __post_init__(self) -> None:
        _int("window", self.window, 1)
        _int("warmup_steps", self.warmup_steps, 0)

    def state_buffers(self, nap: Partition, num_features: int) -> StateSpec:
        if self.window == 1:
            return {}
        size = nap.stat_size(num_features)
        return {"history": ((self.window - 1, 2, size), 0.0),
                "history_weight": ((self.window - 1,), 0.0)}

    def _gate(self, state: State, dtype: torch.dtype) -> Tensor:
        return (state.step > self.warmup_steps).to(dtype)

    def window_moments(self, mean: Tensor, var: Tensor, state: State | None
                       ) -> tuple[Tensor, Tensor]:
        """``(μ̄, σ̄²)`` of the batch's ``(mean, var)`` and the history in ``state`` (if any)."""
        if state is None or "history" not in state.buffers:
            return mean, var
        w = state.buffers["history_weight"].to(mean.dtype) * self._gate(state, mean.dtype)
        rows, weights = with_history(torch.stack([mean.reshape(-1), var.reshape(-1)]),
                                      state.buffers["history"], w)
        mbar, vbar = pool_moments(rows[:, 0], rows[:, 1], (0,), weights[..., 0])
        return mbar.reshape(mean.shape), vbar.reshape(var.shape)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None, state: State | None = None,
    ) -> Stats:
        mean, var = batch_moments(self.fused, v, nap, spatial)
        mbar, vbar = self.window_moments(mean, var, state)
        return {"mean": mbar, "var": vbar, "batch_mean": mean, "batch_var": var}

    @S.no_grad
    def update_state(self, state: Stats, stats: Stats) -> None:
        if "history" in state:
            entry = torch.stack([stats["batch_mean"].reshape(-1), stats["batch_var"].reshape(-1)])
            push_history(state["history"], state["history_weight"], entry)


@dataclass(frozen=True, repr=False)
class MovingAverageStandardize(WindowStandardize):
    r"""Moving-average BN (Yan et al. 2020): :class:`WindowStandardize`'s forward (simple moving
    averages of ``μ`` and ``E[x²]`` over ``window`` iterations) and moving averages of the
    *backward* statistics too:

    .. math::
        \frac{\partial L}{\partial x} = \frac{1}{\bar\sigma}\big(g - \bar g - \hat{x}\,\bar\psi\big),
        \qquad g = \gamma\,\frac{\partial L}{\partial y},\quad
        \bar g = \overline{\mathrm{E}[g]},\quad \bar\psi = \overline{\mathrm{E}[g\,\hat{x}]}

    where ``E`` is the mean over the batch area and the bar the average over the current and up
    to ``window − 1`` earlier backward passes (recorded by training steps that update the running
    estimates). With one iteration (``window=1``, the warm-up, or right after a reset) this is
    BN's exact gradient; otherwise it is the paper's approximation, not the derivative of the
    forward (it is affine, not linear, in the incoming gradient). One autograd Function
    (:func:`~normkit.functional.fused_running.moving_average_standardize`), first order only;
    the backward of a step reads the backward history as it is when it runs.
    """

    window: int = 16
    # read and recorded by the backward when it runs: passed live, never snapshotted
    backward_state = ("grad_history", "grad_weight")
    eval_moments = Standardize.eval_moments  # evaluation: BN's, with the running estimates

    def state_buffers(self, nap: Partition, num_features: int) -> StateSpec:
        spec = super().state_buffers(nap, num_features)
        if spec:
            spec["grad_history"] = spec["history"]
            spec["grad_weight"] = spec["history_weight"]
        return spec

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None, state: State | None = None,
    ) -> Stats:
        with torch.no_grad():  # the autograd Function below gives the whole input gradient
            stats = super().fit(v, nap, spatial, eps=eps, params=params, state=state)
        if state is not None and "grad_history" in state.buffers:
            stats["grad_history"] = state.buffers["grad_history"]
            stats["grad_weight"] = state.buffers["grad_weight"]
            stats["grad_gate"] = self._gate(state, stats["mean"].dtype)
        return stats

    def update_state(self, state: Stats, stats: Stats) -> None:
        super().update_state(state, stats)
        if "grad_history" in stats:
            stats["record_grad"] = stats["grad_weight"]  # arms this step's backward to record

    def transform(
        self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
        weight: Tensor | None, bias: Tensor | None,
    ) -> Tensor:
        if "batch_mean" not in stats:  # evaluation with the running estimates
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        return moving_average_standardize(
            v, stats["mean"], stats["var"], weight, bias, eps, nap.dims,
            history=stats.get("grad_history"), history_weight=stats.get("grad_weight"),
            gate=stats.get("grad_gate"), record="record_grad" in stats,
        )
