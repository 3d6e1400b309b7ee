"""A resumable sweep of runs (methods × batch sizes × seeds) saved in a run directory.

The directory holds ``config.json`` (settings, grid, dataset, library versions) and
``results.jsonl``, one line per finished run, appended and flushed as each run ends. A run's key
is (method spec, batch size, seed, config hash): restarting the same command skips the finished
runs, so a sweep killed midway loses at most the runs in progress. A directory whose
``config.json`` has other settings is refused, never mixed. Example::

    from normkit.experiments.runner import CompareConfig
    from normkit.experiments.sweep import run_sweep

    cfg = CompareConfig(methods=["none"], dataset="gaussian", batch_sizes=[32], seeds=[0],
                        epochs=1)
    records = run_sweep(cfg, "runs/doc-sweep", show_progress=False)
    [r["status"] for r in records]   # ['ok']
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import signal
import time
from collections.abc import Callable, Iterator
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
from .data import Dataset, load_dataset
from .runner import CompareConfig, train_run, validate_methods

__all__ = ["RESULTS_FILE", "CONFIG_FILE", "ResultStore", "WorkerError", "prepare", "run_key",
           "run_sweep", "default_jobs"]

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
Run = tuple[str, int, int]  # (method, batch size, seed)


def run_key(method: str, batch_size: int, seed: int, config_hash: str) -> str:
    """Identity of one run: ``"<hash>/<method>/bs=<batch_size>/seed=<seed>"``."""
    return f"{config_hash}/{method}/bs={batch_size}/seed={seed}"


def _versions() -> dict[str, str]:
    try:
        normkit_version = importlib.metadata.version("normkit")
    except importlib.metadata.PackageNotFoundError:
        normkit_version = getattr(importlib.import_module("normkit"), "__version__", "unknown")
    return {"normkit": normkit_version, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


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
        self.config_path = self.dir / CONFIG_FILE

    def open(self, dataset: Dataset) -> None:
        """Check the directory's settings against ``cfg`` and (re)write ``config.json``.

        Raises:
            ConfigError: if the directory holds results of other settings, listing the
                differences and the fix.
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
                     "seeds": self.cfg.seeds},
            "data_dir": self.cfg.data_dir, "dataset": dataset.describe(),
            "versions": _versions(), "created": created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = self.config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        tmp.replace(self.config_path)

    def load(self) -> dict[str, dict[str, Any]]:
        """Finished runs of this config, by :func:`run_key`.

        A line cut short by a kill is dropped (and the file rewritten without it), so that
        the run is done again.
        """
        if not self.results_path.exists():
            return {}
        text = self.results_path.read_text()
        lines = text.splitlines()
        records, good = {}, []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            good.append(line)
            if record.get("config_hash") == self.cfg.config_hash():
                records[run_key(record["method"], record["batch_size"], record["seed"],
                                record["config_hash"])] = record
        if len(good) != len(lines) or (lines and not text.endswith("\n")):
            tmp = self.results_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(g + "\n" for g in good))
            tmp.replace(self.results_path)
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
    """
    cfg.validate()
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset,
                           seed=cfg.data_seed)
    validate_methods(dataset, cfg)
    store = ResultStore(out_dir, cfg)
    store.open(dataset)
    return dataset, store


def run_sweep(cfg: CompareConfig, out_dir: str | Path, *, jobs: int = 1,
              threads: int = 1, show_progress: bool = True,
              console: Console | None = None,
              prepared: tuple[Dataset, ResultStore] | None = None) -> list[dict[str, Any]]:
    """Run every (method, batch size, seed) of ``cfg`` not yet in ``out_dir``, resumably.

    Args:
        cfg: the sweep.
        out_dir: run directory; finished runs found there are skipped.
        jobs: runs in parallel worker processes (1: in this process). Workers are spawned,
            so a script calling this with ``jobs > 1`` needs the usual
            ``if __name__ == "__main__":`` guard; they stop when this process dies.
        threads: torch threads per run. Small models gain little from more than one and run
            many times slower when threads outnumber the free cores: keep ``jobs × threads ≤
            cores`` and prefer more ``jobs``.
        show_progress: show a live progress bar with the current runs and the ETA.
        console: where the progress bar goes (default: a new stderr console).
        prepared: the result of :func:`prepare`, if already called.

    Returns:
        The records of the requested grid, in grid order (finished earlier or now).
    """
    dataset, store = prepared or prepare(cfg, out_dir)
    done = store.load()
    h = cfg.config_hash()
    grid = [(m, b, s) for s in cfg.seeds for b in sorted(cfg.batch_sizes) for m in cfg.methods]
    todo = [run for run in grid if run_key(*run, h) not in done]
    steps = {run: cfg.epochs * (len(dataset.x_train) // run[1]) for run in todo}
    console = console or Console(stderr=True)
    if show_progress and len(todo) < len(grid):
        console.print(f"resuming: {len(grid) - len(todo)} of {len(grid)} runs already in "
                      f"{store.results_path}")
    progress = Progress(TextColumn("{task.description}", table_column=Column(
                            ratio=1, no_wrap=True, overflow="ellipsis")),
                        BarColumn(bar_width=20), TaskProgressColumn(),
                        TextColumn("{task.fields[runs]} runs"), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=not show_progress, expand=True)
    with progress:
        task = progress.add_task("starting", total=sum(steps.values()) or 1,
                                 runs=f"0/{len(todo)}")
        for finished, record in enumerate(
                _execute(dataset, cfg, todo, jobs, threads, progress, task), 1):
            store.append(record)
            done[run_key(record["method"], record["batch_size"], record["seed"], h)] = record
            progress.update(task, runs=f"{finished}/{len(todo)}")
        progress.update(task, description="done", completed=sum(steps.values()) or 1)
    return [done[run_key(*run, h)] for run in grid]


def _label(run: Run) -> str:
    return f"{run[0]} bs={run[1]} seed={run[2]}"


def _execute(dataset: Dataset, cfg: CompareConfig, todo: list[Run], jobs: int, threads: int,
             progress: Progress, task: Any) -> Iterator[dict[str, Any]]:
    """Yield the records of ``todo`` as runs finish, sequentially or in worker processes."""
    advance: Callable[[int], None] = lambda n: progress.advance(task, n)  # noqa: E731
    if jobs <= 1 or len(todo) <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for run in todo:
                progress.update(task, description=_label(run))
                yield train_run(dataset, cfg, *run, on_steps=advance)
        finally:
            torch.set_num_threads(before)
        return
    yield from _execute_parallel(dataset, cfg, todo, jobs, threads, progress, task, advance)


def _execute_parallel(dataset: Dataset, cfg: CompareConfig, todo: list[Run], jobs: int,
                      threads: int, progress: Progress, task: Any,
                      advance: Callable[[int], None]) -> Iterator[dict[str, Any]]:
    """Run ``todo`` in ``jobs`` worker processes fed from a queue; terminate them on exit."""
    ctx = multiprocessing.get_context("spawn")  # fork after torch has threads can deadlock
    tasks, events = ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(dataset, cfg, tasks, events, threads),
                           daemon=True) for _ in range(min(jobs, len(todo)))]
    for run in [*todo, *[None] * len(workers)]:
        tasks.put(run)
    for w in workers:
        w.start()
    running: dict[int, Run] = {}
    try:
        for _ in todo:
            while True:
                try:
                    kind, pid, value = events.get(timeout=0.5)
                except queue.Empty:
                    dead = [w for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        lost = running.get(dead[0].pid)
                        raise WorkerError(
                            f"a worker process died (exit code {dead[0].exitcode}; out of "
                            f"memory?) while running {_label(lost) if lost else 'a run'}; "
                            "finished runs are saved: rerun to resume, or use --jobs 1"
                        ) from None
                    continue
                if kind == "steps":
                    advance(value)
                    continue
                if kind == "start":
                    running[pid] = value
                else:
                    running.pop(pid, None)
                progress.update(task, description=", ".join(map(_label, running.values())))
                if kind == "done":
                    yield value
                    break
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()


class WorkerError(RuntimeError):
    """A worker process of a parallel sweep died (killed, out of memory, crashed)."""


def _worker(dataset: Dataset, cfg: CompareConfig, tasks: Any, events: Any, threads: int) -> None:
    """Worker process: train runs from ``tasks`` until ``None``, report through ``events``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(threads)
    importlib.import_module("normkit")  # registers the methods in this fresh process
    pid, parent = os.getpid(), os.getppid()

    def on_steps(n: int) -> None:
        if os.getppid() != parent:  # the sweep was killed: stop rather than linger
            os._exit(1)
        events.put(("steps", pid, n))

    while True:
        try:
            run = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if run is None:
            return
        events.put(("start", pid, run))
        events.put(("done", pid, train_run(dataset, cfg, *run, on_steps=on_steps)))
