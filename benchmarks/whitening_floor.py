"""The matmul floor of a whitening training step against torch's BatchNorm2d (issue 20).

``python benchmarks/whitening_floor.py [--shape 128x64x16x16] [--group 16] [--repeats 15]
[--compile]``

A batch-whitening step (groups of ``d`` channels over ``N·S`` samples) multiplies the
activations at least four times: ``Σ = X Xᵀ`` and ``W X`` in the forward, ``G = g Xᵀ`` and the
input gradient in the backward; the input gradient ``Mᵀ g + P X`` is two products with different
right operands (``g`` and ``X``), so five is the floor without concatenating them. Per-sample
(instance) whitening of ``C`` channels adds ``eigh`` of ``N`` ``C × C`` covariances. This script
times those batched products alone (the same ``bmm`` calls as ``normkit``'s ops, on the same
shapes), BN forward+backward, and each method's module, interleaved round by round in one
process (in a shuffled order each round), in thread CPU time (a shared machine's waiting is not counted). ``--compile`` adds
``torch.compile(fullgraph=True)`` of BN and of the batch-whitening modules (inductor; minutes).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

import normkit as nk


def _floors(x: torch.Tensor, g: torch.Tensor, d: int) -> dict[str, Callable[[], object]]:
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    xb, gb = x.detach().reshape(n * c // d, d, s), g.reshape(n * c // d, d, s)
    m = torch.randn(1, c // d, d, d).expand(n, c // d, d, d).reshape(n * c // d, d, d)
    xi, gi = x.detach().reshape(n, c, s), g.reshape(n, c, s)
    mi = torch.randn(n, c, c)
    cov = torch.bmm(xi, xi.mT) / s + 1e-3 * torch.eye(c)

    def four(a: torch.Tensor, b: torch.Tensor, mat: torch.Tensor) -> None:
        torch.bmm(a, a.mT)
        torch.bmm(mat, a)
        torch.bmm(b, a.mT)
        torch.bmm(mat, b)

    def five(a: torch.Tensor, b: torch.Tensor, mat: torch.Tensor) -> None:
        torch.bmm(a, a.mT)
        torch.bmm(mat, a)
        torch.bmm(b, a.mT)
        torch.bmm(mat, b).baddbmm_(mat, a)

    return {
        f"4 matmuls, d={d}": lambda: four(xb, gb, m),
        f"5 matmuls, d={d}": lambda: five(xb, gb, m),
        f"5 matmuls, d={c} per sample": lambda: five(xi, gi, mi),
        f"eigh of {n} {c}x{c}": lambda: torch.linalg.eigh(cov),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="128x64x16x16")
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split("x"))
    c = shape[1]
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)

    def step(m: torch.nn.Module) -> Callable[[], None]:
        return lambda: m(x).backward(g)

    cells: dict[str, Callable[[], object]] = {"torch BN": step(torch.nn.BatchNorm2d(c))}
    cells.update(_floors(x, g, a.group))
    names = ("dbn", "cd_bw", "iternorm", "pca_bw", "instance_whitening")
    cells.update({n: step(nk.create(n, c)) for n in names})
    if a.compile:
        cells["compiled torch BN"] = step(torch.compile(torch.nn.BatchNorm2d(c), fullgraph=True))
        for n in names[:3]:
            cells[f"compiled {n}"] = step(torch.compile(nk.create(n, c), fullgraph=True))
    for f in cells.values():  # warm-up (and the compiles)
        f(), f()
    times: dict[str, list[float]] = {k: [] for k in cells}
    order = list(cells)
    for _ in range(a.repeats):
        random.shuffle(order)  # no cell always runs after the same one (caches)
        for k in order:
            f = cells[k]
            t = time.thread_time()
            f()
            times[k].append(time.thread_time() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = med["torch BN"]
    cbase = med.get("compiled torch BN")
    print(f"{a.shape}, {a.threads} thread(s), median thread CPU ms of {a.repeats} rounds")
    for k, v in med.items():
        extra = f"  x compiled BN {v / cbase:5.2f}" if cbase else ""
        print(f"  {k:34s} {v:8.2f}  x BN {v / base:5.2f}{extra}")


if __name__ == "__main__":
    main()
