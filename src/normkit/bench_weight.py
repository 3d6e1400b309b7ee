"""``normkit bench --weights``: the cost of weight parametrizations (issue: book ch. 7).

Two tables, timed round-robin in one process (:func:`normkit._bench_timing._time_cell`):

* **layer** — forward + backward of a ``Conv2d(64, 64, 3)`` (weight ``64 × 576``) on
  ``(32, 64, 16, 16)`` with each :mod:`normkit.weight` method, against the plain layer and, for
  weight and spectral norm, torch's own parametrizations; median ms and the ratio to the plain
  layer.
* **orthogonal** — OWN (eigendecomposition) against ONI (Newton–Schulz, T = 5) on the weight alone
  at ``64 × 576`` and ``512 × 4608``: forward + backward median ms, and ``‖WWᵀ − I‖_F`` of the
  result (how orthogonal each makes it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations as TP

from . import weight as nk_weight
from ._bench_timing import _median, _table, _time_cell, machine_info

__all__ = ["run_weights", "weights_report", "LAYER_METHODS", "ORTHO_SHAPES"]

LAYER_METHODS: dict[str, dict[str, Any]] = {
    "weight_norm": {}, "centered_weight_norm": {}, "weight_standardization": {},
    "spectral_norm": {}, "own": {}, "oni": {"iterations": 5}, "cosine_norm": {}}
ORTHO_SHAPES = ((64, 576), (512, 4608))


def _fwd_bwd(mod: nn.Module, x: Tensor) -> Callable[[], None]:
    xg = x.detach().requires_grad_()
    params = [p for p in mod.parameters() if p.requires_grad]

    def run() -> None:
        y = mod(xg)
        torch.autograd.grad(y, [xg, *params], torch.ones_like(y))
    return run


def _ortho_run(p: nn.Module, v: Tensor) -> Callable[[], None]:
    vg = v.detach().requires_grad_()

    def run() -> None:
        w = p(vg)
        torch.autograd.grad(w, vg, torch.ones_like(w))
    return run


def run_weights(*, batch: int = 32, channels: int = 64, size: int = 16,
                ortho_shapes: Sequence[tuple[int, int]] = ORTHO_SHAPES, repeats: int = 7,
                cell_budget_s: float = 4.0, threads: int = 2,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run both tables; a JSON-able dict (``machine``, ``layer`` rows, ``orthogonal`` rows)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"machine": machine_info(), "layer": [], "orthogonal": [], "errors": []}
    try:
        torch.manual_seed(0)
        plain = nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(batch, channels, size, size, generator=gen)
        mods: dict[str, nn.Module] = {"plain": plain}
        for name, kw in LAYER_METHODS.items():
            mods[name] = nk_weight.apply(copy.deepcopy(plain), name, **kw)
        mods["torch weight_norm"] = TP.weight_norm(copy.deepcopy(plain))
        mods["torch spectral_norm"] = TP.spectral_norm(copy.deepcopy(plain))
        for m in mods.values():
            m.train()
        samples, _, errors = _time_cell({n: _fwd_bwd(m, x) for n, m in mods.items()}, repeats, 1,
                                        cell_budget_s)
        out["errors"] += [{"table": "layer", "impl": n, "error": e} for n, e in errors.items()]
        base = _median(samples["plain"])
        for n, s in samples.items():
            med = _median(s)
            out["layer"].append({"impl": n, "median_ms": med, "ratio_plain": med / base,
                                 "weight": f"{channels}x{channels * 9}", "input": list(x.shape)})
        log(f"  layer table: {time.perf_counter() - start:.1f} s")
        for rows, cols in ortho_shapes:
            v = torch.randn(rows, cols, generator=gen) / cols ** 0.5
            impls = {"own": nk_weight.OrthogonalWeightNorm(),
                     "oni": nk_weight.OrthogonalNewton(iterations=5)}
            samples, _, errors = _time_cell({n: _ortho_run(p, v) for n, p in impls.items()},
                                            repeats, 1, cell_budget_s)
            out["errors"] += [{"table": "orthogonal", "impl": n, "error": e} for n, e in errors.items()]
            for n, p in impls.items():
                with torch.no_grad():
                    w = p(v.double())
                    err = torch.linalg.matrix_norm(w @ w.T - torch.eye(rows, dtype=w.dtype)).item()
                out["orthogonal"].append({"impl": n, "shape": f"{rows}x{cols}",
                                          "median_ms": _median(samples[n]) if samples.get(n) else None,
                                          "orthogonality_error": err})
            log(f"  orthogonal {rows}x{cols}: {time.perf_counter() - start:.1f} s")
    finally:
        torch.set_num_threads(prev)
    out["elapsed_s"] = time.perf_counter() - start
    return out


def weights_report(result: dict[str, Any], rich: bool = False) -> str:
    """The two tables of :func:`run_weights` as text."""
    layer = [[r["impl"], f"{r['median_ms']:.3g}", f"{r['ratio_plain']:.2f}"] for r in result["layer"]]
    ortho = [[r["shape"], r["impl"], "—" if r["median_ms"] is None else f"{r['median_ms']:.3g}",
              f"{r['orthogonality_error']:.1e}"] for r in result["orthogonal"]]
    w = result["layer"][0]
    parts = [
        _table(f"weight parametrizations: Conv2d weight {w['weight']}, input {tuple(w['input'])}, "
               f"fwd+bwd median ms and ratio to the plain layer", ["impl", "ms", "x plain"], layer,
               rich),
        _table("orthogonalization of the weight alone (fwd+bwd): OWN (eigh) vs ONI (Newton–Schulz, "
               "T=5); ‖WWᵀ − I‖_F of the result in float64", ["weight", "impl", "ms", "‖WWᵀ−I‖"],
               ortho, rich),
    ]
    return "\n\n".join(p for p in parts if p) + f"\n{result['elapsed_s']:.0f} s"
