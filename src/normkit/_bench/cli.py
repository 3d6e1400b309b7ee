"""The command line of ``normkit bench`` / ``python benchmarks/run.py``: run, print tables, write JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._device import check_device
from . import speed as _speed
from .goalrun import GOAL_SHAPES, goals_report, run_goals
from .speed import (
    COMPILE_METHODS,
    COMPILE_MODES,
    DEFAULT_SHAPES,
    DETAIL_SHAPES,
    MODES,
    QUICK_SHAPES,
    report,
)
from .timing import loadavg, machine_info, parse_shape
from .whitening import WHITENING_GROUPS, WHITENING_METHODS, WHITENING_SHAPES, run_whitening

__all__ = ["build_parser", "main"]


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [p for v in values for p in v.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``normkit bench`` / ``python benchmarks/run.py``."""
    p = argparse.ArgumentParser(prog="normkit bench", description=_speed.__doc__.split("\n\n")[0])
    p.add_argument("--goals", action="store_true",
                   help="the goals of issue 20: every method's eager and compiled fwd+bwd ratio to "
                        "torch BatchNorm2d, to timm's layer and torch LocalResponseNorm where they "
                        "apply, eval ratio, saved memory; a met/missed table (default "
                        f"{' '.join(GOAL_SHAPES)}, float32, 1 thread; all methods in ~1.5 min, ~10 with a "
                        "cold inductor cache)")
    p.add_argument("--shapes", "--shape", nargs="+",
                   help=f"shapes (default {' '.join(DEFAULT_SHAPES)}; --goals: {' '.join(GOAL_SHAPES)})")
    p.add_argument("--methods", nargs="+", help="methods, comma- or space-separated (default all)")
    p.add_argument("--repeats", type=int,
                   help="timed rounds per cell (default 7, --quick 3, --goals 15)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per implementation, the first included (1)")
    p.add_argument("--quick", action="store_true",
                   help=f"small shapes ({' '.join(QUICK_SHAPES)}), 3 rounds, no compile rows "
                        "(< 1 min)")
    p.add_argument("--json", type=Path,
                   help="where to write the results (default benchmarks/results/latest.json; "
                        "--goals: benchmarks/results/goals.json)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile-methods", nargs="+", help=f"default {','.join(COMPILE_METHODS)}")
    p.add_argument("--compile-modes", nargs="+", help=f"default {','.join(COMPILE_MODES)}")
    p.add_argument("--detail-shapes", nargs="+",
                   help=f"shapes with compiled rows (default {','.join(DETAIL_SHAPES)})")
    p.add_argument("--modes", nargs="+", help=f"subset of {','.join(MODES)}")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads for the run (default 2; --goals: 1)")
    p.add_argument("--statistic", default="median", choices=("median", "min"),
                   help="--goals: ratios of medians (default) or of minima (the least "
                        "disturbed call)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"),
                   help="--goals, --parity: where to run (cuda: timed with torch.cuda.Event; "
                   "default cpu)")
    p.add_argument("--allocator", default="steady", choices=("steady", "default"),
                   help="--goals: steady keeps the C allocator from returning freed memory to the "
                   "OS during the run (glibc mallopt), so a call's time does not depend on which "
                   "call re-faults freed pages; default leaves it as it is")
    p.add_argument("--parity", action="store_true",
                   help="no timing: every method's float64 training step and eval on --device "
                   "against the CPU's (output, gradients, buffers); exit status 1 on a mismatch "
                   "(default shape 8x32x8x8)")
    p.add_argument("--cell-budget", type=float, default=4.0,
                   help="seconds after which a cell stops at 3 rounds (default 4)")
    p.add_argument("--max-minutes", type=float,
                   help="shrink cell budgets so the run ends near this (default 9, --quick 0.75, "
                        "--goals 13: past it compilation is skipped for the methods left)")
    p.add_argument("--plain", action="store_true", help="plain-text tables even on a terminal")
    p.add_argument("--from-json", type=Path, help="print the tables of a saved run and exit")
    p.add_argument("--whitening", action="store_true",
                   help=f"only the whitening benchmark: {','.join(WHITENING_METHODS)} at group sizes "
                        f"{'/'.join(map(str, WHITENING_GROUPS))} on {' '.join(WHITENING_SHAPES)} vs "
                        "torch BN, the papers' formulation and one block-diagonal matmul (< 4 min)")
    p.add_argument("--weights", action="store_true",
                   help="only the weight-parametrization benchmark: a conv layer with each "
                        "normkit.weight method vs the plain layer, OWN vs ONI (< 1 min)")
    p.add_argument("--whitening-shapes", nargs="+", help=argparse.SUPPRESS)  # tests: tiny shapes
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    p.add_argument("--whitening-groups", nargs="+", help=argparse.SUPPRESS)
    return p


def _main_whitening(args: argparse.Namespace, rich: bool) -> int:
    try:
        shapes = [parse_shape(s).label for s in _split(args.whitening_shapes) or WHITENING_SHAPES]
        groups = [int(v) for v in _split(args.whitening_groups) or WHITENING_GROUPS]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"schema": 1, "machine": machine_info()}
    torch.set_num_threads(prev)
    result["whitening"] = run_whitening(shapes, groups, repeats=args.repeats or 15,
                                        warmup=args.warmup, threads=args.threads)
    result["machine"]["loadavg_end"] = loadavg()
    _emit(report(result, rich=rich), result, args.json)
    return 0


def _main_goals(args: argparse.Namespace, rich: bool) -> int:
    try:
        import normkit as nk

        shapes = [parse_shape(s).label for s in _split(args.shapes) or GOAL_SHAPES]
        methods = _split(args.methods)
        for m in methods or ():
            nk.info(m)
        check_device(args.device)
        allocator = None
        if args.allocator == "steady":
            from .allocator import steady_allocator

            allocator = steady_allocator()
        minutes = args.max_minutes if args.max_minutes is not None else 13.0
        result = run_goals(shapes, methods, repeats=args.repeats or 15, warmup=args.warmup,
                           compile_=not args.no_compile, device=args.device, threads=args.threads,
                           cell_budget_s=args.cell_budget, max_seconds=60 * minutes,
                           backend=args.compile_backend, statistic=args.statistic)
        result["config"]["allocator"] = allocator or "as the process found it"
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _emit(goals_report(result, rich=rich), result, args.json)
    return 0


def _emit(text: str, data: Any, path: Path) -> None:
    """Print a run's tables and keep its JSON at ``path``."""
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}")


def _main_parity(args: argparse.Namespace, rich: bool) -> int:
    from .parity import parity_report, run_parity

    try:
        check_device(args.device)
        shapes = _split(args.shapes) or ["8x32x8x8"]
        if len(shapes) != 1:
            raise ValueError(f"--parity takes one shape, got {shapes}")
        result = run_parity(_split(args.methods), args.device, shape=shapes[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _emit(parity_report(result, rich=rich), result, args.json)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """``normkit bench`` / ``python benchmarks/run.py``: run, print tables, write JSON."""
    args = build_parser().parse_args(argv)
    rich = sys.stdout.isatty() and not args.plain
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        print(goals_report(saved, rich=rich) if "goals" in saved else report(saved, rich=rich))
        return 0
    if args.threads is None:
        args.threads = 1 if args.goals else 2
    if args.json is None:
        args.json = Path("benchmarks/results/" + ("goals.json" if args.goals else "parity.json"
                                                  if args.parity else "latest.json"))
    if args.goals:
        return _main_goals(args, rich)
    if args.parity:
        return _main_parity(args, rich)
    if args.device != "cpu":
        print("error: --device applies to --goals and --parity only (the other benchmarks run "
              "on the CPU)",
              file=sys.stderr)
        return 2
    if args.whitening:
        return _main_whitening(args, rich)
    if args.weights:
        from .weights import run_weights, weights_report

        result = run_weights(repeats=args.repeats or 7, threads=args.threads)
        _emit(weights_report(result, rich=rich), {"schema": 1, "weights": result}, args.json)
        return 0
    shapes = _split(args.shapes) or list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    modes = _split(args.modes) or list(MODES)
    compile_modes = _split(args.compile_modes) or list(COMPILE_MODES)
    bad = sorted(set(modes + compile_modes) - set(MODES))
    if bad:
        print(f"error: unknown modes {bad}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    try:
        specs = [parse_shape(s) for s in shapes]
        import normkit as nk

        methods = _split(args.methods)
        for m in methods or ():
            nk.info(m)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    no_compile = args.no_compile or args.quick
    minutes = args.max_minutes if args.max_minutes is not None else (0.75 if args.quick else 9.0)
    result = _speed.run([s.label for s in specs], methods,
                 repeats=args.repeats or (3 if args.quick else 7), warmup=args.warmup, modes=modes,
                 compile_methods=() if no_compile else (_split(args.compile_methods) or COMPILE_METHODS),
                 compile_modes=compile_modes,
                 detail_shapes=_split(args.detail_shapes) or (() if args.quick else DETAIL_SHAPES),
                 cell_budget_s=1.0 if args.quick else args.cell_budget,
                 max_seconds=60 * minutes, threads=args.threads)
    _emit(report(result, rich=rich), result, args.json)
    return 0
