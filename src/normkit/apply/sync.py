"""Model surgery for synchronized statistics: :func:`sync` sets every batch-dependent
normalization of a model to merge its training statistics over the ranks of a process group.

The statistics themselves are merged by the partition :class:`normkit.nap.Synced` with the
collectives of :mod:`normkit.functional.collectives`; this module only walks the model. All three
are also reachable as :mod:`normkit.distributed`.

Example (in each process of a ``torch.distributed`` job)::

    model = normkit.sync(model)            # every batch-dependent normalization, in place
    model = torch.nn.parallel.DistributedDataParallel(model)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import nop
from ..errors import ConfigError
from ..methods.standard import BatchNorm
from ..nop._combination import BatchInstanceStandardize, SwitchableStandardize
from ..nop._robust import Renormalize
from ..normalization import Normalization
from .recognize import NormAct, looks_like_norm, recognize

__all__ = ["sync", "SYNC_OPERATIONS"]


# The operations whose statistics reduce through their partition (or, for Whiten, call
# synced_covariance): they synchronize when the partition is Synced.
_SYNC_TYPES: tuple[type, ...] = (nop.Standardize, nop.Center, nop.Scale, nop.Whiten, Renormalize,
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

    def convert(mod: nn.Module, name: str) -> nn.Module:
        where = name or "model"
        if isinstance(mod, Normalization):
            if mod.nap.batch_dependent:
                if type(mod.nop) not in _SYNC_TYPES:
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
