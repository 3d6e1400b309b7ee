"""A copy of module state that ``torch.compile``'s backward never re-reads from the live buffer.

AOTAutograd's partitioner may *recompute* a cheap forward value in the backward instead of saving
it. For a value read from a buffer that the same forward then updates in place (a running
estimate, the step counter, a history of earlier batches) the recomputation reads the buffer
*after* the update: silently wrong gradients, or a version-counter error (pytorch/pytorch#197039,
not in torch 2.13). Reading such state through :func:`snapshot` makes the read an opaque custom
op, which the partitioner never recomputes: the backward sees the values the forward used.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["snapshot"]


@torch.library.custom_op("normkit::snapshot", mutates_args=())
def _snapshot(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def snapshot(t: Tensor) -> Tensor:
    """``t`` as it is now, for state read by a forward that later updates it in place.

    Under ``torch.compile`` / ``torch.export`` a copy made by an opaque op (``normkit::snapshot``)
    that the backward cannot recompute from the updated buffer; in eager mode, and for a tensor
    that requires grad, ``t`` itself (eager autograd saves what it needs, and a parameter is
    never updated inside a forward).

    Example:
        >>> import torch
        >>> from normkit.functional.snapshot import snapshot
        >>> buf = torch.zeros(3)
        >>> snapshot(buf) is buf   # eager: no copy
        True
    """
    if torch.compiler.is_compiling() and not t.requires_grad:
        return _snapshot(t)
    return t
