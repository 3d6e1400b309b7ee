"""``normkit bench --whitening``: batch whitening against torch BN, the papers' plain formulation
(:class:`~normkit._bench.reference.PlainWhitening`) and the cost floor of evaluation (one
block-diagonal matmul), with the issue's targets judged per row."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .reference import Lambda, PlainWhitening, bn_torch
from .timing import fmt, median, parse_shape, runner, saved_bytes, table, time_cell

__all__ = ["WHITENING_GROUPS", "blockmm_for", "WHITENING_METHODS", "WHITENING_MODES", "WHITENING_SHAPES",
           "run_whitening", "whitening_report"]

# ``--whitening``: batch whitening against torch BN, the papers' plain formulation and the cost
# floor of evaluation (one block-diagonal matmul). The issue's targets, judged per row.
WHITENING_METHODS: dict[str, dict[str, Any]] = {
    "dbn": {}, "pca_bw": {}, "cd_bw": {}, "iternorm": {"iterations": 5}}
WHITENING_KINDS = {"dbn": "zca", "pca_bw": "pca", "cd_bw": "cholesky", "iternorm": "newton"}
WHITENING_SHAPES = ("128x64x16x16", "256x512")
WHITENING_GROUPS = (16, 64)
WHITENING_MODES = ("fwd-train", "fb-train", "fwd-eval")
WHITENING_TOL = 1e-3  # float32 agreement of ours and the plain formulation
# (method or None for all, group size or None, shape or None, metric, limit): the issue states its
# targets on (128, 64, 16, 16) float32; 256x512 (0.5 MB, ~0.1 ms per pass) is reported, not judged:
# there fixed per-call costs (module overhead, the d×d matrix functions) dominate every ratio.
WHITENING_TARGETS: tuple[tuple[str | None, int | None, str | None, str, float], ...] = (
    ("iternorm", 64, "128x64x16x16", "ours/BN", 3.0),
    ("dbn", 16, "128x64x16x16", "ours/BN", 2.0),
    (None, None, "128x64x16x16", "eval/mm", 1.2),
    (None, None, "128x64x16x16", "saved/in", 1.25),
)


def _group_view(y: Tensor, d: int) -> Tensor:
    return y.transpose(0, 1).reshape(y.shape[1] // d, d, -1)


def blockmm_for(x: Tensor, d: int, gen: torch.Generator) -> nn.Module:
    """The cost floor of whitening in evaluation: one ``torch.baddbmm`` of random ``(C/d, d, d)``
    blocks and shift over ``x`` already in the ``(C/d, d, N·S)`` layout (the module ignores its
    argument). ``d`` must divide ``C``; the blocks are drawn from ``gen`` (a CPU generator) and
    moved to ``x``'s device."""
    c = x.shape[1]
    wmat = (torch.randn(c // d, d, d, generator=gen) / math.sqrt(d)).to(x.device)
    shift = torch.randn(c // d, d, 1, generator=gen).to(x.device)
    xm = _group_view(x, d).contiguous()
    return Lambda(lambda _x, w=wmat, s=shift, v=xm: torch.baddbmm(s, w, v))


def _whitening_check(ours: nn.Module, plain: nn.Module, kind: str, x: Tensor, g: Tensor,
                     d: int) -> dict[str, Any]:
    """Train (and one eval) outputs of ``ours`` and ``plain`` from the same fresh state.

    PCA whitening is defined up to the sign of each eigenvector: ours fixes it (largest entry
    positive), ``eigh`` does not, so a channel of the plain output may be negated. For PCA the
    judged difference is between the covariances of the two outputs (sign-free; both are
    ``diag(λ/(λ+ε))``), ``|y|`` is reported, and the eval output (an average of sign-ambiguous
    matrices) and the gradients are not compared.
    """
    out: dict[str, Any] = {}
    ys, ds = [], []
    for m in (ours, plain):
        xg = x.detach().requires_grad_()
        y = m.train()(xg)
        ds.append(torch.autograd.grad(y, xg, g)[0])
        ys.append(y.detach())
    with torch.no_grad():
        ev = [m.eval()(x) for m in (ours, plain)]
    if kind == "pca":
        cov = [(lambda v: torch.bmm(v, v.transpose(1, 2)) / v.shape[-1])(_group_view(y, d)) for y in ys]
        out["compared"] = "cov(y)"
        out["max_abs_diff"] = float((cov[0] - cov[1]).abs().max())
        out["max_abs_diff_absy"] = float((ys[0].abs() - ys[1].abs()).abs().max())
    else:
        out["compared"] = "y"
        out["max_abs_diff"] = float((ys[0] - ys[1]).abs().max())
        out["max_abs_diff_eval"] = float((ev[0] - ev[1]).abs().max())
        out["max_abs_diff_grad"] = float((ds[0] - ds[1]).abs().max())
    out["ok"] = bool(out["max_abs_diff"] <= WHITENING_TOL
                     and out.get("max_abs_diff_eval", 0.0) <= WHITENING_TOL)
    return out


def _whitening_targets(row: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for method, d, shape, metric, limit in WHITENING_TARGETS:
        if (method in (None, row["method"]) and d in (None, row["group_size"])
                and shape in (None, row["shape"]) and row["ratios"].get(metric) is not None):
            value = row["ratios"][metric]
            found.append({"metric": metric, "limit": limit, "value": value, "met": value <= limit})
    return found


def run_whitening(shapes: Sequence[str] = WHITENING_SHAPES, group_sizes: Sequence[int] = WHITENING_GROUPS,
                  methods: Sequence[str] = tuple(WHITENING_METHODS), *, repeats: int = 7,
                  warmup: int = 1, cell_budget_s: float = 3.0, threads: int = 2,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``--whitening`` benchmark: for each (shape, group size, method), ``ours``, ``plain``
    (:class:`PlainWhitening`), torch BN and, in eval, ``blockmm`` — one
    ``torch.baddbmm`` over the input already in ``(G, d, N·S)`` layout — timed round-robin per
    mode (:data:`WHITENING_MODES`); eval runs after one training step. Saved bytes are per
    training forward (all storages autograd keeps, the input's included) over the input's bytes.
    """
    import normkit as nk

    specs = [parse_shape(s) for s in shapes]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "config": {"shapes": [s.label for s in specs], "group_sizes": list(group_sizes),
                   "methods": list(methods), "modes": list(WHITENING_MODES), "repeats": repeats,
                   "warmup": warmup, "cell_budget_s": cell_budget_s, "threads": threads,
                   "tolerance": WHITENING_TOL,
                   "targets": [dict(zip(("method", "group_size", "shape", "metric", "limit"), t,
                                        strict=True)) for t in WHITENING_TARGETS]},
        "rows": [], "errors": []}
    try:
        for spec in specs:
            x = spec.make(gen)
            g = torch.randn(x.shape, generator=gen)
            c = spec.dims[1]
            for d in group_sizes:
                if c % d:
                    continue
                for method in methods:
                    kind = WHITENING_KINDS[method]
                    where = {"method": method, "kind": kind, "group_size": d, "shape": spec.label}
                    t0 = time.perf_counter()
                    try:
                        ours = nk.create(method, c, group_size=d, **WHITENING_METHODS[method])
                        plain = PlainWhitening(kind, c, d, eps=ours.eps, momentum=ours.momentum,
                                                iterations=WHITENING_METHODS[method].get("iterations", 5))
                        check = _whitening_check(ours, plain, kind, x, g, d)
                        bn = bn_torch(c, len(spec.dims))
                        blockmm = blockmm_for(x, d, gen)
                        saved = {n: saved_bytes(m, x) for n, m in (("ours", ours), ("plain", plain))}
                    except Exception as e:
                        out["errors"].append({**where, "error": f"{type(e).__name__}: {e}"[:300]})
                        log(f"  {method:<9} d={d:<3} {spec.label:<14} skipped: {type(e).__name__}: {e}")
                        continue
                    impls: dict[str, nn.Module] = {"ours": ours, "plain": plain, "bn_torch": bn}
                    med: dict[str, dict[str, float]] = {}
                    for mode in WHITENING_MODES:
                        cell = dict(impls, **({"blockmm": blockmm} if mode == "fwd-eval" else {}))
                        runs = {n: runner(m, x, g, mode) for n, m in cell.items()}
                        samples, _, errors = time_cell(runs, repeats, warmup, cell_budget_s)
                        med[mode] = {n: median(s) for n, s in samples.items() if s}
                        out["errors"] += [{**where, "mode": mode, "impl": n, "error": e}
                                          for n, e in errors.items()]
                    bt, fe = med["fb-train"], med["fwd-eval"]

                    def ratio(a: dict[str, float], num: str, den: str) -> float | None:
                        return a[num] / a[den] if a.get(num) and a.get(den) else None

                    row = {**where, "medians_ms": med, "numerics": check,
                           "saved_bytes": {n: s["saved_bytes"] for n, s in saved.items()},
                           "saved_extra_bytes": {n: s["saved_extra_bytes"] for n, s in saved.items()},
                           "input_bytes": x.nbytes,
                           "ratios": {"ours/BN": ratio(bt, "ours", "bn_torch"),
                                      "plain/BN": ratio(bt, "plain", "bn_torch"),
                                      "ours/plain": ratio(bt, "ours", "plain"),
                                      "eval/mm": ratio(fe, "ours", "blockmm"),
                                      "saved/in": saved["ours"]["saved_bytes"] / x.nbytes,
                                      "plain saved/in": saved["plain"]["saved_bytes"] / x.nbytes}}
                    row["targets"] = _whitening_targets(row)
                    out["rows"].append(row)
                    log(f"  {method:<9} d={d:<3} {spec.label:<14} {time.perf_counter() - t0:5.1f} s")
    finally:
        torch.set_num_threads(prev)
    judged = [t for r in out["rows"] for t in r["targets"]]
    out["targets"] = {"judged": len(judged), "met": sum(t["met"] for t in judged)}
    out["numerics_ok"] = all(r["numerics"]["ok"] for r in out["rows"])
    out["elapsed_s"] = time.perf_counter() - t_start
    return out


def whitening_report(w: dict[str, Any], rich: bool = False) -> str:
    """The ``--whitening`` table: medians (ms), ratios and the issue's targets (``!`` = missed)."""
    rows = []
    for r in w["rows"]:
        med = r["medians_ms"]
        marks = {t["metric"]: "*" if t["met"] else "!" for t in r["targets"]}

        def q(metric: str, r: dict[str, Any] = r, marks: dict[str, str] = marks) -> str:
            return fmt(r["ratios"].get(metric)) + marks.get(metric, "")

        n = r["numerics"]
        rows.append([r["shape"], f"{r['method']} d={r['group_size']}",
                     "/".join(fmt(med["fwd-train"].get(k), ".3g") for k in ("ours", "plain")),
                     "/".join(fmt(med["fb-train"].get(k), ".3g") for k in ("ours", "plain", "bn_torch")),
                     "/".join(fmt(med["fwd-eval"].get(k), ".3g") for k in ("ours", "plain", "blockmm")),
                     q("ours/BN"), fmt(r["ratios"]["plain/BN"]), fmt(r["ratios"]["ours/plain"]),
                     q("eval/mm"), q("saved/in"), fmt(r["ratios"]["plain saved/in"]),
                     f"{n['max_abs_diff']:.1e}{'' if n['ok'] else '!'}" + (" cov" if n["compared"] != "y" else "")])
    header = ["shape", "method", "fT ms o/p", "bT ms o/p/BN", "fE ms o/p/mm", "o/BN bT",
              "p/BN bT", "o/p bT", "oE/mm", "saved/in", "p saved/in", "|o-p|"]
    c = w["config"]
    title = (f"whitening, {c['threads']} threads: median ms (fT fwd train, bT fwd+bwd train, fE eval "
             f"fwd); o ours, p plain (papers' formulation), BN torch BatchNorm, mm one block-diagonal "
             f"baddbmm; saved = bytes saved for backward / input bytes. Targets, on 128x64x16x16 "
             f"(the issue's shape; 256x512 is reported, not judged): o/BN bT <= 3 (iternorm d=64) "
             f"and <= 2 (dbn d=16); oE/mm <= 1.2; saved/in <= 1.25. Judged cells: * met, ! missed")
    text = table(title, header, rows, rich)
    t = w["targets"]
    tail = (f"targets met: {t['met']}/{t['judged']}; plain agrees with ours (<= {c['tolerance']:g}, "
            f"PCA by output covariance): {w['numerics_ok']}; {w['elapsed_s']:.0f} s")
    tail += "".join(f"\n  error: {e['method']} d={e['group_size']} {e['shape']} {e.get('mode', '')} "
                    f"{e.get('impl', '')}: {e['error']}" for e in w["errors"])
    return "\n\n".join(s for s in (text, tail) if s is not None)
