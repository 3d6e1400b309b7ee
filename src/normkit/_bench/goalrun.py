"""``normkit bench --goals``: every registered method against the speed goals of issue 20.

For each method at each shape (default ``128x64x16x16`` float32, 1 thread), one round-robin loop
times forward + backward in training (``torch.autograd.grad`` of the input and parameters) of

* ``ours`` — ``normkit.create(method, C)`` (conditional methods with a fixed condition,
  :mod:`~normkit._bench.conditioned`), and ``bn`` — torch ``BatchNorm2d(C)``;
* ``compiled`` / ``compiled_bn`` — both under ``torch.compile(fullgraph=True)`` (inductor); a
  method that fails to compile keeps its row, with the error's first line;
* ``peer`` — timm's implementation of the layer (:data:`~normkit._bench.goals.PEERS`; timm is
  imported here, lazily: without it the column is empty and a note says so), next to
  ``peer_ours``, normkit configured like it where that differs from the defaults;
* ``lrn`` — torch's local response normalization at the method's window and constants, for
  the local family (:func:`~normkit._bench.reference.lrn_at_window`: ``LocalResponseNorm``
  for ``lrn``, the same computation over LCN's and divisive normalization's windows);

then, in a second loop (three times the rounds: the calls are short), the evaluation forward
(``no_grad``) of ``ours`` and ``bn`` after those training steps, and ``blockmm`` (one
block-diagonal matmul) for whitening. Saved-for-backward bytes come from
:func:`~normkit._bench.timing.saved_bytes`; the judged figure leaves out statistics (storages of at
most ``N·C`` values: per-sample / per-channel moments), so it counts activations. Ratios are of
medians (``statistic="min"``: of minima, the least disturbed call) of the same loop; the goals
(:data:`~normkit._bench.goals.GOALS`) are judged per method and listed met / missed. On CUDA
every call is timed with ``torch.cuda.Event`` (:func:`~normkit._bench.timing.time_call`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import reference
from .conditioned import Conditioned, build_method, inner
from .goals import EXEMPT, FIGURES, PEERS, goals_for, verdict
from .reference import bn_torch, lrn_at_window
from .timing import (
    ShapeSpec,
    fmt,
    fmt_load,
    load_warning,
    loadavg,
    machine_info,
    median,
    parse_shape,
    runner,
    saved_bytes,
    table,
    time_cell,
    usable_cores,
)
from .whitening import blockmm_for

__all__ = ["GOAL_SHAPES", "goals_report", "run_goals"]

GOAL_SHAPES = ("128x64x16x16",)
_MIN_CASE_S = 3.0  # below this many seconds left per remaining case, compilation is skipped


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else error


def _eval_kind(ours: nn.Module) -> tuple[str | None, int | None]:
    """``("affine", None)`` when the eval transform is a per-channel affine map, ``("matrix", d)``
    when it is block-diagonal with ``d × d`` blocks, else ``(None, None)`` (per-sample statistics,
    a condition, or no running statistics)."""
    layer = inner(ours)
    with contextlib.suppress(Exception):
        a, _ = layer.folded()  # type: ignore[operator]
        if a.dim() == 1:
            return "affine", None
        if a.dim() == 3:
            return "matrix", int(a.shape[-1])
    return None, None


def _timm_layers() -> tuple[Any, str | None]:
    try:
        import timm.layers as layers
    except ImportError as e:
        return None, f"timm is not installed ({e}): timm peer columns left out"
    return layers, None


def _peer(method: str, x: Tensor, ours: nn.Module, gen: torch.Generator,
          layers: Any) -> tuple[nn.Module | None, nn.Module | None, str | None]:
    """(normkit configured like the peer or ``None`` when ``ours`` is, the peer, note): timm's
    layer, or a plain-torch reference on ``ours``'s own weights (with ``ours``'s condition)."""
    spec = PEERS.get(method)
    if spec is not None and spec.source == "torch":
        ref = getattr(reference, spec.cls)(inner(ours)).to(x.device)
        return None, (Conditioned(ref, ours.condition) if isinstance(ours, Conditioned)
                      else ref), None
    if spec is None or layers is None:
        return None, None, None
    mine = build_method(method, x, gen, **spec.kwargs) if spec.kwargs else None
    eps = inner(mine or ours).eps
    eps = eps if eps is not None else torch.finfo(x.dtype).eps
    try:
        peer = getattr(layers, spec.cls)(x.shape[1], eps=eps, **spec.timm_kwargs).to(x.device)
    except Exception as e:  # an older timm without the class
        return None, None, f"timm peer {spec.cls} unavailable: {_first_line(str(e))}"
    return mine, peer, None


def _ratio(med: dict[str, float], num: str, den: str) -> float | None:
    return med[num] / med[den] if med.get(num) and med.get(den) else None


def _run_method(method: str, spec: ShapeSpec, device: torch.device, gen: torch.Generator,
                layers: Any, *, compile_: bool, repeats: int, warmup: int, budget: float,
                backend: str = "inductor") -> dict[str, Any]:
    import normkit as nk

    x = spec.make(gen).to(device)
    g = torch.randn(x.shape, generator=gen).to(device).contiguous(memory_format=(
        torch.channels_last if spec.layout == "channels_last" else torch.contiguous_format))
    row: dict[str, Any] = {"method": method, "family": nk.info(method).family, "shape": spec.label,
                           "medians_ms": {}, "errors": {}, "notes": [], "figures": {},
                           "input_bytes": x.nbytes}
    ours = build_method(method, x, gen)
    bn = bn_torch(x.shape[1], x.dim()).to(device)
    fb: dict[str, nn.Module] = {"ours": ours, "bn": bn}
    mine, peer, note = _peer(method, x, ours, gen, layers)
    if peer is not None:
        fb.update({"peer": peer, **({"peer_ours": mine} if mine is not None else {})})
        row["peer"] = PEERS[method].cls
    if note:
        row["notes"].append(note)
    lrn = lrn_at_window(method, inner(ours))
    if lrn is not None:
        fb["lrn"], row["lrn_window"] = lrn[0].to(device), lrn[1]
    if compile_:
        torch._dynamo.reset()  # one method's graphs at a time: stay under dynamo's recompile limit
        # compiled copies, as a compiled model is used: with the module shared with the eager
        # rows, normkit bn read 1.5-1.85x compiled torch BN in this loop (1.02x with copies;
        # no recompilation; the cause is not established)
        fb["compiled"] = torch.compile(copy.deepcopy(ours), fullgraph=True, backend=backend)
        fb["compiled_bn"] = torch.compile(copy.deepcopy(bn), fullgraph=True, backend=backend)
    runs = {n: runner(m, x, g, "fb-train") for n, m in fb.items()}
    with warnings.catch_warnings():  # inductor's own deprecation warnings, once per kernel
        warnings.simplefilter("ignore", FutureWarning)
        samples, first, errors = time_cell(runs, repeats, warmup, budget, device)
    row["medians_ms"]["fb-train"] = {n: median(s) for n, s in samples.items() if s}
    row["min_ms"] = {"fb-train": {n: min(s) for n, s in samples.items() if s}}
    row["compile_s"] = {n: first[n] for n in ("compiled", "compiled_bn") if n in first}
    row["errors"].update({n: _first_line(e) for n, e in errors.items()})
    kind, d = _eval_kind(ours)
    row["eval_kind"] = kind
    ev: dict[str, nn.Module] = {"ours": ours, "bn": bn}
    if kind == "matrix" and d is not None and x.shape[1] % d == 0:
        ev["blockmm"] = blockmm_for(x, d, gen)
    samples, _, errors = time_cell({n: runner(m, x, g, "fwd-eval") for n, m in ev.items()},
                                    3 * repeats, warmup, budget, device)  # short calls: more rounds
    row["medians_ms"]["fwd-eval"] = {n: median(s) for n, s in samples.items() if s}
    row["min_ms"]["fwd-eval"] = {n: min(s) for n, s in samples.items() if s}
    row["errors"].update({f"eval {n}": _first_line(e) for n, e in errors.items()})
    try:
        saved = saved_bytes(ours, x, stats_numel=x.shape[0] * x.shape[1])
        row["saved_extra_bytes"] = saved["saved_extra_bytes"]
        row["saved_stats_bytes"] = saved["saved_stats_bytes"]
    except Exception as e:
        row["errors"]["saved"] = _first_line(f"{type(e).__name__}: {e}")
    if compile_:
        torch._dynamo.reset()
    return row


def _figures(row: dict[str, Any], statistic: str = "median") -> dict[str, float | None]:
    times = row["medians_ms"] if statistic == "median" else row.get("min_ms", {})
    fb, ev = times.get("fb-train", {}), times.get("fwd-eval", {})
    saved = row.get("saved_extra_bytes")
    saved = None if saved is None else saved - row.get("saved_stats_bytes", 0)
    return {
        "eager": _ratio(fb, "ours", "bn"),
        "eager/LRN": _ratio(fb, "ours", "lrn"),
        "compiled": _ratio(fb, "compiled", "compiled_bn"),
        "peer": _ratio(fb, "peer_ours" if "peer_ours" in fb else "ours", "peer"),
        "eval": _ratio(ev, "ours", "bn"),  # judged only for a per-channel affine eval
        "eval/mm": _ratio(ev, "ours", "blockmm"),
        "saved": None if saved is None else saved / row["input_bytes"],
    }


def _applies(figure: str, row: dict[str, Any], compiled: bool) -> bool:
    return {"eager": True, "eager/LRN": "lrn_window" in row, "compiled": compiled,
            "peer": row["method"] in PEERS, "eval": row.get("eval_kind") == "affine",
            "eval/mm": row.get("eval_kind") == "matrix", "saved": True}[figure]


# the timed implementations whose failure misses a goal (a failing timm layer or torch module
# leaves it n/a: nothing of normkit's was measured wrong)
_ERROR_OF = {"eager": ("ours",), "eager/LRN": ("ours",), "compiled": ("compiled", "ours"),
             "peer": ("peer_ours", "ours"), "eval": ("eval ours",), "eval/mm": ("eval ours",),
             "saved": ("saved", "ours")}


def _judge(row: dict[str, Any], compiled: bool, skipped: bool = False) -> list[dict[str, Any]]:
    """The goals of ``row``'s method that apply to it, each with its verdict (``skipped``: the
    compiled goal was not run for the time budget, and says so)."""
    out = []
    errors = row["errors"]
    for figure, goal in goals_for(row["method"]).items():
        if figure == "compiled" and skipped:
            out.append({"figure": figure, "limit": goal.limit, "value": None, "error": None,
                        "wording": goal.wording, "verdict": "not run (--max-minutes)"})
        if not _applies(figure, row, compiled):
            continue
        why = EXEMPT.get((row["method"], figure))
        if why is not None:
            out.append({"figure": figure, "limit": goal.limit, "wording": goal.wording,
                        "value": row["figures"].get(figure), "error": None,
                        "verdict": "exempt", "why": why})
            continue
        value = row["figures"].get(figure)
        error = next((errors[k] for k in _ERROR_OF[figure] if k in errors), None)
        out.append({"figure": figure, "limit": goal.limit, "value": value, "wording": goal.wording,
                    "verdict": verdict(value, goal, error), "error": error})
    return out


def run_goals(shapes: Sequence[str] = GOAL_SHAPES, methods: Sequence[str] | None = None, *,
              repeats: int = 7, warmup: int = 1, compile_: bool = True, device: str = "cpu",
              threads: int = 1, cell_budget_s: float = 3.0, max_seconds: float = math.inf,
              backend: str = "inductor", statistic: str = "median",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the goals benchmark (see the module docstring); a JSON-ready dict with ``machine``,
    ``config``, ``rows`` (one per shape and method, with its ``figures`` and judged ``goals``),
    ``goals`` (met / judged) and ``warnings`` (a loaded machine, timm missing, budget cuts).

    Every cell stops after ``repeats`` rounds, or earlier past ``cell_budget_s`` or its share of
    what is left of ``max_seconds``; compilation is skipped for a method when what remains per
    method left is less than the mean time of a method so far (or 3 s). ``backend`` is
    ``torch.compile``'s (the goals are for inductor; the tests use ``aot_eager``, which compiles
    in a second).
    """
    import normkit as nk

    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
    specs = [parse_shape(s) for s in shapes]
    for s in specs:
        if len(s.dims) != 4:
            raise ValueError(f"the goals run needs NCHW shapes (torch BatchNorm2d, timm's 2d layers),"
                             f" got {s.label!r}: pass e.g. --shapes 128x64x16x16")
    names = list(nk.list_methods()) if methods is None else [nk.info(m).name for m in methods]
    dev = torch.device(device)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    cores = usable_cores()
    result: dict[str, Any] = {
        "schema": 1, "machine": {**machine_info(), "usable_cores": cores, "device": str(dev)},
        "config": {"shapes": [s.label for s in specs], "methods": names, "repeats": repeats,
                   "warmup": warmup, "compile": compile_, "backend": backend, "device": str(dev),
                   "threads": threads, "statistic": statistic,
                   "dtype": "float32", "cell_budget_s": cell_budget_s, "max_seconds": max_seconds},
        "rows": [], "warnings": []}
    if dev.type == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(dev)
    warn = load_warning(result["machine"]["loadavg_start"], cores, threads)
    if warn:
        result["warnings"].append(warn)
        log(warn)
    layers, note = _timm_layers()
    if note:
        result["warnings"].append(note)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    deadline = start + max_seconds
    cases = [(s, m) for s in specs for m in names]
    skipped_compile: list[str] = []
    case_s: list[float] = []  # seconds per case so far
    try:
        for i, (spec, method) in enumerate(cases):
            left = (deadline - time.perf_counter()) / (len(cases) - i)
            pace = sum(case_s) / len(case_s) if case_s else 0.0
            compile_now = compile_ and left > max(_MIN_CASE_S, pace)
            if compile_ and not compile_now:
                skipped_compile.append(f"{method} {spec.label}")
            t0 = time.perf_counter()
            try:
                row = _run_method(method, spec, dev, gen, layers, compile_=compile_now,
                                  repeats=repeats, warmup=warmup,
                                  budget=max(min(cell_budget_s, left / 2), 0.0), backend=backend)
            except Exception as e:  # the method cannot be built or run: a row with the error
                row = {"method": method, "family": nk.info(method).family, "shape": spec.label,
                       "medians_ms": {}, "errors": {"ours": _first_line(f"{type(e).__name__}: {e}")},
                       "notes": [], "input_bytes": 0}
            row["figures"] = _figures(row, statistic) if row["input_bytes"] else {}
            row["goals"] = _judge(row, compile_now, skipped=compile_ and not compile_now)
            result["rows"].append(row)
            case_s.append(time.perf_counter() - t0)
            log(f"  {method:<22} {spec.label:<14} {case_s[-1]:5.1f} s")
    finally:
        torch.set_num_threads(prev)
    if skipped_compile:
        result["warnings"].append(f"--max-minutes budget: compilation skipped for "
                                  f"{len(skipped_compile)} cases ({', '.join(skipped_compile[:5])}"
                                  f"{', ...' if len(skipped_compile) > 5 else ''})")
    result["machine"]["loadavg_end"] = loadavg()
    warn = load_warning(result["machine"]["loadavg_end"], cores, threads, own=threads)
    if warn and warn not in result["warnings"]:
        result["warnings"].append(warn.replace("WARNING:", "WARNING (at the end):", 1))
    judged = [g for r in result["rows"] for g in r["goals"] if g["verdict"] in ("met", "missed")]
    result["goals"] = {"judged": len(judged), "met": sum(g["verdict"] == "met" for g in judged)}
    result["elapsed_s"] = time.perf_counter() - start
    return result


_AGAINST = {"eager": "torch BN", "eager/LRN": "torch LRN", "compiled": "compiled torch BN",
            "peer": "timm", "eval": "torch BN eval", "eval/mm": "block matmul",
            "saved": "input bytes"}


def _against(figure: str, row: dict[str, Any]) -> str:
    if figure == "peer":
        spec = PEERS.get(row["method"])
        source = "timm" if spec is None or spec.source == "timm" else "torch"
        return f"{source} {row.get('peer', '')}".strip()
    if figure == "eager/LRN":
        return f"torch LRN({row.get('lrn_window', '')})"
    return _AGAINST[figure]


def _method_rows(result: dict[str, Any]) -> list[list[str]]:
    stat = result["config"].get("statistic", "median")
    rows = []
    for r in result["rows"]:
        times = r["medians_ms"] if stat == "median" else r.get("min_ms", {})
        f, fb = r.get("figures", {}), times.get("fb-train", {})
        comp = fmt(f.get("compiled"))
        if "compiled" in r["errors"]:
            comp = "error"
        met = sum(g["verdict"] == "met" for g in r["goals"])
        judged = sum(g["verdict"] in ("met", "missed") for g in r["goals"])
        notes = [f"{k}: {v}"[:110] for k, v in r["errors"].items()] + r["notes"]
        rows.append([r["shape"], r["method"], r["family"], fmt(fb.get("ours"), ".3g"),
                     fmt(f.get("eager")), comp, fmt(r.get("compile_s", {}).get("compiled"), ".1f"),
                     f"{fmt(f.get('peer'))} {r.get('peer', '')}".strip(), fmt(f.get("eval")),
                     fmt(f.get("eval/mm")), fmt(f.get("eager/LRN")), fmt(f.get("saved")),
                     f"{met}/{judged}", "; ".join(notes)])
    return rows


def goals_report(result: dict[str, Any], rich: bool = False) -> str:
    """The two tables of :func:`run_goals` (per method, then per goal) and the summary, as text
    (a rich table is printed directly and left out of the text)."""
    c, m = result["config"], result["machine"]
    where = (f"{c['device']}, {c['threads']} thread(s), {c['dtype']}, "
             f"{'compiled with ' + c.get('backend', 'inductor') if c['compile'] else 'no compile'}"
             f"{'; allocator: ' + c['allocator'] if c.get('allocator') else ''}")
    header = ["shape", "method", "family", "ms fb", "x BN", "comp x cBN", "compile s", "x peer",
              "eval x BN", "eval x mm", "x LRN", "saved/in", "goals", "errors / notes"]
    out: list[str | None] = [table(
        f"every method, fwd+bwd training unless eval ({where}): {c.get('statistic', 'median')} "
        "ms of ours, ratios to torch "
        "BatchNorm2d at the same shape in the same loop (compiled: to the compiled BN; compile s: "
        "its first call), to the peer (timm's layer, or the paper's reference in torch), to torch "
        "LocalResponseNorm (local methods); eval "
        "forward to BN eval (judged where the eval is a per-channel affine map) / one block "
        "matmul (whitening); saved = bytes saved for backward beyond the input, statistics "
        "(<= N*C values) aside / input bytes",
        header, _method_rows(result), rich)]
    goal_rows = []
    for r in result["rows"]:
        for g in sorted(r["goals"], key=lambda g: FIGURES.index(g["figure"])):
            measured = fmt(g["value"]) if g["error"] is None else f"error: {g['error']}"[:60]
            goal_rows.append([r["shape"], r["method"], g["figure"], _against(g["figure"], r),
                              measured, f"<= {g['limit']:g}", g["verdict"]])
    out.append(table("goals of issue 20, per method (measured = ratio, or saved/input bytes)",
                     ["shape", "method", "goal", "against", "measured", "target", "verdict"],
                     goal_rows, rich))
    t = result["goals"]
    lines = [f"goals met: {t['met']}/{t['judged']}; ratios are from one run on this machine "
             f"({c.get('statistic', 'median')} of round-robin calls); judge a goal from a quiet run. {m['cpu']}; torch "
             f"{m['torch']}; load {fmt_load(m.get('loadavg_start'))} -> "
             f"{fmt_load(m.get('loadavg_end'))} on {m.get('usable_cores')} cores; "
             f"{result.get('elapsed_s', 0):.0f} s"]
    missed: dict[str, list[str]] = {}
    for r in result["rows"]:
        for g in r["goals"]:
            if g["verdict"] == "missed":
                missed.setdefault(g["figure"], []).append(r["method"])
    lines += [f"  missed {f}: {', '.join(dict.fromkeys(ms))}" for f, ms in missed.items()]
    exempt: dict[tuple[str, str], list[str]] = {}
    for r in result["rows"]:
        for g in r["goals"]:
            if g["verdict"] == "exempt":
                exempt.setdefault((r["method"], g["why"]), []).append(g["figure"])
    lines += [f"  exempt ({m}: {', '.join(sorted(set(fs), key=FIGURES.index))}): {why}"
              for (m, why), fs in exempt.items()]
    lines += [f"  {w}" for w in result.get("warnings", [])]
    out.append("\n".join(lines))
    return "\n\n".join(s for s in out if s is not None)
