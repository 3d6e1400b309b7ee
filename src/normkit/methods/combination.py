"""Multi-mode and combinational normalization (book ch. 5): switchable normalization, batch-instance
normalization, EvoNorm-B0/S0, filter response normalization and batch-channel normalization.

Each combines normalizations the framework already has (BN, IN, LN, GN statistics) — mixed with
learned weights, gated, chained, or fused with an activation — so each is one operation of
:mod:`normkit.nop._combination` composed with an existing partition and recovery.
"""

from __future__ import annotations

import torch
from typing_extensions import Unpack

from .. import nap, nop
from ..errors import ConfigError
from ..nop._combination import BatchInstanceStandardize, SwitchableStandardize
from ..nop._norm_act import BatchChannelStandardize, EvoB0, EvoS0, FilterResponse
from ..normalization import Normalization
from ..registry import register
from ._common import GN_GROUPS, NormKwargs, affine_recovery, default_grouping, group_partition

__all__ = ["SwitchableNorm", "BatchInstanceNorm", "EvoNormB0", "EvoNormS0", "FilterResponseNorm",
           "BatchChannelNorm"]

_FAMILY = "combination"


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {value!r}")


@register("switchable_norm", family=_FAMILY, aliases=("switchable_normalization",),
          paper="Luo, Ren, Peng, Zhang & Li 2019, arXiv:1806.10779")
class SwitchableNorm(Normalization):
    r"""Switchable normalization: standardize with a learned mixture of IN, LN and BN statistics.

    .. math::
        y = \gamma \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma_k^2 + \epsilon}} + \beta,
        \qquad w = \phi(\lambda),\ w' = \phi(\lambda'),\ k \in \{\mathrm{in}, \mathrm{ln},
        \mathrm{bn}\}

    ``μ_in, σ²_in`` per sample and channel over the positions, ``μ_ln, σ²_ln`` per sample over all
    channels and positions, ``μ_bn, σ²_bn`` per channel over the batch and positions (biased
    variances, the paper's ``1/|I_k|``; LN and BN moments are pooled from the IN ones, exactly).
    The logits ``mean_weight`` (``λ``) and ``var_weight`` (``λ'``) are learned, one per mode in
    the order of ``modes``, init 0 (equal weights). ``φ`` is softmax; ``sparse=True`` makes it
    sparsemax, the Euclidean projection onto the simplex (see below). Training tracks BN's
    running mean and unbiased variance; evaluation mixes them with the input's own IN and LN
    statistics, as the paper (so the eval output still depends on each sample: nothing to fold).

    ``sparse=True`` follows Sparse Switchable Normalization (Shao et al., CVPR 2019,
    arXiv:1903.03793) in replacing softmax by a projection onto the simplex, so that weights can
    be exactly 0 and one mode can be selected outright (the layer then *is* IN, LN or BN). SSN's
    "sparsestmax" additionally restricts the projection to points at a distance ≥ r from the
    simplex's centre, with ``r`` annealed during training to force a one-hot choice; normkit
    implements the ``r = 0`` case, sparsemax (Martins & Astudillo 2016): no schedule to tune,
    exact zeros, and exactly one-hot once a logit leads the others by ≥ 1.

    Paper: Luo, Ren, Peng, Zhang & Li, *Differentiable Learning-to-Normalize via Switchable
    Normalization*, ICLR 2019. arXiv:1806.10779.

    Args:
        num_features: channels ``C``.
        modes: the statistics mixed, a non-empty tuple from ``("in", "ln", "bn")`` (default all
            three). Without ``"bn"`` the layer is batch-independent and keeps no running
            estimates (``track_running_stats=True`` is then refused).
        sparse: sparsemax instead of softmax. Default ``False``.
        affine: per-channel ``γ`` (init 1), ``β`` (init 0). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps=1e-5``, ``momentum=0.1``, ...).

    Shape:
        ``(N, C, *spatial)`` → same; training needs more than one position (IN statistics) and
        more than one value per channel over the batch (BN).

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        >>> sn = nk.create("switchable_norm", 3, sparse=True, dtype=torch.float64)
        >>> with torch.no_grad():   # logits leading by >= 1: sparsemax selects BN outright
        ...     _ = sn.mean_weight.copy_(torch.tensor([0.0, 0.0, 2.0]))
        ...     _ = sn.var_weight.copy_(torch.tensor([0.0, 0.0, 2.0]))
        >>> bn = nk.BatchNorm(3, dtype=torch.float64)
        >>> torch.allclose(sn(x), bn(x), atol=1e-12)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        modes: tuple[str, ...] = ("in", "ln", "bn"),
        sparse: bool = False,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        op = SwitchableStandardize(modes=tuple(modes) if isinstance(modes, list) else modes,
                                   sparse=sparse)
        batch = "bn" in op.modes
        if not batch and kw.get("track_running_stats"):
            raise ConfigError(
                f"modes {op.modes} use no batch statistics, so there is nothing to track; "
                f"drop track_running_stats=True or add 'bn' to modes"
            )
        super().__init__(num_features, nap=nap.Batch() if batch else nap.Instance(), nop=op,
                         nrr=affine_recovery(affine), **kw)


@register("bin", family=_FAMILY, aliases=("batch_instance_norm", "batch_instance_normalization"),
          paper="Nam & Kim 2018, arXiv:1805.07925")
class BatchInstanceNorm(Normalization):
    r"""Batch-instance normalization: a learned per-channel gate between BN and IN.

    .. math::
        y = \big(\rho \cdot \hat{x}_{BN} + (1 - \rho) \cdot \hat{x}_{IN}\big)\,\gamma + \beta,
        \qquad \hat{x}_{BN} = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}},\
        \hat{x}_{IN} = \frac{x - \mu_{nc}}{\sqrt{\sigma_{nc}^2 + \epsilon}}

    with ``ρ ∈ [0, 1]`` per channel (parameter ``gate``). The paper keeps ``ρ`` in ``[0, 1]`` by
    clipping it after each parameter update; normkit clamps it in the forward instead
    (``ρ = clamp(gate, 0, 1)``), which gives the same function without touching the optimizer.
    The difference: a gate pushed past a bound keeps its raw value (with zero gradient) rather
    than being reset to the bound; call :meth:`clip_gate_` after ``optimizer.step()`` to
    reproduce the paper's update exactly. BN's statistics are tracked for evaluation; IN's always
    come from the input. ``gate_init=1`` (default) starts the layer as BN, ``0`` as IN.

    Paper: Nam & Kim, *Batch-Instance Normalization for Adaptively Style-Invariant Neural
    Networks*, NeurIPS 2018. arXiv:1805.07925.

    Args:
        num_features: channels ``C``.
        gate_init: initial ``ρ`` in ``[0, 1]``. Default ``1.0``.
        affine: per-channel ``γ``, ``β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *spatial)`` → same; training needs more than one position per channel (IN).

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 3, 5, 5)
        >>> bin0 = nk.create("bin", 3, gate_init=0.0)
        >>> torch.allclose(bin0(x), nk.InstanceNorm(3, affine=True)(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        gate_init: float = 1.0,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=BatchInstanceStandardize(gate_init),
                         nrr=affine_recovery(affine), **kw)

    @torch.no_grad()
    def clip_gate_(self) -> None:
        """Clip the gate parameter to ``[0, 1]`` in place (the paper's step after each update)."""
        self.gate.clamp_(0.0, 1.0)


@register("evonorm_b0", family=_FAMILY, aliases=("evonormb0",),
          paper="Liu, Brock, Simonyan & Le 2020, arXiv:2004.02967")
class EvoNormB0(Normalization):
    r"""EvoNorm-B0: an evolved batch-dependent normalization-activation layer.

    .. math::
        y = \frac{x}{\max\big(\sqrt{s^2_B(x) + \epsilon},\ v \odot x + \sqrt{s^2_I(x) + \epsilon}
            \big)} \odot \gamma + \beta

    ``s²_B`` is the variance per channel over the batch and positions (a running estimate —
    ``running_var``, unbiased — in evaluation), ``s²_I`` the variance per sample and channel over
    the positions (from the input, also in evaluation); ``v`` (init 1), ``γ`` (1) and ``β`` (0)
    are per channel. The numerator is not centred, and the ``max`` makes the layer its own
    nonlinearity: use it in place of BN + ReLU.

    Paper: Liu, Brock, Simonyan & Le, *Evolving Normalization-Activation Layers*, NeurIPS 2020.
    arXiv:2004.02967.

    Args:
        num_features: channels ``C``.
        affine: per-channel ``γ``, ``β`` (``v`` is always learned). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *spatial)`` → same; training needs more than one position (instance variance).

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        >>> b0 = nk.create("evonorm_b0", 3, dtype=torch.float64)
        >>> sb = x.var((0, 2, 3), correction=0, keepdim=True)
        >>> si = x.var((2, 3), correction=0, keepdim=True)
        >>> ref = x / torch.maximum((sb + 1e-5).sqrt(), x + (si + 1e-5).sqrt())
        >>> torch.allclose(b0(x), ref, atol=1e-12)
        True
    """

    def __init__(self, num_features: int, *, affine: bool = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=EvoB0(), nrr=affine_recovery(affine),
                         **kw)


@register("evonorm_s0", family=_FAMILY, aliases=("evonorms0",),
          paper="Liu, Brock, Simonyan & Le 2020, arXiv:2004.02967")
class EvoNormS0(Normalization):
    r"""EvoNorm-S0: an evolved batch-independent normalization-activation layer.

    .. math::
        y = \frac{x \odot \mathrm{sigmoid}(v \odot x)}{\sqrt{s^2_G(x) + \epsilon}} \odot \gamma
            + \beta

    ``s²_G`` is the variance per sample over each of the ``g`` groups of ``C/g`` channels and the
    positions (GN's area); ``v`` (init 1), ``γ`` (1), ``β`` (0) are per channel. The numerator is
    a SiLU-like gate ``x·σ(v x)``, not centred: use the layer in place of GN + activation.

    Paper: Liu, Brock, Simonyan & Le, *Evolving Normalization-Activation Layers*, NeurIPS 2020.
    arXiv:2004.02967.

    Args:
        num_features: channels ``C``.
        num_groups / group_size: the grouping (at most one; must divide ``C``; default
            ``gcd(C, 32)`` groups: 32 where 32 divides ``C``, as :class:`~normkit.GroupNorm`;
            :func:`~normkit.methods._common.default_grouping`).
        affine: per-channel ``γ``, ``β`` (``v`` is always learned). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
        >>> s0 = nk.create("evonorm_s0", 4, num_groups=2, dtype=torch.float64)
        >>> var = x.reshape(2, 2, -1).var(-1, correction=0)[:, :, None, None, None]
        >>> ref = (x * torch.sigmoid(x)).reshape(2, 2, 2, 3, 3) / (var + 1e-5).sqrt()
        >>> torch.allclose(s0(x), ref.reshape(x.shape), atol=1e-12)
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
        partition = group_partition(nap.Group, num_features, num_groups, group_size)
        super().__init__(num_features, nap=partition, nop=EvoS0(), nrr=affine_recovery(affine),
                         **kw)

    @property
    def num_groups(self) -> int:
        """Number of channel groups ``g``."""
        return self.groups[0]


@register("frn", family=_FAMILY, aliases=("filter_response_norm", "filter_response_normalization"),
          paper="Singh & Krishnan 2020, arXiv:1911.09737")
class FilterResponseNorm(Normalization):
    r"""Filter response normalization with a thresholded linear unit (FRN + TLU).

    .. math::
        \nu^2 = \frac{1}{|S|}\sum_{s} x_{ncs}^2,\qquad
        \hat{x} = \frac{x}{\sqrt{\nu^2 + \epsilon}},\qquad
        y = \max(\gamma \hat{x} + \beta,\ \tau)

    per sample and channel over the positions ``S``: no mean is subtracted and nothing depends on
    the batch, in training or evaluation. ``τ`` (``tau``, per channel, init 0) is the learned
    threshold of the TLU, which replaces the activation after the layer; ``tlu=False`` gives
    plain FRN ``γ x̂ + β`` (= :class:`~normkit.nop.Scale` ``("rms")`` over
    :class:`~normkit.nap.Instance`). ``learnable_eps=True`` uses the paper's learned
    ``ε + |ε_l|`` (one scalar parameter ``learned_eps``, init 1e-4: ``|·|`` has no gradient at
    0), meant for inputs with few positions — with one position ``x̂ = x/√(x² + ε)`` is almost
    ``sign(x)``. ``eps`` defaults to the paper's ``1e-6``.

    Paper: Singh & Krishnan, *Filter Response Normalization Layer: Eliminating Batch Dependence in
    the Training of Deep Neural Networks*, CVPR 2020. arXiv:1911.09737.

    Args:
        num_features: channels ``C``.
        tlu: learn the TLU threshold ``τ``. Default ``True``.
        learnable_eps: add the learned ``|ε_l|`` to ``eps``. Default ``False``.
        affine: per-channel ``γ``, ``β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps=1e-6``; running statistics are
            refused: FRN normalizes every input by its own ``ν²``).

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 3, 4, 4)
        >>> nu2 = x.pow(2).mean((2, 3), keepdim=True)
        >>> frn = nk.create("frn", 3)
        >>> torch.allclose(frn(x), (x / (nu2 + 1e-6).sqrt()).clamp_min(0), atol=1e-6)
        True
        >>> plain = nk.create("frn", 3, tlu=False)
        >>> torch.allclose(plain(x), x / (nu2 + 1e-6).sqrt(), atol=1e-6)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        tlu: bool = True,
        learnable_eps: bool = False,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        _check_bool("tlu", tlu)
        _check_bool("learnable_eps", learnable_eps)
        if kw.get("track_running_stats"):
            raise ConfigError(
                "FRN normalizes every input by its own mean square, in training and evaluation, "
                "and keeps no running estimates; got track_running_stats=True"
            )
        kw.setdefault("eps", 1e-6)
        op = (FilterResponse(tlu=tlu, learned_eps=learnable_eps) if tlu or learnable_eps
              else nop.Scale("rms"))
        super().__init__(num_features, nap=nap.Instance(), nop=op, nrr=affine_recovery(affine),
                         **kw)


@register("bcn", family=_FAMILY, aliases=("batch_channel_norm", "batch_channel_normalization"),
          paper="Qiao, Wang, Liu, Shen & Yuille 2019, arXiv:1903.10520")
class BatchChannelNorm(Normalization):
    r"""Batch-channel normalization: BN with its own affine, then group ("channel") normalization.

    .. math::
        h = \gamma_b \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta_b,\qquad
        y = \gamma \frac{h - \mu_{ng}(h)}{\sqrt{\sigma_{ng}^2(h) + \epsilon}} + \beta

    The BN step uses batch statistics per channel in training (running estimates —
    ``running_mean``, ``running_var`` — in evaluation); the GN step standardizes ``h`` per sample
    over each of ``g`` groups of channels and the positions, from the input in training and
    evaluation. Affine placement, exactly: ``γ_b, β_b`` (``bn_weight``, ``bn_bias``, per channel,
    ``bn_affine``) between the two steps, as BN's own affine; ``γ, β`` (``weight``, ``bias``, per
    channel, ``affine``) after GN. (The authors' reference code ties the second affine per group;
    a per-channel ``γ, β`` contains that case.) The BN step adds batch knowledge that GN alone
    lacks; the GN step keeps every sample away from the "elimination singularities" the paper
    analyzes. This is the paper's large-batch form; its micro-batch variant (normalizing with the
    running estimates during training as well) is not implemented.

    ``group_size=1`` makes the second step IN (``y = IN(BN(x))``), ``num_groups=1`` LN over all
    channels and positions (``y = LN(BN(x))``).

    Paper: Qiao, Wang, Liu, Shen & Yuille, *Micro-Batch Training with Batch-Channel Normalization
    and Weight Standardization*, 2019. arXiv:1903.10520.

    Args:
        num_features: channels ``C``.
        num_groups / group_size: the GN grouping (at most one; must divide ``C``; default
            ``gcd(C, 32)`` groups: 32 where 32 divides ``C``, the paper's GN setting;
            :func:`~normkit.methods._common.default_grouping`).
        bn_affine: learn ``γ_b, β_b`` between the steps. Default ``True``.
        affine: learn ``γ, β`` after the GN step. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps`` used by both steps).

    Shape:
        ``(N, C, *)`` → same; training needs more than one value per channel over the batch.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 6, 3, 3)
        >>> bcn = nk.create("bcn", 6, num_groups=2)
        >>> ref = nk.GroupNorm(6, num_groups=2)(nk.BatchNorm(6)(x))
        >>> torch.allclose(bcn(x), ref, atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        group_size: int | None = None,
        bn_affine: bool = True,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        if num_groups is None and group_size is None:
            num_groups = default_grouping(num_features, GN_GROUPS, count=True)
        op = BatchChannelStandardize(num_groups=num_groups, group_size=group_size,
                                     bn_affine=bn_affine)
        super().__init__(num_features, nap=nap.Batch(), nop=op, nrr=affine_recovery(affine), **kw)

    @property
    def num_groups(self) -> int:
        """Number of channel groups ``g`` of the GN step."""
        return self.nop.num_groups
