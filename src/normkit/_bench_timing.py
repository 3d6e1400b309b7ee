"""Timing, machine and table helpers shared by ``normkit bench`` (:mod:`normkit.benchmarking`) and
its weight tables (:mod:`normkit.bench_weight`): one module both import, so neither imports the
other's privates."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine_info"]


def _time_cell(runs: dict[str, Callable[[], None]], repeats: int, warmup: int,
               budget_s: float) -> tuple[dict[str, list[float]], dict[str, float], dict[str, str]]:
    """Round-robin timing of ``runs`` (ms per call), the first call's seconds, and errors.

    Each implementation is called ``warmup`` times untimed (the first call, which includes any
    compilation, is reported), then ``repeats`` rounds run, the order rotating each round. Past
    ``budget_s`` the cell stops after 3 rounds — or after 1 if 3 would not fit the budget.
    """
    first: dict[str, float] = {}
    errors: dict[str, str] = {}
    last: dict[str, float] = {}
    for name, run in list(runs.items()):
        try:
            for i in range(max(warmup, 1)):
                t0 = time.perf_counter()
                run()
                last[name] = time.perf_counter() - t0
                if i == 0:
                    first[name] = last[name]
        except Exception as e:  # record and drop the implementation, keep benchmarking
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            del runs[name]
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    min_rounds = min(3, repeats) if 3 * sum(last.values()) <= budget_s else 1
    start = time.perf_counter()
    for r in range(repeats):
        if r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        k = r % len(names) if names else 0
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runs[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return samples, first, errors


def _median(v: list[float]) -> float:
    s = sorted(v)
    k = len(s) // 2
    return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch/python versions, threads and load of this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import normkit as nk

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "normkit": nk.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_start": _loadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _table(title: str, header: list[str], rows: list[list[str]], rich: bool) -> str | None:
    if rich:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i < 2 else "right")
        for r in rows:
            t.add_row(*r)
        Console().print(t)
        return None
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([title, line(header), *(line(r) for r in rows)])
