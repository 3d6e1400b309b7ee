"""Compiled vs eager speed of batch whitening (DBN, IterNorm) against torch's BatchNorm2d.

``python benchmarks/compile_whitening.py [--shape 128x64x16x16] [--repeats 15] [--threads 1]``

Each implementation is timed in three modes on the same input: ``fb-train`` (training forward,
running buffers updated, then ``torch.autograd.grad`` w.r.t. the input and every parameter with a
fixed ``dy``), ``fb-eval`` (the same in eval mode: running statistics) and ``fwd-eval`` (eval
forward under ``torch.no_grad()``). ``compiled`` is ``torch.compile(module, fullgraph=True)``
(inductor) of a deep copy; its first calls (the compiles) are excluded, and its outputs and
gradients are checked against eager before timing. Medians over ``--repeats`` rounds after
three warm-up rounds, eager and compiled alternating round by round (minima in brackets), in
process CPU time (``time.process_time``: with one thread it is the op time, and unlike wall time
it does not count the time the process waits for a core on a shared machine). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import normkit as nk


def _modes(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Callable[[], None]]:
    params = list(m.parameters())

    def fb(train: bool) -> Callable[[], None]:
        def run() -> None:
            m.train(train)
            xr = x.detach().requires_grad_()
            torch.autograd.grad(m(xr), [xr, *params], dy)

        return run

    def fwd_eval() -> None:
        m.eval()
        with torch.no_grad():
            m(x)

    return {"fb-train": fb(True), "fb-eval": fb(False), "fwd-eval": fwd_eval}


def _times_ms(fns: list[Callable[[], None]], repeats: int) -> list[tuple[float, float]]:
    """(median, min) CPU ms of each of ``fns``, timed in alternation round by round (so a change
    of machine load hits every implementation alike)."""
    for _ in range(3):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.process_time()
            fn()
            ts.append(time.process_time() - t)
    return [(1e3 * statistics.median(ts), 1e3 * min(ts)) for ts in times]


def _check(eager: torch.nn.Module, compiled: Callable, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Largest relative difference of compiled vs eager outputs and gradients (train, eval)."""
    worst = 0.0
    for train in (True, False):
        outs = []
        for m, call in ((eager, eager), (compiled._orig_mod, compiled)):  # type: ignore[attr-defined]
            m.train(train)
            xr = x.detach().requires_grad_()
            y = call(xr)
            outs.append((y, *torch.autograd.grad(y, [xr, *m.parameters()], dy)))
        for a, b in zip(*outs, strict=True):
            a, b = a.detach(), b.detach()
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="128x64x16x16")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split("x"))
    c = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 1.5 + 0.5
    dy = torch.randn(shape, generator=g)
    builders = {"dbn": lambda: nk.create("dbn", c), "iternorm": lambda: nk.create("iternorm", c),
                "torch_bn": lambda: torch.nn.BatchNorm2d(c)}
    print(f"shape {shape}, float32, {torch.get_num_threads()} thread(s), median of "
          f"{args.repeats}, torch {torch.__version__}")
    print(f"{'method':<10}{'mode':<10}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}"
          f"{'(min ms)':>18}{'compile s':>11}{'max rel diff':>14}")
    for name, build in builders.items():
        torch._dynamo.reset()
        eager = build()
        eager(x)  # running statistics away from their initial values
        compiled_mod = copy.deepcopy(eager)
        compiled = torch.compile(compiled_mod, fullgraph=True)
        t = time.perf_counter()
        diff = _check(eager, compiled, x, dy)
        compile_s = time.perf_counter() - t
        e_modes, c_modes = _modes(eager, x, dy), _modes(compiled, x, dy)
        for mode in e_modes:
            c_modes[mode]()  # compile this mode's graph before timing
            (te, me), (tc, mc) = _times_ms([e_modes[mode], c_modes[mode]], args.repeats)
            print(f"{name:<10}{mode:<10}{te:>10.2f}{tc:>13.2f}{te / tc:>9.2f}x"
                  f"{me:>9.2f} /{mc:>7.2f}{compile_s:>11.1f}{diff:>14.2e}")


if __name__ == "__main__":
    main()
