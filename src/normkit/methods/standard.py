"""Standardization over different areas (book ch. 3 and 4.1): BN, LN, IN, GN, PN, batch-group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .. import nap
from ..functional.normalize import default_eps
from ..normalization import Normalization
from ..registry import register
from ._common import (
    NormKwargs,
    affine_recovery,
    group_partition,
    layer_partition,
)
from ._torch_form import TrailingDims, torch_call_form

__all__ = ["BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "PositionalNorm", "BatchGroupNorm"]


@register("bn", family="standardization", aliases=("batch_norm", "batchnorm"),
          paper="Ioffe & Szegedy 2015, arXiv:1502.03167")
class BatchNorm(Normalization):
    r"""Batch normalization: standardize each channel over the batch and positions.

    .. math::
        y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
        \mu_B, \sigma_B^2 \text{ over } (N, *\text{spatial}) \text{ per channel}

    Training uses the biased batch variance and tracks running mean and unbiased variance; eval
    uses the running estimates. One class for any rank (``BatchNorm1d/2d/3d`` in torch); loads and
    saves torch BN state_dicts (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``). Dispatches to ``torch.nn.functional.batch_norm``.

    Paper: Ioffe & Szegedy, *Batch Normalization*, ICML 2015. arXiv:1502.03167.

    Args:
        num_features: channels ``C``.
        affine: learn per-channel ``γ`` (init 1) and ``β`` (init 0). Default ``True``.
        bias: with ``affine``, learn ``β`` too; ``False`` keeps ``γ`` only (``bias`` is ``None``),
            as torch's ``bias=False``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps=1e-5``, ``momentum=0.1``,
            ``track_running_stats=True``, ``channel_axis=1``, ``device``, ``dtype``).

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``).

    Example:
        >>> import torch, normkit as nk
        >>> ours, ref = nk.BatchNorm(8), torch.nn.BatchNorm2d(8)
        >>> x = torch.randn(4, 8, 5, 5)
        >>> torch.allclose(ours(x), ref(x), atol=1e-6)
        True
        >>> torch.allclose(ours.running_var, ref.running_var)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = True, bias: bool = True,
                 **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nrr=affine_recovery(affine, bias=bias), **kw)


@register("ln", family="standardization", aliases=("layer_norm", "layernorm", "layernorm2d"),
          paper="Ba, Kiros & Hinton 2016, arXiv:1607.06450")
class LayerNorm(TrailingDims, Normalization):
    r"""Layer normalization: standardize each sample over its features.

    .. math::
        y = \gamma \frac{x - \mu_n}{\sqrt{\sigma_n^2 + \epsilon}} + \beta

    with ``μ_n, σ_n²`` over ``over``:

    * ``"all"`` — every channel and position of sample ``n`` (the book's definition), with a
      per-channel ``γ, β``; equals GN with one group.
    * ``"channels"`` — the ``C`` channels of each position: ``torch.nn.LayerNorm(C)`` on
      ``(…, C)`` inputs (``channel_axis=-1``), or the channels-first "LayerNorm2d" of ConvNeXt
      (``channel_axis=1``).

    ``over=None`` (default) picks ``"all"`` for ``channel_axis=1`` and ``"channels"`` for
    ``channel_axis=-1``. Dispatches to ``group_norm`` / ``layer_norm`` kernels.

    **torch's call form.** A list/tuple first argument, or torch's ``elementwise_affine=``, means
    torch's ``LayerNorm(normalized_shape, eps, elementwise_affine, bias)``: statistics over the
    last ``len(normalized_shape)`` dimensions, which must equal ``normalized_shape``, with an
    elementwise ``γ, β`` of that shape (``channel_axis=-1`` and ``over="channels"`` by default;
    ``num_features`` is then ``prod(normalized_shape)``). The module then equals
    ``torch.nn.LayerNorm`` with the same arguments and state_dicts load both ways.
    ``nk.LayerNorm(768)`` alone keeps normkit's form (the book's LN over ``(C, *spatial)`` of a
    channels-first input); write ``nk.LayerNorm([768])`` or ``channel_axis=-1`` for torch's.

    Paper: Ba, Kiros & Hinton, *Layer Normalization*, 2016. arXiv:1607.06450.

    Args:
        num_features: channels ``C``, or torch's ``normalized_shape`` (a list/tuple of ints).
        over: ``"all"``, ``"channels"`` or ``None`` (see above).
        affine: learnable ``γ, β``. Default ``True``.
        elementwise_affine: torch's name for ``affine`` (selects torch's call form); giving both
            with different values raises.
        bias: with ``affine``, learn ``β`` too; ``False`` keeps ``γ`` only (``bias`` is ``None``),
            as torch's ``bias=False``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same (or ``(N, *, C)`` with ``channel_axis=-1``); torch's form:
        ``(*, *normalized_shape)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 7, 16)
        >>> ln, ref = nk.LayerNorm(16, channel_axis=-1), torch.nn.LayerNorm(16)
        >>> torch.allclose(ln(x), ref(x), atol=1e-6)
        True
        >>> img = torch.randn(2, 8, 4, 4)
        >>> torch.allclose(nk.LayerNorm(8)(img), nk.GroupNorm(8, num_groups=1)(img), atol=1e-6)
        True
        >>> ln, ref = nk.LayerNorm([8, 4, 4], bias=False), torch.nn.LayerNorm([8, 4, 4], bias=False)
        >>> _ = ln.load_state_dict(ref.state_dict())       # γ of shape (8, 4, 4), no β
        >>> torch.allclose(ln(img), ref(img), atol=1e-6)
        True
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        over: Literal["all", "channels"] | None = None,
        affine: bool | None = None,
        elementwise_affine: bool | None = None,
        bias: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        num_features, shape, on = torch_call_form("LayerNorm", num_features, affine,
                                                  elementwise_affine, over, kw)
        partition = layer_partition(over, kw.get("channel_axis", 1))
        recovery = affine_recovery(on, bias=bias, shape=shape if shape and len(shape) > 1 else None)
        super().__init__(num_features, nap=partition, nrr=recovery, **kw)
        self._set_normalized_shape(shape)

    def _trailing_kernel(self, x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """torch's ``layer_norm`` over several trailing dimensions (it takes γ's shape)."""
        if not self._native_ok(x, kind="layer_norm"):
            return None
        eps = self.eps if self.eps is not None else default_eps(x.dtype)
        return F.layer_norm(x, shape, self.weight, self.bias, eps)


@register("in", family="standardization", aliases=("instance_norm", "instancenorm"),
          paper="Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022")
class InstanceNorm(Normalization):
    r"""Instance normalization: standardize each channel of each sample over its positions.

    .. math::
        y_{nc} = \gamma_c \frac{x_{nc} - \mu_{nc}}{\sqrt{\sigma_{nc}^2 + \epsilon}} + \beta_c

    Defaults follow ``torch.nn.InstanceNorm2d``: ``affine=False``, ``track_running_stats=False``.
    With tracking, running estimates average the per-instance statistics over the batch, as torch.
    Training with a single position per channel raises.

    Paper: Ulyanov, Vedaldi & Lempitsky, *Instance Normalization*, 2016. arXiv:1607.08022.

    Args:
        num_features: channels ``C``.
        affine: per-channel ``γ, β``. Default ``False``.
        bias: with ``affine``, learn ``β`` too (torch's ``bias``). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``track_running_stats=False``).

    Shape:
        ``(N, C, *)`` with at least 2 positions in training → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 4, 6, 6)
        >>> torch.allclose(nk.InstanceNorm(4)(x), torch.nn.InstanceNorm2d(4)(x), atol=1e-6)
        True
        >>> torch.allclose(nk.InstanceNorm(4)(x), nk.GroupNorm(4, num_groups=4, affine=False)(x), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = False, bias: bool = True,
                 **kw: Unpack[NormKwargs]) -> None:
        kw.setdefault("track_running_stats", False)
        super().__init__(num_features, nap=nap.Instance(),
                         nrr=affine_recovery(affine, bias=bias), **kw)


@register("gn", family="standardization", aliases=("group_norm", "groupnorm"),
          paper="Wu & He 2018, arXiv:1803.08494")
class GroupNorm(Normalization):
    r"""Group normalization: standardize each sample over groups of ``C/g`` channels and positions.

    .. math::
        y = \gamma \frac{x - \mu_{ng}}{\sqrt{\sigma_{ng}^2 + \epsilon}} + \beta

    One group is LN over ``(C, *spatial)``; ``C`` groups is IN. Dispatches to
    ``torch.nn.functional.group_norm``; state_dict-compatible with ``torch.nn.GroupNorm``.

    Paper: Wu & He, *Group Normalization*, ECCV 2018. arXiv:1803.08494.

    Args:
        num_features: channels ``C``.
        num_groups: number of groups ``g`` (must divide ``C``), or
        group_size: channels per group (at most one of the two). Default: ``gcd(C, 32)`` groups
            — the paper's 32 wherever 32 divides ``C`` (:func:`~normkit.methods._common.
            default_grouping`).
        affine: per-channel ``γ, β``. Default ``True``.
        bias: with ``affine``, learn ``β`` too (torch's ``bias``). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 8, 5, 5)
        >>> ref = torch.nn.GroupNorm(4, 8)
        >>> torch.allclose(nk.GroupNorm(8, num_groups=4)(x), ref(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        group_size: int | None = None,
        affine: bool = True,
        bias: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        partition = group_partition(nap.Group, num_features, num_groups, group_size)
        super().__init__(num_features, nap=partition, nrr=affine_recovery(affine, bias=bias), **kw)

    @property
    def num_groups(self) -> int:
        """Number of channel groups ``g``."""
        return self.groups[0]


@register("pn", family="standardization", aliases=("positional_norm", "pono"),
          paper="Li, Wu, Lim, Belongie & Weinberger 2019, arXiv:1907.04312")
class PositionalNorm(Normalization):
    r"""Positional normalization: standardize each position of each sample over the channels.

    .. math::
        y_{n,:,p} = \frac{x_{n,:,p} - \mu_{np}}{\sqrt{\sigma_{np}^2 + \epsilon}}, \qquad
        \mu_{np}, \sigma^2_{np} \text{ over the } C \text{ channels at position } p

    No affine by default (PONO re-injects the moments elsewhere); with ``affine=True`` it is the
    channels-first "LayerNorm2d".

    Paper: Li et al., *Positional Normalization*, NeurIPS 2019. arXiv:1907.04312.

    Args:
        num_features: channels ``C``.
        affine: per-channel ``γ, β``. Default ``False``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 8, 3, 3)
        >>> ref = torch.nn.functional.layer_norm(x.movedim(1, -1), (8,)).movedim(-1, 1)
        >>> torch.allclose(nk.PositionalNorm(8)(x), ref, atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = False, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Position(), nrr=affine_recovery(affine), **kw)


@register("batch_group_norm", family="standardization", aliases=("bgn", "batchgroupnorm"),
          paper="Summers & Dinneen 2020, arXiv:1906.03548")
class BatchGroupNorm(Normalization):
    r"""Batch-group normalization: standardize groups of ``C/g`` channels over the batch.

    .. math::
        y = \gamma \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta, \qquad
        \mu_g, \sigma_g^2 \text{ over } (N, C/g, *\text{spatial})

    Batch-dependent: tracks running estimates of shape ``(g,)``. ``group_size=1`` is BN.

    Paper: Summers & Dinneen, *Four Things Everyone Should Know to Improve Batch Normalization*,
    ICLR 2020. arXiv:1906.03548.

    Args:
        num_features: channels ``C``.
        num_groups / group_size: the grouping (at most one; must divide ``C``; default
            ``gcd(C, 32)`` groups, as :class:`GroupNorm`).
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 6, 3, 3)
        >>> bgn, bn = nk.BatchGroupNorm(6, group_size=1), nk.BatchNorm(6)
        >>> torch.allclose(bgn(x), bn(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        group_size: int | None = None,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        partition = group_partition(nap.BatchGroup, num_features, num_groups, group_size)
        super().__init__(num_features, nap=partition, nrr=affine_recovery(affine), **kw)
