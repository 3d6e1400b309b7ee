"""Evaluation latency of a small CNN before and after ``normkit.apply.fold.fold``.

Model: 3 blocks of Conv3x3 → norm → ReLU (32, 64, 64 channels; the second and third with stride
2), global average pool, Linear(64, 10); input 64×3×32×32. Norms: torch ``BatchNorm2d``,
normkit ``bn``, ``dbn`` and ``iternorm`` (``group_size=16``). Before timing, the running
statistics are warmed by a few training forwards and the folded model's output is compared with
the original's (``max_rel_diff`` in the JSON).

Each (norm, model) pair is timed round-robin in the same loop (original and folded alternate,
order rotating each round), one ``model(x)`` under ``torch.inference_mode()`` per sample; we
report medians and the ratio of medians. The machine is shared: quote medians and ratios.
One thread by default: with 2 threads on the shared 2-core machine, waits for a worker thread
held by another process dominate (the same folded network took 14 to 112 ms from row to row).

    python benchmarks/fold.py                    # ~1 min on 2 cores, writes benchmarks/results/fold.json
    python benchmarks/fold.py --quick            # 5 rounds, batch 16
    python benchmarks/fold.py --device cuda      # on a GPU (synchronized timing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import normkit as nk
from normkit._bench import machine_info
from normkit.apply.fold import fold

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "torch_bn": nn.BatchNorm2d,
    "bn": lambda c: nk.create("bn", c),
    "dbn": lambda c: nk.create("dbn", c, group_size=16),
    "iternorm": lambda c: nk.create("iternorm", c, group_size=16),
}


def small_cnn(norm: Callable[[int], nn.Module]) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for cout, stride in ((32, 1), (64, 2), (64, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
              device: str) -> dict[str, list[float]]:
    """Seconds per call of each model, round-robin with a rotating order."""
    names = list(models)
    out: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                models[n](x)
        for r in range(repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                _sync(device)
                t0 = time.perf_counter()
                models[n](x)
                _sync(device)
                out[n].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="5 rounds, batch 16")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "fold.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batch, args.warmup = 5, 16, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        info = machine_info()
        if args.device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(args.device)
        rows = []
        gen = torch.Generator().manual_seed(0)
        for name, norm in NORMS.items():
            torch.manual_seed(0)
            model = small_cnn(norm)
            model.train()
            with torch.no_grad():
                for _ in range(3):
                    model(torch.randn(32, 3, 32, 32, generator=gen))
            model = model.eval().to(args.device)
            folded = fold(model)
            x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(args.device)
            with torch.inference_mode():
                y, yf = model(x), folded(x)
            rel = float((y - yf).abs().max() / y.abs().max())
            times = time_pair({"original": model, "folded": folded}, x, args.repeats,
                              args.warmup, args.device)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"norm": name, "median_ms_original": med["original"] * 1e3,
                         "median_ms_folded": med["folded"] * 1e3,
                         "speedup": med["original"] / med["folded"], "max_rel_diff": rel,
                         "samples_s": times})
    finally:
        torch.set_num_threads(threads)
    result = {"machine": info, "device": args.device, "batch": args.batch,
              "input": [args.batch, 3, 32, 32], "repeats": args.repeats, "rows": rows}
    print(f"fold: small CNN eval latency, batch {args.batch}, 32x32, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}, medians of {args.repeats}")
    print(f"{'norm':<10} {'original ms':>12} {'folded ms':>10} {'speedup':>8} {'max rel diff':>13}")
    for r in rows:
        print(f"{r['norm']:<10} {r['median_ms_original']:>12.3f} {r['median_ms_folded']:>10.3f} "
              f"{r['speedup']:>7.2f}x {r['max_rel_diff']:>13.1e}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
