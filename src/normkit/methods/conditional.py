"""Conditional and input-adaptive normalization (book ch. 4.3): γ, β computed per sample.

Each preset is a standard normalization (BN, IN or LN) whose recovery is conditional
(:mod:`normkit.nrr`). Methods that need a condition take it as the second forward argument,
``module(x, condition)``; calling them without one raises.
"""

from __future__ import annotations

from typing import Literal

from typing_extensions import Unpack

from .. import nap, nop, nrr
from ..nop._combination import InstanceLayerStandardize
from ..normalization import Normalization
from ..registry import register
from ._common import GN_GROUPS, NormKwargs, default_grouping, layer_partition

__all__ = ["AdaLIN", "InstanceLevelMetaNorm", "ConditionalBatchNorm", "ConditionalInstanceNorm", "AdaIN", "SPADENorm",
           "InstanceEnhancedBatchNorm", "AttentiveNorm", "DynamicLayerNorm"]


@register("cbn", family="conditional", aliases=("conditional_batch_norm",),
          paper="de Vries et al. 2017, arXiv:1707.00683")
class ConditionalBatchNorm(Normalization):
    r"""Conditional BN: ``y = γ(c) ⊙ (x − μ_B)/√(σ²_B + ε) + β(c)``, ``γ, β`` chosen by a class
    index or computed from an embedding (:class:`normkit.nrr.ConditionalAffine`); BN's running
    statistics for evaluation. With one class it is BN.

    .. math::
        y = \gamma(c) \odot \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta(c)

    Paper: de Vries et al. 2017, arXiv:1707.00683.

    Args:
        num_features: channels ``C``.
        num_classes: ``K`` classes (condition: integer ``(N,)``), or
        embedding_dim: ``E`` (condition: ``(N, E)``). Exactly one.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` and a condition per sample → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> cbn = nk.create("cbn", 4, num_classes=3)
        >>> cbn(torch.randn(8, 4, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).shape
        torch.Size([8, 4, 5])
    """

    def __init__(self, num_features: int, *, num_classes: int | None = None,
                 embedding_dim: int | None = None, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.Standardize(),
                         nrr=nrr.ConditionalAffine(num_classes=num_classes,
                                                   embedding_dim=embedding_dim), **kw)


@register("cin", family="conditional", aliases=("conditional_instance_norm",),
          paper="Dumoulin, Shlens & Kudlur 2017, arXiv:1610.07629")
class ConditionalInstanceNorm(Normalization):
    r"""Conditional IN (one affine per style): ``y = γ(c) ⊙ IN(x) + β(c)``.

    .. math::
        y = \gamma(c) \odot \mathrm{IN}(x) + \beta(c)

    Paper: Dumoulin, Shlens & Kudlur 2017, arXiv:1610.07629.

    Args:
        num_features: channels ``C``.
        num_classes: ``K`` styles, or
        embedding_dim: ``E``. Exactly one.
        **kw: :class:`~normkit.methods._common.NormKwargs` (no running statistics by default).

    Shape:
        ``(N, C, *)`` (and the condition, where one is needed) → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> cin = nk.create("cin", 3, num_classes=2)
        >>> cin(torch.randn(2, 3, 4, 4), torch.tensor([1, 0])).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, num_features: int, *, num_classes: int | None = None,
                 embedding_dim: int | None = None, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Instance(), nop=nop.Standardize(),
                         nrr=nrr.ConditionalAffine(num_classes=num_classes,
                                                   embedding_dim=embedding_dim), **kw)


@register("adain", family="conditional", aliases=("adaptive_instance_norm",),
          paper="Huang & Belongie 2017, arXiv:1703.06868")
class AdaIN(Normalization):
    r"""Adaptive instance normalization: ``y = σ(s)·(x − μ(x))/σ(x) + μ(s)`` with the statistics of
    a style input ``s`` (the condition), per sample and channel over positions.

    .. math::
        y = \sigma(s)\,\frac{x - \mu(x)}{\sigma(x)} + \mu(s)

    Paper: Huang & Belongie 2017, arXiv:1703.06868.

    Args:
        num_features: channels ``C``.
        style_eps: added to the style variance (``eps`` is the content's).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` (and the condition, where one is needed) → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> content, style = torch.randn(2, 3, 8, 8), 2 + 3 * torch.randn(2, 3, 6, 6)
        >>> y = nk.create("adain", 3)(content, style)
        >>> torch.allclose(y.mean((2, 3)), style.mean((2, 3)), atol=1e-5)
        True
    """

    def __init__(self, num_features: int, *, style_eps: float = 1e-5,
                 **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Instance(), nop=nop.Standardize(),
                         nrr=nrr.AdaptiveInstance(eps=style_eps), **kw)


@register("spade", family="conditional", aliases=("spatially_adaptive_norm",),
          paper="Park et al. 2019, arXiv:1903.07291")
class SPADENorm(Normalization):
    r"""SPADE: ``y = BN(x) ⊙ (1 + γ(m)) + β(m)``, per-position ``γ, β`` from a segmentation map
    ``m`` (the condition, ``(N, L, *size)``) through a small conv net (BN without affine, as the
    paper).

    .. math::
        y = \mathrm{BN}(x) \odot \big(1 + \gamma(m)\big) + \beta(m)

    Paper: Park et al. 2019, arXiv:1903.07291.

    Args:
        num_features: channels ``C``.
        label_channels: ``L``.
        hidden: channels of the shared conv (128).
        kernel_size: 3.
        spatial_dims: 2 (1 or 3 for sequences or volumes).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` (and the condition, where one is needed) → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> spade = nk.create("spade", 4, label_channels=3, hidden=8)
        >>> spade(torch.randn(2, 4, 8, 8), torch.rand(2, 3, 4, 4)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, num_features: int, *, label_channels: int, hidden: int = 128,
                 kernel_size: int = 3, spatial_dims: int = 2, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.Standardize(),
                         nrr=nrr.SPADE(label_channels=label_channels, hidden=hidden,
                                       kernel_size=kernel_size, spatial_dims=spatial_dims), **kw)


@register("iebn", family="conditional", aliases=("instance_enhanced_batch_norm",),
          paper="Liang et al. 2020, arXiv:1908.04008")
class InstanceEnhancedBatchNorm(Normalization):
    r"""Instance-enhanced BN: ``y = γ ⊙ σ(v ⊙ p + b) ⊙ BN(x) + β``, ``p`` the sample's mean over
    positions (:class:`normkit.nrr.InstanceGate`).

    .. math::
        y = \gamma \odot \sigma(v \odot p + b) \odot \mathrm{BN}(x) + \beta

    Paper: Liang et al. 2020, arXiv:1908.04008.

    Shape:
        ``(N, C, *)`` (and the condition, where one is needed) → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> nk.create("iebn", 4)(torch.randn(3, 4, 5)).shape
        torch.Size([3, 4, 5])
    """

    def __init__(self, num_features: int, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.Standardize(),
                         nrr=nrr.InstanceGate(), **kw)


@register("attentive_norm", family="conditional", aliases=("attentive_normalization",),
          paper="Li, Sun & Wu 2019, arXiv:1908.01259")
class AttentiveNorm(Normalization):
    r"""Attentive normalization: BN followed by an attention-weighted mixture of ``K`` affines,
    ``λ = sigmoid(A p + a)``, ``y = (λΓ) ⊙ BN(x) + λB`` (:class:`normkit.nrr.AttentiveAffine`).

    .. math::
        \lambda = \mathrm{sigmoid}(A p + a), \qquad y = (\lambda \Gamma) \odot \mathrm{BN}(x) + \lambda B

    Paper: Li, Sun & Wu 2019, arXiv:1908.01259.

    Args:
        num_features: channels ``C``.
        num_affines: ``K`` (4).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` (and the condition, where one is needed) → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> an = nk.create("attentive_norm", 4, num_affines=2)
        >>> x = torch.randn(3, 4, 5)
        >>> torch.allclose(an(x), nk.create("bn", 4)(x), atol=1e-6)   # starts as plain BN
        True
    """

    def __init__(self, num_features: int, *, num_affines: int = 4, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=nop.Standardize(),
                         nrr=nrr.AttentiveAffine(num_affines=num_affines), **kw)


@register("dynamic_ln", family="conditional", aliases=("dynamic_layer_norm",),
          paper="Kim, Song & Lee 2017, Interspeech (arXiv:1707.06065)")
class DynamicLayerNorm(Normalization):
    r"""Dynamic layer normalization: LN whose ``γ, β`` are predicted from the input's mean over
    positions ``s`` (over time for ``(B, T, D)``): ``γ = γ₀ + W_γ s``, ``β = β₀ + W_β s``
    (:class:`normkit.nrr.DynamicAffine`; ``W`` starts at 0, i.e. plain LN).

    .. math::
        y = \gamma \odot \mathrm{LN}(x) + \beta, \qquad \gamma = \gamma_0 + W_\gamma s, \quad \beta = \beta_0 + W_\beta s

    Paper: Kim, Song & Lee 2017, Interspeech (arXiv:1707.06065).

    Args:
        num_features: channels ``C``.
        over: as :class:`~normkit.methods.standard.LayerNorm` (``None``: all of a sample for
            ``channel_axis=1``, the channels of each position for ``channel_axis=-1``).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` (and the condition, where one is needed) → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> dln = nk.create("dynamic_ln", 6, channel_axis=-1)
        >>> x = torch.randn(2, 5, 6)
        >>> torch.allclose(dln(x), torch.nn.functional.layer_norm(x, (6,)), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, over: Literal["all", "channels"] | None = None,
                 **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=layer_partition(over, kw.get("channel_axis", 1)),
                         nop=nop.Standardize(), nrr=nrr.DynamicAffine(), **kw)


@register("adalin", family="conditional", aliases=("adaptive_layer_instance_norm",),
          paper="Kim, Kim, Kang & Lee 2020, arXiv:1907.10830")
class AdaLIN(Normalization):
    r"""Adaptive layer-instance normalization (U-GAT-IT):
    ``y = γ ⊙ (ρ·IN(x) + (1 − ρ)·LN(x)) + β`` with a learned per-channel ``ρ`` (``gate``,
    clamped to [0, 1]) and ``(γ, β)`` given per sample as the condition — in U-GAT-IT computed by
    fully connected layers from the encoder's attention features.

    .. math::
        y = \gamma \odot \big(\rho\,\mathrm{IN}(x) + (1 - \rho)\,\mathrm{LN}(x)\big) + \beta

    Paper: Kim, Kim, Kang & Lee 2020, arXiv:1907.10830.

    Args:
        num_features: channels ``C``.
        rho_init: initial ``ρ`` (0.9 in the paper's decoder; 1 is AdaIN with given γ, β).
        **kw: :class:`~normkit.methods._common.NormKwargs` (per sample: no running statistics).

    Shape:
        ``(N, C, *)`` and ``(γ, β)`` each ``(N, C)`` → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> m = nk.create("adalin", 4)
        >>> gamma, beta = torch.ones(2, 4), torch.zeros(2, 4)
        >>> m(torch.randn(2, 4, 5, 5), (gamma, beta)).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(self, num_features: int, *, rho_init: float = 0.9, **kw: Unpack[NormKwargs]) -> None:
        kw.setdefault("track_running_stats", False)
        super().__init__(num_features, nap=nap.Instance(),
                         nop=InstanceLayerStandardize(gate_init=rho_init), nrr=nrr.ExternalAffine(),
                         **kw)


@register("ilm", family="conditional", aliases=("instance_level_meta_norm", "ilm_gn"),
          paper="Jia, Chen & Huang 2019, arXiv:1904.03516")
class InstanceLevelMetaNorm(Normalization):
    r"""Instance-level meta normalization on GN (the paper's ILM+GN): GN whose affine is
    corrected per sample by an encoder-decoder on the input's pooled response
    (:class:`normkit.nrr.MetaAffine`): ``y = γ(x) ⊙ GN(x) + β(x)``.

    .. math::
        y = \gamma(x) \odot \mathrm{GN}(x) + \beta(x)

    Paper: Jia, Chen & Huang 2019, arXiv:1904.03516.

    Args:
        num_features: channels ``C``.
        num_groups: GN's groups. Default ``gcd(C, 32)``, as :class:`~normkit.GroupNorm`.
        reduction: bottleneck ratio ``r`` of the encoder (4).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → ``(N, C, *)``.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 8, 4, 4)
        >>> ilm = nk.create("ilm", 8, num_groups=2)
        >>> torch.allclose(ilm(x), nk.create("gn", 8, num_groups=2)(x), atol=1e-6)  # starts as GN
        True
    """

    def __init__(self, num_features: int, *, num_groups: int | None = None, reduction: int = 4,
                 **kw: Unpack[NormKwargs]) -> None:
        if num_groups is None:
            num_groups = default_grouping(num_features, GN_GROUPS, count=True)
        super().__init__(num_features, nap=nap.Group(num_groups=num_groups), nop=nop.Standardize(),
                         nrr=nrr.MetaAffine(reduction=reduction), **kw)
