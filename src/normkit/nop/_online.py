r"""Operations whose statistics are estimates rather than the batch's own (book ch. 6).

Three methods combine two sets of moments — the input's own and an estimate from elsewhere (the
population, the stream, the previous layer) — and all three do it with the same rule, the
moments of a two-component mixture with weight :math:`w` on the first component
(:func:`~normkit.functional.merging.mix_moments`, the law of total variance); the math is in
:mod:`normkit.functional.online`:

.. math::
    \mu = w\,\mu_a + (1 - w)\,\mu_b, \qquad
    \sigma^2 = w\,\sigma_a^2 + (1 - w)\,\sigma_b^2 + w(1 - w)(\mu_a - \mu_b)^2

Every term is non-negative, so the variance never is, and no ``E[x²] − μ²`` cancellation occurs
(a mean offset of 1e4 in float32 is harmless).

* :class:`ExampleWeighted` — evaluation mixes each example's own statistics into the population
  ones (Summers & Dinneen's inference example weighting, ``eval_norm``).
* :func:`~normkit.functional.online.kalman_estimate` — a layer's batch moments mixed with a prediction from the previous
  layer's estimate through a learned transition (Kalman normalization, ``kalman_norm``).
* :class:`OnlineStandardize` — streaming estimates updated sample by sample, with the control
  process backward of Online Normalization (``online_norm``);
  :func:`~normkit.functional.online.online_normalize` is its forward as a plain differentiable
  function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional.fused_online import stream_moments_scan
from ..functional.fused_robust import constant_standardize, online_affine
from ..functional.fused_robust import moments as fused_moments
from ..functional.merging import mix_moments
from ..functional.online import check_weight as _check_weight
from ..functional.online import online_control_backward, stream_moments
from ..functional.online import online_normalize as online_normalize  # noqa: F401 - old path
from ..functional.partition import as_dtype
from ..functional.snapshot import snapshot
from ..functional.whiten import _first_order
from ..nap import Partition
from ._base import Coefficients, Kernel, Layout, Operation, Stats
from ._standard import Standardize

__all__ = [
    "sample_dims",
    "ExampleWeighted",
    "OnlineStandardize",
]


def sample_dims(nap: Partition) -> tuple[int, ...]:
    """The axes of the canonical view a partition reduces over, less the batch axis: each
    example's own statistics over the same area (``(S,)`` for BN's partition)."""
    return tuple(d for d in nap.dims if d != 0)


# ------------------------------------------------------------------ inference example weighting
@dataclass(frozen=True, repr=False)
class ExampleWeighted(Standardize):
    r"""Standardization whose evaluation mixes each example's own moments into the running ones.

    Training is plain standardization over the partition (BN over ``Batch()``). At evaluation,
    with the example's moments ``μ_x, σ²_x`` over its own part of the area (its positions) and
    the running ``μ_pop, σ²_pop``, the statistics are those of the mixture
    ``α·(example) + (1 − α)·(population)`` (:func:`mix_moments`):

    .. math::
        \mu = \alpha\mu_x + (1-\alpha)\mu_{pop}, \quad
        \sigma^2 = \alpha\sigma_x^2 + (1-\alpha)\sigma^2_{pop} + \alpha(1-\alpha)(\mu_x-\mu_{pop})^2

    i.e. ``σ² = α E[x²] + (1 − α)(σ²_pop + μ²_pop) − μ²``. ``α = 0`` is the running statistics
    exactly; ``α = 1/B`` gives the example the share it had in a training batch of ``B``.
    """

    alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_weight("alpha", self.alpha, "the weight of each example's own statistics at "
                      "evaluation; 0 is plain BN evaluation")

    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        pop = self.from_running(running, nap, num_features)
        if self.alpha == 0:
            return pop
        mean_x, var_x = S.moments(v, sample_dims(nap))
        mean, var = mix_moments(mean_x, var_x, pop["mean"], pop["var"], self.alpha)
        return {"mean": mean, "var": var}

    def native_kernel(self, layout: Layout) -> Kernel | None:
        """Training is BN: its kernel (per-channel ``γ, β`` or none)."""
        if layout.recovery == "weight":
            return None
        return "batch_norm" if Standardize.native_kernel(self, layout) == "batch_norm" else None

    def native_applies(self, use_batch: bool) -> bool:
        """The kernel computes training, and evaluation only at ``α = 0``."""
        return use_batch or self.alpha == 0

    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.alpha != 0:
            raise ConfigError(
                f"example weighting (alpha={self.alpha}) mixes in each input's own statistics at "
                f"evaluation; nothing fixed to fold (alpha=0 folds like BN)"
            )
        return super().fold(stats, nap=nap, eps=eps, weight=weight, bias=bias)


# ---------------------------------------------------------------------------- online normalization
class _OnlineControl(torch.autograd.Function):
    """``x̂ = (x − μ_before)·s`` per sample with the control-process backward
    (:func:`online_control_backward`), updating the control buffers ``u`` (``grad_mean``) and
    ``v`` (``grad_proj``) in place. The statistics are inputs without gradient: Online
    Normalization replaces differentiation through them by the control process."""

    @staticmethod
    def forward(ctx, v: Tensor, scale: Tensor, shift: Tensor, grad_mean: Tensor,  # type: ignore[override]
                grad_proj: Tensor, k: float) -> Tensor:
        y = torch.addcmul(shift, v, scale)
        ctx.save_for_backward(y, scale)
        ctx.buffers, ctx.k = (grad_mean, grad_proj), k
        return y

    @staticmethod
    @_first_order("Online Normalization's control-process backward",
                  "second derivatives through streaming statistics are not defined")
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        y, scale = ctx.saved_tensors
        grad_mean, grad_proj = ctx.buffers
        n, a, b, _ = y.shape
        shape = (a, b, 1)
        u, v = (t.reshape(shape).to(y.dtype) for t in (grad_mean, grad_proj))
        dx, u, v = online_control_backward(as_dtype(grad, y.dtype), y, scale, u, v, ctx.k)
        grad_mean.copy_(u.reshape(-1))
        grad_proj.copy_(v.reshape(-1))
        return dx, None, None, None, None, None


@dataclass(frozen=True, repr=False)
class OnlineStandardize(Operation):
    r"""Online Normalization (Chiley et al. 2019): standardize each sample with streaming
    estimates of the mean and variance that were updated by the samples before it, and
    backpropagate with the control process.

    ``fit`` returns each sample's own moments over its part of the area (the ``x_t``-statistics);
    :meth:`stream` runs the forward recursion (:func:`stream_moments`) and updates the buffers;
    :meth:`normalize` applies ``x̂`` with the control-process backward
    (:func:`online_control_backward`). ``backward_momentum`` is ``1 − α_b``; 0 turns the control
    off (the gradient with the statistics held constant, buffers ``grad_*`` untouched).

    Buffers: ``running_mean``, ``running_var`` (the streaming estimates, used in training and at
    evaluation) and ``running_grad_mean``, ``running_grad_proj`` (the control variables ``u``,
    ``v``, updated by the backward).
    """

    backward_momentum: float = 0.01
    #: training with the control process runs one Function with the recovery
    #: (:func:`~normkit.functional.fused_robust.online_affine`)
    fused: bool = field(default=True, repr=False)

    stat_names = ("mean", "var", "grad_mean", "grad_proj")
    needs_spread = False
    eval_moments = Standardize.eval_moments  # evaluation: BN's, with the streaming estimates

    def __post_init__(self) -> None:
        _check_weight("backward_momentum", self.backward_momentum,
                      "1 − alpha_bkw of the control process; 0 turns it off")

    def transform(self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
                  weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Evaluation (the streaming estimates, constants): BN's evaluation kernel (fused)."""
        if self.fused and not (stats["mean"].requires_grad or stats["var"].requires_grad):
            y = constant_standardize(v, stats["mean"], stats["var"], weight, bias, eps)
            if y is not None:
                return y
        return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.fused:  # the fused moments: one vector norm for Σ(x − μ)²
            mean, var = fused_moments(v, sample_dims(nap))
        else:
            mean, var = S.moments(v, sample_dims(nap))
        return {"mean": mean, "var": var}

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        return Fs.standardize_coefficients(stats["mean"], stats["var"], eps)

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        shape = nap.stat_view_shape(num_features)
        return {k: running[k].reshape(shape) for k in ("mean", "var")}

    @torch.no_grad()
    def stream(self, samples: Stats, running: Stats, nap: Partition, num_features: int,
               factors: Sequence[float | Tensor]) -> Stats:
        """Statistics each sample is normalized with (``(N, A, B, 1)``), updating ``running``'s
        ``mean`` and ``var`` in place to the estimates after the last sample."""
        shape = nap.stat_view_shape(num_features)[1:]
        dtype = torch.promote_types(samples["mean"].dtype, running["mean"].dtype)
        # the estimates before the batch, as they are before the in-place update below
        mean, var = (snapshot(running[k]).reshape(shape).to(dtype) for k in ("mean", "var"))
        stream = stream_moments_scan if self.fused else stream_moments
        m_before, v_before, mean, var = stream(
            as_dtype(samples["mean"], dtype), as_dtype(samples["var"], dtype), mean, var, factors)
        running["mean"].copy_(mean.reshape(-1))
        running["var"].copy_(var.reshape(-1))
        # each sample's own moments go along: the fused backward's ⟨x̂²⟩ (normalize)
        return {"mean": m_before, "var": v_before, "sample_mean": samples["mean"],
                "sample_var": samples["var"]}

    def normalize(self, v: Tensor, stats: Stats, running: Stats, eps: float,
                  weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``x̂·γ + β`` of the canonical view ``v`` (≥ float32) with the control-process
        backward; ``fused`` (and ``stats`` from :meth:`stream`): one Function, recovery
        included."""
        scale, shift = self.coefficients(stats, eps, 1)
        vf = as_dtype(v, scale.dtype)
        if self.backward_momentum == 0:  # no control: the gradient with constant statistics
            return Fs.affine_transform(torch.addcmul(shift, vf, scale), None, None, weight, bias)
        if self.fused and "sample_mean" in stats:
            return online_affine(vf, as_dtype(stats["mean"], scale.dtype), scale,
                                 sample_mean=as_dtype(stats["sample_mean"], scale.dtype),
                                 sample_var=as_dtype(stats["sample_var"], scale.dtype),
                                 weight=weight, bias=bias, grad_mean=running["grad_mean"],
                                 grad_proj=running["grad_proj"], k=self.backward_momentum)
        xhat = _OnlineControl.apply(vf, scale, shift, running["grad_mean"], running["grad_proj"],
                                    self.backward_momentum)
        return Fs.affine_transform(xhat, None, None, weight, bias)
