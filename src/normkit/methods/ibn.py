"""IBN-Net's instance-batch normalization (book ch. 10.1, domain generalization): IN on the first
channels, BN on the others, in one layer.

The operation is batch-instance standardization (:class:`~normkit.nop._combination.
BatchInstanceStandardize`, the gate ``ρ`` between BN and IN) with the gate fixed per channel
instead of learned: ``ρ_c = 0`` (IN) for the first ``⌊ratio·C⌋`` channels and ``ρ_c = 1`` (BN)
for the rest. Use it in an existing model with ``normkit.convert(model, to="ibn:ratio=0.5")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from .. import nap
from ..errors import ConfigError
from ..functional.partition import stats_dtype
from ..nap import Partition
from ..nop._combination import BatchInstanceStandardize
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery

__all__ = ["IBN", "InstanceBatchStandardize"]


@dataclass(frozen=True, repr=False)
class InstanceBatchStandardize(BatchInstanceStandardize):
    r"""IN on the first ``k = ⌊ratio·C⌋`` channels, BN on the others (Pan et al. 2018).

    .. math::
        \hat{x}_c = \begin{cases}
            (x_c - \mu_{nc}) / \sqrt{\sigma_{nc}^2 + \epsilon} & c < k \quad \text{(IN)} \\
            (x_c - \mu_{c}) / \sqrt{\sigma_{c}^2 + \epsilon} & c \ge k \quad \text{(BN)}
        \end{cases}

    Batch-instance standardization with the fixed gate ``ρ = [0]*k + [1]*(C − k)``: no learned
    parameters of its own. BN's statistics are tracked for every channel (those of the IN
    channels are kept but unused, so a BN ``state_dict`` loads as is); IN's come from each input,
    also in evaluation, so there is nothing fixed to fold. Use with ``Batch()``.
    """

    gate_init: float = field(default=1.0, repr=False)
    ratio: float = 0.5
    num_instance: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool)
                or not 0.0 <= self.ratio <= 1.0):
            raise ConfigError(
                f"ratio must be a number in [0, 1] (the share of channels given to IN; IBN-Net "
                f"uses 0.5), got {self.ratio!r}"
            )

    def bind(self, nap: Partition, num_features: int) -> InstanceBatchStandardize:
        super().bind(nap, num_features)
        return replace(self, num_instance=math.floor(self.ratio * num_features))

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        k = self.num_instance
        if k == 0:  # BN only
            return nap.count(v, spatial)
        if k == v.shape[1]:  # IN only: one value per statistic is one position
            return v.shape[3]
        return super().count(v, nap, spatial)

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict[str, Any]
    ) -> dict[str, nn.Parameter]:
        return {}

    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        return None

    def _gate(self, v: Tensor, params: Any) -> Tensor:
        k = 0 if self.num_instance is None else self.num_instance
        rho = (torch.arange(v.shape[1], device=v.device) >= k).to(stats_dtype(v))
        return rho.reshape(1, -1, 1, 1)


@register("ibn", family="combination", aliases=("ibn_net", "instance_batch_norm"),
          paper="Pan, Luo, Shi & Tang 2018, arXiv:1807.09441")
class IBN(Normalization):
    r"""Instance-batch normalization (IBN-Net): IN on the first ``⌊ratio·C⌋`` channels, BN on
    the rest, then a per-channel affine.

    .. math::
        y_c = \gamma_c\,\hat{x}_c + \beta_c,\qquad
        \hat{x}_c = \mathrm{IN}(x)_c \ (c < \lfloor \text{ratio}\cdot C \rfloor),\quad
        \hat{x}_c = \mathrm{BN}(x)_c \ \text{otherwise}

    IN removes each image's contrast and style from the shallow features, BN keeps the content
    discriminative: the mix generalizes across domains without target data (IBN-Net's "IBN-a"
    blocks use ``ratio=0.5`` in the first norm layer of the residual blocks of the early
    stages). Running mean and unbiased variance are tracked for every channel (BN's buffers and
    names, so a BN checkpoint loads and :func:`normkit.convert` keeps BN's statistics);
    evaluation uses them on the BN channels and each input's statistics on the IN channels.
    ``ratio=0`` is BN, ``ratio=1`` is IN with affine and running statistics.

    Paper: Pan, Luo, Shi & Tang, *Two at Once: Enhancing Learning and Generalization Capacities
    via IBN-Net*, ECCV 2018. arXiv:1807.09441.

    Args:
        num_features: channels ``C``.
        ratio: share of channels given to IN, in ``[0, 1]``. Default ``0.5``.
        affine: per-channel ``γ`` (init 1), ``β`` (init 0). Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps=1e-5``, ``momentum=0.1``, ...).

    Shape:
        ``(N, C, *spatial)`` → same; training needs more than one position per channel (IN)
        when ``⌊ratio·C⌋ > 0``.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(4, 6, 5, 5)
        >>> ibn = IBN(6, ratio=0.5)
        >>> y = ibn(x)
        >>> torch.allclose(y[:, :3], nk.InstanceNorm(3)(x[:, :3]), atol=1e-5)
        True
        >>> torch.allclose(y[:, 3:], nk.BatchNorm(3)(x[:, 3:]), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        ratio: float = 0.5,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        super().__init__(num_features, nap=nap.Batch(), nop=InstanceBatchStandardize(ratio=ratio),
                         nrr=affine_recovery(affine), **kw)

    @property
    def num_instance(self) -> int:
        """Number of leading channels normalized by IN, ``⌊ratio·C⌋``."""
        return int(self.nop.num_instance)  # type: ignore[attr-defined]

    @property
    def ratio(self) -> float:
        """Share of channels given to IN (the constructor's ``ratio``)."""
        return float(self.nop.ratio)  # type: ignore[attr-defined]
