"""Timing, memory and printing helpers of the benchmarks (``normkit bench``).

Every implementation of one cell is timed round-robin in the same loop (the order rotates each
round), so machine noise hits all of them alike; medians are reported. Memory is the bytes autograd
saves for backward (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage).

Example:
    >>> parse_shape("64x64x32x32:cl")
    ShapeSpec(dims=(64, 64, 32, 32), layout='channels_last')
    >>> median([3.0, 1.0, 2.0, 10.0])
    2.5
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ShapeSpec", "copy_bandwidth", "fmt", "fmt_load", "load_warning", "loadavg",
           "machine_info", "median", "parse_shape", "runner", "saved_bytes", "synchronize", "table",
           "time_call", "time_cell", "usable_cores"]


@dataclass(frozen=True)
class ShapeSpec:
    """An input shape and its memory layout (``nchw``, ``channels_last`` or ``rows``)."""

    dims: tuple[int, ...]
    layout: str

    @property
    def label(self) -> str:
        return "x".join(map(str, self.dims)) + (":cl" if self.layout == "channels_last" else "")

    def make(self, gen: torch.Generator) -> Tensor:
        x = torch.randn(self.dims, generator=gen)
        return x.contiguous(memory_format=torch.channels_last) if self.layout == "channels_last" else x


def parse_shape(text: str) -> ShapeSpec:
    """``"128x64x16x16"`` (NCHW), ``"…:cl"`` (channels-last, 4-D only) or ``"8192x768"`` (rows)."""
    body, _, tag = text.strip().partition(":")
    try:
        dims = tuple(int(d) for d in body.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected e.g. 64x64x32x32, 64x64x32x32:cl or 8192x768") from None
    if len(dims) not in (2, 4) or min(dims) < 1:
        raise ValueError(f"bad shape {text!r}: need 2 (rows x features) or 4 (NCHW) positive sizes")
    if tag not in ("", "cl", "nchw") or (tag == "cl" and len(dims) != 4):
        raise ValueError(f"bad layout {tag!r} in {text!r}: use ':cl' on a 4-D shape or nothing")
    return ShapeSpec(dims, "rows" if len(dims) == 2 else ("channels_last" if tag == "cl" else "nchw"))



def runner(mod: nn.Module, x: Tensor, g: Tensor, mode: str) -> Callable[[], None]:
    """One call of ``mod`` in ``mode``: a forward under ``no_grad`` (``fwd-*``) or a forward and
    ``autograd.grad`` of the input and parameters with upstream ``g`` (``fb-*``)."""
    mod.train(mode.endswith("train"))
    if mode.startswith("fwd"):
        def fwd() -> None:
            with torch.no_grad():
                mod(x)
        return fwd
    xg = x.detach().requires_grad_()
    inputs = [xg, *(p for p in mod.parameters() if p.requires_grad)]

    def fwd_bwd() -> None:
        torch.autograd.grad(mod(xg), inputs, g)
    return fwd_bwd


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS); nothing to wait for on the CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


def time_call(run: Callable[[], None], device: torch.device | None = None) -> float:
    """Milliseconds of one call of ``run`` on ``device``.

    CPU: wall time (``time.perf_counter``). CUDA: the queue is drained first, then two
    ``torch.cuda.Event(enable_timing=True)`` recorded around the call on the current stream give
    the GPU time between them (``Event.elapsed_time``, after ``end.synchronize()``). MPS: wall time
    between two ``torch.mps.synchronize()``.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    synchronize(device)
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def time_cell(runs: dict[str, Callable[[], None]], repeats: int, warmup: int,
               budget_s: float, device: torch.device | None = None
               ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, str]]:
    """Round-robin timing of ``runs`` (ms per call), the first call's seconds, and errors.

    Each implementation is called ``warmup`` times untimed (the first call, which includes any
    compilation, is reported), then ``repeats`` rounds run, the order rotating each round. Past
    ``budget_s`` the cell stops after 3 rounds — or after 1 if 3 would not fit the budget. Calls
    are timed by :func:`time_call` on ``device`` (``None``: the CPU).
    """
    first: dict[str, float] = {}
    errors: dict[str, str] = {}
    last: dict[str, float] = {}
    for name, run in list(runs.items()):
        try:
            for i in range(max(warmup, 1)):
                last[name] = time_call(run, device) / 1e3
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
            samples[n].append(time_call(runs[n], device))
    return samples, first, errors


def median(v: list[float]) -> float:
    """The median of ``v`` (the mean of the two middle values for an even count)."""
    s = sorted(v)
    k = len(s) // 2
    return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])


def saved_bytes(mod: nn.Module, x: Tensor, stats_numel: int = 0) -> dict[str, int]:
    """Bytes autograd saves for backward in one training forward, deduplicated by storage.

    ``saved_bytes``: every storage; ``saved_extra_bytes``: those other than the input's and the
    parameters'; ``saved_stats_bytes``: the part of the extra held in storages of at most
    ``stats_numel`` elements (statistics, e.g. ``N·C`` for one value per sample and channel).
    """
    mod.train()
    xg = x.detach().requires_grad_()
    seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, elements) of its largest saved view
    own = {xg.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in mod.parameters()}

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage().data_ptr()
        size = (t.numel() * t.element_size(), t.numel())
        seen[key] = max(seen.get(key, (0, 0)), size)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(xg)
    del y
    extra = [v for k, v in seen.items() if k not in own]
    return {"saved_bytes": sum(b for b, _ in seen.values()),
            "saved_extra_bytes": sum(b for b, _ in extra),
            "saved_stats_bytes": sum(b for b, n in extra if n <= stats_numel)}


def copy_bandwidth(numel: int = 1 << 24, repeats: int = 11) -> float:
    """GB/s of ``y.copy_(x)`` on float32 (bytes read + written over the median time)."""
    x, y = torch.randn(numel), torch.empty(numel)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / median(times[2:]) / 1e9



def loadavg() -> list[float] | None:
    """``os.getloadavg()``, or ``None`` where the platform has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def usable_cores() -> int:
    """CPUs this process may run on (its affinity where the platform says, else ``os.cpu_count``)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_warning(load: list[float] | None, cores: int, threads: int, own: float = 0.0) -> str | None:
    """A warning when other processes compete for the cores a timing run needs, else ``None``.

    Other processes' load is the 1-minute load average less ``own`` (what this run adds itself:
    0 before it starts, about ``threads`` at its end). The machine is loaded when that plus the
    run's ``threads`` exceeds ``cores``: then the scheduler shares cores and every ratio moves
    (by ±30 % on a shared 2-core VM).

    Example:
        >>> load_warning([3.0, 2.0, 1.0], cores=2, threads=1) is not None
        True
        >>> load_warning([0.1, 0.1, 0.1], cores=2, threads=1) is None
        True
    """
    if not load:
        return None
    others = max(load[0] - own, 0.0)
    if others + threads <= cores:
        return None
    return (f"WARNING: the machine is loaded (1-min load {load[0]:.1f}, about {others:.1f} from "
            f"other processes, {cores} cores, {threads} thread(s) for this run): timings share "
            f"cores, so ratios move between runs (by ±30 % at a load of 2-3 on 2 cores, by up to "
            f"2-3x at 6-8); rerun on a quiet machine before judging a goal")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch/python versions, threads and load of this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from .. import __version__

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "normkit": __version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_start": loadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}



def fmt(v: float | None, spec: str = ".2f") -> str:
    """``v`` formatted by ``spec``; ``-`` for a missing or NaN value."""
    return "-" if v is None or v != v else format(v, spec)


def table(title: str, header: list[str], rows: list[list[str]], rich: bool) -> str | None:
    """A plain-text table (returned), or a rich table printed directly (returns ``None``)."""
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


def fmt_load(load: list[float] | None) -> str:
    """A load average as ``1.0/2.0/3.0``."""
    return "-" if not load else "/".join(f"{v:.1f}" for v in load)

