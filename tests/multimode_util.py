"""Shared helpers of ``tests/test_multimode*.py``: float64 test data, a forward and backward with a
fixed cotangent, the tolerance and the hypothesis settings (see ``tests/test_multimode.py``).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


def _x(shape, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale + loc


def _run(m, x, cot_seed=1):
    """Output, input gradient and parameter gradients for a fixed random cotangent."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], _x(y.shape, cot_seed))
    return y.detach(), grads[0], grads[1:]


def _sigmoid(t):
    return 1 / (1 + math.exp(-t))
