"""The collectives' math: moments merged over the ranks of a ``torch.distributed`` group.

Every rank computes its local count ``n_r``, mean ``μ_r`` and centred second moment ``M_{2,r}``;
two differentiable all-reduces merge them into the statistics of the union of the ranks' samples
(each rank's term is its scatter about the global mean,
:func:`~normkit.functional.merging.scatter_about`):

.. math::
    n = \\sum_r n_r,\\quad \\mu = \\frac{1}{n}\\sum_r n_r \\mu_r,\\quad
    M_2 = \\sum_r \\Big(M_{2,r} + n_r (\\mu_r - \\mu)(\\mu_r - \\mu)^\\top\\Big)

Every term is a sum of squares around a local mean (no ``E[x²] − μ²`` cancellation); a rank with
one sample or none contributes exactly what it has. The all-reduce's backward is the same sum of
the incoming gradients, so every rank gets the gradient of the objective summed over ranks (DDP's
averaged loss, times the world size, as with torch's ``SyncBatchNorm``). Works with gloo on CPU
and NCCL on GPU.

These are pure functions of tensors and a process group; the partition that uses them is
:class:`normkit.nap.Synced`, and the model surgery is :func:`normkit.sync`. The public face of
all three is :mod:`normkit.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .merging import scatter_about
from .partition import stats_dtype

__all__ = ["count_communication", "global_count", "synced_moments", "synced_covariance",
           "all_reduce_sum"]


_COUNTERS: list[dict[str, int]] = []


class count_communication:
    """Context manager counting what synchronized statistics all-reduce (calls and bytes,
    forward and backward) — the communication cost per training step.

    Example::

        with normkit.distributed.count_communication() as c:
            model(x).sum().backward()
        c["bytes"], c["calls"]
    """

    def __enter__(self) -> dict[str, int]:
        self.counts = {"calls": 0, "bytes": 0}
        _COUNTERS.append(self.counts)
        return self.counts

    def __exit__(self, *exc: Any) -> None:
        _COUNTERS.remove(self.counts)


def _count(t: Tensor) -> None:
    for c in _COUNTERS:
        c["calls"] += 1
        c["bytes"] += t.numel() * t.element_size()


class _AllReduceSum(torch.autograd.Function):
    """``Σ_ranks t``; the backward is the same sum of the incoming gradients (every rank's loss
    depends on the sum), so each rank receives the gradient of the global objective."""

    @staticmethod
    def forward(ctx, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        _count(out)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(t: Tensor, group: Any = None) -> Tensor:
    """``Σ_ranks t`` over ``group`` (default: the world), differentiable: the backward
    all-reduces the gradients the same way. Counted by :class:`count_communication`."""
    return _AllReduceSum.apply(t, group)


def global_count(local: int, group: Any = None) -> int:
    """The sum over ranks of ``local`` (one small all-reduce; a host synchronization)."""
    t = torch.tensor([local], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return int(t.item())


def synced_moments(v: Tensor, dims: Sequence[int], group: Any = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` of the union of every rank's ``v`` (kept dims)."""
    dims = tuple(dims)
    x = v.to(stats_dtype(v))
    n = 1
    for d in dims:
        n *= x.shape[d]
    local_sum = x.sum(dims, keepdim=True)
    count = torch.full_like(local_sum, float(n))
    total = all_reduce_sum(torch.cat([count, local_sum]), group)
    size = total[: count.shape[0]]
    mean = total[count.shape[0]:] / size.clamp_min(1)
    local_mean = local_sum / max(n, 1)
    d = x - local_mean
    m2 = scatter_about((d * d).sum(dims, keepdim=True), local_mean, n, mean)
    return mean, all_reduce_sum(m2, group) / size.clamp_min(1)


def synced_covariance(x: Tensor, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Batch whitening's statistics over every rank: ``x`` is ``(P, G, D, S)`` with the samples
    on ``P`` and ``S`` (the canonical view) — mean ``(1, G, D, 1)``, biased covariance
    ``(1, G, D, D)`` and the local samples centred on the global mean."""
    xf = x.to(stats_dtype(x))
    n = xf.shape[0] * xf.shape[3]
    local_sum = xf.sum((0, 3), keepdim=True)
    count = torch.full_like(local_sum[:, :1, :1], float(n))
    total = all_reduce_sum(torch.cat([count.flatten(), local_sum.flatten()]), group)
    size = total[0].clamp_min(1)
    mean = total[1:].reshape(local_sum.shape) / size
    local_mean = local_sum / max(n, 1)
    d = xf - local_mean
    cross = torch.matmul(d, d.transpose(-1, -2)).sum(0, keepdim=True)
    m2 = scatter_about(cross, local_mean.squeeze(-1), n, mean.squeeze(-1))
    return mean, all_reduce_sum(m2, group) / size, xf - mean
