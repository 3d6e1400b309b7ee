"""``normkit analyze``: command-line front end of the analysis tools (book ch. 9).

``main`` takes the arguments after the word ``analyze``::

    normkit analyze snd --methods bn,dbn,pca_bw,cd_bw,iternorm --dim 16 --batch-sizes 32,64,128,256

``snd`` measures the stochastic normalization disturbance (:func:`~normkit.analysis.stochasticity.
snd_stats`) and the whitening error (:func:`~normkit.analysis.stochasticity.whitening_error`) of
each method at each batch size on :func:`~normkit.analysis.stochasticity.gaussian_data`, prints a
table, and writes ``snd.json`` and ``snd.png`` (SND vs batch size, log-log) into ``--out``.
``inputs`` (book ch. 2) prints, for a linear model on digits with raw / centred / standardized /
whitened inputs, the Hessian's condition number and the GD steps to the target loss
(:func:`~normkit.analysis.inputs.input_conditioning`) and writes ``inputs.json`` and
``inputs.png`` (loss vs GD steps). ``conditioning --run DIR`` plots the output layer's conditioning over the epochs of a
``normkit compare --analyze`` run (``conditioning.png`` in the run folder).

A method may be a spec string with keyword arguments, e.g. ``iternorm:iterations=1``; inside
``--methods`` further ``key=value`` items attach to the preceding method
(``--methods "iternorm:iterations=1,eps=1e-3,dbn"`` is two methods).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import NormkitError
from ..registry import info, parse_spec
from .stochasticity import gaussian_data, snd_stats, whitening_error

__all__ = ["main"]

_DEFAULT_METHODS = "bn,dbn,pca_bw,cd_bw,iternorm"


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _split_methods(text: str) -> list[str]:
    """Split on commas; an item ``key=value`` without ``:`` continues the previous spec."""
    specs: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and specs:
            specs[-1] += ("," if ":" in specs[-1] else ":") + item
        else:
            specs.append(item)
    return specs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normkit analyze", description="Analysis tools for normalization methods (ch. 9)."
    )
    sub = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    p = sub.add_parser(
        "snd",
        help="stochastic normalization disturbance and whitening error vs batch size",
        description=(
            "Stochastic normalization disturbance (SND; Huang et al., CVPR 2019/2020) and "
            "whitening error ||Cov(x_hat) - I||_F of each method at each batch size, on Gaussian "
            "data with a random covariance of condition number 100."
        ),
    )
    p.add_argument("--methods", default=_DEFAULT_METHODS,
                   help=f"comma-separated registry names or specs (default {_DEFAULT_METHODS})")
    p.add_argument("--dim", type=_positive_int, default=16, help="data dimension d (default 16)")
    p.add_argument("--batch-sizes", type=_positive_ints, default=[32, 64, 128, 256],
                   help="comma-separated batch sizes m (default 32,64,128,256)")
    p.add_argument("--group-size", type=_positive_int, default=None,
                   help="whitening group size for methods that take one (default: --dim)")
    p.add_argument("--iterations", type=_positive_int, default=5,
                   help="IterNorm iterations T for methods that take them (default 5)")
    p.add_argument("--samples", type=_positive_int, default=50,
                   help="samples x_i per estimate (default 50)")
    p.add_argument("--batches", type=_positive_int, default=20,
                   help="random batches per sample (default 20)")
    p.add_argument("--data-size", type=_positive_int, default=4096,
                   help="rows of the synthetic data set (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("runs/analyze-snd"),
                   help="output folder (default runs/analyze-snd)")
    p.add_argument("--plain", action="store_true", help="plain-text table even on a terminal")
    c = sub.add_parser(
        "conditioning",
        help="the output layer's conditioning over training, from a 'compare --analyze' run",
        description=(
            "Read the results of a 'normkit compare --analyze' run and plot, per batch size, the "
            "generalized condition number κ₀.₅ of the output layer's input second moment against "
            "the epoch, one line per method (layer-wise conditioning, Huang et al., ECCV 2020); "
            "writes conditioning.png into the run folder and prints the last epoch's values."
        ),
    )
    c.add_argument("--run", type=Path, required=True,
                   help="the compare run folder (holding results.jsonl)")
    c.add_argument("--plain", action="store_true", help="plain-text table even on a terminal")
    i = sub.add_parser(
        "inputs",
        help="Hessian condition number and GD steps of a linear model per input preprocessing",
        description=(
            "Chapter 2: a linear least-squares (or logistic) model on a real data set with raw, "
            "centred, standardized and whitened inputs; prints the Hessian's condition number and "
            "the full-batch GD steps (optimal constant step) to the target loss, and writes "
            "inputs.json and inputs.png (loss vs GD steps, log scale) into --out."
        ),
    )
    i.add_argument("--dataset", default="digits", help="data set name (default digits)")
    i.add_argument("--data-dir", default=None, help="folder of IDX files (fashion-mnist, mnist)")
    i.add_argument("--subset", type=_positive_int, default=None,
                   help="use at most this many training examples (default all)")
    i.add_argument("--loss", choices=("least-squares", "logistic"), default="least-squares",
                   help="linear model's loss (default least-squares)")
    i.add_argument("--rel-tol", type=float, default=0.01,
                   help="least squares: target loss (1 + rel_tol)·L* (default 0.01)")
    i.add_argument("--target-loss", type=float, default=0.1,
                   help="logistic: target training loss (default 0.1)")
    i.add_argument("--max-steps", type=_positive_int, default=None,
                   help="GD budget (default 10^9 least squares, 5000 logistic)")
    i.add_argument("--eps", type=float, default=1e-10,
                   help="eps of the standardization and whitening (default 1e-10)")
    i.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    i.add_argument("--out", type=Path, default=Path("runs/analyze-inputs"),
                   help="output folder (default runs/analyze-inputs)")
    i.add_argument("--plain", action="store_true", help="plain-text table even on a terminal")
    return parser


def _run_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..experiments.data import load_inputs
    from .inputs import input_conditioning

    start = time.perf_counter()
    try:
        x, y = load_inputs(args.dataset, subset=args.subset, seed=args.seed,
                           data_dir=args.data_dir)
        rows = input_conditioning(x, y, loss=args.loss.replace("-", "_"), eps=args.eps,
                                  rel_tol=args.rel_tol, target_loss=args.target_loss,
                                  max_steps=args.max_steps)
    except NormkitError as e:
        parser.error(str(e))
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = [{"preprocessing": r.preprocessing, "cond": r.cond, "lambda_max": r.lambda_max,
                "lambda_min": r.lambda_min, "step_size": r.step_size, "steps": r.steps,
                "target": r.target, "final_loss": r.final_loss, "optimum_loss": r.optimum_loss}
               for r in rows]
    payload = {"tool": "inputs", "config": config, "seconds": elapsed, "results": results,
               "n": int(x.shape[0]), "torch": torch.__version__}
    (args.out / "inputs.json").write_text(json.dumps(payload, indent=2))
    _plot_inputs(rows, args.out / "inputs.png", args.dataset)
    budget = args.max_steps or (5000 if args.loss == "logistic" else 10**9)
    header = ["preprocessing", "condition number", "GD steps", "final loss"]
    body = [[r.preprocessing, f"{r.cond:.4g}",
             str(r.steps) if r.steps is not None else f"> {budget}",
             f"{r.final_loss:.6g}"] for r in rows]
    target = rows[0].target
    _table(header, body, f"{args.loss} on {args.dataset} (n = {x.shape[0]}): GD steps to loss "
                         f"<= {target:.6g}", args.plain)
    print(f"wrote {args.out / 'inputs.json'} and {args.out / 'inputs.png'} ({elapsed:.1f} s)")
    return 0


def _plot_inputs(rows: list[Any], path: Path, dataset: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        steps, loss = r.curve_steps.double() + 1, r.curve_loss  # step t plotted at t + 1 (log x)
        ax.plot(steps.tolist(), loss.tolist(), label=f"{r.preprocessing} (κ = {r.cond:.3g})")
    ax.axhline(rows[0].target, color="k", ls=":", lw=1, label="target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GD steps + 1")
    ax.set_ylabel(f"training loss ({rows[0].loss.replace('_', ' ')})")
    ax.set_title(f"Linear model on {dataset}: input preprocessing")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _table(header: list[str], body: list[list[str]], caption: str, plain: bool) -> None:
    if not plain and sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=caption)
        for h in header:
            table.add_column(h, justify="left" if h == header[0] else "right")
        for line in body:
            table.add_row(*line)
        Console().print(table)
        return
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    print(caption)
    for line in [header, *body]:
        print("  ".join(s.ljust(w) if i == 0 else s.rjust(w)
                        for i, (s, w) in enumerate(zip(line, widths, strict=True))))


def _run_conditioning(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path = args.run / "results.jsonl"
    if not path.is_file():
        parser.error(f"no results.jsonl in {args.run}; run 'normkit compare --analyze' first")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curves: dict[tuple[str, int], list[list[float]]] = {}
    for r in records:
        ks = [h["analysis"].get("x_kappa_0.5") for h in r.get("history", []) if "analysis" in h]
        if r.get("status") == "ok" and ks and all(k is not None for k in ks):
            curves.setdefault((r["method"], r["batch_size"]), []).append(ks)
    if not curves:
        parser.error(f"the runs in {args.run} have no conditioning records; rerun 'normkit "
                     f"compare' with --analyze")
    methods = list(dict.fromkeys(m for m, _ in curves))
    sizes = sorted({b for _, b in curves})
    mean = {key: [sum(v) / len(v) for v in zip(*runs, strict=False)] for key, runs in curves.items()}
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(sizes), 3.5))
    FigureCanvasAgg(fig)
    for i, b in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        for m in methods:
            if (m, b) in mean:
                ax.plot(range(1, len(mean[m, b]) + 1), mean[m, b], marker="o", label=m)
        ax.set_yscale("log")
        ax.set_title(f"batch size {b}")
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    fig.axes[0].set_ylabel("κ₀.₅ of the output layer's input")
    fig.axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.run / "conditioning.png", dpi=90)
    print("κ₀.₅ of the output layer's input, last epoch (mean over seeds)")
    width = max(len(m) for m in methods)
    print("  ".join(["method".ljust(width), *(f"bs={b}".rjust(9) for b in sizes)]))
    for m in methods:
        cells = [f"{mean[m, b][-1]:9.3g}" if (m, b) in mean else " " * 8 + "—" for b in sizes]
        print("  ".join([m.ljust(width), *cells]))
    print(f"wrote {args.run / 'conditioning.png'}")
    return 0


def _method_kwargs(spec: str, group_size: int, iterations: int) -> tuple[str, dict[str, Any]]:
    """Registry name and keyword arguments: ``group_size``/``iterations`` where the preset takes
    them (``iterations`` not with a ``method=`` that does not iterate: the presets refuse it),
    overridden by the spec's own keyword arguments."""
    name, spec_kw = parse_spec(spec)
    params = inspect.signature(info(name).cls.__init__).parameters
    kw: dict[str, Any] = {}
    if "group_size" in params:
        kw["group_size"] = group_size
    method = spec_kw.get("method", params["method"].default if "method" in params else None)
    if "iterations" in params and method in (None, "newton"):
        kw["iterations"] = iterations
    return name, {**kw, **spec_kw}


def _run_snd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    specs = _split_methods(args.methods)
    if not specs:
        parser.error("--methods is empty")
    group_size = args.dim if args.group_size is None else args.group_size
    if group_size > args.dim:
        parser.error(f"--group-size ({group_size}) must be at most --dim ({args.dim})")
    too_big = [m for m in args.batch_sizes if not 2 <= m <= args.data_size]
    if too_big:
        parser.error(f"batch sizes must be in [2, --data-size={args.data_size}], got {too_big}")
    if args.samples > args.data_size:
        parser.error(f"--samples ({args.samples}) must be at most --data-size ({args.data_size})")
    try:
        methods = [(s, *_method_kwargs(s, group_size, args.iterations)) for s in specs]
    except NormkitError as e:
        parser.error(str(e))

    x = gaussian_data(args.data_size, args.dim, generator=args.seed)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for label, name, kw in methods:
        for m in args.batch_sizes:
            try:
                r = snd_stats(name, x, batch_size=m, num_batches=args.batches,
                              num_samples=args.samples, generator=args.seed, **kw)
                err = whitening_error(name, x, batch_size=m, num_batches=args.batches,
                                      group=group_size, generator=args.seed, **kw)
            except (NormkitError, TypeError) as e:
                parser.error(f"method {label!r} at batch size {m}: {e}")
            rows.append({"method": label, "batch_size": m, "snd": r.mean, "snd_std": r.std,
                         "whitening_error": err})
    elapsed = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(group_size=group_size, methods=[s for s, _, _ in methods])
    payload = {"tool": "snd", "config": config, "seconds": elapsed, "results": rows,
               "torch": torch.__version__}
    (args.out / "snd.json").write_text(json.dumps(payload, indent=2))
    _plot(rows, [s for s, _, _ in methods], args.out / "snd.png", args.dim)
    _print_table(rows, [s for s, _, _ in methods], args.batch_sizes, args.plain)
    print(f"wrote {args.out / 'snd.json'} and {args.out / 'snd.png'} ({elapsed:.1f} s)")
    return 0


def _plot(rows: list[dict[str, Any]], labels: list[str], path: Path, dim: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label in labels:
        pts = [(r["batch_size"], r["snd"]) for r in rows if r["method"] == label and r["snd"] > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size m")
    ax.set_ylabel("SND")
    ax.set_title(f"Stochastic normalization disturbance, d = {dim}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _print_table(rows: list[dict[str, Any]], labels: list[str], sizes: list[int],
                 plain: bool) -> None:
    cell = {(r["method"], r["batch_size"]): f"{r['snd']:.3f} / {r['whitening_error']:.2f}"
            for r in rows}
    header = ["method", *[f"m={m}" for m in sizes]]
    body = [[label, *[cell[label, m] for m in sizes]] for label in labels]
    _table(header, body, "SND / whitening error ||Cov - I||_F", plain)


def main(argv: list[str] | None = None) -> int:
    """Run ``normkit analyze TOOL ...``; ``argv`` is what follows ``analyze``.

    Returns the exit status: 0 on success, 2 on bad input (the message goes to stderr).

    Example:
        >>> main(["snd", "--methods", "nope"])  # unknown method: usage and message on stderr
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.tool == "conditioning":
            return _run_conditioning(args, parser)
        if args.tool == "inputs":
            return _run_inputs(args, parser)
        return _run_snd(args, parser)
    except SystemExit as e:  # argparse exits on --help (0) and on bad input (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
