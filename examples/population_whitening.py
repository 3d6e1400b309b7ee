"""Natural Neural Networks on MNIST-1D: an MLP whose layers are whitened by population
statistics (:mod:`normkit.population`) against the same MLP with plain ``nn.Linear`` layers.

Both models start from the same initialization (a ``WhitenedLinear`` draws the same numbers as
``nn.Linear``; the first refresh re-expresses it without changing the function), see the same
batches and take plain SGD steps with the same learning rate. The whitened model refreshes its
whitening every ``--every`` steps from ``--refresh-batches`` random training batches. Reported:
the steps each needs to reach the plain model's final training loss (full training set, checked
every ``--eval-every`` steps), final losses and test accuracy, per seed, as a markdown table.

Run::

    python examples/population_whitening.py            # full: 3 seeds (a few minutes on 2 cores)
    python examples/population_whitening.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normkit.experiments.data import Dataset, load_dataset
from normkit.population import RefreshEvery, WhitenedLinear


def mlp(sizes: Sequence[int], whitened: bool, **kw: Any) -> nn.Sequential:
    """``Linear → ReLU → … → Linear`` with ``WhitenedLinear`` layers if ``whitened``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(WhitenedLinear(a, b, **kw) if whitened else nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(ds: Dataset, seed: int, whitened: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One run; returns the loss curve ``[(step, train_loss)]`` and final figures."""
    torch.manual_seed(seed)
    sizes = [ds.x_train.shape[1], *[args.hidden] * args.depth, ds.num_classes]
    model = mlp(sizes, whitened, eps=args.eps, method=args.method)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    pick = torch.Generator().manual_seed(seed + 1000)
    n = len(ds.x_train)
    cb = None
    if whitened:
        def batches() -> list[torch.Tensor]:
            return [ds.x_train[torch.randint(n, (args.batch_size,), generator=pick)]
                    for _ in range(args.refresh_batches)]
        cb = RefreshEvery(model, batches, every=args.every, optimizer=opt)
        cb.refresh()
    curve = [(0, full_loss(model, ds.x_train, ds.y_train)[0])]
    tic = time.perf_counter()
    perm, pos = torch.randperm(n, generator=order), 0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=order), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cb is not None:
            cb.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, full_loss(model, ds.x_train, ds.y_train)[0]))
    wall = time.perf_counter() - tic
    _, acc = full_loss(model, ds.x_test, ds.y_test)
    return {"curve": curve, "final": curve[-1][1], "test_acc": acc, "wall_s": wall}


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose training loss is ≤ ``target`` (None if never)."""
    return next((s for s, loss in curve if loss <= target), None)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny run for tests")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05, help="the common learning rate (table 1)")
    p.add_argument("--lrs", default="0.05,0.1,0.2,0.5,1.0",
                   help="grid for each model's own best lr on seed 0 (table 2; '' to skip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--every", type=int, default=100, help="refresh period T (steps)")
    p.add_argument("--refresh-batches", type=int, default=8)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--method", default="pca", choices=["pca", "zca", "cholesky"])
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--subset", type=int, default=None, help="training examples (default all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: tiny matmuls, robust on a shared machine)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.hidden, args.subset, args.lrs = 60, 1, 32, 1000, "0.05,0.2"
        args.every, args.eval_every, args.refresh_batches = 20, 10, 2
    return args


def _table(title: str, runs: dict[Any, dict[str, Any]], lrs: tuple[float, float],
           seeds: int) -> list[dict[str, Any]]:
    """Print one markdown table: per seed, steps of each model to the plain model's final
    training loss (plain at ``lrs[0]``, whitened at ``lrs[1]``)."""
    print(f"\n{title}\n")
    print("| seed | target (plain final train loss) | plain steps | whitened steps | speed-up "
          "| whitened final loss | plain test acc % | whitened test acc % | wall s plain / white |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for seed in range(seeds):
        plain, white = runs[(seed, False, lrs[0])], runs[(seed, True, lrs[1])]
        target = plain["final"]
        sp, sw = steps_to(plain["curve"], target), steps_to(white["curve"], target)
        rows.append({"seed": seed, "target": target, "steps_plain": sp, "steps_whitened": sw,
                     "final_whitened": white["final"], "test_acc_plain": plain["test_acc"],
                     "test_acc_whitened": white["test_acc"]})
        ratio = f"{sp / sw:.2f}×" if sp and sw else "–"
        print(f"| {seed} | {target:.4f} | {sp} | {sw if sw is not None else 'never'} | {ratio} "
              f"| {white['final']:.4f} | {100 * plain['test_acc']:.1f} | "
              f"{100 * white['test_acc']:.1f} | {plain['wall_s']:.1f} / {white['wall_s']:.1f} |")
    reached = [r for r in rows if r["steps_whitened"] and r["steps_plain"]]
    if reached:
        mean = sum(r["steps_plain"] / r["steps_whitened"] for r in reached) / len(reached)
        print(f"\nwhitened reached the target in {len(reached)}/{len(rows)} seeds; mean speed-up "
              f"{mean:.2f}× in steps (not wall time)")
    return rows


def main(argv: Sequence[str] | None = None, *, dataset: Dataset | None = None
         ) -> dict[str, Any]:
    """Run the comparison, print the markdown tables and return their rows (``dataset``: an
    already loaded ``load_dataset("mnist1d", subset=...)`` to reuse)."""
    args = parse(argv)
    ds = dataset if dataset is not None else load_dataset("mnist1d", subset=args.subset)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _compare(args, ds)
    finally:
        torch.set_num_threads(threads)


def _compare(args: argparse.Namespace, ds: Dataset) -> dict[str, Any]:
    runs: dict[Any, dict[str, Any]] = {}  # (seed, whitened, lr) → run

    def run(seed: int, whitened: bool, lr: float) -> dict[str, Any]:
        key = (seed, whitened, lr)
        if key not in runs:
            runs[key] = train(ds, seed, whitened, argparse.Namespace(**{**vars(args), "lr": lr}))
        return runs[key]

    with warnings.catch_warnings():  # a diverging whitened run warns at each skipped refresh
        warnings.simplefilter("ignore", RuntimeWarning)
        grid = [float(v) for v in args.lrs.split(",") if v.strip()]
        best = {}
        for whitened in (False, True):
            finals = {lr: run(0, whitened, lr)["final"] for lr in grid}
            finals = {lr: (f if math.isfinite(f) else math.inf) for lr, f in finals.items()}
            best[whitened] = min(finals, key=finals.__getitem__) if finals else args.lr
        for seed in range(args.seeds):
            for whitened in (False, True):
                run(seed, whitened, args.lr)
                if grid:
                    run(seed, whitened, best[whitened])
    print(f"MNIST-1D, MLP {args.depth}×{args.hidden} ReLU, plain SGD, batch {args.batch_size}, "
          f"{args.steps} steps, seeds 0..{args.seeds - 1}; whitened: WhitenedLinear layers, "
          f"method={args.method}, eps={args.eps}, refresh every {args.every} steps on "
          f"{args.refresh_batches} batches; training loss on the full training set every "
          f"{args.eval_every} steps.")
    out = {"args": vars(args), "common": _table(
        f"Table 1: the same lr = {args.lr} for both", runs, (args.lr, args.lr), args.seeds)}
    if grid:
        print(f"\nlr grid {grid} on seed 0 (lowest final training loss; diverged = ∞): plain "
              f"{best[False]}, whitened {best[True]}")
        out["best"] = _table(f"Table 2: each at its best lr (plain {best[False]}, whitened "
                             f"{best[True]})", runs, (best[False], best[True]), args.seeds)
        out["best_lr"] = {"plain": best[False], "whitened": best[True]}
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
