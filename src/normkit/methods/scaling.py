"""Standardization variants of the normalization operation (book ch. 4.2): centering only,
scaling only (RMS, L2), and non-quadratic scales (L1, range)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from typing_extensions import Unpack

from .. import nap, nop, nrr
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery, layer_partition
from ._torch_form import TrailingDims, torch_call_form

__all__ = ["RMSNorm", "ScaleNorm", "MeanOnlyBatchNorm", "L1BatchNorm", "RangeBatchNorm"]


@register("rms_norm", family="scaling", aliases=("rmsnorm", "rms"),
          paper="Zhang & Sennrich 2019, arXiv:1910.07467")
class RMSNorm(TrailingDims, Normalization):
    r"""Root-mean-square normalization: scale each sample by its quadratic mean, no centering.

    .. math::
        y = \gamma \frac{x}{\sqrt{\tfrac{1}{m}\sum x^2 + \epsilon}}

    over ``over`` (as :class:`LayerNorm`: ``"all"`` for ``channel_axis=1``, ``"channels"`` for
    ``channel_axis=-1`` by default). ``RMSNorm(D, channel_axis=-1)`` equals
    ``torch.nn.RMSNorm(D)``, including its default ``eps=None`` (the machine epsilon of the
    computation type: float32's for float16/bfloat16/float32 inputs, float64's for float64);
    learns ``γ`` only.

    **torch's call form.** As :class:`LayerNorm`: a list/tuple first argument, or torch's
    ``elementwise_affine=``, means torch's ``RMSNorm(normalized_shape, eps=None,
    elementwise_affine=True)``: the quadratic mean over the last ``len(normalized_shape)``
    dimensions, which must equal ``normalized_shape``, with an elementwise ``γ`` of that shape
    (``channel_axis=-1``, ``over="channels"``; ``num_features = prod(normalized_shape)``). The
    module then equals ``torch.nn.RMSNorm`` with the same arguments and state_dicts load both
    ways. Over several dimensions it runs the composition on the flattened dimensions.

    Paper: Zhang & Sennrich, *Root Mean Square Layer Normalization*, NeurIPS 2019.
    arXiv:1910.07467.

    Args:
        num_features: channels ``C``, or torch's ``normalized_shape`` (an int with
            ``elementwise_affine=``, or a list/tuple of ints).
        over: ``"all"``, ``"channels"`` or ``None``.
        affine: learn ``γ`` (init 1). Default ``True``.
        elementwise_affine: torch's name for ``affine`` (selects torch's call form); giving both
            with different values raises.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps`` defaults to ``None``).

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``); torch's form:
        ``(*, *normalized_shape)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(3, 5, 16)
        >>> torch.allclose(nk.RMSNorm(16, channel_axis=-1)(x), torch.nn.RMSNorm(16)(x), atol=1e-6)
        True
        >>> ours, ref = nk.RMSNorm(16, channel_axis=-1, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
        >>> torch.allclose(ours(x), ref(x), atol=1e-6)
        True
        >>> ours, ref = nk.RMSNorm([5, 16]), torch.nn.RMSNorm([5, 16])
        >>> _ = ours.load_state_dict(ref.state_dict())     # γ of shape (5, 16)
        >>> torch.allclose(ours(x), ref(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        over: Literal["all", "channels"] | None = None,
        affine: bool | None = None,
        elementwise_affine: bool | None = None,
        **kw: Unpack[NormKwargs],
    ) -> None:
        kw.setdefault("eps", None)
        num_features, shape, on = torch_call_form("RMSNorm", num_features, affine,
                                                  elementwise_affine, over, kw)
        partition = layer_partition(over, kw.get("channel_axis", 1))
        recovery = affine_recovery(on, bias=False,
                                   shape=shape if shape and len(shape) > 1 else None)
        super().__init__(num_features, nap=partition, nop=nop.Scale("rms"), nrr=recovery, **kw)
        self._set_normalized_shape(shape)


@register("scale_norm", family="scaling", aliases=("scalenorm",),
          paper="Nguyen & Salazar 2019, arXiv:1910.05895")
class ScaleNorm(Normalization):
    r"""Scale normalization: project each sample onto a sphere of learned radius ``g``.

    .. math::
        y = g \frac{x}{\sqrt{\|x\|_2^2 + \epsilon}}, \qquad g \text{ one learned scalar}

    ``g`` starts at ``√num_features`` (the paper's ``√d``). Area as :class:`LayerNorm` (``over``).

    Paper: Nguyen & Salazar, *Transformers without Tears*, IWSLT 2019. arXiv:1910.05895.

    Args:
        num_features: channels ``C``.
        over: ``"all"``, ``"channels"`` or ``None``.
        init: initial ``g`` (``None``: ``√num_features``).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(3, 16)
        >>> y = nk.ScaleNorm(16, eps=1e-12)(x)
        >>> torch.allclose(y.norm(dim=1), torch.full((3,), 4.0), atol=1e-4)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        over: Literal["all", "channels"] | None = None,
        init: float | None = None,
        **kw: Unpack[NormKwargs],
    ) -> None:
        partition = layer_partition(over, kw.get("channel_axis", 1))
        super().__init__(num_features, nap=partition, nop=nop.Scale("l2"),
                         nrr=nrr.Scalar(init), **kw)


@register("mean_only_bn", family="scaling", aliases=("center_norm", "mean_only_batch_norm"),
          paper="Salimans & Kingma 2016, arXiv:1602.07868")
class MeanOnlyBatchNorm(Normalization):
    r"""Mean-only batch normalization: center each channel over the batch, no scaling.

    .. math::
        y = x - \mu_B + \beta

    Meant to pair with weight normalization, which provides the scale. Tracks ``running_mean``.

    Paper: Salimans & Kingma, *Weight Normalization*, NeurIPS 2016. arXiv:1602.07868.

    Args:
        num_features: channels ``C``.
        affine: learn ``β`` (init 0). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 3, 5)
        >>> torch.allclose(nk.MeanOnlyBatchNorm(3)(x), x - x.mean((0, 2), keepdim=True), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.Center(),
                         nrr=affine_recovery(affine, weight=False), **kw)


@register("l1_bn", family="scaling", aliases=("l1_batch_norm", "l1bn"),
          paper="Wu, Li, Chen, Shi & Shi 2018, arXiv:1802.09769")
class L1BatchNorm(Normalization):
    r"""L1 batch normalization: divide by the mean absolute deviation, rescaled to match σ.

    .. math::
        y = \gamma \frac{x - \mu_B}{\sqrt{\pi/2}\ \mathbb{E}_B|x - \mu_B| + \epsilon} + \beta

    For Gaussian activations ``√(π/2)·E|x − μ| = σ``, so it behaves like BN without squares.
    Tracks ``running_mean`` and ``running_scale``.

    Paper: Wu et al., *L1-Norm Batch Normalization for Efficient Training of Deep Neural
    Networks*, 2018. arXiv:1802.09769.

    Args:
        num_features: channels ``C``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import math, torch, normkit as nk
        >>> x = torch.randn(8, 3, 4)
        >>> c = x - x.mean((0, 2), keepdim=True)
        >>> ref = c / (math.sqrt(math.pi / 2) * c.abs().mean((0, 2), keepdim=True) + 1e-5)
        >>> torch.allclose(nk.L1BatchNorm(3)(x), ref, atol=1e-5)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.L1(),
                         nrr=affine_recovery(affine), **kw)


@register("range_bn", family="scaling", aliases=("range_batch_norm", "linf_bn"),
          paper="Hoffer, Banner, Golan & Soudry 2018, arXiv:1803.01814")
class RangeBatchNorm(Normalization):
    r"""Range (L∞) batch normalization: divide by the scaled range of each channel.

    .. math::
        y = \gamma \frac{x - \mu_B}{C(m)\,(\max_B x - \min_B x) + \epsilon} + \beta, \qquad
        C(m) = \frac{1}{\sqrt{2 \ln m}}

    with ``m`` the number of values per channel. Tracks ``running_mean`` and ``running_scale``.

    Paper: Hoffer et al., *Norm matters: efficient and accurate normalization schemes in deep
    networks*, NeurIPS 2018. arXiv:1803.01814.

    Args:
        num_features: channels ``C``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import math, torch, normkit as nk
        >>> x = torch.randn(8, 3)
        >>> c = x - x.mean(0)
        >>> scale = (x.amax(0) - x.amin(0)) / math.sqrt(2 * math.log(8))
        >>> torch.allclose(nk.RangeBatchNorm(3)(x), c / (scale + 1e-5), atol=1e-5)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.Range(),
                         nrr=affine_recovery(affine), **kw)
