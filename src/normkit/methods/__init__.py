"""Named methods: registered presets of :class:`normkit.Normalization`, one family per file."""

from . import combination as combination  # noqa: F401  (registers its presets)
from . import conditional as conditional  # noqa: F401
from . import multimode as multimode  # noqa: F401
from . import online as online  # noqa: F401
from . import robust as robust  # noqa: F401

from .local import DivisiveNorm as DivisiveNorm
from .local import LocalContextNorm as LocalContextNorm
from .local import LocalResponseNorm as LocalResponseNorm
from .scaling import L1BatchNorm as L1BatchNorm
from .scaling import MeanOnlyBatchNorm as MeanOnlyBatchNorm
from .scaling import RangeBatchNorm as RangeBatchNorm
from .scaling import RMSNorm as RMSNorm
from .scaling import ScaleNorm as ScaleNorm
from .standard import BatchGroupNorm as BatchGroupNorm
from .standard import BatchNorm as BatchNorm
from .standard import GroupNorm as GroupNorm
from .standard import InstanceNorm as InstanceNorm
from .standard import LayerNorm as LayerNorm
from .standard import PositionalNorm as PositionalNorm
from .whitening import BatchWhitening as BatchWhitening
from .whitening import CholeskyBatchWhitening as CholeskyBatchWhitening
from .whitening import DecorrelatedBatchNorm as DecorrelatedBatchNorm
from .whitening import GroupWhitening as GroupWhitening
from .whitening import InstanceWhitening as InstanceWhitening
from .whitening import IterNorm as IterNorm
from .whitening import PCABatchWhitening as PCABatchWhitening
from .whitening import SwitchableWhitening as SwitchableWhitening
