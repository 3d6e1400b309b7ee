"""``normkit.experiments.compare``: the ``normkit compare`` command as a Python function.

Example (a model and a dataset of your own, defined at the top level of a module or script;
``records`` are the run records, the report is in ``out``)::

    import torch
    from torch import nn
    from normkit.experiments import compare

    def net(norm_layer, input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 64), norm_layer(64),
                             nn.ReLU(), nn.Linear(64, num_classes))

    def data():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(600, 20, generator=g), torch.randint(0, 3, (600,), generator=g)
        x[torch.arange(600), y] += 2.0
        return x[:500], y[:500], x[500:], y[500:]

    if __name__ == "__main__":
        records = compare(model=net, dataset=data, methods=["bn", "ln", "none"],
                          batch_sizes=[8, 32], epochs=2, out="runs/mine")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backends import check_backend
from .report import write_report
from .runner import CompareConfig
from .sweep import default_jobs, prepare, run_sweep
from .user import spec_of

__all__ = ["compare"]


def compare(*, model: str | Callable[..., Any] = "cnn1d",
            dataset: str | Callable[..., Any] = "mnist1d", out: str | Path = "runs/compare",
            jobs: int | None = None, backend: str = "local", address: str | None = None,
            report: bool = True, show_progress: bool = False,
            **settings: Any) -> list[dict[str, Any]]:
    """Run a comparison sweep (resumable in ``out``), write its report, return the records.

    Args:
        model: a built-in model name, a ``module:function`` spec, or a module-level function
            ``f(norm_layer=, input_shape=, num_classes=) -> nn.Module`` (with ``convert=True``:
            ``f(input_shape=, num_classes=)`` building a stock model whose norms are converted).
        dataset: a built-in dataset name, a spec, or a module-level function returning
            ``(x_train, y_train, x_test, y_test)`` or ``(train, test)`` Datasets.
        out: the run directory.
        jobs: local worker processes (default: the CPU cores, at most 8; call from under
            ``if __name__ == "__main__":`` when > 1).
        backend: ``"local"`` or ``"ray"``; ``address``: the Ray cluster.
        report: write ``report.md``/``report.html``, the CSV and the plots into ``out``.
        show_progress: show the progress bar on stderr.
        **settings: any field of :class:`~normkit.experiments.runner.CompareConfig`
            (``methods``, ``batch_sizes``, ``seeds``, ``epochs``, ``lrs`` or ``lr=..., lrs=None``,
            ``convert``, ...).

    Returns:
        The run records (validation runs first when tuning, then the test runs), as in
        ``results.jsonl``; :func:`normkit.experiments.stats.recommend` ranks them.

    Raises:
        ConfigError: for a bad setting, before any training.
    """
    cfg = CompareConfig(model=spec_of(model) if callable(model) else model,
                        dataset=spec_of(dataset) if callable(dataset) else dataset, **settings)
    check_backend(backend, address, cfg.device)
    prepared = prepare(cfg, out)
    records = run_sweep(cfg, out, jobs=jobs or default_jobs(), show_progress=show_progress,
                        prepared=prepared, backend=backend, address=address)
    if report:
        write_report(records, prepared[1].dir, {"dataset": cfg.dataset, "model": cfg.model,
                                                **cfg.settings()})
    return records
