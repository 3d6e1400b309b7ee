"""Multi-mode normalization (book ch. 5): mode, mixture and task normalization.

Each preset composes ``nap.Batch()`` with an operation of :mod:`normkit.nop._multimode` that
normalizes with a mixture of statistics instead of one per-channel ``(μ, σ²)``; see there for
the math shared by the three.
"""

from __future__ import annotations

from typing import Literal

from typing_extensions import Unpack

from .. import nap
from ..nop._multimode import MixtureStandardize, ModeStandardize, TaskStandardize
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery

__all__ = ["ModeNorm", "MixtureNorm", "TaskNorm"]


@register("mode_norm", family="multimode", aliases=("mode_normalization",),
          paper="Deecke, Murray & Bilen 2019, arXiv:1810.05466")
class ModeNorm(Normalization):
    r"""Mode normalization: ``K`` modes, each sample softly assigned by a learned gate.

    .. math::
        g(x_n) = \mathrm{softmax}\big(W\,\bar{x}_n + b\big) \in \Delta^{K},\qquad
        y_n = \gamma \odot \sum_{k=1}^{K} g_k(x_n)\,
              \frac{x_n - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} + \beta

    with ``x̄_n`` sample ``n``'s features averaged over its positions, and per mode ``k`` and
    channel the gate-weighted batch moments
    ``μ_k = Σ_n g_k(x_n)·mean(x_n)/Σ_n g_k(x_n)``,
    ``σ²_k = Σ_n g_k(x_n)·mean((x_n − μ_k)²)/Σ_n g_k(x_n)`` (means over positions).
    Running estimates per mode (``running_mean``, ``running_var`` of shape ``(K, C)``, the
    variance unbiased with BN's factor ``m/(m−1)``, ``m = N·S``) serve evaluation, where the gate
    is still computed from each input. ``K = 1`` is BN (outputs, gradients, running statistics).

    The gate ``W`` (``gate_weight``, ``(K, C)``) starts at ``U(−1/√C, 1/√C)`` drawn with a fixed
    seed, so construction and ``reset_parameters()`` agree (a zero gate is a symmetric point
    where all modes stay identical), and ``b`` (``gate_bias``) at 0. The gate sees raw
    features: inputs of large magnitude saturate it to hard assignments.

    Paper: Deecke, Murray & Bilen, *Mode Normalization*, ICLR 2019. arXiv:1810.05466.

    Args:
        num_features: channels ``C``.
        num_modes: number of modes ``K`` (≥ 1). Default 2.
        affine: per-channel ``γ, β`` shared by the modes. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps=1e-5``, ``momentum=0.1``,
            ``track_running_stats=True``, ``channel_axis``, ``device``, ``dtype``).

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``); more than one value per
        channel in training.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(8, 4, 5, 5)
        >>> mn = nk.create("mode_norm", 4, num_modes=3)
        >>> mn(x).shape, tuple(mn.running_mean.shape)
        (torch.Size([8, 4, 5, 5]), (3, 4))
        >>> one, bn = nk.create("mode_norm", 4, num_modes=1), nk.BatchNorm(4)
        >>> torch.allclose(one(x), bn(x), atol=1e-5)
        True
    """

    def __init__(
        self, num_features: int, *, num_modes: int = 2, affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=ModeStandardize(num_modes=num_modes),
                         nrr=affine_recovery(affine), **kw)

    @property
    def num_modes(self) -> int:
        """Number of modes ``K``."""
        return self.nop.num_modes  # type: ignore[attr-defined, no-any-return]


@register("mixture_norm", family="multimode", aliases=("mixture_normalization",),
          paper="Kalayeh & Shah 2019, arXiv:1806.02892")
class MixtureNorm(Normalization):
    r"""Mixture normalization: per channel, a Gaussian mixture fitted to the batch by EM.

    .. math::
        y = \gamma \odot \sum_{k=1}^{K} p(k \mid x)\,
            \frac{x - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} + \beta,\qquad
        p(k \mid x) \propto \pi_k\,\mathcal{N}(x;\ \mu_k,\ \sigma_k^2 + \epsilon)

    In training, each channel's ``N·S`` values are fitted with a ``K``-component mixture by
    ``iterations`` EM steps (E: posteriors; M: posterior-weighted means, biased variances and
    weights ``π_k``), and every value is normalized with the posteriors of the fitted mixture.

    EM starts from the running mixture (``init="running"``, a warm start: component
    ``k`` keeps its identity from batch to batch, which its running averages rely on); a channel
    whose running components all coincide (before the first batch, after
    ``reset_running_stats()``, or with ``track_running_stats=False``) starts from the batch, as
    ``init="batch"`` always does: component ``k`` at ``μ_B + z_k·√(σ²_B + ε)``, ``z_k`` the
    ``(k + ½)/K`` quantile of the standard normal, variance ``σ²_B·(1 − mean z²)``, weights
    ``1/K``. Gradients flow through every EM step: the output is an exact
    smooth function of the batch, as BN differentiates through its moments; treating the EM
    statistics as constants would give the gradient of another function. The running start is
    a constant.

    Running estimates, all ``(K, C)``: ``running_mean``, ``running_var`` (unbiased with BN's
    factor ``m/(m−1)``, ``m = N·S``, for every component) and ``running_log_prior`` (log mixing
    weights, initially 0 = equal weights, averaged in the log domain and renormalized by a
    softmax). Evaluation uses the posteriors of each value under the running mixture. ``K = 1``
    is BN. Following the book's per-channel formulation, each channel has its own mixture
    (the paper also discusses mixtures over feature vectors).

    Paper: Kalayeh & Shah, *Training Faster by Separating Modes of Variation in Batch-normalized
    Models*, TPAMI 2019. arXiv:1806.02892.

    Args:
        num_features: channels ``C``.
        num_components: mixture components ``K`` (≥ 1). Default 2.
        iterations: EM steps per training forward, in ``[1, 100]``. Default 3.
        init: ``"running"`` (default) or ``"batch"`` (stateless: the batch statistics then
            depend on the batch alone).
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same; more than one value per channel in training. Training saves the
        centred input and ``(K, C)`` statistics per EM step for the backward (a hand-derived
        backward through the EM steps, :mod:`normkit.functional.fused_mixture`);
        ``native=False`` unrolls EM in autograd and saves about ``(iterations + 1)·K`` times the
        input.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.cat([torch.randn(8, 2, 16) - 4, torch.randn(8, 2, 16) + 4])  # two modes
        >>> mix = nk.create("mixture_norm", 2, num_components=2, iterations=5)
        >>> y = mix(x)
        >>> bool(y[:8].mean().abs() < 0.1 and y[8:].mean().abs() < 0.1)  # each mode centred
        True
        >>> one, bn = nk.create("mixture_norm", 2, num_components=1), nk.BatchNorm(2)
        >>> torch.allclose(one(x), bn(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_components: int = 2,
        iterations: int = 3,
        init: Literal["running", "batch"] = "running",
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        op = MixtureStandardize(num_components=num_components, iterations=iterations, init=init)
        super().__init__(num_features, nap=nap.Batch(), nop=op, nrr=affine_recovery(affine), **kw)


@register("task_norm", family="multimode", aliases=("task_normalization",),
          paper="Bronskill, Gordon, Requeima, Nowozin & Turner 2020, arXiv:2003.03284")
class TaskNorm(Normalization):
    r"""TaskNorm: batch (context-set) moments blended with each example's own moments.

    .. math::
        \alpha = \mathrm{sigmoid}(a\,m + b),\qquad
        \mu = \alpha\,\mu_{BN} + (1 - \alpha)\,\mu_{IN},

        \sigma^2 = \alpha\big(\sigma^2_{BN} + (\mu_{BN} - \mu)^2\big)
                 + (1 - \alpha)\big(\sigma^2_{IN} + (\mu_{IN} - \mu)^2\big),\qquad
        y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    ``μ_BN, σ²_BN``: the batch's per-channel moments; ``m``: the batch size ``N`` (the context
    set's size); ``μ_IN, σ²_IN``: each example's moments per channel over its positions
    (``moments="instance"``, TaskNorm-I) or over all its channels and positions
    (``moments="layer"``, TaskNorm-L). ``a`` (``alpha_scale``) and ``b`` (``alpha_offset``) are
    learned scalars, initially 0 (``α = ½``): with a larger context set, ``a > 0`` moves the
    blend towards BN. ``α → 1`` is BN; ``α → 0`` is IN (``"layer"``: LN over ``(C, *)``).

    Meta-learning: statistics come from the context set. For meta-testing (and any
    context/target split without gradients through the context moments), build the layer with
    ``momentum=1.0``, run it in training mode on the context set (the running buffers then hold
    exactly its moments, the variance unbiased, and ``running_size`` its size), then in eval
    mode on the targets, which are normalized with the context moments blended with their own.
    Meta-training with target losses differentiated through the context moments needs both sets
    in one forward, which this module does not provide. In a plain network, evaluation uses the
    running BN estimates blended as in training with ``m = running_size``, the running average
    of the training batch sizes (an EMA from 0 like every running mean: after ``t`` steps of a
    constant size ``N`` it is ``N·(1 − (1 − momentum)^t)``; ``momentum=None`` averages exactly).

    Paper: Bronskill, Gordon, Requeima, Nowozin & Turner, *TaskNorm: Rethinking Batch
    Normalization for Meta-Learning*, ICML 2020. arXiv:2003.03284.

    Args:
        num_features: channels ``C``.
        moments: per-example moments ``"instance"`` (default) or ``"layer"``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``); more than one value
        per channel in training. Spatial size 1 is allowed (instance variance 0).

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
        >>> tn = nk.create("task_norm", 4, dtype=torch.float64)
        >>> with torch.no_grad():
        ...     _ = tn.alpha_offset.fill_(50.0)  # α = sigmoid(50) = 1 in float64: BN
        >>> torch.allclose(tn(x), nk.BatchNorm(4, dtype=torch.float64)(x))
        True
        >>> with torch.no_grad():
        ...     _ = tn.alpha_offset.fill_(-50.0)  # α = 0: IN
        >>> torch.allclose(tn(x), nk.InstanceNorm(4, dtype=torch.float64)(x))
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        moments: Literal["instance", "layer"] = "instance",
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=TaskStandardize(moments=moments),
                         nrr=affine_recovery(affine), **kw)
