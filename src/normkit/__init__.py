"""normkit — normalization techniques in deep learning, as one PyTorch library.

Every normalization is a composition of an area partition (:mod:`normkit.nap`), an operation
(:mod:`normkit.nop`) and a representation recovery (:mod:`normkit.nrr`) in
:class:`normkit.Normalization`; named methods are registered presets::

    >>> import normkit as nk
    >>> layer = nk.create("gn", 64, num_groups=8)
    >>> "bn" in nk.list_methods()
    True
"""

from . import analysis as analysis
from . import apply as apply
from . import distributed as distributed
from . import functional as functional
from . import gradient as gradient
from . import nap as nap
from . import nop as nop
from . import nrr as nrr
from . import population as population
from . import weight as weight
from .apply import batch_statistics as batch_statistics
from .apply import convert as convert
from .apply import fold as fold
from .apply import freeze as freeze
from .apply import recalibrate as recalibrate
from .apply import unfreeze as unfreeze
from .apply.norm_act import norm_act as norm_act
from .apply.recognize import NormAct as NormAct
from .distributed import sync as sync
from .errors import ConfigError as ConfigError
from .errors import DTypeError as DTypeError
from .errors import NormkitError as NormkitError
from .errors import ShapeError as ShapeError
from .errors import UnknownMethodError as UnknownMethodError
from .input_norm import InputNormalizer as InputNormalizer
from .input_norm import NotFittedError as NotFittedError
from .methods import IBN as IBN
from .methods import AdaIN as AdaIN
from .methods import AdaLIN as AdaLIN
from .methods import AttentiveNorm as AttentiveNorm
from .methods import BatchChannelNorm as BatchChannelNorm
from .methods import BatchGroupNorm as BatchGroupNorm
from .methods import BatchInstanceNorm as BatchInstanceNorm
from .methods import BatchNorm as BatchNorm
from .methods import BatchRenorm as BatchRenorm
from .methods import BatchWhitening as BatchWhitening
from .methods import CholeskyBatchWhitening as CholeskyBatchWhitening
from .methods import ConditionalBatchNorm as ConditionalBatchNorm
from .methods import ConditionalInstanceNorm as ConditionalInstanceNorm
from .methods import CrossIterationBatchNorm as CrossIterationBatchNorm
from .methods import DecorrelatedBatchNorm as DecorrelatedBatchNorm
from .methods import DivisiveNorm as DivisiveNorm
from .methods import DynamicLayerNorm as DynamicLayerNorm
from .methods import EvalNorm as EvalNorm
from .methods import EvoNormB0 as EvoNormB0
from .methods import EvoNormS0 as EvoNormS0
from .methods import FilterResponseNorm as FilterResponseNorm
from .methods import GhostBatchNorm as GhostBatchNorm
from .methods import GroupNorm as GroupNorm
from .methods import GroupWhitening as GroupWhitening
from .methods import InstanceEnhancedBatchNorm as InstanceEnhancedBatchNorm
from .methods import InstanceLevelMetaNorm as InstanceLevelMetaNorm
from .methods import InstanceNorm as InstanceNorm
from .methods import InstanceWhitening as InstanceWhitening
from .methods import IterNorm as IterNorm
from .methods import KalmanNorm as KalmanNorm
from .methods import L1BatchNorm as L1BatchNorm
from .methods import LayerNorm as LayerNorm
from .methods import LocalContextNorm as LocalContextNorm
from .methods import LocalResponseNorm as LocalResponseNorm
from .methods import MeanOnlyBatchNorm as MeanOnlyBatchNorm
from .methods import MixtureNorm as MixtureNorm
from .methods import ModeNorm as ModeNorm
from .methods import MomentumBatchNorm as MomentumBatchNorm
from .methods import MovingAverageBatchNorm as MovingAverageBatchNorm
from .methods import OnlineNorm as OnlineNorm
from .methods import PCABatchWhitening as PCABatchWhitening
from .methods import PositionalNorm as PositionalNorm
from .methods import PowerNorm as PowerNorm
from .methods import RangeBatchNorm as RangeBatchNorm
from .methods import RMSNorm as RMSNorm
from .methods import ScaleNorm as ScaleNorm
from .methods import SPADENorm as SPADENorm
from .methods import SwitchableNorm as SwitchableNorm
from .methods import SwitchableWhitening as SwitchableWhitening
from .methods import TaskNorm as TaskNorm
from .normalization import Normalization as Normalization
from .registry import create as create
from .registry import get as get
from .registry import info as info
from .registry import list_families as list_families
from .registry import list_methods as list_methods
from .registry import parse_spec as parse_spec
from .registry import partial as partial

__version__ = "0.1.0"
