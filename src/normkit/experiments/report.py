"""Tables, plots and reports of a comparison sweep.

From the run records of :func:`normkit.experiments.sweep.run_sweep` this writes, in the run
directory: ``results.csv`` (one row per run), ``error_vs_batch_size.png`` (test error against
batch size on a log2 axis, mean and 95 % t interval over seeds), ``training_curves.png`` (train
loss and test error per epoch), for a tuned sweep ``error_vs_lr.png`` (validation error against
the lr, :mod:`normkit.experiments.report_lr`), and ``report.md`` / ``report.html`` embedding them
with the recommendation (:mod:`normkit.experiments.stats`; the HTML is self-contained: images are
base64 data URIs). Every file is written atomically (:mod:`normkit.experiments.files`). Tables
and plots show the test-phase runs; a tuned sweep's validation runs appear in the lr section. :func:`results_table` gives the same summary as a rich table. Runs
of ``compare --shift`` add a table (method × shift × adaptation: :func:`summarize_shift`,
:func:`shift_table`) and ``shift.png`` (:func:`plot_shift`).
Example::

    >>> from normkit.experiments.report import summarize
    >>> rows = summarize([{"method": "bn", "batch_size": 2, "seed": 0, "status": "ok",
    ...                    "test_error": 10.0, "time_per_step_ms": 1.0}])
    >>> rows[0]["error_mean"], rows[0]["ok"], rows[0]["error_ci"]
    (10.0, 1, None)
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from .files import method_colors, new_figure, save_figure_atomic, write_text_atomic
from .stats import interval, recommend, recommendation_lines

__all__ = ["headline", "summarize", "results_table", "write_csv", "plot_error_vs_batch_size",
           "plot_training_curves", "write_report", "summarize_shift", "shift_table", "plot_shift"]

Record = dict[str, Any]
_CSV_FIELDS = ["method", "batch_size", "seed", "status", "test_error", "test_acc", "test_loss",
               "test_error_batch_stats", "lr", "epochs", "steps", "time_per_step_ms", "wall_s",
               "num_params", "error", "config_hash", "phase", "base_lr", "val_error"]


def headline(records: Iterable[Record]) -> list[Record]:
    """The test-phase records (all of an untuned sweep; a tuned one's runs at the chosen lr)."""
    return [r for r in records if r.get("phase", "test") == "test"]



def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One row per (method, batch size) of the test-phase runs: mean, std and 95 % t interval
    over the seeds that finished.

    Returns:
        Rows in first-seen method order, then by batch size, with ``method``, ``batch_size``,
        ``ok`` (finished runs), ``runs``, ``error_mean``/``error_std`` (test error, percent),
        ``error_ci`` (half-width of the 95 % t interval; ``None`` for one seed), ``lr`` (the
        base lr of a tuned sweep's runs),
        ``bstats_mean``/``bstats_std`` (with batch statistics, when measured),
        ``ms_per_step`` and ``problems`` (``status: error`` of each run that did not finish).
    """
    groups: dict[tuple[str, int], list[Record]] = {}
    for r in headline(records):
        groups.setdefault((r["method"], r["batch_size"]), []).append(r)
    order = list(dict.fromkeys(m for m, _ in groups))
    rows = []
    for (method, bs), runs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]),
                                                                      kv[0][1])):
        ok = [r for r in runs if r["status"] == "ok"]
        err_mean, err_std = _mean_std([r["test_error"] for r in ok])
        _, low, high = interval([r["test_error"] for r in ok]) if ok else (None, None, None)
        bs_mean, bs_std = _mean_std([r["test_error_batch_stats"] for r in ok
                                     if r.get("test_error_batch_stats") is not None])
        ms, _ = _mean_std([r["time_per_step_ms"] for r in ok])
        rows.append({
            "method": method, "batch_size": bs, "ok": len(ok), "runs": len(runs),
            "error_mean": err_mean, "error_std": err_std,
            "error_ci": None if high is None else (high - low) / 2,
            "lr": runs[0].get("base_lr"), "bstats_mean": bs_mean,
            "bstats_std": bs_std, "ms_per_step": ms,
            "problems": [f"seed {r['seed']} {r['status']}: {r.get('error')}"
                         for r in runs if r["status"] != "ok"],
        })
    return rows


def _cell(row: dict[str, Any], key: str = "error") -> str:
    """``"12.3 ± 0.4"`` (± the 95 % t interval's half-width for the test error, the std for
    batch statistics; one seed: ``"12.3"``), with ``(k/n)`` when only k of n seeds finished,
    ``"failed"`` if none did."""
    mean, std = row[f"{key}_mean"], row.get(f"{key}_ci") or row[f"{key}_std"]
    if mean is None:
        return "—" if key == "bstats" and row["ok"] else "failed"
    text = f"{mean:.1f} ± {std:.1f}" if row["ok"] > 1 else f"{mean:.1f}"
    return text if row["ok"] == row["runs"] else f"{text} ({row['ok']}/{row['runs']})"


def _grid(rows: list[dict[str, Any]], key: str = "error") -> tuple[list[int], list[list[str]]]:
    """Method × batch size matrix of cells, plus a ms/step column, for tables."""
    sizes = sorted({r["batch_size"] for r in rows})
    by = {(r["method"], r["batch_size"]): r for r in rows}
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [_cell(by[method, b], key) if (method, b) in by else "" for b in sizes]
        times = [by[method, b]["ms_per_step"] for b in sizes
                 if (method, b) in by and by[method, b]["ms_per_step"] is not None]
        lines.append([method, *cells, f"{statistics.fmean(times):.2f}" if times else "—"])
    return sizes, lines


def results_table(records: Iterable[Record], title: str = "test error (%)") -> Table:
    """Rich table: a row per method, a column per batch size, cells "mean ± 95 % interval"
    test error (the test-phase runs)."""
    rows = summarize(records)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    sizes, lines = _grid(rows)
    width = max(len(line[0]) for line in lines) + (len(" (batch stats)") if any(
        r["bstats_mean"] is not None for r in rows) else 0)
    table.add_column("method", min_width=width, no_wrap=True)
    for header in [*(f"bs={b}" for b in sizes), "ms/step"]:
        table.add_column(header, justify="right", no_wrap=True)
    for line in lines:
        table.add_row(*line)
    if any(r["bstats_mean"] is not None for r in rows):
        for line in _grid(rows, "bstats")[1]:
            table.add_row(f"{line[0]} (batch stats)", *line[1:-1], "", style="dim")
    return table


def write_csv(records: Iterable[Record], path: str | Path) -> Path:
    """One CSV row per run with the scalar fields (no per-epoch history), written atomically."""
    path = Path(path)
    records = list(records)
    extra = list(dict.fromkeys(f"shift_{s}_{a}_error" for r in records
                               for s, row in (r.get("shift") or {}).items() for a in row))
    with io.StringIO(newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS + extra, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(({**r, **{f"shift_{s}_{a}_error": None if v is None else _pct(v)
                                   for s, row in (r.get("shift") or {}).items()
                                   for a, v in row.items()}} for r in records) if extra
                         else records)
        return write_text_atomic(path, f.getvalue())


def plot_error_vs_batch_size(records: list[Record], path: str | Path) -> Path:
    """Test error against batch size (log2 axis), one line per method, mean and 95 % t interval
    over seeds (test-phase runs).

    Dashed lines show the error with batch statistics when it was measured.
    """
    rows = summarize(records)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = method_colors(methods)
    fig, axes = new_figure(figsize=(7.5, 4))
    ax = axes[0][0]
    for method in methods:
        for key, style, suffix in (("error", "-o", ""), ("bstats", "--x", " (batch stats)")):
            pts = [r for r in rows if r["method"] == method and r[f"{key}_mean"] is not None]
            if pts:
                ax.errorbar([r["batch_size"] for r in pts], [r[f"{key}_mean"] for r in pts],
                            yerr=[r.get(f"{key}_ci") or r[f"{key}_std"] for r in pts],
                            fmt=style, capsize=3,
                            color=colors[method], label=method + suffix)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set(xlabel="batch size", ylabel="test error (%)", title="test error vs batch size")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    return save_figure_atomic(fig, path, dpi=110)


def plot_training_curves(records: list[Record], path: str | Path) -> Path:
    """Per batch size (columns): train loss (top) and test error (bottom) per epoch, mean over
    seeds, one line per method (test-phase runs)."""
    from matplotlib.ticker import MaxNLocator

    records = headline(records)
    sizes = sorted({r["batch_size"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = method_colors(methods)
    fig, axes = new_figure(len(sizes), 2, sharey="row")
    most = 1
    for col, bs in enumerate(sizes):
        for method in methods:
            runs = [r["history"] for r in records
                    if r["method"] == method and r["batch_size"] == bs and r.get("history")]
            for row, (key, scale) in enumerate((("train_loss", 1.0), ("test_acc", -100.0))):
                epochs = max((len(h) for h in runs), default=0)
                most = max(most, epochs)
                means = [statistics.fmean(h[e][key] for h in runs if len(h) > e)
                         for e in range(epochs)]
                ys = [100 + m * scale if scale < 0 else m for m in means]
                ys = [y if math.isfinite(y) else float("nan") for y in ys]
                axes[row][col].plot(range(1, epochs + 1), ys, "-o", ms=3, color=colors[method],
                                    label=method)
        axes[0][col].set_title(f"batch size {bs}")
        axes[1][col].set_xlabel("epoch")
        for row in (0, 1):
            axes[row][col].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[row][col].grid(alpha=0.3)
    for ax in (a for line in axes for a in line):  # one epoch: a point at 1, not a 0.95–1.05 axis
        ax.set_xlim(0.5, most + 0.5)
        if most <= 10:
            ax.set_xticks(range(1, most + 1))
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("test error (%)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper",
               fontsize="small")
    return save_figure_atomic(fig, path, dpi=90)


def _blocks(records: list[Record], meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's content as (kind, value) blocks, rendered to Markdown and to HTML."""
    from .report_lr import lr_blocks

    rows = summarize(records)
    sizes, lines = _grid(rows)
    header = ["method", *(f"bs={b}" for b in sizes), "ms/step"]
    tuned = any(r.get("phase") == "val" for r in records)
    blocks: list[tuple[str, Any]] = [
        ("h1", f"normkit compare: {meta.get('dataset', '')} / {meta.get('model', '')}"),
        ("p", meta.get("summary", "")),
        ("h2", "Recommendation"), ("ul", recommendation_lines(recommend(records))),
        ("h2", "Test error (%), mean ± 95 % t interval over seeds (eval-mode statistics"
               + (", each method at its tuned lr)" if tuned else ")")),
        ("table", (header, lines)),
    ]
    if any(r["bstats_mean"] is not None for r in rows):
        blocks += [("h2", "Test error (%) with batch statistics (train mode, run's batch size)"),
                   ("table", (header[:-1], [line[:-1] for line in _grid(rows, "bstats")[1]]))]
    blocks += [("h2", "Test error vs batch size"), ("img", "error_vs_batch_size.png"),
               *lr_blocks(records), ("h2", "Training curves"), ("img", "training_curves.png")]
    shift = _shift_lines(records)
    if shift:
        blocks += [("h2", "Test error (%) under covariate shift, mean ± std over seeds"),
                   ("p", _SHIFT_NOTE), ("table", shift), ("img", "shift.png")]
    analysis = _analysis_lines(records, sizes)
    if analysis:
        blocks += [("h2", "Output layer at the end of training (--analyze): κ₀.₅ of its input "
                          "second moment / λ_max, mean over seeds"),
                   ("table", (header[:-1], analysis))]
    problems = [f"{r['method']} bs={r['batch_size']} {p}" for r in rows for p in r["problems"]]
    if problems:
        blocks += [("h2", "Runs that did not finish"), ("ul", problems)]
    blocks += [("h2", "Configuration"), ("ul", [f"{k}: {v}" for k, v in meta.items()
                                                 if k != "summary"])]
    return blocks


def _analysis_lines(records: list[Record], sizes: list[int]) -> list[list[str]]:
    """Method × batch size cells ``"κ / λ_max"`` of the last epoch's ``analysis`` (``—`` where a
    value is missing or infinite); empty when no run was analyzed."""
    cells: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in records:
        last = (r.get("history") or [{}])[-1].get("analysis") if r["status"] == "ok" else None
        if last and last.get("x_kappa_0.5") is not None and last.get("x_lambda_max") is not None:
            cells.setdefault((r["method"], r["batch_size"]), []).append(
                (last["x_kappa_0.5"], last["x_lambda_max"]))
    if not cells:
        return []
    lines = []
    for method in dict.fromkeys(r["method"] for r in records):
        row = [method]
        for b in sizes:
            vals = cells.get((method, b))
            row.append(f"{statistics.fmean(k for k, _ in vals):.3g} / "
                       f"{statistics.fmean(v for _, v in vals):.3g}" if vals else "—")
        lines.append(row)
    return lines


def _markdown(blocks: list[tuple[str, Any]]) -> str:
    out = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {value}")
        elif kind == "p":
            out.append(value)
        elif kind == "table":
            head, lines = value
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(line) + " |" for line in lines]
        elif kind == "img":
            out.append(f"![{value}]({value})")
        elif kind == "ul":
            out += [f"- {item}" for item in value]
        out.append("")
    return "\n".join(out)


def _bold(text: str) -> str:
    """Markdown ``**bold**`` of a list item as HTML."""
    import re

    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def _html(blocks: list[tuple[str, Any]], out_dir: Path) -> str:
    esc = html.escape
    body = []
    for kind, value in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{esc(str(value))}</{kind}>")
        elif kind == "table":
            head, lines = value
            body.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>"
                                  for line in lines) + "</table>")
        elif kind == "img":
            data = base64.b64encode((out_dir / value).read_bytes()).decode()
            body.append(f'<img alt="{esc(value)}" src="data:image/png;base64,{data}">')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_bold(esc(str(i)))}</li>" for i in value)
                        + "</ul>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:right}td:first-child{text-align:left}img{max-width:100%}")
    title = esc(str(blocks[0][1]))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(records: list[Record], out_dir: str | Path,
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.csv``, both plots, ``report.md`` and a self-contained ``report.html``.

    Args:
        records: run records (see :func:`normkit.experiments.runner.train_run`).
        out_dir: the run directory.
        meta: configuration shown in the report; ``dataset``, ``model`` and ``summary`` (one
            sentence under the title) are used in the header.

    Returns:
        The written paths by name (``csv``, ``error_plot``, ``curves_plot``, ``markdown``,
        ``html``; ``lr_plot`` for a tuned sweep, ``shift_plot`` for runs with ``shift``).
    """
    from .report_lr import plot_error_vs_lr

    out = Path(out_dir)
    paths = {"csv": write_csv(records, out / "results.csv"),
             "error_plot": plot_error_vs_batch_size(records, out / "error_vs_batch_size.png"),
             "curves_plot": plot_training_curves(records, out / "training_curves.png")}
    if any(r.get("phase") == "val" for r in records):
        paths["lr_plot"] = plot_error_vs_lr(records, out / "error_vs_lr.png")
    if summarize_shift(records):
        paths["shift_plot"] = plot_shift(records, out / "shift.png")
    blocks = _blocks(records, meta)
    write_text_atomic(out / "report.md", _markdown(blocks))
    write_text_atomic(out / "report.html", _html(blocks, out))
    return paths | {"markdown": out / "report.md", "html": out / "report.html"}


# ------------------------------------------------------------------------------ covariate shift
_ADAPT_NAMES = {"as_is": "as is", "adabn": "AdaBN", "ptbn": "PTBN", "tent": "TENT"}
_SHIFT_NOTE = ("Each trained model on each shifted test set: as is (training statistics), with "
               "AdaBN (statistics re-estimated on the shifted test inputs), with prediction-time "
               "BN (PTBN: each test batch's own statistics) and with TENT (γ, β adapted online by "
               "entropy minimisation, one SGD step per test batch); — where the adaptation does "
               "not apply (no batch-statistics layer, or no normalization γ, β). "
               "See normkit.experiments.shift for the shifts and their severities.")


def _pct(accuracy: float) -> float:
    return round(100 * (1 - accuracy), 6)


def summarize_shift(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One row per (method, batch size, shift) of the runs with a ``shift`` result: test error
    (percent) mean ± std over seeds, clean and for each adaptation.

    Returns:
        Rows with ``method``, ``batch_size``, ``shift``, ``ok`` (seeds) and
        ``<key>_mean``/``<key>_std`` for ``clean``, ``as_is``, ``adabn``, ``ptbn``, ``tent``
        (``None`` where not measured).

    Example:
        >>> rec = {"method": "bn", "batch_size": 8, "seed": 0, "status": "ok", "test_acc": 0.9,
        ...        "shift": {"noise": {"as_is": 0.5, "adabn": 0.8, "ptbn": 0.7, "tent": None}}}
        >>> row = summarize_shift([rec])[0]
        >>> row["shift"], round(row["adabn_mean"], 6), row["tent_mean"]
        ('noise', 20.0, None)
    """
    groups: dict[tuple[str, int, str], list[Record]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("shift"):
            for name in r["shift"]:
                groups.setdefault((r["method"], r["batch_size"], name), []).append(r)
    rows = []
    for (method, bs, name), runs in groups.items():
        row: dict[str, Any] = {"method": method, "batch_size": bs, "shift": name, "ok": len(runs)}
        for key in ("clean", *_ADAPT_NAMES):
            accs = [r["test_acc"] if key == "clean" else r["shift"][name].get(key) for r in runs]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([_pct(a) for a in accs
                                                               if a is not None])
        rows.append(row)
    return rows


def _shift_lines(records: list[Record]) -> tuple[list[str], list[list[str]]] | None:
    rows = summarize_shift(records)
    if not rows:
        return None
    several = len({r["batch_size"] for r in rows}) > 1

    def cell(row: dict[str, Any], key: str) -> str:
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        if mean is None:
            return "—"
        return f"{mean:.1f} ± {std:.1f}" if row["ok"] > 1 else f"{mean:.1f}"

    head = ["method", *(["bs"] if several else []), "shift", "clean",
            *_ADAPT_NAMES.values()]
    lines = [[r["method"], *([str(r["batch_size"])] if several else []), r["shift"],
              *(cell(r, k) for k in ("clean", *_ADAPT_NAMES))] for r in rows]
    return head, lines


def shift_table(records: Iterable[Record], title: str = "test error (%) under shift") -> Table:
    """Rich table of :func:`summarize_shift`: a row per (method[, batch size], shift), a column
    per adaptation."""
    head, lines = _shift_lines(list(records)) or (["method", "shift"], [])
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < head.index("shift") + 1 else "right",
                         no_wrap=True)
    for line in lines:
        table.add_row(*line)
    return table


def plot_shift(records: list[Record], path: str | Path) -> Path:
    """One panel per shift: grouped bars of test error (clean, as is, AdaBN, PTBN, TENT) per
    method (and batch size), mean over seeds with the std as error bars."""
    rows = summarize_shift(records)
    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    several = len({r["batch_size"] for r in rows}) > 1
    keys = ("clean", *_ADAPT_NAMES)
    colors = method_colors(list(keys))
    fig, axes = new_figure(len(shifts), 1, figsize=(3.2 * len(shifts) + 1.6, 3.4), sharey="row")
    width = 0.8 / len(keys)
    for col, name in enumerate(shifts):
        ax = axes[0][col]
        these = [r for r in rows if r["shift"] == name]
        for k, key in enumerate(keys):
            xs = [i + (k - (len(keys) - 1) / 2) * width for i, r in enumerate(these)
                  if r[f"{key}_mean"] is not None]
            ys = [r[f"{key}_mean"] for r in these if r[f"{key}_mean"] is not None]
            es = [r[f"{key}_std"] for r in these if r[f"{key}_mean"] is not None]
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors[key],
                   label=_ADAPT_NAMES.get(key, key) if col == 0 else None)
        ax.set_xticks(range(len(these)), [r["method"] + (f" bs={r['batch_size']}" if several
                                                         else "") for r in these],
                      rotation=30, ha="right", fontsize="small")
        ax.set_title(f"shift: {name}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("test error (%)")
    fig.legend(loc="outside right upper", fontsize="small")
    return save_figure_atomic(fig, path, dpi=100)
