"""Shared helpers of ``tests/test_online*.py``: float64 test data with per-channel offsets, random
affine parameters, and the tolerance.

Tolerances: float64 computations of the same formula in a different order agree to ~1e-15
relative on O(10) values; ``TIGHT`` (1e-10) leaves a wide margin while any formula error (a
missing cross term, ε misplaced, biased/unbiased mix-up) changes results by ≥ 1e-4 here.
"""

from __future__ import annotations

import torch

import cases  # noqa: F401  (import the table first: it loads cases_online at its end)

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, loc=0.5, scale=1.7):
    x = torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale + loc
    if len(shape) > 1:  # per-channel offsets
        x = x + 0.4 * torch.arange(shape[1], dtype=DT).view(1, -1, *([1] * (len(shape) - 2)))
    return x


def _randomize(m: torch.nn.Module, seed: int = 3) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("weight", "bias"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 if name == "weight"
                        else torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _per_channel(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)
