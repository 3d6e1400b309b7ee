"""The model-level procedures of :mod:`normkit.population`: replace a model's ``Linear``/``Conv2d``
layers by population-whitened ones (:func:`whiten_layers`), list them (:func:`population_layers`),
re-estimate their statistics and re-express their parameters (:func:`refresh`, every ``n`` steps
with :class:`RefreshEvery`). The layers themselves are in ``population/_layers.py``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..apply.stats import _call
from ..errors import ConfigError
from ..functional.merging import MomentPool
from ._layers import (
    _STATES,
    OptimizerState,
    PopulationMethod,
    WhitenedConv2d,
    WhitenedLinear,
    _PopulationWhitened,
)

__all__ = ["population_layers", "whiten_layers", "refresh", "RefreshEvery"]


def population_layers(model: nn.Module) -> list[_PopulationWhitened]:
    """The population-whitened layers of ``model`` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, _PopulationWhitened)]


def whiten_layers(model: nn.Module, *, method: PopulationMethod = "pca", eps: float = 1e-2,
                  skip: Iterable[str] = ()) -> list[str]:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (in place) by a
    :class:`WhitenedLinear` / :class:`WhitenedConv2d` with the same weight and bias, ``c = 0`` and
    ``W = I``: the model computes the same function until the first :func:`refresh`.

    Args:
        model: any module; a bare ``nn.Linear``/``nn.Conv2d`` cannot be replaced in place (wrap it).
        method, eps: of the new layers (see :class:`WhitenedLinear`).
        skip: qualified names of layers to leave as they are.

    Returns:
        The qualified names of the replaced layers, in module order.

    Raises:
        ConfigError: a ``Conv2d`` with ``groups > 1``, non-zero padding mode or string padding
            (none of which the whitened convolution has), or no layer to replace.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 4)
        >>> before = model(x)
        >>> whiten_layers(model, method="zca")
        ['0', '2']
        >>> isinstance(model[0], WhitenedLinear), torch.allclose(model(x), before, atol=1e-6)
        (True, True)
    """
    skip = set(skip)
    targets = [(name, m) for name, m in model.named_modules()
               if name and name not in skip and type(m) in (nn.Linear, nn.Conv2d)]
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear / nn.Conv2d sub-module to "
                          f"whiten (skip={sorted(skip)})")
    for name, m in targets:
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                         or isinstance(m.padding, str)):
            raise ConfigError(f"layer {name!r}: {m} has groups={m.groups}, padding_mode="
                              f"{m.padding_mode!r}, padding={m.padding!r}; WhitenedConv2d needs "
                              f"groups=1 and integer zero padding (pass it in skip=)")
    factory = {"eps": eps, "method": method}
    for name, m in targets:
        like = {"device": m.weight.device, "dtype": m.weight.dtype}
        if isinstance(m, nn.Linear):
            new: _PopulationWhitened = WhitenedLinear(m.in_features, m.out_features,
                                                      bias=m.bias is not None, **factory, **like)
        else:
            new = WhitenedConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                 padding=m.padding, dilation=m.dilation,  # type: ignore[arg-type]
                                 bias=m.bias is not None, **factory, **like)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)  # type: ignore[union-attr]
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return [name for name, _ in targets]


def _collect(model: nn.Module, layers: list[_PopulationWhitened], data: list[Any]
             ) -> tuple[list[_PopulationWhitened], dict[_PopulationWhitened, MomentPool]]:
    """One pass over ``data``: each layer's pooled input statistics, and the layers in the order
    they were first called."""
    pools = {m: MomentPool() for m in layers}
    order: list[_PopulationWhitened] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        stats, m = module._batch_statistics(args[0])  # type: ignore[operator]
        if m > 0:
            if module not in order:
                order.append(module)  # type: ignore[arg-type]
            pools[module].add(stats, m)  # type: ignore[index]

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        for batch in data:
            _call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return order, pools


@torch.no_grad()
def refresh(model: nn.Module, batches: Iterable[Any] | Tensor, *, num_batches: int | None = None,
            optimizer: torch.optim.Optimizer | None = None,
            optimizer_state: OptimizerState = "transform") -> nn.Module:
    r"""Re-estimate ``c``, ``W`` of every population-whitened layer of ``model`` from
    ``batches`` and re-express its parameters so the model computes the same function.

    The model runs in eval mode without gradient (modes restored afterwards); layers are
    refreshed in the order they are called. One pass serves all layers, since a full-rank
    refresh leaves every layer's output unchanged; after each low-rank layer, the later layers'
    statistics are recollected in another pass. The batches are held in a list during the call
    (use ``num_batches`` to bound it); layers the batches never reach are left unchanged with a
    warning, as are layers whose statistics are not finite.

    **Optimizer state.** The re-expression is the linear map ``T(V, d) = (V·WW′⁺, d + VW(c′−c))``
    of the parameters. With ``optimizer`` and ``optimizer_state="transform"`` (default) the same
    ``T`` is applied to the first moments that move like parameters (SGD's ``momentum_buffer``,
    Adam's ``exp_avg``), so a pending momentum step changes the function as it would have
    without the refresh; other state (``exp_avg_sq``, step counts) is left as is. ``"keep"``
    leaves the state untouched (it then refers to the old coordinates), ``"reset"`` deletes the
    state of these parameters (momentum restarts from the next gradient). NNN does not
    transform it. With data parallelism, pass the same batches on every process (statistics are
    not synchronized).

    Args:
        model: any module containing :class:`WhitenedLinear` / :class:`WhitenedConv2d` layers.
        batches: a tensor (one batch) or an iterable of batches as for
            :func:`normkit.apply.recalibrate` (tensors, ``(input, target)`` pairs, keyword
            mappings).
        num_batches: use at most this many batches (default: all).
        optimizer: the optimizer of ``model``'s parameters, for ``optimizer_state``.
        optimizer_state: ``"transform"``, ``"keep"`` or ``"reset"``.

    Returns:
        ``model``.

    Raises:
        ConfigError: no population-whitened layer, no batches, bad ``num_batches`` or
            ``optimizer_state``.

    Example:
        >>> model = nn.Sequential(WhitenedLinear(5, 4), nn.ReLU(), WhitenedLinear(4, 2))
        >>> data = [torch.randn(32, 5) + 1 for _ in range(3)]
        >>> before = model(data[0])
        >>> _ = refresh(model, data)
        >>> torch.allclose(model(data[0]), before, atol=1e-5), int(model[2].num_refreshes)
        (True, 1)
    """
    if num_batches is not None and (not isinstance(num_batches, int)
                                    or isinstance(num_batches, bool) or num_batches <= 0):
        raise ConfigError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if optimizer_state not in _STATES:
        raise ConfigError(f"optimizer_state must be one of {_STATES}, got {optimizer_state!r}")
    layers = population_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no population-whitened layer: use "
                          f"WhitenedLinear / WhitenedConv2d in the model")
    data = ([batches] if isinstance(batches, Tensor)
            else list(itertools.islice(batches, num_batches)))
    if not data:
        raise ConfigError("refresh got no batches: pass a non-empty iterable of inputs")
    modes = {m: m.training for m in model.modules()}
    pending: list[_PopulationWhitened] = layers
    try:
        model.eval()
        first = True
        while pending:
            order, pools = _collect(model, pending, data)
            if first:
                missing = [type(m).__name__ for m in layers if m not in order]
                if missing:
                    warnings.warn(f"refresh: {len(missing)} population-whitened layer(s) got no "
                                  f"input from the batches and were left unchanged: {missing}",
                                  RuntimeWarning, stacklevel=3)
                first = False
            for i, layer in enumerate(order):
                changed = layer._refresh_from(pools[layer], optimizer, optimizer_state)
                if changed and layer.low_rank:  # may change its output: recollect the rest
                    pending = order[i + 1:]
                    break
            else:
                pending = []
    finally:
        for m, training in modes.items():
            m.training = training
    return model


class RefreshEvery:
    """Training-loop callback: :func:`refresh` the model every ``every`` optimizer steps.

    Call :meth:`step` (or the object itself) once after each ``optimizer.step()``; it refreshes
    after steps ``every``, ``2·every``, ... Call :meth:`refresh` once before training so the
    whitening starts from the data (the layers start with ``W = I``)::

        cb = RefreshEvery(model, lambda: loader, every=100, num_batches=4, optimizer=opt)
        cb.refresh()
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
            cb.step()

    Args:
        model: the model (see :func:`refresh`).
        batches: a callable returning an iterable of batches (called at every refresh), or a
            re-iterable such as a list or a ``DataLoader`` (iterated afresh each time).
        every: refresh period ``T`` in steps (NNN: a few hundred).
        num_batches: batches per refresh (default: all that ``batches`` gives).
        optimizer, optimizer_state: as :func:`refresh`.

    Raises:
        ConfigError: ``every`` not a positive int, or ``batches`` a one-shot iterator.

    Example:
        >>> model = torch.nn.Sequential(WhitenedLinear(3, 2))
        >>> data = [torch.randn(16, 3) for _ in range(2)]
        >>> cb = RefreshEvery(model, data, every=2)
        >>> [cb.step() for _ in range(4)], int(model[0].num_refreshes)
        ([False, True, False, True], 2)
    """

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[Any]] | Iterable[Any], *,
                 every: int, num_batches: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 optimizer_state: OptimizerState = "transform") -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ConfigError(f"every must be a positive int (steps between refreshes), "
                              f"got {every!r}")
        if not callable(batches) and iter(batches) is batches:  # type: ignore[arg-type]
            raise ConfigError("batches is a one-shot iterator that the first refresh would use "
                              "up: pass a list, a DataLoader or a callable returning batches")
        self.model, self.batches, self.every = model, batches, every
        self.num_batches, self.optimizer, self.optimizer_state = (num_batches, optimizer,
                                                                  optimizer_state)
        self.steps = 0

    def refresh(self) -> None:
        """Refresh now (does not count as a step)."""
        batches = self.batches() if callable(self.batches) else self.batches
        refresh(self.model, batches, num_batches=self.num_batches, optimizer=self.optimizer,
                optimizer_state=self.optimizer_state)

    def step(self) -> bool:
        """Count one optimizer step; refresh if it is a multiple of ``every``. Returns whether
        it refreshed."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.refresh()
        return True

    __call__ = step
