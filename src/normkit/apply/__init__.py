"""Model-level applications of normalization (book ch. 8): recalibrating, freezing, converting,
folding, domain adaptation, style transfer and slimming; recalibrating, freezing and overriding the
statistics of every normalization module of a model.

=========================  ==============================================================
function                   what
=========================  ==============================================================
``recalibrate(model, b)``  precise BN: recompute running statistics exactly over batches
``freeze(model)``          evaluation statistics and frozen ``γ, β``, surviving ``.train()``
``unfreeze(model)``        undo :func:`freeze`
``batch_statistics(m)``    context: predict with batch statistics, running ones untouched
``statistics_modules(m)``  the modules these act on
``convert(model, to=...)`` replace every normalization layer with a registry method (a report)
``fold(model)``            fold eval-mode BN / whitening into the Linear/Conv before it
``recognize(layer)``       what a norm computes (BN, GN, LN/RMS over which axis, act after)
``NormAct``                a norm followed by the activation/dropout of a norm+act layer
``adabn(model, target)``   domain adaptation: statistics re-estimated on the target domain
``DomainSpecificNorm``     one normalization per domain, shared weights (``use_domain``)
``TransNorm``              transferable normalization: domain-weighted channels (DA)
``prediction_time_bn``     context: test batches normalized by their own statistics
``Tent`` / ``tent_adapt``  test-time entropy minimisation over the norm layers' γ, β
``adain``, ``wct``         style transfer: AdaIN and whitening–coloring of features
``gamma_l1``, ``slim``     network slimming: L1 on γ, then prune channels with small |γ|
``sync(model)``            synchronize batch statistics over a process group (``nk.sync``)
=========================  ==============================================================
"""

from .adapt import DomainSpecificNorm as DomainSpecificNorm
from .adapt import Tent as Tent
from .adapt import TransNorm as TransNorm
from .adapt import adabn as adabn
from .adapt import domain_specific as domain_specific
from .adapt import prediction_time_bn as prediction_time_bn
from .adapt import softmax_entropy as softmax_entropy
from .adapt import tent_adapt as tent_adapt
from .adapt import tent_parameters as tent_parameters
from .adapt import use_domain as use_domain
from .convert import ConversionReport as ConversionReport
from .convert import ConvertedLayer as ConvertedLayer
from .convert import convert as convert
from .fold import FoldReport as FoldReport
from .fold import fold as fold
from .recognize import NormAct as NormAct
from .recognize import Recognition as Recognition
from .recognize import looks_like_norm as looks_like_norm
from .recognize import recognize as recognize
from .slim import SlimmedLayer as SlimmedLayer
from .slim import SlimReport as SlimReport
from .slim import add_gamma_l1 as add_gamma_l1
from .slim import gamma_l1 as gamma_l1
from .slim import is_slimmable as is_slimmable
from .slim import slim as slim
from .stats import batch_statistics as batch_statistics
from .stats import freeze as freeze
from .stats import recalibrate as recalibrate
from .stats import statistics_modules as statistics_modules
from .stats import unfreeze as unfreeze
from .style import adain as adain
from .style import feature_moments as feature_moments
from .style import wct as wct
from .sync import sync as sync

__all__ = [
    "convert", "ConversionReport", "ConvertedLayer", "fold", "FoldReport",
    "recognize", "Recognition", "looks_like_norm", "NormAct", "recalibrate", "freeze", "unfreeze",
    "batch_statistics", "statistics_modules",
    "adabn", "DomainSpecificNorm", "TransNorm", "domain_specific", "use_domain",
    "prediction_time_bn", "softmax_entropy", "tent_parameters", "Tent", "tent_adapt",
    "adain", "wct", "feature_moments",
    "gamma_l1", "add_gamma_l1", "slim", "SlimReport", "SlimmedLayer", "is_slimmable", "sync",
]
