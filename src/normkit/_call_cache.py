"""Per-call bookkeeping of :class:`~normkit.Normalization` without nn.Module's slow lookups.

A small model at batch size 2 spends most of a norm layer's time in Python (a step is ~1.5 ms):
``getattr`` on a parameter or buffer goes through ``nn.Module.__getattr__`` (~1 µs each), and the
spread check (:func:`normkit._pipeline.check_batch`) recounts a shape it has already accepted.
These helpers read the module's ``_parameters`` / ``_buffers`` dicts directly (the same objects
``getattr`` returns: a registered name cannot also live in ``__dict__``) and remember the last
input shape that passed the spread check, keyed on everything the check reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _pipeline as P

__all__ = ["check_batch_once", "member", "running_buffers"]

# ``stat_names -> ("running_<name>", ...)``: the buffer names of an operation's statistics
_RUNNING_NAMES: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}


def member(module: nn.Module, name: str, strict: bool = False) -> Any:
    """``getattr(module, name, None)`` (``strict``: ``getattr(module, name)``), reading a
    registered parameter or buffer straight from its dict (``nn.Module.__getattr__`` is the slow
    fallback of attribute lookup)."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name) if strict else getattr(module, name, None)


def members(module: nn.Module, names: Iterable[str], strict: bool = True) -> dict[str, Any]:
    """``{name: member(module, name, strict)}`` for ``names`` (:func:`member`)."""
    return {n: member(module, n, strict) for n in names}


def running_buffers(module: nn.Module, stat_names: tuple[str, ...]) -> dict[str, Tensor] | None:
    """The running estimates ``{stat: running_<stat>}``, or ``None`` when there are none (no
    statistics, or a buffer is ``None``: the module does not track them)."""
    names = _RUNNING_NAMES.get(stat_names)
    if names is None:
        names = _RUNNING_NAMES.setdefault(stat_names,
                                          tuple((s, f"running_{s}") for s in stat_names))
    if not names:
        return None
    bufs = {}
    buffers = module._buffers
    for stat, name in names:  # an unregistered name raises AttributeError, as getattr does
        t = buffers[name] if name in buffers else getattr(module, name)
        if t is None:
            return None
        bufs[stat] = t
    return bufs


def check_batch_once(module: Any, x: Tensor, shape: tuple[int, ...]) -> None:
    """:func:`~normkit._pipeline.check_batch` of ``module`` (a :class:`~normkit.Normalization`)
    for input ``x`` (of original shape ``shape``) over its own partition, skipped when the last
    call that passed it had the same shape, partition, operation, grouping, channel axis and
    padding — everything the check reads (it counts values per statistic from the shape alone;
    a new partition or operation object, even an equal one, is checked again).
    Only a passed check is remembered: a failing shape raises on every call. Under
    ``torch.compile`` / ``torch.export`` the check always runs (no Python state in traced code).
    """
    nap, nop = module.nap, module.nop
    groups, axis, padded = module.groups, module.channel_axis, module._num_padded
    if torch.compiler.is_compiling():
        P.check_batch(x, groups, axis, padded, nap, nop, shape)
        return
    # the partition and operation by identity (no dataclass comparison, which could compare
    # tensor fields): the remembered entry holds them, so their ids cannot be reused meanwhile
    key = (shape, id(nap), id(nop), groups, axis, padded)
    seen = module.__dict__.get("_spread_ok")
    if seen is not None and seen[0] == key:
        return
    P.check_batch(x, groups, axis, padded, nap, nop, shape)
    object.__setattr__(module, "_spread_ok", (key, nap, nop))  # plain attribute, no state_dict
