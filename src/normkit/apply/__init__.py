"""Model-level applications of normalization: recalibrating, freezing and overriding the
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
=========================  ==============================================================
"""

from .convert import ConversionReport as ConversionReport
from .convert import convert as convert
from .fold import FoldReport as FoldReport
from .fold import fold as fold
from .stats import batch_statistics as batch_statistics
from .stats import freeze as freeze
from .stats import recalibrate as recalibrate
from .stats import statistics_modules as statistics_modules
from .stats import unfreeze as unfreeze

__all__ = ["convert", "ConversionReport", "fold", "FoldReport", "recalibrate", "freeze", "unfreeze", "batch_statistics", "statistics_modules"]
