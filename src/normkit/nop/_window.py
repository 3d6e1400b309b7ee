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

from ..functional.fused import _reduced
from ..functional.fused_robust import _last_first, _sum_dot
from ..functional.merging import pool_moments, weighted_mean
from ..functional.whiten import _first_order
from ..nap import Partition
from ._base import State, StateSpec, Stats
from ._robust import _BlendedStandardize, _int, batch_moments
from ._standard import Standardize

__all__ = ["WindowStandardize", "MovingAverageStandardize"]


@torch.no_grad()
def _push(history: Tensor, weight: Tensor, entry: Tensor) -> None:
    """Shift register: ``entry`` becomes ``history[0]`` (weight 1), the oldest entry drops out."""
    history.copy_(torch.cat([entry.unsqueeze(0).to(history.dtype), history[:-1]]))
    weight.copy_(torch.cat([weight.new_ones(1), weight[:-1]]))


def _with_history(current: Tensor, history: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The current pair ``(2, size)`` (weight 1) stacked above the ``history`` ``(k, 2, size)``,
    and the weights ``(1 + k, 1, 1)``: the groups :func:`pool_moments` and :func:`weighted_mean`
    average over axis 0 (both pair members at once)."""
    rows = torch.cat([current.unsqueeze(0), history.to(current.dtype)])
    w = torch.cat([weight.new_ones(1), weight]).to(current.dtype)
    return rows, w.reshape(-1, 1, 1)


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
        rows, weights = _with_history(torch.stack([mean.reshape(-1), var.reshape(-1)]),
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

    @torch.no_grad()
    def update_state(self, state: Stats, stats: Stats) -> None:
        if "history" in state:
            entry = torch.stack([stats["batch_mean"].reshape(-1), stats["batch_var"].reshape(-1)])
            _push(state["history"], state["history_weight"], entry)


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
    forward (it is affine, not linear, in the incoming gradient). One autograd Function, first
    order only; the backward of a step reads the backward history as it is when it runs.
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
        return _MovingAverageBackward.apply(
            v, stats["mean"], stats["var"], weight, bias, eps, nap.dims,
            stats.get("grad_history"), stats.get("grad_weight"), stats.get("grad_gate"),
            "record_grad" in stats,
        )


class _MovingAverageBackward(torch.autograd.Function):
    """``y = γ(x − μ̄)/√(σ̄² + ε) + β`` with MABN's moving-average backward (see
    :class:`MovingAverageStandardize`). The backward history buffers are read (and, for a
    recording step, pushed to) when the backward runs. Saves the input and per-channel
    statistics only: ``E[g]`` and ``ψ = E[g x̂]`` come from ``Σ g`` and one batched dot product
    ``Σ g x``, and ``∂x = γ s g − s ψ̄ s (x − μ̄) − s ḡ`` is three passes."""

    @staticmethod
    def forward(ctx, v, mean, var, weight, bias, eps, dims, history, hweight, gate, record):  # type: ignore[override]
        inv = torch.rsqrt(var + eps)
        a = inv if weight is None else inv * weight
        b = -mean * a
        b = b if bias is None else b + bias
        ctx.save_for_backward(v, mean, inv, weight)
        ctx.dims, ctx.in_dtype = dims, v.dtype
        ctx.history, ctx.hweight, ctx.gate, ctx.record = history, hweight, gate, record
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        return (v.to(mean.dtype) * a).add_(b)  # mul + add: a broadcasting addcmul is slower

    @staticmethod
    @_first_order("MABN's moving-average backward",
                  "use cross_iteration_bn (plain autograd) where second derivatives are needed")
    def backward(ctx, gy):  # type: ignore[override]
        v, mean, inv, weight = ctx.saved_tensors
        dims = ctx.dims
        x = v.to(inv.dtype)
        gy = gy.to(inv.dtype)
        # γ folds into the per-channel sums when it is constant along the reduced axes
        folded = weight is None or all(weight.shape[d] == 1 for d in dims)
        g = gy if folded or weight is None else gy * weight
        w = 1.0 if not folded or weight is None else weight
        big = _reduced(x, dims)
        g_sum = _last_first(g, dims)
        dot = _sum_dot(g, x, dims)  # Σ g x
        g_mean = w * g_sum / big  # E[g'], g' = γ·∂L/∂y
        psi = w * inv * (dot - mean * g_sum) / big  # E[g' x̂]
        g_bar, psi_bar = g_mean, psi
        if ctx.history is not None:
            hw = ctx.hweight.to(inv.dtype) * ctx.gate
            current = torch.stack([g_mean.reshape(-1), psi.reshape(-1)])
            bar = weighted_mean(*_with_history(current, ctx.history, hw), (0,))[0]
            g_bar, psi_bar = bar[0].reshape(g_mean.shape), bar[1].reshape(psi.shape)
            if ctx.record:
                _push(ctx.history, ctx.hweight, current)
        c2 = -(inv * inv * psi_bar)  # ∂x = (g' − ḡ − x̂ ψ̄)·s
        gx = (g * (w * inv)).add_(-(inv * g_bar) - c2 * mean).addcmul_(x, c2).to(ctx.in_dtype)
        gw = gb = None
        if weight is not None:
            gw = (inv * (dot - mean * g_sum) if folded else gy * (x - mean) * inv)
            gw = gw.sum_to_size(weight.shape).to(weight.dtype)
        if ctx.bias is not None:
            gb = (g_sum if folded else gy).sum_to_size(ctx.bias[0]).to(ctx.bias[1])
        return gx, None, None, gw, gb, None, None, None, None, None, None
