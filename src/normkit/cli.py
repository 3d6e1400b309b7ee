"""The ``normkit`` command: ``compare``, ``list`` and ``bench``.

``normkit compare`` trains small models with several normalization methods across batch sizes
and seeds, and writes a resumable run directory with results, plots and reports; ``normkit list``
prints the catalog of methods; ``normkit bench`` runs the speed benchmark. Every bad option or
method exits with status 2 and one ``error: ...`` line before any training starts. ``compare``,
``list`` and ``analyze`` need the ``compare`` extra (``pip install 'normkit[compare]'``); without it
they exit with status 2 and one line saying so. ``bench`` and ``--version`` need torch alone; ``python
-m normkit`` is the same command. Example::

    $ normkit compare --methods bn,gn:num_groups=8,ln,none --batch-sizes 2,4,16,64
    $ normkit compare --model my_models.py:net --dataset my_data.py:load --backend ray
    $ normkit list --family standardization
    $ normkit bench --help
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._cli_values import (
    HelpFormatter,
    count_or_all,
    device_spec,
    float_list,
    int_list,
    join,
    positive,
    split_methods,
)

__all__ = ["main", "build_parser", "split_methods"]

# What the ``compare`` extra installs (pyproject.toml); the core library needs torch alone.
COMPARE_EXTRA = ("numpy", "scipy", "matplotlib", "rich", "mnist1d")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("normkit")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        from . import __version__

        return __version__


def _missing_extra() -> list[str]:
    """The modules of the ``compare`` extra that are not installed."""
    import importlib.util

    return [m for m in COMPARE_EXTRA if importlib.util.find_spec(m) is None]

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``normkit`` command (all subcommands)."""
    from .experiments.backends import BACKENDS
    from .experiments.config import OPTIMIZERS
    from .experiments.data import DATASETS
    from .experiments.models import MODELS
    from .experiments.runner import GRADIENT_METHODS, CompareConfig

    d = CompareConfig()  # the defaults live there, once
    parser = argparse.ArgumentParser(
        prog="normkit", description="normkit: normalization methods for PyTorch.",
        epilog="Run 'normkit COMMAND --help' for the options of each command.")
    parser.add_argument("-V", "--version", action="version", version=f"normkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = HelpFormatter

    c = sub.add_parser(
        "compare", formatter_class=fmt,
        help="train small models with several methods across batch sizes and report",
        description="Train one model per (method, batch size, seed) and compare test errors. "
        "Every run sees the same number of examples (--epochs passes over the training set) and "
        "a learning rate scaled with the batch size (--lr-scaling); by default each method's lr "
        "is tuned per batch size over --lrs on a validation split of the training set, and the "
        "test set is evaluated only at the chosen lr. The report gives the test error with its 95 % "
        "interval over seeds and recommends, per batch size, the best method and those not "
        "significantly worse (paired over seeds). The defaults take a few minutes on 2 CPU "
        "cores. Your own model and data: --model/--dataset module:function. Results go to "
        "--out; rerunning the same command resumes, skipping finished runs.")
    c.add_argument("--methods", "--norm", type=split_methods, default=",".join(d.methods),
                   help="comma-separated method specs ('normkit list' shows the names; 'none' is "
                   "no normalization); arguments follow a colon, e.g. gn:num_groups=8,eps=1e-3")
    c.add_argument("--dataset", default=d.dataset, metavar="NAME|MODULE:FUNCTION",
                   help=f"one of {', '.join(DATASETS)} (mnist1d is generated locally; mnist and "
                   "fashion-mnist read IDX files; digits is scikit-learn's; gaussian is a quick "
                   "synthetic set), or your function returning (x_train, y_train, x_test, "
                   "y_test) or (train, test) Datasets, as package.module:function or "
                   "path/file.py:function")
    c.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory with the IDX files of mnist/fashion-mnist (Fashion-MNIST is "
                   "also found in Debian's /usr/share/datasets/fashion-mnist)")
    c.add_argument("--model", default=d.model, metavar="NAME|MODULE:FUNCTION",
                   help=f"one of {', '.join(MODELS)} (mlp: any input, cnn1d: sequences, cnn2d: "
                   "images, resnet: either), or your function f(norm_layer=, input_shape=, "
                   "num_classes=) -> nn.Module, as package.module:function or "
                   "path/file.py:function")
    c.add_argument("--convert", action="store_true",
                   help="--model is f(input_shape=, num_classes=) building a stock model; "
                   "normkit.convert replaces its normalization layers by each method")
    c.add_argument("--batch-sizes", type=int_list, default=join(d.batch_sizes), metavar="B,B,...",
                   help="training batch sizes")
    c.add_argument("--seeds", type=int_list, default=join(d.seeds), metavar="S,S,...",
                   help="seeds of model initialization and data order; one run per seed")
    c.add_argument("--epochs", type=positive(int), default=d.epochs,
                   help="passes over the training set, the same for every batch size")
    lr = c.add_mutually_exclusive_group()
    lr.add_argument("--lrs", type=float_list, default=None, metavar="LR,LR,...",
                    help="learning rates at --base-batch-size to tune over: per method and batch "
                    "size the one of lowest validation error is chosen, then tested (default: "
                    f"{join(d.lrs or [])})")
    lr.add_argument("--lr", type=positive(float), default=None,
                    help="one learning rate at --base-batch-size for every method, no tuning and "
                    "no validation split (a quick run); cosine decay to 0 over training")
    c.add_argument("--val-fraction", type=float, default=d.val_fraction, metavar="F",
                   help="share of the training set held out (seeded) to choose the lr")
    c.add_argument("--tune-seeds", type=count_or_all, default=d.tune_seeds, metavar="K|all",
                   help="how many of the seeds (the first K) run the validation grid; the lr is "
                   "chosen on their mean validation error, then every seed is trained and tested "
                   f"at it ('all': every seed; default: {d.tune_seeds})")
    c.add_argument("--base-batch-size", type=positive(int), default=d.base_batch_size,
                   help="batch size at which --lr applies; others get lr * batch / base")
    scaling = c.add_mutually_exclusive_group()
    scaling.add_argument("--lr-scaling", choices=["linear", "sqrt", "none"],
                         default=_scaling_name(d.lr_scaling),
                         help="how the lr follows the batch size B: linear (lr * B / base, "
                         "SGD's rule), sqrt (lr * sqrt(B / base), Adam's) or none")
    scaling.add_argument("--no-lr-scaling", dest="lr_scaling", action="store_const", const="none",
                         help="use --lr for every batch size instead of scaling it (= "
                         "--lr-scaling none)")
    c.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help="sgd (with --momentum), adam or adamw (betas 0.9, 0.999); give --lrs "
                   "on its scale (SGD's ~0.1, Adam's ~1e-3 to 0.1) (default: "
                   f"{d.optimizer}; sgd with --gradient lars/lamb, which replace it)")
    c.add_argument("--warmup", type=float, default=d.warmup, metavar="F",
                   help="share of the training steps, in [0, 1), over which the lr rises "
                   "linearly to its value before the cosine decay (0: none)")
    c.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum, in [0, 1)")
    c.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="weight decay of the optimizer (decoupled with adamw)")
    c.add_argument("--weight", default=None, metavar="METHOD[:k=v,...]",
                   help="a normkit.weight method on every hidden Linear/Conv layer, e.g. ws, sn, "
                        "oni:iterations=5 (default: none)")
    c.add_argument("--gradient", default=None, choices=list(GRADIENT_METHODS),
                   help="gc, block, agc (hooks on SGD) or lars, lamb (replace SGD); default SGD")
    c.add_argument("--nproc", type=positive(int), default=1, metavar="N",
                   help="data-parallel processes per run (DDP on gloo, batch statistics "
                        "synchronized over the global batch; --jobs is then 1). Across machines, "
                        "start the command with torchrun instead: every run is then DDP over "
                        "torchrun's processes")
    c.add_argument("--analyze", action="store_true",
                   help="record the output layer's conditioning (λ_max, κ of its input and output "
                        "gradient) and weight norm after every epoch; a table in the report")
    c.add_argument("--shift", default=None, metavar="NAME[:SEVERITY],...",
                   help="after training, evaluate every model on covariate-shifted copies of the "
                        "test set (contrast, noise, blur, rotation; fixed seed) as is, with AdaBN, "
                        "with prediction-time BN and with TENT; a table and shift.png in the "
                        "report (default: none)")
    c.add_argument("--input-norm", default=None, metavar="METHOD",
                   choices=["center", "standardize", "pca", "zca", "cholesky"],
                   help="normalize the inputs with statistics of the training set before the "
                        "model (normkit.InputNormalizer: center, standardize, zca, cholesky; pca "
                        "with --model mlp; default: none)")
    c.add_argument("--population", default=None, metavar="METHOD",
                   choices=["pca", "zca", "cholesky"],
                   help="Natural Neural Networks: every Linear/Conv2d whitens its input with "
                        "population statistics refreshed every --refresh-every steps (pca, zca, "
                        "cholesky; default: plain layers)")
    c.add_argument("--refresh-every", type=positive(int), default=100, metavar="T",
                   help="steps between population refreshes (default: 100)")
    c.add_argument("--subset", type=count_or_all, default=d.subset, metavar="N|all",
                   help="use at most N training and N test examples (smaller = faster; 'all': "
                   f"the whole dataset; default: {d.subset})")
    c.add_argument("--out", metavar="DIR", default=None,
                   help="run directory (default: runs/compare-DATASET-MODEL); reusing it with "
                   "other settings is refused, so pass a new one when you change them")
    c.add_argument("--eval-batch-stats", action="store_true",
                   help="also report test error with batch statistics (train mode, batches of "
                   "the run's size) besides the usual eval-mode running statistics")
    c.add_argument("--device", type=device_spec, default=d.device, metavar="cpu|cuda[:N]|mps",
                   help="where every run trains and is evaluated (the data is generated and "
                   "shuffled on the CPU, so the same runs see the same batches on any device; "
                   "results on another device are kept apart from the CPU's)")
    c.add_argument("--jobs", type=positive(int), default=None, metavar="N",
                   help="runs in parallel processes (default: CPU cores, at most 8)")
    c.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local: processes on this machine; ray: one Ray task per run on a Ray "
                   "cluster (pip install 'normkit[ray]'), records collected here")
    c.add_argument("--address", default=None, metavar="ADDR",
                   help="with --backend ray: the cluster (auto, or ray://host:10001); default: "
                   "start a local Ray instance")
    c.add_argument("--quiet", action="store_true",
                   help="no progress bar and no table; print only the run directory")

    ls = sub.add_parser("list", formatter_class=fmt, help="list the normalization methods",
                        description="Print the catalog: name, family, aliases, paper, summary.")
    ls.add_argument("--family", default=None, help="only methods of this family")

    sub.add_parser("bench", add_help=False, help="run the speed benchmark "
                   "('normkit bench --help' for its options)")
    sub.add_parser("analyze", add_help=False, help="analysis tools, e.g. 'normkit analyze snd' "
                   "('normkit analyze --help')")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normkit`` command line; returns the exit status (2 for bad input).

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Example (prints the standardization family and returns 0)::

        main(["list", "--family", "standardization"])
    """
    from .errors import NormkitError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"normkit {_version()}")
        return 0
    if argv[:1] != ["bench"] and _missing_extra():  # bench needs torch alone
        command = f"normkit {argv[0]}" if argv[:1] in (["compare"], ["list"], ["analyze"]) else "normkit"
        print(f"{command} needs the compare extra: pip install 'normkit[compare]' "
              f"(missing: {', '.join(_missing_extra())})", file=sys.stderr)
        return 2
    if argv[:1] == ["bench"]:  # the benchmark parses its own options, --help included
        return _bench(argv[1:])
    if argv[:1] == ["analyze"]:  # so do the analysis tools
        from .analysis.cli import main as analyze

        return int(analyze(argv[1:]) or 0)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, message already printed)
        return int(exit_.code or 0)
    try:
        return _compare(args) if args.command == "compare" else _list(args)
    except NormkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only directory, disk full: one line, finished runs are saved
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{where}: {err.strerror or err}; finished runs are saved, "
              "free space or choose a writable --out and rerun", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; rerun the same command to resume",
              file=sys.stderr)
        return 130


def _bench(argv: list[str]) -> int:
    from ._bench import main as bench_main

    try:
        return int(bench_main(argv) or 0)
    except SystemExit as exit_:  # its argparse: --help or a usage error
        return int(exit_.code or 0)


def _load_methods() -> None:
    """Import the ``normkit`` package so that its methods are registered."""
    import importlib

    importlib.import_module("normkit")


def _code_spans(text: str) -> Any:
    """``text`` as rich Text (no markup parsing: ``[0, 1]`` stays literal), `code` spans cyan."""
    from rich.text import Text

    out = Text()
    for i, part in enumerate(text.split("`")):
        out.append(part, style="cyan" if i % 2 else "")
    return out


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from . import registry

    _load_methods()
    names = registry.list_methods(args.family)
    table = Table(title=f"normkit methods ({len(names)})")
    for header in ("name", "family", "aliases", "paper", "summary"):
        table.add_column(header, overflow="fold")
    for name in names:
        meta = registry.info(name)
        table.add_row(meta.name, meta.family, ", ".join(meta.aliases), Text(meta.paper),
                      _code_spans(meta.summary))
    Console().print(table)
    return 0


def _scaling_name(scaling: bool | str) -> str:
    """The ``--lr-scaling`` choice of a config's ``lr_scaling``."""
    if isinstance(scaling, bool):
        return "linear" if scaling else "none"
    return scaling


def _optimizer_text(cfg: Any) -> str:
    base = {"adam": "Adam", "adamw": "AdamW"}.get(cfg.optimizer, f"SGD (momentum {cfg.momentum})")
    opt = {"lars": "LARS", "lamb": "LAMB"}.get(cfg.gradient or "", base)
    if cfg.gradient in ("gc", "block", "agc"):
        opt += {"gc": " with gradient centralization", "block": " with block-normalized gradients",
                "agc": " with adaptive gradient clipping"}[cfg.gradient]
    return opt + (f", weights {cfg.weight} on the hidden layers" if cfg.weight else "")


def _print_whole(table: Any, quiet: bool) -> None:
    """Print a rich table to stdout at least as wide as it needs: a narrow terminal (or a pipe,
    80 columns for rich) wraps lines instead of truncating the numbers."""
    from rich.console import Console

    console = Console(quiet=quiet)
    need = console.measure(table, options=console.options.update_width(10_000)).maximum
    if need > console.width:
        console = Console(quiet=quiet, width=need)
    console.print(table)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _compare(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line, not a source location
        return _compare_run(args)


def _summary(cfg: Any, dataset: Any) -> str:
    epochs = f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
    scaled = {"linear": " scaled linearly with the batch size",
              "sqrt": " scaled with the square root of the batch size",
              "none": ""}[_scaling_name(cfg.lr_scaling)]
    schedule = (f"a linear warmup over {cfg.warmup:.0%} of the steps, then cosine decay"
                if cfg.warmup else "cosine decay")
    if cfg.lrs is None:
        lr = f"lr {cfg.lr} at batch size {cfg.base_batch_size}{scaled}"
    else:
        lr = (f"the lr tuned per method and batch size over {', '.join(map(str, cfg.lrs))} at "
              f"batch size {cfg.base_batch_size}{scaled}, on a validation split of "
              f"{cfg.val_fraction:.0%} of the training set (seed {cfg.data_seed}) with "
              f"seed{'s' * (len(cfg.tuning_seeds()) != 1)} {join(cfg.tuning_seeds())}, then "
              "every seed retrained on the whole training set and tested")
    return (f"{cfg.model} on {dataset.name}: {len(dataset.x_train)} training and "
            f"{len(dataset.x_test)} test examples, {epochs}, {_optimizer_text(cfg)} with {lr}, "
            f"{schedule}; seeds {cfg.seeds}"
            f"{'' if cfg.device == 'cpu' else f'; on {cfg.device}'}.")


def _compare_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .errors import ConfigError
    from .experiments import torchrun
    from .experiments.backends import check_backend
    from .experiments.report import results_table, shift_table, write_report
    from .experiments.runner import CompareConfig
    from .experiments.stats import recommend, recommendation_lines
    from .experiments.sweep import WorkerError, default_jobs, grid, prepare, run_sweep

    _load_methods()
    d = CompareConfig()
    cfg = CompareConfig(
        methods=args.methods, dataset=args.dataset, data_dir=args.data_dir, model=args.model,
        batch_sizes=args.batch_sizes, seeds=args.seeds, epochs=args.epochs,
        lr=args.lr if args.lr is not None else d.lr,
        lrs=None if args.lr is not None else (args.lrs or d.lrs), val_fraction=args.val_fraction,
        tune_seeds=args.tune_seeds,
        convert=args.convert,
        base_batch_size=args.base_batch_size,
        lr_scaling={"linear": True, "none": False}.get(args.lr_scaling, args.lr_scaling),
        optimizer=args.optimizer or ("sgd" if args.gradient in ("lars", "lamb") else d.optimizer),
        warmup=args.warmup, momentum=args.momentum, weight_decay=args.weight_decay,
        subset=args.subset,
        eval_batch_stats=args.eval_batch_stats, weight=args.weight, gradient=args.gradient,
        nproc=args.nproc, analyze=args.analyze, shift=args.shift,
        input_norm=args.input_norm, population=args.population,
        refresh_every=args.refresh_every, device=args.device)
    out = args.out or "runs/compare-" + "-".join(
        Path(v.rpartition(":")[2] if ":" in v else v).name for v in (args.dataset, args.model))
    jobs = 1 if cfg.nproc > 1 else (args.jobs or default_jobs())
    if torchrun.launched():  # every run DDP over torchrun's processes; rank 0 reports
        if cfg.nproc > 1 or args.backend != "local" or cfg.device != "cpu":
            raise ConfigError("under torchrun every run is data-parallel over torchrun's "
                              "processes on the CPU (gloo): drop --nproc, --backend and "
                              "--device")
        torchrun.init()
        jobs, args.quiet = 1, args.quiet or torchrun.rank() != 0
    console = Console(stderr=True, quiet=args.quiet)
    check_backend(args.backend, args.address, cfg.device)
    dataset, store = prepared = prepare(cfg, out)  # every check before any training
    runs = len(grid(cfg)) + (len(cfg.methods) * len(cfg.batch_sizes) * len(cfg.seeds)
                             if cfg.lrs is not None else 0)
    console.print(f"{runs} runs of {cfg.model} on {dataset.name} ({len(dataset.x_train)} train, "
                  f"{len(dataset.x_test)} test){' with the lr tuned' if cfg.lrs else ''} -> "
                  f"{store.dir}")
    try:
        records = run_sweep(cfg, out, jobs=jobs, show_progress=not args.quiet, console=console, prepared=prepared,
                            backend=args.backend, address=args.address)
    except WorkerError as err:  # not bad input: status 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    meta = {"dataset": cfg.dataset, "model": cfg.model, "summary": _summary(cfg, dataset),
            **cfg.settings(), **({"lrs": cfg.lrs} if cfg.lrs else {}),
            "config_hash": cfg.config_hash()}
    if torchrun.rank() != 0:  # rank 0 writes the report
        return 0
    paths = write_report(records, store.dir, meta)
    _print_whole(results_table(records, title=f"test error (%) — {cfg.model} on {cfg.dataset}"),
                 args.quiet)
    if cfg.shift is not None:
        _print_whole(shift_table(records, title=f"test error (%) under shift — {cfg.model} on "
                                                f"{cfg.dataset}"), args.quiet)
    out_console = Console(quiet=args.quiet, soft_wrap=True, highlight=False)
    out_console.print("recommendation:", style="bold")
    for line in recommendation_lines(recommend(records)):
        out_console.print(f"  {line.replace('**', '')}", markup=False)
    console.print(f"report: {paths['html']}")
    if args.quiet:
        print(store.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
