"""NOP — normalization operation: what is done with the statistics of an area?

Each operation splits into ``fit`` (statistics of the area a partition defines) and
``coefficients`` (statistics → ``(scale, shift)`` with ``x̂ = x·scale + shift``). Training fits on
the batch and may track running estimates; evaluation feeds the running estimates to the same
``coefficients``, so train and eval cannot drift apart.

===================  ===========================================  ==================
operation            x̂                                            statistics
===================  ===========================================  ==================
``Standardize()``    (x − μ)/√(σ² + ε)                            mean, var
``Center()``         x − μ                                        mean
``Scale("rms")``     x/√(E[x²] + ε)                               ms
``Scale("l2")``      x/√(Σx² + ε)                                 ms
``L1()``             (x − μ)/(√(π/2)·E|x − μ| + ε)                mean, scale
``Range()``          (x − μ)/((max − min)·C(m) + ε)               mean, scale
``Divisive(...)``    (x − μ)/(k + α·σ²)^β   (``center=False``: x/(k + α·E[x²])^β)  mean, var / ms
===================  ===========================================  ==================

The operations of the other families (combination, multi-mode, robust, online, power) are
exported here too: every public :class:`Operation` subclass of this package is importable as
``normkit.nop.<Name>``.

Example:
    >>> import torch, normkit as nk
    >>> x = torch.randn(4, 3, 5)
    >>> y = nk.normalize(x, nap=nk.nap.Layer(), nop=nk.nop.Scale("rms"), eps=1e-6)
    >>> torch.allclose(y, x / (x.pow(2).mean((1, 2), keepdim=True) + 1e-6).sqrt())
    True
"""

from ._base import Coefficients as Coefficients
from ._base import Kernel as Kernel
from ._base import Layout as Layout
from ._base import Operation as Operation
from ._base import State as State
from ._base import StateSpec as StateSpec
from ._base import Stats as Stats
from ._combination import BatchInstanceStandardize as BatchInstanceStandardize
from ._combination import InstanceLayerStandardize as InstanceLayerStandardize
from ._combination import SwitchableStandardize as SwitchableStandardize
from ._ibn import InstanceBatchStandardize as InstanceBatchStandardize
from ._multimode import MixtureStandardize as MixtureStandardize
from ._multimode import ModeStandardize as ModeStandardize
from ._multimode import TaskStandardize as TaskStandardize
from ._norm_act import BatchChannelStandardize as BatchChannelStandardize
from ._norm_act import EvoB0 as EvoB0
from ._norm_act import EvoS0 as EvoS0
from ._norm_act import FilterResponse as FilterResponse
from ._online import ExampleWeighted as ExampleWeighted
from ._online import OnlineStandardize as OnlineStandardize
from ._power import PowerScale as PowerScale
from ._robust import Ghost as Ghost
from ._robust import MomentumStandardize as MomentumStandardize
from ._robust import Renormalize as Renormalize
from ._robust import RobustStandardize as RobustStandardize
from ._standard import L1 as L1
from ._standard import Center as Center
from ._standard import Divisive as Divisive
from ._standard import Range as Range
from ._standard import Scale as Scale
from ._standard import Standardize as Standardize
from ._switch_whiten import SwitchableWhiten as SwitchableWhiten
from ._whiten import Whiten as Whiten
from ._window import MovingAverageStandardize as MovingAverageStandardize
from ._window import WindowStandardize as WindowStandardize

__all__ = [
    "Operation", "Stats", "Coefficients", "State", "StateSpec", "Layout", "Kernel",
    # standardization, scaling, local
    "Standardize", "Center", "Scale", "L1", "Range", "Divisive",
    # whitening
    "Whiten", "SwitchableWhiten",
    # combination
    "SwitchableStandardize", "BatchInstanceStandardize", "InstanceLayerStandardize",
    "InstanceBatchStandardize", "EvoB0", "EvoS0", "FilterResponse", "BatchChannelStandardize",
    # multi-mode
    "ModeStandardize", "MixtureStandardize", "TaskStandardize",
    # robust, online, power
    "RobustStandardize", "Renormalize", "Ghost", "MomentumStandardize", "WindowStandardize",
    "MovingAverageStandardize", "ExampleWeighted", "OnlineStandardize", "PowerScale",
]
