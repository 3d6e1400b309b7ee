"""Shared helpers of ``tests/test_combination*.py``: float64 test data, random parameters, the
tolerances and the hypothesis settings (see ``tests/test_combination.py`` for the numerics).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
HAND = {"rtol": 1e-6, "atol": 1e-6}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


def _x(shape, seed=0, loc=0.3, scale=1.4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale + loc


def _randomize(m, seed=0, skip=()):
    """Random parameters (weight in [0.5, 1.5), bias ~ N(0, 0.25)) except the names in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in skip:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return m


def _copy_affine(src, dst, pairs=(("weight", "weight"), ("bias", "bias"))):
    with torch.no_grad():
        for a, b in pairs:
            getattr(dst, b).copy_(getattr(src, a))
