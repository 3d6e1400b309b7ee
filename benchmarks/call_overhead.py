"""Per-call eager overhead of every registered method at small shapes (issue 20).

At a tiny input a normalization layer's step is mostly Python: argument checks, views, dtype
conversions, dict building, the autograd Function's ``apply``. This script times, for every
registered method (built as ``normkit bench`` builds them:
:func:`normkit._bench.conditioned.build_method`) and torch's ``BatchNorm2d`` in the same process:

- ``fwd``: one training-mode forward of an input that requires grad (the graph is built, as in a
  training step);
- ``fb``: that forward and ``y.backward(dy)``.

Thread time (``time.thread_time``, one thread), ``--calls`` calls per sample, samples taken in
interleaved rounds (every method once per round, in turn), the median over ``--rounds`` rounds;
printed as µs per call and as a ratio to torch BN's median at the same shape and mode.

Before/after comparisons run this same script on two source trees, alternating processes::

    for i in 1 2; do
      PYTHONPATH=/work/main/src python benchmarks/call_overhead.py --json /tmp/before_$i.json
      PYTHONPATH=src python benchmarks/call_overhead.py --json /tmp/after_$i.json
    done
    python benchmarks/call_overhead.py --compare /tmp/before_*.json -- /tmp/after_*.json

(``--compare A.json... -- B.json...`` prints A and B side by side, each cell the median over its
files.) One run of every method at the two default shapes takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

SHAPES = ("2x64x2x2", "8x64x8x8")


def _shape(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split("x"))


def _build(methods: list[str], shape: tuple[int, ...]) -> dict[str, Any]:
    from normkit._bench.conditioned import build_method

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    mods: dict[str, Any] = {"torch_bn": torch.nn.BatchNorm2d(shape[1])}
    for name in methods:
        try:
            m = build_method(name, x, gen).train()
            m(x.clone().requires_grad_())  # a method refusing this shape is left out
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            print(f"# {name} at {shape}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        mods[name] = m
    return mods


def _time(fn: Any, calls: int) -> float:
    t = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t) / calls * 1e6


def measure(methods: list[str], shape: tuple[int, ...], rounds: int, calls: int
            ) -> dict[str, dict[str, float]]:
    """``{method: {"fwd": µs, "fb": µs}}``: medians over interleaved rounds."""
    mods = _build(methods, shape)
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape)

    def fwd(m: Any) -> Any:
        return lambda: m(x)

    def fb(m: Any) -> Any:
        return lambda: m(x).backward(dy)

    fns = {k: (fwd(m), fb(m)) for k, m in mods.items()}
    for f, g in fns.values():  # warm-up: caches, allocator
        _time(f, 2)
        _time(g, 2)
    samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in fns}
    for _ in range(rounds):
        for k, (f, g) in fns.items():
            samples[k][0].append(_time(f, calls))
            samples[k][1].append(_time(g, calls))
    return {k: {"fwd": statistics.median(a), "fb": statistics.median(b)}
            for k, (a, b) in samples.items()}


def _table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for shape, res in results.items():
        bn = res["torch_bn"]
        lines.append(f"## {shape}   (torch BN fwd {bn['fwd']:.0f} µs, fwd+bwd {bn['fb']:.0f} µs)")
        lines.append(f"{'method':24s} {'fwd µs':>8s} {'/BN':>6s} {'fb µs':>8s} {'/BN':>6s}")
        for k, r in res.items():
            lines.append(f"{k:24s} {r['fwd']:8.0f} {r['fwd'] / bn['fwd']:6.2f} "
                         f"{r['fb']:8.0f} {r['fb'] / bn['fb']:6.2f}")
    return "\n".join(lines)


def _median_of(files: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    runs = [json.load(open(f)) for f in files]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for shape in runs[0]:
        out[shape] = {}
        for k in runs[0][shape]:
            vals = [r[shape][k] for r in runs if k in r.get(shape, {})]
            out[shape][k] = {m: statistics.median(v[m] for v in vals) for m in ("fwd", "fb")}
    return out


def compare(before: list[str], after: list[str]) -> str:
    """A markdown table: per shape and method, before/after µs and ratio to torch BN."""
    a, b = _median_of(before), _median_of(after)
    lines = []
    for shape in a:
        bn_a, bn_b = a[shape]["torch_bn"], b[shape]["torch_bn"]
        lines.append(f"\n### {shape} (torch BN fwd {bn_a['fwd']:.0f}→{bn_b['fwd']:.0f} µs, "
                     f"fb {bn_a['fb']:.0f}→{bn_b['fb']:.0f} µs)\n")
        lines.append("| method | fwd µs before | after | /BN before | after "
                     "| fb µs before | after | /BN before | after |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k in a[shape]:
            if k == "torch_bn" or k not in b[shape]:
                continue
            ra, rb = a[shape][k], b[shape][k]
            lines.append(
                f"| {k} | {ra['fwd']:.0f} | {rb['fwd']:.0f} | {ra['fwd'] / bn_a['fwd']:.2f} | "
                f"{rb['fwd'] / bn_b['fwd']:.2f} | {ra['fb']:.0f} | {rb['fb']:.0f} | "
                f"{ra['fb'] / bn_a['fb']:.2f} | {rb['fb'] / bn_b['fb']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--compare":
        sep = argv.index("--")
        print(compare(argv[1:sep], argv[sep + 1:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", help="comma-separated (default: every registered method)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--json", help="write the medians here")
    args = p.parse_args(argv)
    import normkit as nk

    torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else list(nk.list_methods())
    results = {s: measure(methods, _shape(s), args.rounds, args.calls) for s in args.shapes}
    print(f"# normkit from {nk.__file__}")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
