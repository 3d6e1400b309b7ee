"""Your own model and data in ``normkit compare``: a model and a dataset defined in this file,
compared with one command.

``tiny_cnn`` takes the normalization under test as ``norm_layer`` (the drop-in convention of
torchvision and timm: ``norm_layer(num_features)``), ``stock_cnn`` is a model with torch's
``BatchNorm1d`` whose norms ``--convert`` replaces, and ``noisy_waves`` is a small synthetic
dataset (sine waves of 4 frequencies in noise, one class each, deterministic). The command line::

    normkit compare --model examples/compare_own_model.py:tiny_cnn \\
        --dataset examples/compare_own_model.py:noisy_waves \\
        --methods bn,gn:num_groups=4,ln,none --batch-sizes 4,32 --epochs 3 --out runs/own
    normkit compare --model examples/compare_own_model.py:stock_cnn --convert \\
        --dataset examples/compare_own_model.py:noisy_waves --methods bn,gn:num_groups=4,none

(a module on the Python path works the same: ``--model mypackage.models:tiny_cnn``). From Python,
``normkit.experiments.compare`` takes the functions themselves. Run::

    python examples/compare_own_model.py            # the comparison above (about a minute)
    python examples/compare_own_model.py --quick    # seconds: one epoch, two batch sizes
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn


def tiny_cnn(norm_layer, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two conv layers with ``norm_layer`` after each, on ``(L,)`` sequences."""
    return nn.Sequential(
        nn.Unflatten(1, (1, input_shape[0])),
        nn.Conv1d(1, 16, 5, padding=2), norm_layer(16), nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2), norm_layer(32), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, num_classes))


def stock_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The same network with torch's ``BatchNorm1d``, as a model from a library would come."""
    return tiny_cnn(nn.BatchNorm1d, input_shape, num_classes)


def noisy_waves(n_train: int = 1200, n_test: int = 400, length: int = 32,
                ) -> tuple[torch.Tensor, ...]:
    """Sine waves of frequency 1–4 (the class) with random phase and amplitude in noise."""
    g = torch.Generator().manual_seed(0)
    n = n_train + n_test
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.arange(length) / length
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    amp = 0.5 + torch.rand(n, 1, generator=g)
    x = amp * torch.sin(2 * math.pi * (y[:, None] + 1) * t + phase)
    x = x + 0.8 * torch.randn(n, length, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def main(argv: list[str] | None = None) -> list[dict]:
    from normkit.experiments import compare
    from normkit.experiments.stats import recommend

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch, batch sizes 8 and 32")
    parser.add_argument("--out", default="runs/compare-own-model")
    args = parser.parse_args(argv)
    records = compare(model=tiny_cnn, dataset=noisy_waves,
                      methods=["bn", "gn:num_groups=4", "ln", "none"],
                      batch_sizes=[8, 32] if args.quick else [4, 32],
                      seeds=[0, 1] if args.quick else [0, 1, 2], epochs=1 if args.quick else 3,
                      out=args.out, jobs=1 if args.quick else None)
    for rec in recommend(records):
        print(rec.text())
    print(f"report: {args.out}/report.md")
    return records


if __name__ == "__main__":
    main()
