"""IBN-Net's operation: batch-instance standardization with a fixed gate, IN on the first
``⌊ratio·C⌋`` channels and BN on the others (the preset is :class:`normkit.IBN`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional.partition import stats_dtype
from ..nap import Partition
from ._combination import BatchInstanceStandardize

__all__ = ["InstanceBatchStandardize"]


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
