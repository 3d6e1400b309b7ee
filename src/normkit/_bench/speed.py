"""``normkit bench``: every preset against torch's kernel and a plain formulation.

``python benchmarks/run.py`` (or ``normkit bench``) times each registered method (``ours``) on
NCHW, channels-last and ``(rows, features)`` inputs, next to

* ``torch`` — torch's native module computing the same thing, where one exists;
* ``plain`` — the straightforward autograd formula of the papers' reference code, e.g.
  ``(x - x.mean(d)) / torch.sqrt(x.var(d, unbiased=False) + eps) * w + b``;
* ``generic`` — our own generic path (``native=False``) for methods that dispatch to a kernel,
  so the dispatch is justified by numbers;
* ``bn_torch`` — ``torch.nn.BatchNorm`` at the same shape, the yardstick for methods without a
  native kernel;
* ``compiled`` — ``torch.compile(ours)`` (inductor) for a few methods, with its compile time.

Modes: ``fwd-train``/``fwd-eval`` (forward under ``torch.no_grad()``) and ``fb-train``/``fb-eval``
(forward + ``torch.autograd.grad`` w.r.t. the input and the parameters). Every implementation of
one (method, shape, mode) cell is timed round-robin in the same loop (the order rotates each
round), so machine noise hits all of them alike; we report medians and ratios of medians.
``torch.set_num_threads`` is set to ``--threads`` (default 2, this machine's core count) for the
run and restored afterwards. Memory is the bytes autograd saves for backward (through
``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage), with and without the
storages of the input and parameters. Bandwidth is an ideal kernel's traffic (forward: read x,
write y = 2 passes; forward+backward: + read x, read dy, write dx = 5 passes) over the median time,
as a fraction of the measured ``y.copy_(x)`` bandwidth.

The plain formulas and torch's modules are in :mod:`normkit._bench.reference`, the timing in
:mod:`normkit._bench.timing`, the command line in :mod:`normkit._bench.cli`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .reference import bn_torch, plain_for, torch_for
from .timing import (
    ShapeSpec,
    copy_bandwidth,
    fmt,
    fmt_load,
    loadavg,
    machine_info,
    median,
    parse_shape,
    runner,
    saved_bytes,
    table,
    time_cell,
)
from .whitening import whitening_report

__all__ = ["COMPILE_METHODS", "COMPILE_MODES", "DEFAULT_SHAPES", "DETAIL_SHAPES", "MODES",
           "NATIVE_TARGET", "NON_NATIVE_TARGET", "QUICK_SHAPES", "ROW_METHODS", "report", "run"]

MODES = ("fwd-train", "fwd-eval", "fb-train", "fb-eval")
DEFAULT_SHAPES = ("128x64x16x16", "128x64x16x16:cl", "64x64x32x32", "64x64x32x32:cl", "8192x768")
QUICK_SHAPES = ("32x64x16x16", "2048x768")
COMPILE_METHODS = ("rms_norm", "ln", "bn", "l1_bn")
COMPILE_MODES = ("fwd-eval", "fb-train")
DETAIL_SHAPES = ("64x64x32x32", "8192x768")  # shapes with compiled rows
# Methods run on (rows, features) inputs and their keyword arguments there.
ROW_METHODS: dict[str, dict[str, Any]] = {
    "ln": {"channel_axis": -1}, "rms_norm": {"channel_axis": -1},
    "scale_norm": {"channel_axis": -1}, "bn": {}, "mean_only_bn": {}, "l1_bn": {},
    "range_bn": {}, "batch_group_norm": {},
}
NATIVE_TARGET, NON_NATIVE_TARGET = 1.1, 2.0
FB_PASSES, FWD_PASSES = 5, 2



# ------------------------------------------------------------------------------ the run
@dataclass
class _Case:
    method: str
    spec: ShapeSpec
    impls: dict[str, nn.Module]
    native: bool
    ref: str | None


def _build_case(method: str, spec: ShapeSpec, compile_: bool) -> _Case:
    import normkit as nk

    kw = ROW_METHODS.get(method, {}) if len(spec.dims) == 2 else {}
    c = spec.dims[-1] if kw.get("channel_axis") == -1 else spec.dims[1]
    ours = nk.create(method, c, **kw)
    impls: dict[str, nn.Module] = {"ours": ours}
    native = getattr(ours, "_native", None) is not None
    if native:
        impls["generic"] = nk.create(method, c, native=False, **kw)
    t = torch_for(method, ours, spec)
    if t is not None:
        impls["torch"] = t
    p = plain_for(method, ours, spec)
    if p is not None:
        impls["plain"] = p
    if not (native and t is not None):
        impls["bn_torch"] = bn_torch(spec.dims[1], len(spec.dims))
    if compile_:
        torch._dynamo.reset()  # one compiled module at a time: stay under dynamo's cache limit
        impls["compiled"] = torch.compile(ours)
    ref = "torch" if native and t is not None else "bn_torch"
    return _Case(method, spec, impls, native, ref)


def _check_numerics(case: _Case, x: Tensor, g: Tensor) -> dict[str, tuple[float, float]]:
    """Max |y − y_ours| and max |dx − dx_ours| of each implementation in training mode."""
    out: dict[str, tuple[float, float]] = {}

    def fb(m: nn.Module) -> tuple[Tensor, Tensor]:
        xg = x.detach().requires_grad_()
        y = m.train()(xg)
        return y.detach(), torch.autograd.grad(y, xg, g)[0]

    y0, d0 = fb(case.impls["ours"])
    for name, m in case.impls.items():
        if name in ("ours", "bn_torch", "compiled"):
            continue
        try:
            y, d = fb(m)
            out[name] = (float((y - y0).abs().max()), float((d - d0).abs().max()))
        except Exception as e:  # the timing loop records the error
            out[name] = (float("nan"), float("nan"))
            print(f"  numerics check failed for {case.method}/{name}: {e}", file=sys.stderr)
    return out


@dataclass
class _Options:
    repeats: int = 7
    warmup: int = 1
    modes: Sequence[str] = MODES
    compile_methods: Sequence[str] = COMPILE_METHODS
    compile_modes: Sequence[str] = COMPILE_MODES
    detail_shapes: Sequence[str] = DETAIL_SHAPES
    cell_budget_s: float = 4.0
    deadline: float = math.inf


def run(shapes: Sequence[str] = DEFAULT_SHAPES, methods: Sequence[str] | None = None, *,
        repeats: int = 7, warmup: int = 1, modes: Sequence[str] = MODES,
        compile_methods: Sequence[str] = COMPILE_METHODS, compile_modes: Sequence[str] = COMPILE_MODES,
        detail_shapes: Sequence[str] = DETAIL_SHAPES, cell_budget_s: float = 4.0,
        max_seconds: float = math.inf, threads: int = 2, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """Run the benchmark and return the JSON-ready result (see the module docstring).

    ``detail_shapes`` get the compiled rows (for ``compile_methods``). A cell stops
    after ``repeats`` rounds, or after 3 once it has taken ``cell_budget_s`` — or its share of
    what is left of ``max_seconds``, so the whole run ends near that limit.
    """
    import normkit as nk

    specs = [parse_shape(s) for s in shapes]
    names = list(nk.list_methods()) if methods is None else [nk.info(m).name for m in methods]
    cases = [(m, s) for s in specs for m in names if len(s.dims) == 4 or m in ROW_METHODS]
    t_start = time.perf_counter()
    opts = _Options(repeats, warmup, list(modes), list(compile_methods), list(compile_modes),
                    list(detail_shapes), cell_budget_s, t_start + max_seconds)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {"schema": 1, "machine": machine_info(), "config": {
        "shapes": [s.label for s in specs], "methods": names, "repeats": repeats, "warmup": warmup,
        "modes": list(modes), "compile_methods": list(compile_methods),
        "compile_modes": list(compile_modes), "detail_shapes": list(detail_shapes),
        "cell_budget_s": cell_budget_s, "max_seconds": max_seconds,
        "fwd_passes": FWD_PASSES, "fb_passes": FB_PASSES}, "results": [], "cells": [],
        "memory": [], "errors": []}
    if compile_methods:
        import torch._inductor.config as inductor_config

        result["config"]["inductor_fx_graph_cache"] = inductor_config.fx_graph_cache
    try:
        bw = copy_bandwidth()
        torch.set_num_threads(1)
        bw1 = copy_bandwidth()
        torch.set_num_threads(threads)
        result["copy_bandwidth_gbs"] = bw
        result["copy_bandwidth_1thread_gbs"] = bw1
        log(f"copy bandwidth: {bw:.1f} GB/s at {threads} threads, {bw1:.1f} GB/s at 1 thread")
        if threads > 1 and bw < bw1:
            log("WARNING: more threads copy slower than one: other processes are using the CPUs, "
                "multi-threaded timings are dominated by scheduler waits")
        for i, (method, spec) in enumerate(cases):
            left = (opts.deadline - time.perf_counter()) / (len(cases) - i) / max(len(modes), 1)
            _run_case(result, method, spec, bw, gen, opts, max(min(cell_budget_s, left), 0.0), log)
    finally:
        torch.set_num_threads(prev_threads)
        if compile_methods and "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
    result["machine"]["loadavg_end"] = loadavg()
    result["elapsed_s"] = time.perf_counter() - t_start
    result["targets"] = _targets(result["cells"])
    return result


def _run_case(result: dict[str, Any], method: str, spec: ShapeSpec, bw: float,
              gen: torch.Generator, opts: _Options, budget: float, log: Callable[[str], None]) -> None:
    where = {"method": method, "shape": spec.label, "layout": spec.layout}
    t0 = time.perf_counter()
    detail = spec.label in opts.detail_shapes
    try:
        case = _build_case(method, spec, detail and method in opts.compile_methods)
        x = spec.make(gen)
        g = torch.randn(x.shape, generator=gen).contiguous(
            memory_format=torch.channels_last if spec.layout == "channels_last" else torch.contiguous_format)
        numerics = _check_numerics(case, x, g)
    except Exception as e:
        result["errors"].append({**where, "impl": "ours", "error": f"{type(e).__name__}: {e}"[:300]})
        log(f"  {method:<18} {spec.label:<18} skipped: {type(e).__name__}: {e}")
        return
    for name, m in case.impls.items():
        if name != "compiled":
            with contextlib.suppress(Exception):
                result["memory"].append({**where, "impl": name, **saved_bytes(m, x)})
    for mode in opts.modes:
        runs = {n: runner(m, x, g, mode) for n, m in case.impls.items()
                if n != "compiled" or mode in opts.compile_modes}
        samples, first, errors = time_cell(runs, opts.repeats, opts.warmup, budget)
        passes = FB_PASSES if mode.startswith("fb") else FWD_PASSES
        med = {n: median(s) for n, s in samples.items() if s}
        for n, err in errors.items():
            result["errors"].append({**where, "mode": mode, "impl": n, "error": err})
        for n, ms in med.items():
            gbs = passes * x.nbytes / (ms * 1e-3) / 1e9
            diff = numerics.get(n, (None, None))
            result["results"].append({
                **where, "mode": mode, "impl": n, "median_ms": ms, "min_ms": min(samples[n]),
                "times_ms": samples[n], "first_call_s": first[n], "gbs": gbs,
                "bw_fraction": gbs / bw, "max_abs_diff": diff[0], "max_abs_diff_grad": diff[1]})
        cell = {**where, "mode": mode, "native": case.native, "ref": case.ref,
                "medians_ms": med, "rounds": max((len(s) for s in samples.values()), default=0)}
        ours = med.get("ours")
        if ours:
            cell["ours_over"] = {n: ours / v for n, v in med.items() if n != "ours"}
        if ours and case.ref in med and mode.startswith("fb"):
            limit = NATIVE_TARGET if case.ref == "torch" else NON_NATIVE_TARGET
            cell["target"] = limit
            cell["target_met"] = ours / med[case.ref] <= limit
        if "compiled" in first:
            cell["compile_s"] = first["compiled"]
        result["cells"].append(cell)
    log(f"  {method:<18} {spec.label:<18} {time.perf_counter() - t0:6.1f} s")


def _targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [c for c in cells if "target_met" in c]
    missed = [{k: c[k] for k in ("method", "shape", "mode", "ref")}
              | {"ratio": c["medians_ms"]["ours"] / c["medians_ms"][c["ref"]], "target": c["target"]}
              for c in judged if not c["target_met"]]
    return {"judged": len(judged), "met": len(judged) - len(missed), "missed": missed}


def _ratio(cell: dict[str, Any] | None, num: str, den: str | None) -> float | None:
    ms = (cell or {}).get("medians_ms", {})
    return ms[num] / ms[den] if den and ms.get(num) and ms.get(den) else None


def _main_rows(result: dict[str, Any], modes: list[str]) -> list[list[str]]:
    """One row per (shape, method); the NCHW (or rows) and channels-last layouts side by side."""
    cells = {(c["method"], c["shape"], c["mode"]): c for c in result["cells"]}
    mem = {(m["method"], m["shape"], m["impl"]): m["saved_extra_bytes"] for m in result["memory"]}
    bw = {(r["method"], r["shape"]): r["bw_fraction"] for r in result["results"]
          if r["mode"] == "fb-train" and r["impl"] == "ours"}
    bases = list(dict.fromkeys(s.split(":")[0] for s in result["config"]["shapes"]))
    rows = []
    for base in bases:
        for method in result["config"]["methods"]:
            row: list[str] = []
            first = None
            for shape in (base, base + ":cl"):
                cs = [cells.get((method, shape, m)) for m in modes]
                c0 = next((c for c in cs if c), None)
                first = first or (c0 and (shape, c0))
                ref = c0["ref"] if c0 else None
                bt = cells.get((method, shape, "fb-train"))
                row += ["/".join(fmt((c or {}).get("medians_ms", {}).get("ours"), ".3g") for c in cs),
                        "/".join(fmt(_ratio(c, "ours", ref)) for c in cs),
                        fmt(_ratio(bt, "ours", "plain")), fmt(_ratio(bt, "ours", "generic")),
                        fmt(100 * bw[(method, shape)] if (method, shape) in bw else None, ".0f")]
            if first is None:
                continue
            shape, c0 = first
            saved = [mem.get((method, shape, k)) for k in ("ours", c0["ref"], "plain")]
            rows.append([base, method + ("" if c0["native"] else "*"),
                         "torch" if c0["ref"] == "torch" else "BN", *row,
                         "/".join(fmt(None if v is None else v / 2**20, ".0f") for v in saved)])
    return rows


def _extra_rows(result: dict[str, Any], modes: list[str]) -> list[list[str]]:
    """Compiled and non-reference torch rows (and the ``cand:*`` rows of runs saved before they
    were removed): ratios to ours (and generic) per mode."""
    by: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for c in result["cells"]:
        for k in c["medians_ms"]:
            if k.startswith(("cand:", "compiled")) or (k == "torch" and c["ref"] != "torch"):
                by.setdefault((c["shape"], c["method"], k), {})[c["mode"]] = c
    rows = []
    for (shape, method, k), per in by.items():
        cs = [per.get(m) for m in modes]
        comp = [per[m].get("compile_s") for m in modes if m in per and k == "compiled"]
        rows.append([shape, f"{method} {k}",
                     "/".join(fmt((c or {}).get("medians_ms", {}).get(k), ".3g") for c in cs),
                     "/".join(fmt(_ratio(c, k, "ours")) for c in cs),
                     "/".join(fmt(_ratio(c, k, "generic")) for c in cs),
                     "/".join(fmt(v, ".1f") for v in comp) or "-"])
    return rows


def report(result: dict[str, Any], rich: bool = False) -> str:
    """Human-readable tables of ``result`` (returned as text; printed directly when ``rich``)."""
    if "cells" not in result:  # a ``--whitening`` run
        m = result["machine"]
        text = whitening_report(result["whitening"], rich)
        return (f"{text}\n{m['cpu']}; torch {m['torch']}; load {fmt_load(m.get('loadavg_start'))}"
                f" -> {fmt_load(m.get('loadavg_end'))}")
    out: list[str | None] = []
    modes = [m for m in MODES if m in result["config"]["modes"]]
    short = "/".join({"fwd-train": "fT", "fwd-eval": "fE", "fb-train": "bT", "fb-eval": "bE"}[m]
                     for m in modes)
    header = ["shape", "method", "ref"]
    for lay in ("", "cl "):
        header += [f"{lay}ms {short}", f"{lay}x ref {short}", f"{lay}bT/plain", f"{lay}bT/gen",
                   f"{lay}bT bw%"]
    header.append("saved MiB o/r/p")
    out.append(table("ours: median ms and ours/ref per mode, NCHW (or rows) then channels-last "
                      "(cl); ref = torch's kernel, or torch BN at the same shape for * (no native "
                      "path)", header, _main_rows(result, modes), rich))
    extra = _extra_rows(result, modes)
    if extra:
        out.append(table(f"compiled and other torch rows per mode ({short}): ms, "
                          "ratio to ours and to our generic path (< 1: the row is faster), "
                          "compile s (first call)",
                          ["shape", "impl", "ms", "x ours", "x generic", "compile s"], extra, rich))
    t = result.get("targets", {})
    m = result["machine"]
    lines = [f"targets (fwd+bwd median; native: ours/torch <= {NATIVE_TARGET}, others: ours/BN "
             f"<= {NON_NATIVE_TARGET}): {t.get('met')}/{t.get('judged')} cells met; "
             f"copy bandwidth {result.get('copy_bandwidth_gbs', 0):.1f} GB/s "
             f"({result.get('copy_bandwidth_1thread_gbs', 0):.1f} at 1 thread); "
             f"{m['threads']} threads on {m['cpu']}; load {fmt_load(m.get('loadavg_start'))} -> "
             f"{fmt_load(m.get('loadavg_end'))}; {result.get('elapsed_s', 0):.0f} s"]
    worst: dict[str, list[dict[str, Any]]] = {}
    for x in t.get("missed", []):
        worst.setdefault(x["method"], []).append(x)
    judged = {}
    for c in result["cells"]:
        if "target_met" in c:
            judged[c["method"]] = judged.get(c["method"], 0) + 1
    for method, xs in worst.items():
        w = max(xs, key=lambda x: x["ratio"])
        lines.append(f"  missed {method}: {len(xs)}/{judged.get(method, 0)} cells, worst "
                     f"{w['ratio']:.2f} x {w['ref']} ({w['shape']} {w['mode']})")
    lines += [f"  error: {e['method']} {e['shape']} {e.get('mode', '')} {e['impl']}: {e['error']}"
              for e in result["errors"]]
    out.append("\n".join(lines))
    if "whitening" in result:
        out.append(whitening_report(result["whitening"], rich))
    return "\n\n".join(s for s in out if s is not None)
