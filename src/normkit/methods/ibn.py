"""IBN-Net's instance-batch normalization (book ch. 10.1, domain generalization): IN on the first
channels, BN on the others, in one layer.

The operation is batch-instance standardization (:class:`~normkit.nop.BatchInstanceStandardize`,
the gate ``ρ`` between BN and IN) with the gate fixed per channel instead of learned:
:class:`normkit.nop.InstanceBatchStandardize`, ``ρ_c = 0`` (IN) for the first ``⌊ratio·C⌋``
channels and ``ρ_c = 1`` (BN) for the rest. Use it in an existing model with
``normkit.convert(model, to="ibn:ratio=0.5")``.
"""

from __future__ import annotations

import warnings
from typing import Any

from typing_extensions import Unpack

from .. import nap
from ..nop import InstanceBatchStandardize as _InstanceBatchStandardize
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery

__all__ = ["IBN"]


def __getattr__(name: str) -> Any:
    """Deprecated path: the operation moved to :mod:`normkit.nop` with every other operation."""
    if name == "InstanceBatchStandardize":
        warnings.warn("normkit.methods.ibn.InstanceBatchStandardize moved to "
                      "normkit.nop.InstanceBatchStandardize; import it from there",
                      DeprecationWarning, stacklevel=2)
        return _InstanceBatchStandardize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        super().__init__(num_features, nap=nap.Batch(), nop=_InstanceBatchStandardize(ratio=ratio),
                         nrr=affine_recovery(affine), **kw)

    @property
    def num_instance(self) -> int:
        """Number of leading channels normalized by IN, ``⌊ratio·C⌋``."""
        return int(self.nop.num_instance)  # type: ignore[attr-defined]

    @property
    def ratio(self) -> float:
        """Share of channels given to IN (the constructor's ``ratio``)."""
        return float(self.nop.ratio)  # type: ignore[attr-defined]
