"""BN with more robust estimates of its statistics (book ch. 6): example weighting at evaluation
(``eval_norm``), Kalman normalization across layers (``kalman_norm``) and Online Normalization
for batch size 1 (``online_norm``). The math is in :mod:`normkit.nop._online`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from .. import nap
from .._pipeline import Call
from ..errors import ConfigError, ShapeError
from ..functional import statistics as S
from ..functional.online import check_weight as _check_weight
from ..functional.online import kalman_estimate
from ..nop import Stats
from ..nop._online import ExampleWeighted, OnlineStandardize
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery

__all__ = ["EvalNorm", "KalmanNorm", "OnlineNorm"]

_PAPER_SD = "Summers & Dinneen 2020, arXiv:1906.03548; Singh & Shrivastava 2019 (EvalNorm, ICCV)"


@register("eval_norm", family="robust",
          aliases=("evalnorm", "example_weighting", "inference_example_weighting"), paper=_PAPER_SD)
class EvalNorm(Normalization):
    r"""BN whose evaluation mixes each example's own statistics into the population statistics.

    Training is BN. At evaluation each example ``x`` is standardized per channel with the
    moments of the mixture ``α·(x's own values) + (1 − α)·(population)``:

    .. math::
        \mu = \alpha\mu_x + (1-\alpha)\mu_{pop}, \qquad
        \sigma^2 = \alpha\sigma_x^2 + (1-\alpha)\sigma_{pop}^2 + \alpha(1-\alpha)(\mu_x-\mu_{pop})^2

    with ``μ_x, σ²_x`` the example's mean and (biased) variance over its positions and
    ``μ_pop, σ²_pop`` the running estimates; equivalently ``σ² = αE[x²] + (1−α)(σ²_pop + μ²_pop)
    − μ²``. This is Summers & Dinneen's *inference example weighting*: in training an example
    makes up ``1/B`` of its batch's statistics, at evaluation none of the population's, and
    ``α`` (``≈ 1/B``, tuned on validation data; settable after training, ``m.alpha = 0.2``)
    gives it back its share. ``α = 0`` is BN's evaluation exactly (and folds; otherwise
    :meth:`folded` raises). Inputs without positions have ``σ²_x = 0``: the output is
    ``(1−α)(x − μ_pop)/√((1−α)σ²_pop + ε)``.

    Not covered: EvalNorm's *learned* estimator (Singh & Shrivastava 2019 predict the evaluation
    statistics with a small trained model); this preset implements the fixed-``α`` rule only.

    Paper: Summers & Dinneen, *Four Things Everyone Should Know to Improve Batch
    Normalization*, ICLR 2020, arXiv:1906.03548 (§ inference example weighting); Singh &
    Shrivastava, *EvalNorm: Estimating Batch Normalization Statistics for Evaluation*, ICCV 2019.

    Args:
        num_features: channels ``C``.
        alpha: weight of the example's own statistics at evaluation, in ``[0, 1]``.
            Default ``0.1``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (BN's defaults).

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch, normkit as nk
        >>> ew, bn = nk.create("eval_norm", 4, alpha=0.0), nk.BatchNorm(4)
        >>> x = torch.randn(8, 4, 5)
        >>> torch.allclose(ew(x), bn(x)) and torch.allclose(ew.eval()(x), bn.eval()(x))
        True
        >>> ew.alpha = 1.0  # each example by its own statistics: instance normalization
        >>> torch.allclose(ew(x), torch.nn.functional.instance_norm(x), atol=1e-5)
        True
    """

    def __init__(self, num_features: int, *, alpha: float = 0.1, affine: bool = True,
                 **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=ExampleWeighted(alpha=alpha),
                         nrr=affine_recovery(affine), **kw)

    @property
    def alpha(self) -> float:
        """Weight of each example's own statistics at evaluation (settable)."""
        return self.nop.alpha  # type: ignore[attr-defined, no-any-return]

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.nop = ExampleWeighted(alpha=value)


@register("kalman_norm", family="robust", aliases=("kalmannorm", "kn"),
          paper="Wang, Peng, Luo, Wang & Lin 2018, arXiv:1802.03133")
class KalmanNorm(Normalization):
    r"""Kalman normalization: a layer's statistics estimated from its batch and the previous
    layer's estimate.

    Called as ``kn(x, prev_stats=(μ', σ'²))`` with the previous normalization layer's estimate
    (``C'`` channels, e.g. returned by ``prev(h, return_stats=True)``), training standardizes
    with the Kalman update of a prediction through a learned transition ``A`` (``C × C'``) by
    this batch's moments, weighted by a learned per-channel gain ``p ∈ (0, 1)``
    (:func:`~normkit.functional.online.kalman_estimate`):

    .. math::
        \mu_{pred} = A\mu',\quad \sigma^2_{pred} = (A\circ A)\sigma'^2,\quad
        \hat\mu = p\mu_B + (1-p)\mu_{pred},\quad
        \hat\sigma^2 = p\sigma_B^2 + (1-p)\sigma^2_{pred} + p(1-p)(\mu_B-\mu_{pred})^2

    then ``y = γ (x − μ̂)/√(σ̂² + ε) + β``. Gradients flow into ``A``, ``p`` and the previous
    layer's statistics. Running estimates track ``(μ̂, σ̂²)`` with the batch variance unbiased;
    evaluation uses them and ignores ``prev_stats`` (as BN).

    What is implemented: the paper's predict/update structure with a diagonal variance
    propagation (channels treated as independent: ``diag(A Σ' Aᵀ)`` for diagonal ``Σ'``), no
    process-noise term, and the gain learned per channel (``p = sigmoid(gain_logit)``) rather
    than computed from error covariances. A layer-local module cannot see the previous layer, so
    the model passes its estimate explicitly; without ``prev_stats`` (or without
    ``prev_features``) the layer is BN exactly and drops in as ``norm_layer``.

    Paper: Wang, Peng, Luo, Wang & Lin, *Kalman Normalization: Normalizing Internal
    Representations Across Network Layers*, NeurIPS 2018; arXiv:1802.03133 (as *Batch Kalman
    Normalization: Towards Training Deep Neural Networks with Micro-Batches*).

    Args:
        num_features: channels ``C``.
        prev_features: channels ``C'`` of the previous layer's estimate; creates the parameters
            ``transition`` (``C × C'``, initialized to the rectangular identity) and
            ``gain_logit`` (``C``). ``None`` (default): no cross-layer term, plain BN.
        gain: initial gain ``p`` (share of this batch's moments), in ``(0, 1)``. Default 0.5.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (BN's defaults).

    Shape:
        ``x``: ``(N, C, *)`` → same. ``prev_stats``: two ``(C',)`` tensors. With
        ``return_stats=True`` the forward returns ``(y, (μ̂, σ̂²))``, each ``(C,)`` (the running
        estimates at evaluation).

    Example:
        >>> import torch, normkit as nk
        >>> kn1, kn2 = nk.create("kalman_norm", 4), nk.create("kalman_norm", 6, prev_features=4)
        >>> conv = torch.nn.Conv2d(4, 6, 1)
        >>> x = torch.randn(2, 4, 5, 5)
        >>> h, stats = kn1(x, return_stats=True)
        >>> y = kn2(conv(h), prev_stats=stats)
        >>> torch.allclose(kn1(x), nk.BatchNorm(4)(x), atol=1e-6)  # no previous term: BN
        True
    """

    #: the hooks are BN's in evaluation with the running estimates (one BN kernel call there)
    _plain_eval_hooks = True

    def __init__(self, num_features: int, *, prev_features: int | None = None, gain: float = 0.5,
                 affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        if prev_features is not None and (not isinstance(prev_features, int)
                                          or isinstance(prev_features, bool) or prev_features <= 0):
            raise ConfigError(
                f"prev_features must be a positive int (channels of the previous layer's "
                f"estimate) or None, got {prev_features!r}")
        self._gain_init = _check_weight("gain", gain, "the initial share of the batch's own "
                                        "moments", open_low=True, open_high=True)
        super().__init__(num_features, nap=nap.Batch(), nrr=affine_recovery(affine), **kw)
        self.prev_features = prev_features
        if prev_features is not None:
            factory: dict[str, Any] = {"device": kw.get("device"), "dtype": kw.get("dtype")}
            self.transition = nn.Parameter(torch.empty(num_features, prev_features, **factory))
            self.gain_logit = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    @property
    def gain(self) -> Tensor | None:
        """The per-channel gain ``p = sigmoid(gain_logit)`` (``None`` without ``prev_features``)."""
        logit = getattr(self, "gain_logit", None)
        return None if logit is None else torch.sigmoid(logit)

    def reset_parameters(self) -> None:
        """Reset running statistics, ``γ, β``, and ``A`` (rectangular identity), ``p``."""
        super().reset_parameters()
        if getattr(self, "transition", None) is not None:
            with torch.no_grad():
                self.transition.copy_(torch.eye(*self.transition.shape))
                self.gain_logit.fill_(math.log(self._gain_init / (1 - self._gain_init)))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", prev_features={self.prev_features}" if self.prev_features else "")

    def _prediction_inputs(self, prev_stats: Any) -> tuple[Tensor, Tensor]:
        if self.prev_features is None:
            raise ConfigError(
                f"{type(self).__name__}({self.num_features}) was built without prev_features; "
                f"pass prev_features=C' at construction to use the previous layer's statistics")
        if not (isinstance(prev_stats, (tuple, list)) and len(prev_stats) == 2
                and all(isinstance(t, Tensor) for t in prev_stats)):
            raise ConfigError(f"prev_stats must be a (mean, var) pair of tensors, got {prev_stats!r}")
        shape = (self.prev_features,)
        for what, t in zip(("mean", "var"), prev_stats, strict=True):
            if tuple(t.shape) != shape:
                raise ShapeError(f"prev_stats {what} must have shape {shape}, got {tuple(t.shape)}")
        return prev_stats[0], prev_stats[1]

    def forward(self, x: Tensor, condition: Any = None, *, prev_stats: Any = None,
                return_stats: bool = False) -> Any:
        """Normalize ``x``; ``prev_stats`` is the previous layer's ``(mean, var)`` estimate and
        ``return_stats`` also returns this layer's (see the class docstring)."""
        if prev_stats is None and not return_stats:
            return super().forward(x, condition)
        extra: dict[str, Any] = {}
        if prev_stats is not None and (self.training or self._running() is None):
            extra["prev"] = self._prediction_inputs(prev_stats)  # before any state changes
        y = self._run(x, condition, generic=True, extra=extra)
        if not return_stats:
            return y
        if "estimate" in extra:
            return y, extra["estimate"]
        running = self._running()  # an empty batch: nothing estimated
        if running is not None:
            return y, (running["mean"], running["var"])
        nan = torch.full((self.num_features,), math.nan, device=x.device)
        return y, (nan, nan)

    def _statistics(self, call: Call) -> Stats:
        """Training: the Kalman update of the prediction from ``call.extra["prev"]`` by the
        batch's moments (the running estimates track it, with the batch variance unbiased);
        evaluation: the running estimates (as BN)."""
        if not call.use_batch:  # the running estimates themselves are this layer's estimate
            assert call.running is not None
            call.extra["estimate"] = (call.running["mean"], call.running["var"])
            return super()._statistics(call)
        batch_mean, batch_var = call.nap.moments(call.v, call.spatial)
        mean, var = batch_mean.reshape(-1), batch_var.reshape(-1)
        prev = call.extra.get("prev")
        if prev is not None:
            prev = (prev[0].to(mean.dtype), prev[1].to(mean.dtype))
            mean, var = kalman_estimate(mean, var, *prev, self.transition.to(mean.dtype),
                                        torch.sigmoid(self.gain_logit.to(mean.dtype)))
        if call.update and call.running is not None:
            with torch.no_grad():
                r_mean = batch_mean.reshape(-1)
                r_var = S.unbiased_variance(batch_var.reshape(-1), call.m)
                if prev is not None:
                    r_mean, r_var = kalman_estimate(
                        r_mean, r_var, *prev, self.transition.to(r_mean.dtype),
                        torch.sigmoid(self.gain_logit.to(r_mean.dtype)))
                S.ema_update(call.running["mean"], r_mean, self._factor())
                S.ema_update(call.running["var"], r_var, self._factor())
        call.extra["estimate"] = (mean, var)
        shape = self.nap.stat_view_shape(self.num_features)
        return {"mean": mean.reshape(shape), "var": var.reshape(shape)}


@register("online_norm", family="robust", aliases=("onlinenorm", "online_normalization"),
          paper="Chiley et al. 2019, arXiv:1905.05894")
class OnlineNorm(Normalization):
    r"""Online Normalization: batch-free training with streaming statistics and a controlled
    backward.

    Training processes the samples of a batch one after another (batch size 1 is the intended
    use; a batch of ``N`` is exactly ``N`` calls on one sample). Sample ``t`` is standardized per
    channel with the estimates left by the samples before it, which are then updated with its own
    moments ``μ(x_t), σ²(x_t)`` over its positions (:func:`~normkit.functional.online.stream_moments`):

    .. math::
        y_t = \gamma\frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1}+\epsilon}} + \beta, \qquad
        \mu_t = \alpha_f\mu_{t-1} + (1-\alpha_f)\mu(x_t),

        \sigma^2_t = \alpha_f\sigma^2_{t-1} + (1-\alpha_f)\sigma^2(x_t)
                     + \alpha_f(1-\alpha_f)(\mu(x_t) - \mu_{t-1})^2

    The backward replaces differentiation through the statistics by the paper's control process
    (:func:`~normkit.functional.online.online_control_backward`): running estimates of the gradient's
    projections on ``x̂`` and on the constant (buffers ``running_grad_proj`` ``v`` and
    ``running_grad_mean`` ``u``) are fed back with weight ``1 − α_b``, so that on average the
    input gradient has zero mean and is orthogonal to ``x̂`` (BN's projection, in time instead of
    over the batch). Evaluation standardizes with the streaming estimates (and folds).

    ``momentum = 1 − α_f`` is the weight of each new *sample* (``None``: the cumulative average
    over every sample since the last reset, i.e. the exact pooled mean and biased variance), and
    ``num_batches_tracked`` counts samples. The paper's optional error-checking layer
    (activation clamping or layer scaling after the affine) is not part of this module; compose
    it (``torch.nn.Hardtanh``, ``nk.RMSNorm(C, over="all", affine=False)``). A NaN sample
    poisons the streaming estimates, and so every later sample (``reset_running_stats`` recovers).
    Tracking cannot be turned off at construction (the estimates are the method); with
    ``track_running_stats`` set to ``False`` afterwards, training uses the current estimates
    without updating them, with the plain gradient.

    Paper: Chiley, Sharapov, Kosson, Koster, Reece, Samaniego de la Fuente, Subbiah & James,
    *Online Normalization for Training Neural Networks*, NeurIPS 2019. arXiv:1905.05894.

    Args:
        num_features: channels ``C``.
        backward_momentum: ``1 − α_b`` of the control process, in ``[0, 1]``; ``0`` turns the
            control off (gradient with the statistics held constant). Default ``0.01``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` with ``momentum`` defaulting to
            ``0.001`` (``α_f = 0.999``).

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``); any ``N ≥ 1``,
        positions optional (a fully connected layer's sample has ``σ²(x_t) = 0``).

    Example:
        >>> import torch, normkit as nk
        >>> on = nk.create("online_norm", 3, momentum=0.1, affine=False)
        >>> x = torch.randn(4, 3, 8)
        >>> y = on(x)  # sample by sample: the same as four calls on one sample each
        >>> ref = nk.create("online_norm", 3, momentum=0.1, affine=False)
        >>> torch.allclose(y, torch.cat([ref(x[i:i + 1]) for i in range(4)]))
        True
        >>> torch.allclose(on.running_mean, ref.running_mean), int(on.num_batches_tracked)
        (True, 4)
    """

    #: the hooks are BN's in evaluation with the streaming estimates (one BN kernel call there)
    _plain_eval_hooks = True

    def __init__(self, num_features: int, *, backward_momentum: float = 0.01, affine: bool = True,
                 **kw: Unpack[NormKwargs]) -> None:
        if kw.get("track_running_stats", True) is False:
            raise ConfigError(
                "online_norm normalizes with its streaming estimates, which are its state: "
                "track_running_stats=False is not available (got False); use momentum=0 to "
                "freeze the estimates")
        kw.setdefault("momentum", 0.001)
        kw["track_running_stats"] = True
        super().__init__(num_features, nap=nap.Batch(),
                         nop=OnlineStandardize(backward_momentum=backward_momentum),
                         nrr=affine_recovery(affine), **kw)

    @property
    def backward_momentum(self) -> float:
        """``1 − α_b`` of the control process."""
        return self.nop.backward_momentum  # type: ignore[attr-defined, no-any-return]

    def _sample_factors(self, n: int) -> list[float] | list[Tensor]:
        """The weight of each of the call's ``n`` samples (``num_batches_tracked`` already counts
        them)."""
        if self.momentum is None:
            if torch.compiler.is_compiling():  # int() of a buffer would break the graph
                seen = self.num_batches_tracked.double() - n
                return [(seen + (t + 1)).reciprocal() for t in range(n)]
            seen_n = int(self.num_batches_tracked) - n
            return [1.0 / (seen_n + t + 1) for t in range(n)]
        return [float(self.momentum)] * n

    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        """Normalize ``x`` sample by sample in training (see the class docstring)."""
        if not self.training or x.numel() == 0 or self._running() is None:
            return super().forward(x, condition)
        if not self.track_running_stats:  # turned off after construction: frozen estimates
            return self._run(x, condition, use_batch=False, update=False, generic=True)
        steps = x.shape[0] if x.dim() > 1 else 1  # a (C,) vector is one sample
        return self._run(x, condition, use_batch=True, update=True, steps=steps, generic=True)

    def _statistics(self, call: Call) -> Stats:
        """Streaming: each sample's moments update the estimates left by the samples before it
        (the running buffers, in place); the sample is standardized with the earlier ones."""
        if not call.update or call.running is None:
            return super()._statistics(call)
        with torch.no_grad():
            samples = self.nop.fit(call.v, self.nap, call.spatial)
        factors = self._sample_factors(call.v.shape[0])
        return self.nop.stream(samples, call.running, self.nap, self.num_features, factors)

    def _transform(self, call: Call, stats: Stats, weight: Tensor | None,
                   bias: Tensor | None) -> Tensor:
        """Streaming: the control process's normalization (its backward), then ``γ, β``."""
        if not call.update or call.running is None:
            return super()._transform(call, stats, weight, bias)
        return self.nop.normalize(call.v, stats, call.running, call.eps,  # type: ignore[attr-defined, no-any-return]
                                  weight, bias)
