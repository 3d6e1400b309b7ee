"""``normkit bench --parity --device cuda``: every method computes on the device what it computes on
the CPU.

For each method, one module is built on the CPU (conditional methods with their fixed condition,
:mod:`~normkit._bench.conditioned`) and a copy moved to the device; both take one training step on
the same input in float64 (output, input gradient, parameter gradients, the buffers after the
step) and then an evaluation forward, and the largest difference of each against the CPU is
reported relative to the CPU value's scale (``max|a − b| / max(1, max|a|)``). float64 makes the
comparison one of the math, not of rounding: a backend's different reduction order moves results
by ~1e-15, a wrong kernel (a CPU-only branch, a tensor left on the CPU, a layout assumption) by
far more. One float32 step on the device must also be finite. Nothing is timed.

Example (on the CPU this compares the CPU with itself, the check of the checker)::

    >>> r = run_parity(["bn", "dbn"], "cpu", shape="4x8x3x3")
    >>> [(row["method"], row["ok"]) for row in r["rows"]]
    [('bn', True), ('dbn', True)]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .conditioned import Conditioned, _to, build_method
from .timing import fmt, parse_shape, table

__all__ = ["TOLERANCE", "parity_report", "run_parity"]

TOLERANCE = 1e-9  # float64: rounding-order differences are ~1e-15 of the scale


def _moved(m: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of ``m`` (and of its condition) on ``device`` in ``dtype``."""
    out = copy.deepcopy(m).to(device, dtype)
    if isinstance(out, Conditioned):
        out.condition = _to(out.condition, device, dtype)
    return out


def _step(m: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Output, gradients of the input and parameters, buffers after one training step, and the
    evaluation output afterwards (all on the CPU)."""
    xg = x.detach().clone().requires_grad_()
    y = m.train()(xg)
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [xg] + [p for _, p in params], g, allow_unused=True)
    out = {"y": y.detach(), "dx": grads[0]}
    out |= {f"d{n}": gp for (n, _), gp in zip(params, grads[1:], strict=True) if gp is not None}
    out |= {f"buffer {n}": b.detach().clone() for n, b in m.named_buffers()
            if b.is_floating_point()}
    with torch.no_grad():
        out["eval y"] = m.eval()(x)
    return {k: v.detach().cpu() for k, v in out.items()}


def _difference(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) / scale


def _check(method: str, device: torch.device, shape: tuple[int, ...],
           gen: torch.Generator) -> dict[str, Any]:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    cpu = torch.device("cpu")
    ref = _moved(build_method(method, x, gen), cpu, torch.float64)
    on_device = _moved(ref, device, torch.float64)  # copies before any step: the same state
    single = _moved(ref, device, torch.float32)
    want = _step(ref, x, g)
    got = _step(on_device, x.to(device), g.to(device))
    diffs = {k: _difference(want[k], got[k]) if k in got else float("inf") for k in want}
    worst = max(diffs, key=diffs.__getitem__) if diffs else ""
    finite = all(bool(torch.isfinite(t).all())
                 for t in _step(single, x.float().to(device), g.float().to(device)).values())
    ok = bool(diffs) and diffs[worst] <= TOLERANCE and finite
    return {"method": method, "ok": ok, "worst": worst, "difference": diffs.get(worst, 0.0),
            "compared": len(diffs), "float32_finite": finite}


def run_parity(methods: Sequence[str] | None, device: str, *, shape: str = "8x32x8x8",
               seed: int = 0) -> dict[str, Any]:
    """Compare every method (default: all registered) on ``device`` with the CPU (see the module
    docstring); a JSON-ready dict with ``device``, ``shape`` and ``rows`` (``method``, ``ok``,
    the ``worst`` compared tensor and its relative ``difference``, or the ``error``)."""
    import normkit as nk

    dev = torch.device(device)
    spec = parse_shape(shape)
    names = list(nk.list_methods()) if methods is None else [nk.info(m).name for m in methods]
    rows = []
    for method in names:
        gen = torch.Generator().manual_seed(seed)
        try:
            rows.append(_check(method, dev, spec.dims, gen))
        except Exception as e:  # a method that fails on the device keeps its row
            rows.append({"method": method, "ok": False,
                         "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
    return {"device": str(dev), "shape": spec.label, "tolerance": TOLERANCE, "rows": rows,
            "ok": all(r["ok"] for r in rows)}


def parity_report(result: dict[str, Any], rich: bool = False) -> str:
    """The table of :func:`run_parity` and a summary line."""
    rows = [[r["method"], "ok" if r["ok"] else "MISMATCH", r.get("worst", ""),
             fmt(r.get("difference"), ".1e"), str(r.get("compared", "")),
             "" if r.get("float32_finite", True) else "non-finite float32 step",
             r.get("error", "")] for r in result["rows"]]
    head = (f"{result['device']} against the CPU, float64, shape {result['shape']}: largest "
            f"difference relative to the CPU value's scale (tolerance {result['tolerance']:g})")
    text = table(head, ["method", "parity", "worst tensor", "difference", "compared", "float32",
                        "error"], rows, rich) or ""
    bad = [r["method"] for r in result["rows"] if not r["ok"]]
    summary = (f"{len(result['rows']) - len(bad)}/{len(result['rows'])} methods match on "
               f"{result['device']}" + (f"; mismatched: {', '.join(bad)}" if bad else ""))
    return f"{text}\n\n{summary}" if text else summary
