"""Network slimming (Liu et al. 2017) on MNIST-1D and Fashion-MNIST with
:mod:`normkit.apply.slim`.

A CNN with BN (normkit's ``bn``) is trained with the L1 penalty ``s·Σ|γ|`` on every BN scale
(``add_gamma_l1``: an optimizer hook adding ``s·sign(γ)`` to γ's gradient). Then the fraction
``ratio`` of channels with the smallest ``|γ|`` (ranked over the whole network) is removed by
``slim``, which rebuilds the convolutions and the classifier into a smaller model, and the
smaller model is fine-tuned for a few epochs. Reported per dataset and ratio: parameters, FLOPs
of one example (``torch.utils.flop_counter``), test accuracy before pruning, right after it and
after fine-tuning, and the median eval latency of one batch of 256 (same process, same thread
count, ``--threads``, default 1).
The same is done for a model trained without the penalty (``s = 0``) at the middle ratio, to
show what the sparsity buys.

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` files
(``/usr/share/datasets/fashion-mnist``) and skipped, with a note, when they are absent.

Run::

    python examples/slimming.py            # full (about 4 minutes on 2 cores)
    python examples/slimming.py --quick    # seconds: MNIST-1D subset, one ratio
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from normkit.apply.slim import add_gamma_l1, slim
from normkit.experiments.data import DataError, load_dataset
from normkit.experiments.models import build_model


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for tests")
    p.add_argument("--datasets", default="mnist1d,fashion-mnist")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--sparsity", type=float, default=1e-2, help="s of the γ-L1 penalty")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default per set)")
    p.add_argument("--finetune", type=int, default=None, help="fine-tuning epochs after slim")
    p.add_argument("--subset", type=int, default=None, help="examples per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=30, help="latency repeats (median)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these nets are too small to gain "
                        "from more, and on a shared machine extra threads stall)")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.ratios, args.subset, args.repeats = "mnist1d", "0.5", 1000, 5
        args.epochs = args.epochs or 2
        args.finetune = 1 if args.finetune is None else args.finetune
    return args


SETTINGS = {  # dataset -> (model, channels, epochs, fine-tune epochs, subset, lr)
    "mnist1d": ("cnn1d", (32, 64, 64), 20, 5, None, 0.05),
    "fashion-mnist": ("cnn2d", (32, 64, 64), 4, 1, 16000, 0.05),
}


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


def train(model: nn.Module, ds, epochs: int, lr: float, sparsity: float, seed: int) -> None:  # type: ignore[no-untyped-def]
    """SGD with momentum and cosine decay; the γ-L1 hook when ``sparsity > 0``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * -(-len(ds.x_train) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    handle = add_gamma_l1(opt, model, sparsity) if sparsity > 0 else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(ds.x_train, ds.y_train, 128, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    if handle is not None:
        handle.remove()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item()
               for i in range(0, len(x), 1000)) / len(x)


def flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on one example (2 per multiply–add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(example[:1])
    return counter.get_total_flops()


@torch.inference_mode()
def latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one eval forward on the batch ``x``."""
    model.eval()
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def row(name: str, model: nn.Module, ds, args, **acc: float) -> dict:  # type: ignore[no-untyped-def]
    batch = ds.x_test[:256]
    return {"model": name, "params": sum(p.numel() for p in model.parameters()),
            "mflops": flops(model, batch) / 1e6,
            "latency_ms": latency(model, batch, args.repeats), **acc}


def run_dataset(name: str, args: argparse.Namespace) -> list[dict] | None:
    arch, channels, epochs, finetune, subset, lr = SETTINGS[name]
    epochs = args.epochs or epochs
    finetune = args.finetune if args.finetune is not None else finetune
    try:
        ds = load_dataset(name, subset=args.subset or subset, seed=args.seed)
    except DataError as e:
        print(f"\n{name}: skipped ({e})")
        return None
    torch.manual_seed(args.seed)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    for s in (args.sparsity, 0.0):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        base = build_model(arch, ds.input_shape, ds.num_classes, "bn", channels=channels)
        train(base, ds, epochs, lr, s, args.seed)
        tag = f"s={s:g}"
        acc = accuracy(base, ds.x_test, ds.y_test)
        rows.append(row(f"{tag} full", base, ds, args, acc=acc, pruned=acc, tuned=acc))
        for ratio in (ratios if s > 0 else ratios[len(ratios) // 2:][:1]):
            small, report = slim(base, ratio, example_input=ds.x_test[:64])
            pruned = accuracy(small, ds.x_test, ds.y_test)
            tuned = copy.deepcopy(small)
            train(tuned, ds, finetune, lr / 10, 0.0, args.seed + 1)
            rows.append(row(f"{tag} slim {ratio:g}", tuned, ds, args, acc=acc, pruned=pruned,
                            tuned=accuracy(tuned, ds.x_test, ds.y_test)))
            rows[-1]["threshold"] = report.threshold
        print(f"  {name} {tag}: trained {epochs} epochs + slimming in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"\n### {name} ({ds.source}, {len(ds.x_train)} train / {len(ds.x_test)} test, {arch} "
          f"{channels}, {epochs} epochs, fine-tune {finetune})\n")
    print("| model | params | MFLOPs | latency (ms, 256) | acc before | acc pruned | "
          "acc fine-tuned |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']} | {r['mflops']:.3f} | {r['latency_ms']:.2f} | "
              f"{r['acc']:.3f} | {r['pruned']:.3f} | {r['tuned']:.3f} |")
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict] | None]:
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"γ-L1 strength s = {args.sparsity:g}")
    start = time.perf_counter()
    try:
        out = {name: run_dataset(name, args) for name in args.datasets.split(",")}
    finally:
        torch.set_num_threads(threads)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return out


if __name__ == "__main__":
    main()
