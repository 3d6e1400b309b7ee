"""Shared data of the fused and the traced mixture-normalization tests
(``tests/test_fused_mixture*.py``): float64 draws, two-mode channels and a running mixture."""

from __future__ import annotations

import torch

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
EPS = 1e-5


def rand(*shape: int, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)


def two_modes(n: int, c: int, s: int, seed: int) -> torch.Tensor:
    """Each channel a mixture of two well separated modes (EM has something to fit): ``(N, C,
    S)`` float64, no gradient."""
    x = rand(n, c, s, seed=seed, grad=False)
    sign = (torch.arange(n, dtype=F64)[:, None, None] % 2) * 6 - 3
    return x + sign + torch.arange(c, dtype=F64)[None, :, None]


def running_mixture(k: int, c: int, seed: int) -> torch.Tensor:
    """A running mixture ``(3, K, C)`` whose channel 0 is collapsed (starts from the batch)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(k, c, generator=g, dtype=F64) * 2
    var = torch.rand(k, c, generator=g, dtype=F64) + 0.5
    log_prior = torch.randn(k, c, generator=g, dtype=F64) * 0.3
    mean[:, 0], var[:, 0], log_prior[:, 0] = 0.0, 1.0, 0.0
    return torch.stack((mean, var, log_prior))
