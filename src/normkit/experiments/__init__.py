"""Experiments behind ``normkit compare``: datasets, models, training runs, sweeps and reports.

Modules: :mod:`~normkit.experiments.data` (local datasets), :mod:`~normkit.experiments.models`
(MLP, CNNs, ResNet with a pluggable normalization), :mod:`~normkit.experiments.runner` (one
training run and its configuration), :mod:`~normkit.experiments.sweep` (the resumable grid of
runs) and :mod:`~normkit.experiments.report` (tables, plots, Markdown and HTML reports).
Nothing here is imported by ``import normkit``; import the submodules directly::

    >>> from normkit.experiments.runner import CompareConfig
    >>> CompareConfig().methods
    ['bn', 'gn:num_groups=8', 'ln', 'none']
"""
