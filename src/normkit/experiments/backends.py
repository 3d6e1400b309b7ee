"""Where the runs of a sweep execute: this process, local worker processes, or a Ray cluster.

Every backend takes the list of :class:`~normkit.experiments.tuning.Run` s still to do and yields
their records as they finish; the driver (:func:`normkit.experiments.sweep.run_sweep`) appends each
to the run directory's ``results.jsonl``, so resuming works the same whatever ran the runs.

* ``local`` (default): ``jobs`` spawned worker processes fed from a queue (one: this process);
* ``ray``: one Ray task per run (``num_cpus=threads``, and one GPU with ``--device cuda``) on the
  cluster at ``address`` (``None``: start a local Ray instance; ``"auto"``: the cluster this
  machine belongs to). Needs the
  ``ray`` extra (``pip install "normkit[ray]"``) and ``normkit`` (and a user model's module)
  importable on every node. Ray is started and shut down here unless it was already initialized.

A run computes the same numbers on every backend (one torch thread per run by default).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from .._device import check_device
from ..errors import ConfigError
from .data import Dataset
from .runner import CompareConfig, train_run
from .tuning import Run

__all__ = ["BACKENDS", "Backend", "WorkerError", "check_backend", "execute", "run_one"]

Backend = Literal["local", "ray"]
BACKENDS = ("local", "ray")


class WorkerError(RuntimeError):
    """A worker process or Ray task of a sweep died (killed, out of memory, crashed)."""


def label(run: Run) -> str:
    """``"bn bs=8 lr=0.1 seed=0 (val)"``: a run for the progress bar and messages."""
    lr = "" if run.lr is None else f" lr={run.lr:g}"
    return f"{run.method} bs={run.batch_size}{lr} seed={run.seed}" + (
        " (val)" if run.phase == "val" else "")


def run_one(dataset: Dataset, cfg: CompareConfig, run: Run,
            on_steps: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one run (see :func:`normkit.experiments.runner.train_run`)."""
    return train_run(dataset, cfg, run.method, run.batch_size, run.seed, lr=run.lr,
                     phase=run.phase, on_steps=on_steps)


def check_backend(backend: str, address: str | None = None, device: str = "cpu") -> None:
    """Refuse an unknown backend, an ``address`` without Ray, Ray when it is not installed, a
    ``device`` the local backend's machine lacks (:func:`~normkit._device.check_device`),
    or a numbered CUDA device with Ray (Ray gives every run's task one GPU of its own: use
    ``cuda``).

    Raises:
        ConfigError: naming the value and the fix.
    """
    import importlib.util

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise ConfigError("--address is the Ray cluster's; add --backend ray or drop --address")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--backend ray needs Ray: pip install 'normkit[ray]' (or "
                          "'ray>=2.9'), or use the default local backend")
    check_device(device, here=backend == "local")
    if backend == "ray" and device.startswith("cuda:"):
        raise ConfigError(f"--device {device} names one GPU, but Ray gives each run's task a "
                          f"GPU of its own: use --device cuda with --backend ray")


def execute(dataset: Dataset, cfg: CompareConfig, todo: list[Run], *, backend: str = "local",
            jobs: int = 1, threads: int = 1, address: str | None = None,
            advance: Callable[[int], None] = lambda n: None,
            describe: Callable[[str], None] = lambda text: None) -> Iterator[dict[str, Any]]:
    """Yield the records of ``todo`` as the runs finish.

    Args:
        backend: ``"local"`` or ``"ray"``.
        jobs: local worker processes (1: this process); ignored by Ray.
        threads: torch threads per run.
        address: the Ray cluster (``backend="ray"`` only).
        advance: called with the optimizer steps done (progress).
        describe: called with the runs in progress (progress).

    Raises:
        ConfigError: for an unknown backend, ``address`` without Ray, or Ray not installed.
        WorkerError: when a worker process or Ray task dies.
    """
    check_backend(backend, address, cfg.device)
    if not todo:
        return
    if backend == "ray":
        yield from _execute_ray(dataset, cfg, todo, threads, address, advance, describe)
    elif jobs <= 1 or len(todo) <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for run in todo:
                describe(label(run))
                yield run_one(dataset, cfg, run, advance)
        finally:
            torch.set_num_threads(before)
    else:
        yield from _execute_processes(dataset, cfg, todo, jobs, threads, advance, describe)


# ------------------------------------------------------------------------------ local processes
def _execute_processes(dataset: Dataset, cfg: CompareConfig, todo: list[Run], jobs: int,
                       threads: int, advance: Callable[[int], None],
                       describe: Callable[[str], None]) -> Iterator[dict[str, Any]]:
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
                        lost = running.get(dead[0].pid)  # type: ignore[arg-type]
                        raise WorkerError(
                            f"a worker process died (exit code {dead[0].exitcode}; out of "
                            f"memory?) while running {label(lost) if lost else 'a run'}; "
                            "finished runs are saved: rerun to resume, or use --jobs 1"
                        ) from None
                    continue
                if kind == "steps":
                    advance(value)
                    continue
                if kind == "start":
                    running[pid] = Run(*value)
                else:
                    running.pop(pid, None)
                describe(", ".join(map(label, running.values())))
                if kind == "done":
                    yield value
                    break
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()


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
        events.put(("start", pid, tuple(run)))
        events.put(("done", pid, run_one(dataset, cfg, Run(*run), on_steps)))


# ------------------------------------------------------------------------------ Ray
def _ray_task(dataset: Dataset, cfg: CompareConfig, run: tuple[Any, ...],
              threads: int) -> dict[str, Any]:
    """One run as a Ray task (in a Ray worker process)."""
    torch.set_num_threads(threads)
    importlib.import_module("normkit")  # registers the methods
    return run_one(dataset, cfg, Run(*run))


def ray_resources(cfg: CompareConfig, threads: int) -> dict[str, Any]:
    """The options of every run's Ray task: ``threads`` CPUs, one GPU when ``cfg.device`` is
    CUDA (Ray hides the GPUs a task did not ask for), no retries.

    Example:
        >>> ray_resources(CompareConfig(device="cuda"), 2)
        {'num_cpus': 2, 'num_gpus': 1, 'max_retries': 0}
    """
    gpus = 1 if torch.device(cfg.device).type == "cuda" else 0
    return {"num_cpus": threads, "num_gpus": gpus, "max_retries": 0}


def _execute_ray(dataset: Dataset, cfg: CompareConfig, todo: list[Run], threads: int,
                 address: str | None, advance: Callable[[int], None],
                 describe: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Submit every run as a Ray task; yield records in the order they finish."""
    import ray

    started = not ray.is_initialized()
    if started:
        import logging

        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    task = ray.remote(**ray_resources(cfg, threads))(_ray_task)
    pending: dict[Any, Run] = {}
    try:
        data_ref, cfg_ref = ray.put(dataset), ray.put(cfg)
        pending = {task.remote(data_ref, cfg_ref, tuple(run), threads): run for run in todo}
        describe(f"{len(pending)} Ray tasks")
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except Exception as err:  # a crashed worker or node: not a training failure
                raise WorkerError(f"the Ray task of {label(run)} died "
                                  f"({type(err).__name__}: {str(err).splitlines()[0]}); "
                                  "finished runs are saved: rerun to resume") from err
            advance(record["steps"])
            describe(f"{len(pending)} Ray tasks left")
            yield record
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
