"""Model-level control of normalization statistics: recalibrate (precise BN), freeze, and
prediction with batch statistics.

Every function here acts on the *statistics modules* of a model
(:func:`statistics_modules`): normkit modules whose partition is batch-dependent or that track
running statistics, torch's ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` (any
``nn.modules.batchnorm._BatchNorm``), and torch's ``InstanceNorm`` with
``track_running_stats=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ..errors import ConfigError
from ..functional.merging import MomentPool as _Pool
from ..nop._online import OnlineStandardize
from ..normalization import Normalization

__all__ = ["statistics_modules", "recalibrate", "freeze", "unfreeze", "batch_statistics"]

_FROZEN = "_normkit_frozen"  # instance attribute: requires_grad of the parameters before freeze()


def _has_running(m: nn.Module) -> bool:
    if isinstance(m, Normalization):
        return m._running() is not None
    return isinstance(m, _NormBase) and m.running_mean is not None


def statistics_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) whose statistics depend on the batch or are
    tracked: normkit modules with a batch-dependent partition or running statistics, torch's
    ``_BatchNorm`` subclasses, and torch ``_NormBase`` modules with running statistics.

    Example:
        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(nk.BatchNorm(3), nk.LayerNorm(3), torch.nn.BatchNorm1d(3))
        >>> [type(m).__name__ for m in statistics_modules(model)]
        ['BatchNorm', 'BatchNorm1d']
    """
    out = []
    for m in model.modules():
        if isinstance(m, Normalization):
            if m.nap.batch_dependent or _has_running(m):
                out.append(m)
        elif isinstance(m, _BatchNorm) or (isinstance(m, _NormBase) and _has_running(m)):
            out.append(m)
    return out


# ----------------------------------------------------------------------------------- recalibrate
def _kind(m: nn.Module) -> str:
    """How a module's statistics are recomputed: ``"exact"`` (pooled over every value of every
    batch), ``"stream"`` (Online Normalization's cumulative stream) or ``"average"``
    (cumulative average of the per-batch values)."""
    if isinstance(m, Normalization):
        if isinstance(m.nop, OnlineStandardize):
            return "stream"
        return "exact" if m.nap.batch_dependent else "average"
    return "exact" if isinstance(m, _BatchNorm) else "average"


def _values_per_statistic(m: nn.Module, x: Tensor) -> int:
    if isinstance(m, Normalization):
        if x.dim() == 1:  # a single (C,) vector with channel_axis=-1
            x = x.unsqueeze(0)
        spatial = tuple(x.shape[2:] if m.channel_axis == 1 else x.shape[1:-1])
        s = 1
        for d in spatial:
            s *= d
        view = x.new_empty(()).expand(x.shape[0], *m.groups, s)
        return int(m.nap.count(view, spatial))
    return x.numel() // max(x.shape[1], 1)


def _running_buffers(m: nn.Module) -> dict[str, Tensor]:
    if isinstance(m, Normalization):
        return dict(m._running() or {})
    return {"mean": m.running_mean, "var": m.running_var}  # type: ignore[dict-item]


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)) and batch:
        model(batch[0])
    else:
        raise ConfigError(
            f"recalibrate needs batches that are tensors, (inputs, targets, ...) tuples or lists, "
            f"or keyword mappings, got {type(batch).__name__}")


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None
                ) -> nn.Module:
    r"""Precise BN: recompute the running statistics of every statistics module of ``model``
    from ``batches``, exactly, instead of the exponential average left by training.

    The model runs in training mode without gradient; each statistics module's statistics are
    reset and recomputed over all the values the batches give it:

    * batch-pooled statistics (BN, batch-group, batch whitening, torch ``BatchNorm``): the exact
      mean and **unbiased variance (or covariance) of the concatenated batches**, whatever the
      batch sizes (Chan's merge of each batch's statistics; the between-batch spread of the
      means included). Statistics without an exact merge (a running whitening *matrix*, L1 or
      range scales) get the average of the per-batch values weighted by their sizes, which for
      equal batches is the ``momentum=None`` cumulative average.
    * per-sample statistics tracked by instance-type modules: the cumulative average
      (``momentum=None``) of the per-batch values.
    * Online Normalization: the cumulative stream (``momentum=None``), i.e. the pooled mean and
      biased variance over every sample; its control buffers are kept.

    ``num_batches_tracked`` ends at the number of batches used (samples for ``online_norm``).
    A statistics module the batches never reach (an unused branch, the other domains of a
    :class:`~normkit.apply.adapt.DomainSpecificNorm`) keeps its statistics unchanged.
    Each module's ``momentum``, ``track_running_stats`` and every module's train/eval mode
    (including :func:`freeze`'s) are restored; if a forward raises, or ``batches`` yields
    nothing, every buffer is restored too. Batches are computed by modules in training mode, so
    a statistics module sees the outputs of the normalizations before it computed with batch
    statistics (as in training); dropout and other train-mode layers are active.

    Args:
        model: any module.
        batches: an iterable of inputs: tensors (``model(x)``), tuples or lists whose first
            element is the input (``(x, target)`` from a ``DataLoader``), or mappings of keyword
            arguments (``model(**batch)``).
        num_batches: use at most this many batches (default: all).

    Returns:
        ``model``.

    Raises:
        ConfigError: for ``num_batches`` ≤ 0, an empty ``batches``, or a batch of another type.

    Example:
        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), nk.BatchNorm(4)).eval()
        >>> data = [torch.randn(8, 3, 5, 5) for _ in range(4)]
        >>> _ = nk.apply.recalibrate(model, data)
        >>> h = torch.cat([model[0](x) for x in data])
        >>> torch.allclose(model[1].running_var, h.transpose(0, 1).flatten(1).var(1), atol=1e-5)
        True
        >>> model.training
        False
    """
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                    or num_batches <= 0):
        raise ConfigError(f"num_batches must be a positive int or None, got {num_batches!r}")
    mods = [m for m in statistics_modules(model) if _has_running(m)]
    modes = {m: m.training for m in model.modules()}
    settings = {m: (m.momentum, m.track_running_stats) for m in mods}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in mods}
    kinds = {m: _kind(m) for m in mods}
    pools = {m: _Pool() for m in mods if kinds[m] == "exact"}
    counts: dict[nn.Module, int] = {}

    called: set[nn.Module] = set()

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        called.add(module)
        if module in pools and args and isinstance(args[0], Tensor):
            counts[module] = _values_per_statistic(module, args[0])

    hooks = [m.register_forward_pre_hook(record) for m in mods]
    seen = 0
    ok = False
    try:
        for m in mods:
            control = {k: b.clone() for k, b in _running_buffers(m).items() if k.startswith("grad_")}
            m.reset_running_stats()
            for k, b in control.items():  # Online Normalization's control state is not a statistic
                _running_buffers(m)[k].copy_(b)
            m.momentum = 1.0 if kinds[m] == "exact" else None
            m.track_running_stats = True
        model.train()
        for m in mods:  # also frozen ones (their train() keeps them in eval)
            m.training = True
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            counts.clear()
            _call(model, batch)
            seen += 1
            for m, pool in pools.items():
                if m in counts:  # momentum 1: the buffers hold this batch's statistics
                    pool.add(_running_buffers(m), counts[m])
        if seen == 0:
            raise ConfigError("recalibrate got no batches: pass a non-empty iterable of inputs")
        for m in mods:  # not called (another branch, a DSBN's other domain): keep its statistics
            if m not in called:
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(saved[m][k])
        for m, pool in pools.items():
            if pool.n == 0:
                continue
            bufs = _running_buffers(m)
            for k, t in pool.result().items():
                bufs[k].copy_(t.reshape(bufs[k].shape))
        ok = True
    finally:
        for h in hooks:
            h.remove()
        for m, (momentum, track) in settings.items():
            m.momentum, m.track_running_stats = momentum, track
            if not ok:
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(saved[m][k])
        for m, training in modes.items():
            m.training = training
    return model


# --------------------------------------------------------------------------------------- freeze
def _frozen_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen module: stays in evaluation mode whatever ``mode``."""
    nn.Module.train(module, False)
    return module


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every statistics module of ``model``: evaluation statistics and no gradient for
    its parameters (``γ, β``), surviving a later ``model.train()``.

    Each module is put in eval mode and its ``train`` method is replaced *on the instance* by one
    that keeps it in eval mode (so a parent's ``.train()`` — which calls each child's ``train``
    — leaves it frozen, and ``module.training`` stays ``False``); its parameters get
    ``requires_grad=False`` and their previous flags are remembered for :func:`unfreeze`. The
    state survives ``copy.deepcopy`` and pickling of the model; ``state_dict`` is unchanged.
    Freezing twice is a no-op.

    Example:
        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), nk.BatchNorm(4))
        >>> _ = nk.apply.freeze(model).train()
        >>> model[1].training, model[1].weight.requires_grad, model[0].training
        (False, False, True)
        >>> _ = nk.apply.unfreeze(model)
        >>> model[1].training, model[1].weight.requires_grad
        (True, True)
    """
    for m in statistics_modules(model):
        if m.__dict__.get(_FROZEN) is not None:
            continue
        m.__dict__[_FROZEN] = {n: p.requires_grad for n, p in m.named_parameters(recurse=False)}
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        m.train = functools.partial(_frozen_train, m)  # type: ignore[method-assign]
        nn.Module.train(m, False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: restore each frozen module's ``train`` method and its parameters'
    ``requires_grad`` flags, and put it in ``model``'s current mode."""
    for m in model.modules():
        flags = m.__dict__.pop(_FROZEN, None)
        if flags is None:
            continue
        m.__dict__.pop("train", None)
        for n, p in m.named_parameters(recurse=False):
            p.requires_grad_(flags.get(n, p.requires_grad))
        m.train(model.training)
    return model


# ----------------------------------------------------------------------------- batch statistics
@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the context, every statistics module of ``model`` normalizes with the statistics of
    the batch it gets (as in training) and leaves its running statistics and counter alone; the
    rest of the model keeps its mode (use it with ``model.eval()``: test-time batch statistics,
    e.g. for a shifted domain). Each module's ``training`` and ``track_running_stats`` are
    restored on exit, also on an exception; frozen modules (:func:`freeze`) are included.
    Online Normalization has no batch statistics and keeps its evaluation transform.

    Example:
        >>> import torch, normkit as nk
        >>> bn = nk.BatchNorm(3).eval()
        >>> x = torch.randn(6, 3, 4) * 5 + 2
        >>> with nk.apply.batch_statistics(bn):
        ...     y = bn(x)
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True
        >>> bn.training, int(bn.num_batches_tracked), float(bn.running_mean.abs().sum())
        (False, 0, 0.0)
    """
    mods = [m for m in statistics_modules(model)
            if not (isinstance(m, Normalization) and isinstance(m.nop, OnlineStandardize))]
    saved = [(m, m.training, m.track_running_stats) for m in mods]
    try:
        for m in mods:
            m.training = True  # batch statistics ...
            m.track_running_stats = False  # ... without updating the running ones (torch's rule)
        yield model
    finally:
        for m, training, track in saved:
            m.training, m.track_running_stats = training, track
