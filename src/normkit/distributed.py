"""Synchronized statistics across processes (``torch.distributed``) for batch-dependent methods.

In training, a synchronized module takes its batch statistics over the *global* batch: every rank
computes its local count, mean and centred second moment, and the ranks merge them with two
differentiable all-reduces (whose backward all-reduces the gradients, so every rank gets the
gradient of the objective summed over ranks — DDP's averaged loss, times the world size, as with
torch's own ``SyncBatchNorm``):

.. math::
    n = \\sum_r n_r,\\quad \\mu = \\frac{1}{n}\\sum_r n_r \\mu_r,\\quad
    M_2 = \\sum_r \\Big(M_{2,r} + n_r (\\mu_r - \\mu)(\\mu_r - \\mu)^\\top\\Big)

Every term is a sum of squares around a local mean (no ``E[x²] − μ²`` cancellation); a rank with
one sample or none contributes exactly what it has. Evaluation makes no collective call (running
statistics, or each rank's own batch where there are none). Works with gloo on CPU and NCCL on
GPU. Batch whitening synchronizes its covariances the same way (through the plain autograd
composition, not the fused single-process Function).

Example (in each process of a ``torch.distributed`` job)::

    model = normkit.sync(model)            # every batch-dependent normalization, in place
    model = torch.nn.parallel.DistributedDataParallel(model)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError
from .functional.partition import stats_dtype
from .nap import Partition

__all__ = ["Synced", "sync", "synced_moments", "synced_covariance", "global_count",
           "count_communication", "SYNC_OPERATIONS"]


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


def _all_reduce(t: Tensor, group: Any) -> Tensor:
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
    total = _all_reduce(torch.cat([count, local_sum]), group)
    size = total[: count.shape[0]]
    mean = total[count.shape[0]:] / size.clamp_min(1)
    local_mean = local_sum / max(n, 1)
    d = x - local_mean
    m2 = (d * d).sum(dims, keepdim=True) + n * (local_mean - mean) ** 2
    return mean, _all_reduce(m2, group) / size.clamp_min(1)


def synced_covariance(x: Tensor, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Batch whitening's statistics over every rank: ``x`` is ``(P, G, D, S)`` with the samples
    on ``P`` and ``S`` (the canonical view) — mean ``(1, G, D, 1)``, biased covariance
    ``(1, G, D, D)`` and the local samples centred on the global mean."""
    xf = x.to(stats_dtype(x))
    n = xf.shape[0] * xf.shape[3]
    local_sum = xf.sum((0, 3), keepdim=True)
    count = torch.full_like(local_sum[:, :1, :1], float(n))
    total = _all_reduce(torch.cat([count.flatten(), local_sum.flatten()]), group)
    size = total[0].clamp_min(1)
    mean = total[1:].reshape(local_sum.shape) / size
    local_mean = local_sum / max(n, 1)
    d = xf - local_mean
    cross = torch.matmul(d, d.transpose(-1, -2)).sum(0, keepdim=True)
    dm = local_mean - mean
    m2 = cross + n * torch.matmul(dm, dm.transpose(-1, -2))
    return mean, _all_reduce(m2, group) / size, xf - mean


@dataclass(frozen=True, repr=False)
class Synced(Partition):
    """A batch-dependent partition whose statistics are merged over the ranks of ``group``.

    Delegates its shape (roles, groups) to ``inner``; ``mean`` / ``moments`` / ``mean_square``
    and ``count`` are global. Used by :class:`normkit.Normalization` in training when a process
    group is set (:func:`sync`).
    """

    inner: Partition = None  # type: ignore[assignment]
    group: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Partition) or not self.inner.batch_dependent:
            raise ConfigError(f"only batch-dependent partitions synchronize, got {self.inner!r}")

    @property
    def roles(self):  # type: ignore[override]
        return self.inner.roles

    def groups(self, num_features: int) -> tuple[int, int]:
        return self.inner.groups(num_features)

    def count(self, v: Tensor, spatial: Sequence[int]) -> int:
        return global_count(self.inner.count(v, spatial), self.group)

    def mean(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        return synced_moments(v, self.dims, self.group)[0]

    def moments(self, v: Tensor, spatial: Sequence[int]) -> tuple[Tensor, Tensor]:
        return synced_moments(v, self.dims, self.group)

    def mean_square(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        mean, var = synced_moments(v, self.dims, self.group)
        return var + mean * mean

    def mean_abs_deviation(self, v: Tensor, mean: Tensor, spatial: Sequence[int]) -> Tensor:
        raise ConfigError("L1 normalization is not synchronized; use Standardize")

    def value_range(self, v: Tensor, spatial: Sequence[int]) -> Tensor:
        raise ConfigError("range normalization is not synchronized; use Standardize")

    def __repr__(self) -> str:
        return f"Synced({self.inner!r})"


def _operations() -> tuple[type, ...]:
    from . import nop
    from .nop._combination import BatchInstanceStandardize, SwitchableStandardize
    from .nop._robust import Renormalize

    return (nop.Standardize, nop.Center, nop.Scale, nop.Whiten, Renormalize,
            SwitchableStandardize, BatchInstanceStandardize)


SYNC_OPERATIONS = ("Standardize", "Center", "Scale", "Whiten", "Renormalize (batch_renorm)",
                   "SwitchableStandardize (switchable_norm's batch branch)",
                   "BatchInstanceStandardize (bin's batch branch)")


def sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Synchronize every batch-dependent normalization of ``model`` over ``process_group``
    (default: the world), in place; returns ``model``.

    normkit modules keep their parameters and buffers; torch's ``BatchNorm1d/2d/3d`` (and
    ``SyncBatchNorm``) and their subclasses are replaced by :class:`normkit.BatchNorm` with the
    same state (torch's ``SyncBatchNorm`` refuses CPU / gloo; this does not). A norm+act layer
    (timm's ``BatchNormAct2d``: BN, then ``drop`` and ``act``, recognised by what it computes,
    :func:`normkit.apply.recognize.recognize`) becomes
    ``NormAct(BatchNorm(...), drop=..., act=...)`` with its original activation and dropout.

    Raises:
        ConfigError: naming the layer's path, for a batch-dependent module it cannot synchronize
            (an operation other than :data:`SYNC_OPERATIONS`, switchable whitening, a BatchNorm
            subclass whose forward is not BN followed by its children, or any other module named
            like a batch norm whose output depends on the other samples of the batch), rather
            than silently training it on the local batch.
    """
    from .apply.recognize import NormAct, looks_like_norm, recognize
    from .methods.standard import BatchNorm
    from .normalization import Normalization

    ops = _operations()

    def convert(mod: nn.Module, name: str) -> nn.Module:
        where = name or "model"
        if isinstance(mod, Normalization):
            if mod.nap.batch_dependent:
                if type(mod.nop) not in ops:
                    raise ConfigError(
                        f"{where}: {type(mod).__name__} ({mod.nop!r}) cannot be "
                        f"synchronized; supported operations: {', '.join(SYNC_OPERATIONS)}")
                mod.process_group = process_group if process_group is not None else dist.group.WORLD
            return mod
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            try:
                rec = recognize(mod, name)
            except ConfigError as e:
                raise ConfigError(f"{where}: cannot be synchronized: {e}") from None
            new = BatchNorm(mod.num_features, eps=mod.eps, momentum=mod.momentum,
                            affine=mod.affine, track_running_stats=mod.track_running_stats,
                            device=(mod.weight.device if mod.weight is not None else None),
                            dtype=(mod.weight.dtype if mod.weight is not None else None))
            new.load_state_dict({k: v for k, v in mod.state_dict().items() if "." not in k})
            new.train(mod.training)
            new = convert(new, name)
            tail = {n: getattr(mod, n) for n in rec.tail}
            return NormAct(new, **tail) if tail else new
        if looks_like_norm(mod) and "BatchNorm" in type(mod).__name__ and _mixes_batch(mod):
            raise ConfigError(
                f"{where}: {type(mod).__name__} normalizes with statistics of the batch (its "
                f"output for one sample changes with the others) but is not a torch or normkit "
                f"batch norm, so it cannot be synchronized. Fix: replace it with a torch or normkit "
                f"BatchNorm first (normkit.apply.convert(model, 'bn') does so for the layers it "
                f"recognises)")
        for child_name, child in list(mod.named_children()):
            new = convert(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(mod, child_name, new)
        return mod

    return convert(model, "")


@torch.no_grad()
def _mixes_batch(mod: nn.Module) -> bool:
    """Whether ``mod``'s training output for sample 0 depends on the other samples (a
    batch-dependent norm), on a copy; ``False`` if it cannot run on ``(4, C, 3, 5)``."""
    import copy

    w = getattr(mod, "weight", None)
    c = w.numel() if isinstance(w, Tensor) else getattr(mod, "num_features", None)
    if not isinstance(c, int):
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, c, 3, 5, generator=g).to(w if isinstance(w, Tensor) else torch.float32)
    x2 = x.clone()
    x2[1:] = x2[1:] * 3 + 1
    try:
        a = copy.deepcopy(mod).train()(x)
        b = copy.deepcopy(mod).train()(x2)
    except Exception:  # noqa: BLE001 - not a (N, C, H, W) layer
        return False
    return isinstance(a, Tensor) and not torch.allclose(a[0], b[0])
