"""Experiments behind ``normkit compare``: datasets, models, training runs, sweeps and reports.

:func:`compare` runs the command from Python (:mod:`~normkit.experiments.api`).

Modules: :mod:`~normkit.experiments.data` (local datasets), :mod:`~normkit.experiments.models`
(MLP, CNNs, ResNet with a pluggable normalization), :mod:`~normkit.experiments.user` (your own
model and data as ``module:function``), :mod:`~normkit.experiments.runner` (one training run and
its configuration), :mod:`~normkit.experiments.tuning` (the validation split and the lr choice),
:mod:`~normkit.experiments.sweep` (the resumable grid of runs),
:mod:`~normkit.experiments.backends` (local processes or Ray),
:mod:`~normkit.experiments.stats` (intervals, paired tests, the recommendation) and
:mod:`~normkit.experiments.report` (tables, plots, Markdown and HTML reports).
Nothing here is imported by ``import normkit``. Example::

    >>> from normkit.experiments.runner import CompareConfig
    >>> CompareConfig().methods
    ['bn', 'gn:num_groups=8', 'ln', 'none']
"""

from .api import compare as compare

__all__ = ["compare"]
