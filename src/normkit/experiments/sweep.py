"""A resumable sweep of runs (methods × batch sizes × seeds, × learning rates when tuning) saved
in a run directory.

The directory holds ``config.json`` (settings, grid, dataset, library versions) and
``results.jsonl``, one line per finished run, appended and flushed as each run ends, whichever
backend ran it (:mod:`normkit.experiments.backends`). A run's key is (method spec, batch size,
seed, config hash; lr and phase when tuning, :mod:`normkit.experiments.tuning`): restarting the
same command skips the finished runs, so a sweep killed midway loses at most the runs in progress.
A directory whose ``config.json`` has other settings is refused, never mixed. A line of
``results.jsonl`` that is not a run record (cut short by a kill, or written by something else) is
moved to ``results.rejected.jsonl`` with a warning, never deleted. Example::

    from normkit.experiments.runner import CompareConfig
    from normkit.experiments.sweep import run_sweep

    cfg = CompareConfig(methods=["none"], dataset="gaussian", batch_sizes=[32], seeds=[0],
                        epochs=1, lrs=None)
    records = run_sweep(cfg, "runs/doc-sweep", show_progress=False)
    [r["status"] for r in records]   # ['ok']
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from ..errors import ConfigError
from . import torchrun
from .backends import WorkerError, execute
from .data import Dataset, load_dataset
from .files import write_text_atomic
from .runner import CompareConfig, validate_methods
from .tuning import Run, record_key, run_key, select_lrs

__all__ = ["RESULTS_FILE", "REJECTED_FILE", "CONFIG_FILE", "RejectedLinesWarning", "ResultStore",
           "WorkerError", "prepare", "run_key", "run_sweep", "default_jobs", "grid"]

RESULTS_FILE = "results.jsonl"
REJECTED_FILE = "results.rejected.jsonl"
CONFIG_FILE = "config.json"
_REQUIRED = {"method": str, "batch_size": int, "seed": int, "config_hash": str, "status": str}


class RejectedLinesWarning(UserWarning):
    """Lines of ``results.jsonl`` that are not run records were moved aside."""


def _versions() -> dict[str, str]:
    try:
        normkit_version = importlib.metadata.version("normkit")
    except importlib.metadata.PackageNotFoundError:
        normkit_version = getattr(importlib.import_module("normkit"), "__version__", "unknown")
    return {"normkit": normkit_version, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(value.get(k), t) and not isinstance(value.get(k), bool)
        for k, t in _REQUIRED.items())


class ResultStore:
    """``config.json`` and the append-only ``results.jsonl`` of one run directory.

    Args:
        out_dir: the run directory (created if missing).
        cfg: the sweep's configuration; its settings must match an existing ``config.json``.
    """

    def __init__(self, out_dir: str | Path, cfg: CompareConfig):
        self.dir = Path(out_dir)
        self.cfg = cfg
        self.results_path = self.dir / RESULTS_FILE
        self.rejected_path = self.dir / REJECTED_FILE
        self.config_path = self.dir / CONFIG_FILE

    def open(self, dataset: Dataset) -> None:
        """Check the directory's settings against ``cfg`` and (re)write ``config.json``.

        Raises:
            ConfigError: if the directory holds results of other settings, listing the
                differences and the fix.
            OSError: when the directory cannot be created or written.
        """
        created = time.strftime("%Y-%m-%dT%H:%M:%S")
        if self.config_path.exists():
            try:
                old = json.loads(self.config_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"{self.config_path} is unreadable ({err}); delete "
                                  f"{self.dir} or pass another --out") from err
            theirs, ours = old.get("settings", {}), self.cfg.settings()
            if old.get("config_hash") != self.cfg.config_hash():
                diff = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now"
                                 for k in sorted(set(theirs) | set(ours))
                                 if theirs.get(k) != ours.get(k))
                raise ConfigError(
                    f"{self.dir} holds results of different settings ({diff or 'unknown'}); pass "
                    f"another --out directory, or delete {self.dir} to start over"
                )
            created = old.get("created", created)
        self.dir.mkdir(parents=True, exist_ok=True)
        content = {
            "config_hash": self.cfg.config_hash(), "settings": self.cfg.settings(),
            "grid": {"methods": self.cfg.methods, "batch_sizes": self.cfg.batch_sizes,
                     "seeds": self.cfg.seeds, **({"lrs": self.cfg.lrs,
                                                  "tuning_seeds": self.cfg.tuning_seeds()}
                                                 if self.cfg.lrs else {})},
            "data_dir": self.cfg.data_dir, "dataset": dataset.describe(),
            "versions": _versions(), "created": created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_text_atomic(self.config_path, json.dumps(content, indent=2) + "\n")

    def load(self) -> dict[str, dict[str, Any]]:
        """Finished runs of this config, by :func:`~normkit.experiments.tuning.record_key`.

        A line that is not a run record — cut short by a kill, not JSON, or JSON of another kind
        (``42``, ``null``, a record without ``batch_size``) — is moved to
        ``results.rejected.jsonl`` (appended) and ``results.jsonl`` rewritten without it, with a
        :class:`RejectedLinesWarning` naming the count, so a rerun redoes that run.
        """
        if not self.results_path.exists():
            return {}
        text = self.results_path.read_text(errors="replace")
        lines = text.splitlines()
        records, good, bad = {}, [], []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not _is_record(record):
                if line.strip():
                    bad.append(line)
                continue
            good.append(line)
            if record["config_hash"] == self.cfg.config_hash():
                records[record_key(record)] = record
        if bad or len(good) != len(lines) or (lines and not text.endswith("\n")):
            if bad:
                with self.rejected_path.open("a") as f:
                    f.write("".join(b + "\n" for b in bad))
            write_text_atomic(self.results_path, "".join(g + "\n" for g in good))
            if bad:
                warnings.warn(RejectedLinesWarning(
                    f"{len(bad)} line{'s' * (len(bad) != 1)} of {self.results_path} "
                    f"{'are' if len(bad) != 1 else 'is'} not a run record (cut short or "
                    f"foreign): moved to {self.rejected_path}; those runs are done again"),
                    stacklevel=2)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Append one finished run and flush it to disk."""
        with self.results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def default_jobs() -> int:
    """Parallel runs by default: the usable CPU cores, at most 8."""
    return min(_cores(), 8)


def prepare(cfg: CompareConfig, out_dir: str | Path) -> tuple[Dataset, ResultStore]:
    """Validate everything a sweep needs before any training: options, data, every method in
    the model (one step on two examples) and the run directory.

    Returns:
        The dataset and the opened :class:`ResultStore`.

    Raises:
        ConfigError, UnknownMethodError, DataError: with the value at fault and the fix.
        OSError: when the run directory cannot be written.
    """
    cfg.validate()
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset,
                           seed=cfg.data_seed)
    validate_methods(dataset, cfg)
    store = ResultStore(out_dir, cfg)
    store.open(dataset)
    return dataset, store


def grid(cfg: CompareConfig, chosen: dict[tuple[str, int], float] | None = None) -> list[Run]:
    """The runs of ``cfg``: the validation grid of a tuned sweep (``chosen=None``) or the test
    grid (at the ``chosen`` lr of each (method, batch size); untuned: ``cfg.lr``)."""
    sizes = sorted(cfg.batch_sizes)
    if cfg.lrs is None:
        return [Run(m, b, s) for s in cfg.seeds for b in sizes for m in cfg.methods]
    if chosen is None:
        return [Run(m, b, s, lr, "val") for s in cfg.tuning_seeds() for b in sizes
                for lr in cfg.lrs for m in cfg.methods]
    return [Run(m, b, s, chosen[m, b], "test") for s in cfg.seeds for b in sizes
            for m in cfg.methods]


def run_sweep(cfg: CompareConfig, out_dir: str | Path, *, jobs: int = 1,
              threads: int = 1, show_progress: bool = True,
              console: Console | None = None,
              prepared: tuple[Dataset, ResultStore] | None = None,
              backend: str = "local", address: str | None = None) -> list[dict[str, Any]]:
    """Run every run of ``cfg`` not yet in ``out_dir``, resumably.

    An untuned sweep (``cfg.lrs is None``) runs every (method, batch size, seed) at ``cfg.lr``.
    A tuned one first runs the validation grid (× ``cfg.lrs``, for the seeds of
    ``cfg.tuning_seeds()``), chooses each method's lr per batch size
    (:func:`~normkit.experiments.tuning.select_lrs`), then trains and tests every seed at the
    chosen lr.

    Args:
        cfg: the sweep.
        out_dir: run directory; finished runs found there are skipped.
        jobs: local backend: runs in parallel worker processes (1: in this process). Workers are
            spawned, so a script calling this with ``jobs > 1`` needs the usual
            ``if __name__ == "__main__":`` guard; they stop when this process dies.
        threads: torch threads per run. Small models gain little from more than one and run
            many times slower when threads outnumber the free cores: keep ``jobs × threads ≤
            cores`` and prefer more ``jobs``.
        show_progress: show a live progress bar with the current runs and the ETA.
        console: where the progress bar goes (default: a new stderr console).
        prepared: the result of :func:`prepare`, if already called.
        backend: ``"local"`` (processes on this machine) or ``"ray"`` (Ray tasks,
            :mod:`normkit.experiments.backends`).
        address: the Ray cluster to connect to (``None``: start a local one).

    Returns:
        The records of the grid (validation runs first when tuning, then the test runs), in
        grid order, finished earlier or now.

    Raises:
        WorkerError: a worker process or Ray task died; finished runs are saved.
        OSError: results cannot be written (read-only directory, disk full).
    """
    dataset, store = prepared or prepare(cfg, out_dir)
    lead = torchrun.rank() == 0  # under torchrun, rank 0 owns the run directory
    done = torchrun.broadcast(store.load() if lead else {})
    h = cfg.config_hash()

    def key(run: Run) -> str:
        return run_key(run.method, run.batch_size, run.seed, h, lr=run.lr, phase=run.phase)

    def steps(run: Run) -> int:
        n = len(dataset.x_train)
        n -= round(cfg.val_fraction * n) if run.phase == "val" else 0
        return cfg.epochs * (n // run.batch_size)

    first = grid(cfg)
    todo = [run for run in first if key(run) not in done]
    total = sum(map(steps, todo))
    if cfg.lrs is not None:  # the test runs: their lr is not known yet, their length is
        tested = {(r["method"], r["batch_size"], r["seed"]) for k, r in done.items()
                  if k.startswith(h) and r.get("phase") == "test"}
        total += sum(steps(Run(m, b, s)) for m in cfg.methods for b in cfg.batch_sizes
                     for s in cfg.seeds if (m, b, s) not in tested)
    console = console or Console(stderr=True)
    resumed = len([k for k in done if k.startswith(h)])
    if show_progress and resumed:
        console.print(f"resuming: {resumed} runs already in {store.results_path}")
    progress = Progress(TextColumn("{task.description}", table_column=Column(
                            ratio=1, no_wrap=True, overflow="ellipsis")),
                        BarColumn(bar_width=20), TaskProgressColumn(),
                        TextColumn("{task.fields[runs]} runs"), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=not show_progress, expand=True)
    finished = 0

    def run_all(runs: list[Run]) -> None:
        nonlocal finished
        for record in execute(dataset, cfg, runs, backend=backend, jobs=jobs, threads=threads,
                              address=address, advance=lambda n: progress.advance(task, n),
                              describe=lambda text: progress.update(task, description=text)):
            if lead:
                store.append(record)
            done[record_key(record)] = record
            finished += 1
            progress.update(task, runs=f"{finished}")

    with progress:
        task = progress.add_task("starting", total=total or 1, runs="0")
        run_all(todo)
        runs = first
        if cfg.lrs is not None:
            second = grid(cfg, torchrun.broadcast(select_lrs(done[key(run)] for run in first)))
            run_all([run for run in second if key(run) not in done])
            runs = first + second
        progress.update(task, description="done", completed=total or 1)
    return [done[key(run)] for run in runs]
