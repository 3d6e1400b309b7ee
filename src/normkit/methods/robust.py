"""BN for more robust estimation (book ch. 6): batch renormalization, ghost batches, momentum BN,
moving-average BN and cross-iteration BN.

All five standardize per channel over the batch like BN and evaluate like BN (running mean and
unbiased variance of the batch statistics, ``momentum`` as torch's); they change the statistics
used in training (:mod:`normkit.nop._robust`). Without running statistics
(``track_running_stats=False``) the stateful ones keep no memory and train as BN; with the
tracking switched off after construction they train as BN too (torch's rule: batch statistics)
and leave their state alone.
"""

from __future__ import annotations

from typing_extensions import Unpack

from .. import nap
from ..nop._robust import Ghost, MomentumStandardize, Renormalize, RobustStandardize
from ..nop._window import MovingAverageStandardize, WindowStandardize
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery

__all__ = ["BatchRenorm", "GhostBatchNorm", "MomentumBatchNorm", "MovingAverageBatchNorm",
           "CrossIterationBatchNorm"]


class _Stateful(Normalization):
    """BN-area normalization whose operation reads, in training, the running estimates, the step
    counter ``num_batches_tracked`` and its own buffers (a ``reads_state`` operation:
    :class:`~normkit.Normalization` registers its :meth:`~normkit.nop.Operation.state_buffers`
    beside the running estimates, resets and loads them with them, passes them in the call's
    :class:`~normkit.nop.State`, and has :meth:`~normkit.nop.Operation.update_state` record the
    steps that update the running estimates).

    A BN ``state_dict`` loads into these modules (strictly): missing extra buffers start empty.
    """

    def __init__(self, num_features: int, *, nop: RobustStandardize, affine: bool,
                 **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop, nrr=affine_recovery(affine), **kw)


@register("batch_renorm", family="robust", aliases=("batch_renormalization", "brn"),
          paper="Ioffe 2017, arXiv:1702.03275")
class BatchRenorm(_Stateful):
    r"""Batch renormalization: BN corrected toward the running statistics in training.

    .. math::
        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta,\quad
        r = \mathrm{sg}\,\mathrm{clip}_{[1/r_{max}, r_{max}]}\frac{\sigma_B}{\sigma},\quad
        d = \mathrm{sg}\,\mathrm{clip}_{[-d_{max}, d_{max}]}\frac{\mu_B - \mu}{\sigma}

    ``σ_B = √(σ_B² + ε)``, ``μ`` and ``σ = √(σ² + ε)`` the running mean and variance, ``sg`` a
    stop-gradient (the gradient flows through ``μ_B, σ_B`` only). Where ``r, d`` are not
    clipped, training normalizes with the running statistics, as evaluation does. The clipping
    limits follow the paper's schedule over the training step ``t`` (``num_batches_tracked``, so
    it is saved and restored with the state): ``r_max = 1, d_max = 0`` — BN — up to
    ``warmup_steps``, then relaxed linearly to ``r_max`` at ``r_max_steps`` and ``d_max`` at
    ``d_max_steps`` (the paper: 5000, 40k, 25k steps; ``r_max = 3``, ``d_max = 5``). All three
    steps ``0`` fix the limits from the first step. Evaluation is BN's.

    The running variance is torch BN's (unbiased ``σ_B²``, EMA with ``momentum``), where the
    paper averages ``σ_B``: the state stays torch-BN compatible and ``r_max = 1, d_max = 0``
    equals BN exactly (outputs, gradients, running statistics).

    Paper: Ioffe, *Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models*, NeurIPS 2017. arXiv:1702.03275.

    Args:
        num_features: channels ``C``.
        r_max: final limit of ``r`` (≥ 1). Default ``3.0``.
        d_max: final limit of ``|d|`` (≥ 0). Default ``5.0``.
        warmup_steps: steps of plain BN. Default ``5000``.
        r_max_steps: step at which ``r_max`` is reached (≥ ``warmup_steps``). Default ``40000``.
        d_max_steps: step at which ``d_max`` is reached (≥ ``warmup_steps``). Default ``25000``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch
        >>> from normkit.methods.robust import BatchRenorm
        >>> x = torch.randn(8, 4, 5, 5)
        >>> brn, bn = BatchRenorm(4, r_max=1.0, d_max=0.0), torch.nn.BatchNorm2d(4)
        >>> torch.allclose(brn(x), bn(x), atol=1e-5)
        True
        >>> fixed = BatchRenorm(4, r_max=1e9, d_max=1e9, warmup_steps=0, r_max_steps=0,
        ...                        d_max_steps=0, momentum=0.0)   # never clipped
        >>> mean, var = fixed.running_mean.view(1, 4, 1, 1), fixed.running_var.view(1, 4, 1, 1)
        >>> torch.allclose(fixed(x), (x - mean) / (var + fixed.eps).sqrt(), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        op = Renormalize(r_max=r_max, d_max=d_max, warmup_steps=warmup_steps,
                         r_max_steps=r_max_steps, d_max_steps=d_max_steps)
        super().__init__(num_features, nop=op, affine=affine, **kw)


@register("ghost_bn", family="robust", aliases=("ghost_batch_norm", "gbn"),
          paper="Hoffer, Hubara & Soudry 2017, arXiv:1705.08741")
class GhostBatchNorm(Normalization):
    r"""Ghost batch normalization: BN over virtual sub-batches of the batch.

    .. math::
        y_i = \gamma\frac{x_i - \mu_{k(i)}}{\sqrt{\sigma_{k(i)}^2 + \epsilon}} + \beta,\qquad
        \mu_k, \sigma_k^2 \text{ over ghost batch } k \text{ (and positions) per channel}

    The batch splits along ``N`` into consecutive ghost batches of ``virtual_batch_size``
    samples (``torch.split``); when that does not divide ``N`` the last one is smaller, and it
    must still hold more than one value per channel (else :class:`~normkit.ShapeError`). A
    batch of at most ``virtual_batch_size`` samples is one ghost batch: BN. Batch statistics are
    ghost statistics whenever used (also in evaluation without running statistics). Running
    statistics: one update per step with the batch mean and the pooled within-ghost variance
    ``Σ_k SS_k/(m − l)`` (unbiased; BN's ``m/(m−1)·σ_B²`` for one ghost), see
    :class:`~normkit.nop._robust.Ghost`. Evaluation is BN's.

    Paper: Hoffer, Hubara & Soudry, *Train longer, generalize better: closing the generalization
    gap in large batch training of neural networks*, NeurIPS 2017. arXiv:1705.08741.

    Args:
        num_features: channels ``C``.
        virtual_batch_size: samples per ghost batch (≥ 1). Default ``32``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch
        >>> from normkit.methods.robust import GhostBatchNorm
        >>> x = torch.randn(6, 4, 3, 3)
        >>> gbn = GhostBatchNorm(4, virtual_batch_size=2, affine=False)
        >>> ref = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True)
        ...                  for c in x.split(2)])
        >>> torch.allclose(gbn(x), ref, atol=1e-5)
        True
    """

    def __init__(self, num_features: int, *, virtual_batch_size: int = 32, affine: bool = True,
                 **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=Ghost(virtual_batch_size),
                         nrr=affine_recovery(affine), **kw)


@register("momentum_bn", family="robust", aliases=("momentum_batch_norm", "mbn"),
          paper="Yong, Huang, Meng, Hua & Zhang 2020, ECCV")
class MomentumBatchNorm(_Stateful):
    r"""Momentum batch normalization: train with momentum-blended batch statistics.

    .. math::
        \mu_M \leftarrow \lambda\mu_M + (1 - \lambda)\mu_B,\quad
        \sigma_M^2 \leftarrow \lambda\sigma_M^2 + (1 - \lambda)\sigma_B^2,\quad
        y = \gamma\frac{x - \mu_M}{\sqrt{\sigma_M^2 + \epsilon}} + \beta

    ``λ`` is tied to the batch size ``m`` (samples): with ``q = min(m/m₀, 1)`` and ``m₀`` the
    ``ideal_batch_size``, the paper's dynamic momentum
    ``λ(t) = ρ^{T/(T−1)·max(T−t, 0)} − ρ^T``, ``ρ = q^{1/T}``, grows from ``0`` (BN) at the
    first step to ``1 − q`` at step ``T = total_steps``; the paper counts ``t, T`` in epochs,
    here in training steps (``num_batches_tracked``). Without ``total_steps``, ``λ = 1 − q``
    throughout; ``lambda_`` fixes ``λ``. A batch of ``m₀`` or more samples, or ``lambda_=0``,
    is BN. The momentum statistics are buffers ``momentum_mean``/``momentum_var``; the first
    step after a reset uses the batch's. Evaluation is BN's: running statistics with torch's
    ``momentum`` (the paper adapts it to the batch size as ``1 − τ₀^{m/m₀}``, ``τ₀ = 0.9``:
    pass that as ``momentum``).

    Paper: Yong, Huang, Meng, Hua & Zhang, *Momentum Batch Normalization for Deep Learning with
    Small Batch Size*, ECCV 2020.

    Args:
        num_features: channels ``C``.
        ideal_batch_size: ``m₀`` (≥ 1). Default ``32``.
        total_steps: ``T`` (≥ 2) for the dynamic ``λ``, or ``None``. Default ``None``.
        lambda_: a fixed ``λ`` in ``[0, 1)`` instead of the rule. Default ``None``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch
        >>> from normkit.methods.robust import MomentumBatchNorm
        >>> mbn = MomentumBatchNorm(4, lambda_=0.5, affine=False)
        >>> a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
        >>> _ = mbn(a)
        >>> mean = 0.5 * a.mean((0, 2)) + 0.5 * b.mean((0, 2))
        >>> var = 0.5 * a.var((0, 2), correction=0) + 0.5 * b.var((0, 2), correction=0)
        >>> torch.allclose(mbn(b), (b - mean[:, None]) / (var[:, None] + mbn.eps).sqrt(), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        ideal_batch_size: int = 32,
        total_steps: int | None = None,
        lambda_: float | None = None,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        op = MomentumStandardize(lambda_=lambda_, ideal_batch_size=ideal_batch_size,
                                 total_steps=total_steps)
        super().__init__(num_features, nop=op, affine=affine, **kw)


@register("cross_iteration_bn", family="robust",
          aliases=("cross_iteration_batch_norm", "cibn", "cbn_iter"),
          paper="Yao, Cao, Zheng, Huang & Lin 2020, arXiv:2002.05712")
class CrossIterationBatchNorm(_Stateful):
    r"""Cross-iteration batch normalization: statistics over the last ``window`` iterations.

    .. math::
        \bar\mu_t = \frac{1}{n}\sum_{\tau=0}^{n-1}\mu_{t-\tau},\quad
        \bar\sigma_t^2 = \frac{1}{n}\sum_{\tau=0}^{n-1}\max(\nu_{t-\tau}, \mu_{t-\tau}^2)
        - \bar\mu_t^2,\quad
        y = \gamma\frac{x - \bar\mu_t}{\sqrt{\bar\sigma_t^2 + \epsilon}} + \beta

    with ``ν = E[x²]`` of each batch and ``n = min(window, steps recorded)``. **Approximation:**
    the paper compensates each earlier ``μ_{t−τ}, ν_{t−τ}`` for the change of the preceding
    layer's weights by a first-order Taylor expansion in those weights, which a layer-local
    module cannot see; here they enter uncompensated (the paper's estimator with the
    compensation term set to 0), so ``max(ν, μ²) = ν`` always holds. Earlier statistics are
    constants for the gradient, which flows through the current batch's. Up to
    ``warmup_steps`` (the paper's burn-in) it is BN while the history fills. The history of
    ``(μ_τ, σ_τ²)`` is the buffer ``history`` ``(window − 1, 2, C)`` with its validity
    ``history_weight``. Evaluation is BN's.

    Paper: Yao, Cao, Zheng, Huang & Lin, *Cross-Iteration Batch Normalization*, CVPR 2021.
    arXiv:2002.05712.

    Args:
        num_features: channels ``C``.
        window: iterations averaged, ``k`` (≥ 1; 1 is BN). Default ``8``.
        warmup_steps: steps of plain BN first. Default ``0``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch
        >>> from normkit.methods.robust import CrossIterationBatchNorm
        >>> cbn = CrossIterationBatchNorm(4, window=2, affine=False)
        >>> a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
        >>> _ = cbn(a)
        >>> both = torch.cat([a, b])          # two equal-size batches: the window is their union
        >>> ref = torch.nn.functional.batch_norm(both, None, None, training=True)[3:]
        >>> torch.allclose(cbn(b), ref, atol=1e-5)
        True
    """

    def __init__(self, num_features: int, *, window: int = 8, warmup_steps: int = 0,
                 affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        op = WindowStandardize(window=window, warmup_steps=warmup_steps)
        super().__init__(num_features, nop=op, affine=affine, **kw)


@register("mabn", family="robust", aliases=("moving_average_batch_norm",),
          paper="Yan, Wan, Zhang, Zhang, Wei & Sun 2020, arXiv:2001.06838")
class MovingAverageBatchNorm(_Stateful):
    r"""Moving-average batch normalization: moving-average statistics in the forward and in the
    backward.

    .. math::
        y = \gamma\frac{x - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}} + \beta,\qquad
        \frac{\partial L}{\partial x} = \frac{1}{\sqrt{\bar\sigma^2 + \epsilon}}
        \big(g - \bar g - \hat{x}\,\bar\psi\big),\quad g = \gamma\frac{\partial L}{\partial y}

    Forward: simple moving averages over the last ``window`` iterations of the batch mean and of
    ``E[x²]`` (``σ̄² = mean(E[x²]) − μ̄²``, computed without cancellation), as
    :class:`CrossIterationBatchNorm`. Backward: BN's gradient with its two batch statistics
    ``E[g]`` and ``E[g·x̂]`` replaced by their simple moving averages over the current and up to
    ``window − 1`` earlier backward passes (buffers ``grad_history``, ``grad_weight``), through
    one autograd Function (first-order only). One iteration (``window=1``, the warm-up, or right
    after a reset) is BN exactly; with more, the backward is the paper's approximation, not the
    derivative of the forward (it is affine in the incoming gradient), and the backward of a step
    reads the backward history as it is when it runs. Out of scope: the paper's centring-free
    variant (``x/√E[x²]`` with weight centralization of the preceding convolution), the
    weight-centralization itself, and its batch-renormalization clipping toward the running
    statistics (see :class:`BatchRenorm`). Evaluation is BN's.

    Paper: Yan, Wan, Zhang, Zhang, Wei & Sun, *Towards Stabilizing Batch Statistics in Backward
    Propagation of Batch Normalization*, ICLR 2020. arXiv:2001.06838.

    Args:
        num_features: channels ``C``.
        window: iterations averaged, forward and backward (≥ 1; 1 is BN). Default ``16``.
        warmup_steps: steps of plain BN first. Default ``0``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch
        >>> from normkit.methods.robust import CrossIterationBatchNorm, MovingAverageBatchNorm
        >>> mabn, cbn = MovingAverageBatchNorm(4, window=3), CrossIterationBatchNorm(4, window=3)
        >>> xs = [torch.randn(2, 4, 6) for _ in range(4)]
        >>> all(torch.allclose(mabn(x), cbn(x), atol=1e-5) for x in xs)   # the same forward
        True
    """

    def __init__(self, num_features: int, *, window: int = 16, warmup_steps: int = 0,
                 affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        op = MovingAverageStandardize(window=window, warmup_steps=warmup_steps)
        super().__init__(num_features, nop=op, affine=affine, **kw)

