"""The learning-rate part of a tuned sweep's report: validation error against the lr.

``error_vs_lr.png`` has one panel per batch size: the mean validation error over seeds at every
lr of the grid (log axis), one line per method, the chosen lr ringed and the test error at it
marked with a star. The report's table gives, per method and batch size, the chosen lr and the
validation errors it was chosen from. Example::

    >>> from normkit.experiments.report_lr import lr_table
    >>> recs = [{"method": "bn", "batch_size": 8, "seed": 0, "phase": "val", "status": "ok",
    ...          "base_lr": lr, "val_error": e} for lr, e in ((0.1, 5.0), (0.3, 4.0))]
    >>> lr_table(recs)
    (['method', 'bs=8'], [['bn', '**0.3** (5.0, **4.0**)']])
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .files import method_colors, new_figure, save_figure_atomic
from .tuning import select_lrs

__all__ = ["validation_errors", "lr_table", "lr_blocks", "plot_error_vs_lr"]

Record = dict[str, Any]


def validation_errors(records: list[Record]) -> dict[tuple[str, int], dict[float, float]]:
    """``{(method, batch size): {lr: mean validation error}}`` (a run not ok counts 100 %)."""
    errs: dict[tuple[str, int], dict[float, list[float]]] = {}
    for r in records:
        if r.get("phase") == "val":
            e = r["val_error"] if r.get("status") == "ok" and r.get("val_error") is not None \
                else 100.0
            errs.setdefault((r["method"], r["batch_size"]), {}).setdefault(r["base_lr"],
                                                                           []).append(e)
    return {k: {lr: statistics.fmean(v) for lr, v in sorted(by.items())}
            for k, by in errs.items()}


def lr_table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per method, per batch size ``chosen lr (val error at each lr)``."""
    errs, chosen = validation_errors(records), select_lrs(records)
    sizes = sorted({b for _, b in errs})
    rows = []
    for method in dict.fromkeys(m for m, _ in errs):
        row = [method]
        for b in sizes:
            by, pick = errs.get((method, b), {}), chosen.get((method, b))
            vals = ", ".join(f"**{e:.1f}**" if lr == pick else f"{e:.1f}" for lr, e in by.items())
            row.append(f"**{pick:g}** ({vals})" if by else "—")
        rows.append(row)
    return ["method", *(f"bs={b}" for b in sizes)], rows


def lr_blocks(records: list[Record]) -> list[tuple[str, Any]]:
    """The report blocks of the lr section (none for an untuned sweep)."""
    if not any(r.get("phase") == "val" for r in records):
        return []
    lrs = sorted({r["base_lr"] for r in records if r.get("phase") == "val"})
    return [("h2", "Learning rate, tuned per method and batch size on the validation split"),
            ("p", f"The chosen lr (at the base batch size; bold) and the mean validation error "
                  f"(%) over seeds at each lr of the grid {', '.join(f'{lr:g}' for lr in lrs)}. "
                  "The test set is evaluated only at the chosen lr."),
            ("table", lr_table(records)), ("img", "error_vs_lr.png")]


def plot_error_vs_lr(records: list[Record], path: str | Path) -> Path:
    """Validation error against lr per batch size (see the module docstring)."""
    errs, chosen = validation_errors(records), select_lrs(records)
    tests: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r.get("phase", "test") == "test" and r.get("status") == "ok":
            tests.setdefault((r["method"], r["batch_size"]), []).append(r["test_error"])
    sizes = sorted({b for _, b in errs})
    methods = list(dict.fromkeys(m for m, _ in errs))
    colors = method_colors(methods)
    fig, axes = new_figure(len(sizes), 1, figsize=(3.2 * len(sizes) + 1.8, 3.3), sharey="row")
    for col, b in enumerate(sizes):
        ax = axes[0][col]
        for m in methods:
            by = errs.get((m, b), {})
            if not by:
                continue
            ax.plot(list(by), list(by.values()), "-o", ms=3, color=colors[m], label=m)
            pick = chosen[m, b]
            ax.plot([pick], [by[pick]], "o", ms=9, mfc="none", color=colors[m])
            if (m, b) in tests:
                ax.plot([pick], [statistics.fmean(tests[m, b])], "*", ms=10, color=colors[m])
        ax.set_xscale("log")
        ax.set(title=f"batch size {b}", xlabel="lr at the base batch size")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation error (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], ls="", marker="o", mfc="none", color="grey", ms=9),
                Line2D([], [], ls="", marker="*", color="grey", ms=10)]
    labels += ["chosen lr", "test error at it"]
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return save_figure_atomic(fig, path, dpi=100)
