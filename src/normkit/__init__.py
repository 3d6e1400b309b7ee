"""normkit — normalization techniques in deep learning, as one PyTorch library.

Every normalization is a composition of an area partition (:mod:`normkit.nap`), an operation
(:mod:`normkit.nop`) and a representation recovery (:mod:`normkit.nrr`) in
:class:`normkit.Normalization`; named methods are registered presets::

    >>> import normkit as nk
    >>> layer = nk.create("gn", 64, num_groups=8)
    >>> "bn" in nk.list_methods()
    True
"""

from . import _deprecated  # noqa: E402,F401  (installs the deprecated aliases)
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
from ._pipeline import normalize as normalize
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
from .methods import *  # noqa: F403  (every preset class: normkit.methods.__all__)
from .normalization import Normalization as Normalization
from .registry import create as create
from .registry import get as get
from .registry import info as info
from .registry import list_families as list_families
from .registry import list_methods as list_methods
from .registry import parse_spec as parse_spec
from .registry import partial as partial

__version__ = "0.1.0"
