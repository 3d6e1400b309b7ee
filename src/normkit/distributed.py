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

The pieces live at their own level, and this module hands them on under the names it always had:
the merge math in :mod:`normkit.functional.collectives` (:func:`synced_moments`,
:func:`synced_covariance`, :func:`global_count`, :class:`count_communication`), the partition
:class:`normkit.nap.Synced` beside the other partitions, and the model surgery :func:`sync` in
:mod:`normkit.apply.sync`.

Example (in each process of a ``torch.distributed`` job)::

    model = normkit.sync(model)            # every batch-dependent normalization, in place
    model = torch.nn.parallel.DistributedDataParallel(model)
"""

from __future__ import annotations

from .apply.sync import SYNC_OPERATIONS as SYNC_OPERATIONS
from .apply.sync import sync as sync
from .functional.collectives import _AllReduceSum as _AllReduceSum  # noqa: F401 - tests use it
from .functional.collectives import count_communication as count_communication
from .functional.collectives import global_count as global_count
from .functional.collectives import synced_covariance as synced_covariance
from .functional.collectives import synced_moments as synced_moments
from .nap import Synced as Synced

__all__ = ["Synced", "sync", "synced_moments", "synced_covariance", "global_count",
           "count_communication", "SYNC_OPERATIONS"]
