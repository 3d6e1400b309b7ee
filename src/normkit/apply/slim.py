r"""Network slimming (Liu et al. 2017, https://arxiv.org/abs/1708.06519): sparsify the BN scales
``γ`` with an L1 penalty during training, then remove the channels with the smallest ``|γ|`` and
rebuild the neighbouring layers into a real, smaller model.

.. math::
    L = \sum_{(x, y)} \ell(f(x, W), y) + s \sum_{\gamma \in \Gamma} |\gamma|

* :func:`gamma_l1` — the penalty :math:`\sum |\gamma|` as a differentiable loss term;
* :func:`add_gamma_l1` — the same as an optimizer step pre-hook, ``grad_γ += s·sign(γ)``;
* :func:`slim` — prune a fraction of the channels and return a smaller model and a
  :class:`SlimReport`.

The normalization layers concerned (:func:`is_slimmable`) are those whose channels are normalized
independently with a per-channel ``γ``: torch's ``BatchNorm*d``/``SyncBatchNorm`` with
``affine=True`` and normkit's batch-dependent per-channel presets (``bn``, ``batch_renorm``,
``ghost_bn``, ``l1_bn``, ``range_bn``, ...), a subset of :func:`~normkit.apply.statistics_modules`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from ..gradient._hooks import _check_positive, _install
from ..nop import L1, Range, Standardize
from ..nop._robust import Ghost
from ..normalization import Normalization
from ._surgery import _analyse, _count, _rebuild, _run, _shapes
from .stats import statistics_modules

__all__ = ["gamma_l1", "add_gamma_l1", "slim", "SlimReport", "SlimmedLayer", "is_slimmable"]


# ------------------------------------------------------------------------------ γ penalty
def is_slimmable(m: nn.Module) -> bool:
    """Whether ``m`` normalizes each channel on its own with a per-channel ``γ`` (``weight``), so
    that a channel can be removed without changing the others: torch's ``_BatchNorm`` with
    ``affine=True``, or a normkit module with a batch-dependent one-channel-per-group partition,
    a standardization-type operation (``Standardize`` and its robust variants, ``L1``,
    ``Range``, ghost BN), a non-conditional recovery and only ``(C,)``-shaped or scalar state."""
    if isinstance(m, _BatchNorm):
        return m.affine
    if not isinstance(m, Normalization) or m.nrr.conditional or next(m.children(), None):
        return False
    c = m.num_features
    w = getattr(m, "weight", None)
    tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    return (m.nap.batch_dependent and tuple(m.groups) == (c, 1)
            and isinstance(m.nop, (Standardize, L1, Range, Ghost))
            and isinstance(w, Tensor) and tuple(w.shape) == (c,)
            and all(t.dim() == 0 or tuple(t.shape) == (c,) for t in tensors))


def _gamma_modules(model: nn.Module, modules: Iterable[nn.Module] | None) -> list[nn.Module]:
    mods = [m for m in statistics_modules(model) if is_slimmable(m)] if modules is None \
        else list(modules)
    if not mods:
        raise ConfigError(f"{type(model).__name__} has no normalization layer with a per-channel "
                          f"γ (BatchNorm with affine=True); network slimming needs one")
    for m in mods:
        if not isinstance(getattr(m, "weight", None), Tensor):
            raise ConfigError(f"{type(m).__name__} has no weight γ to penalize")
    return mods


def gamma_l1(model: nn.Module, *, modules: Iterable[nn.Module] | None = None) -> Tensor:
    r"""The sparsity penalty :math:`\sum_{\text{layers}} \sum_c |\gamma_c|` (differentiable).

    Add ``s * gamma_l1(model)`` to the loss (Liu et al. use ``s = 1e-4 … 1e-5``). Its gradient
    is ``s·sign(γ)`` (``0`` at ``γ = 0``), the same as :func:`add_gamma_l1`'s hook.

    Args:
        model: any module.
        modules: the normalization layers to penalize (default: every :func:`is_slimmable`
            layer of ``model``).

    Returns:
        A 0-d tensor.

    Raises:
        ConfigError: when there is no such layer, or a given module has no ``weight``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> _ = torch.nn.init.constant_(net[1].weight, -0.5)
        >>> gamma_l1(net).item()
        2.0
    """
    return sum((m.weight.abs().sum() for m in _gamma_modules(model, modules)),
               torch.zeros((), dtype=torch.float32))


def add_gamma_l1(optimizer: Optimizer, model: nn.Module, strength: float, *,
                 modules: Iterable[nn.Module] | None = None) -> RemovableHandle:
    r"""Add the L1 subgradient to every ``γ`` before each ``optimizer.step()``:
    ``grad_γ ← grad_γ + s·sign(γ)`` (a ``torch.optim.Optimizer.register_step_pre_hook``, installed
    like :mod:`normkit.gradient`'s transforms; ``step(closure)`` is refused). Every other
    gradient is left alone.

    Args:
        optimizer: any optimizer holding the ``γ`` parameters.
        model: the model whose normalization layers' ``γ`` are penalized.
        strength: ``s ≥ 0``.
        modules: the layers (default: every :func:`is_slimmable` layer of ``model``).

    Returns:
        The hook's handle; ``handle.remove()`` stops the penalty.

    Raises:
        ConfigError: for a negative or non-finite ``strength``, a model without such layers, or
            an optimizer that holds none of their ``γ``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.0)
        >>> handle = add_gamma_l1(opt, net, 0.1)
        >>> net(torch.randn(8, 3)).sum().backward()   # BN's outputs sum to Σβ: grad_γ = 0
        >>> opt.step()
        >>> [round(g, 4) for g in net[1].weight.grad.tolist()]
        [0.1, 0.1, 0.1, 0.1]
    """
    _check_positive("strength", strength, allow_zero=True, fix="Liu et al. use 1e-5 to 1e-4")
    gammas = [m.weight for m in _gamma_modules(model, modules)]
    ids = frozenset(id(g) for g in gammas)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]} \
        if isinstance(optimizer, Optimizer) else ids
    if not ids & held:
        raise ConfigError("the optimizer holds none of the model's γ (normalization weights); "
                          "build it from model.parameters()")
    return _install(optimizer, lambda g, p: g + strength * torch.sign(p),
                    lambda p, _alive=gammas: id(p) not in ids, "add_gamma_l1")


# ------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class SlimmedLayer:
    """One slimmable normalization layer: its producer and consumer layers, its channels before
    and after, and, when it was left whole, why. ``clamped``: the ranking would have removed
    every channel; the one with the largest ``|γ|`` was kept."""

    path: str
    kind: str
    channels: int
    kept: int
    producer: str | None = None
    consumers: tuple[str, ...] = ()
    reason: str = ""
    clamped: bool = False


@dataclass(frozen=True)
class SlimReport:
    """What :func:`slim` did. ``threshold``: the largest ``|γ|`` removed (``nan`` if none);
    ``inexact``: consumer layers whose folded constant is exact only away from the borders
    (zero padding); ``params_*``: parameter counts of the model before and after."""

    layers: tuple[SlimmedLayer, ...]
    ratio: float
    scope: str
    threshold: float
    params_before: int
    params_after: int
    inexact: tuple[str, ...] = ()

    @property
    def removed(self) -> int:
        """Channels removed over all layers."""
        return sum(r.channels - r.kept for r in self.layers)

    @property
    def skipped(self) -> list[str]:
        """Paths of the normalization layers left unpruned (each row's ``reason`` says why)."""
        return [r.path for r in self.layers if r.reason]

    def __str__(self) -> str:
        lines = [f"slim (ratio {self.ratio}, {self.scope}): {self.removed} channels removed, "
                 f"parameters {self.params_before} -> {self.params_after}"]
        for r in self.layers:
            what = f"kept whole: {r.reason}" if r.reason else f"{r.channels} -> {r.kept}" + (
                " (clamped)" if r.clamped else "")
            lines.append(f"  {r.path} ({r.kind}) {what}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ policy
def _select(gammas: dict[str, Tensor], ratio: float, scope: str
            ) -> tuple[dict[str, Tensor], set[str], float]:
    """Boolean keep-masks per norm, the clamped norms and the largest removed ``|γ|``."""
    keep: dict[str, Tensor] = {}
    if scope == "global":
        flat = torch.cat(list(gammas.values()))
        k = math.floor(ratio * len(flat) + 1e-9)
        mask = torch.ones(len(flat), dtype=torch.bool)
        mask[torch.sort(flat, stable=True).indices[:k]] = False
        keep = dict(zip(gammas, mask.split([len(g) for g in gammas.values()]), strict=True))
    else:
        for path, g in gammas.items():
            k = min(math.floor(ratio * len(g) + 1e-9), len(g) - 1)
            keep[path] = torch.ones(len(g), dtype=torch.bool)
            keep[path][torch.sort(g, stable=True).indices[:k]] = False
    clamped = set()
    for path, g in gammas.items():
        if not keep[path].any():  # keep at least one channel: the largest |γ|
            keep[path][g.argmax()] = True
            clamped.add(path)
    removed = [g[~keep[p]] for p, g in gammas.items()]
    gone = torch.cat(removed)
    return keep, clamped, float(gone.max()) if len(gone) else math.nan


def slim(model: nn.Module, ratio: float, *, example_input: Tensor,
         scope: Literal["global", "layer"] = "global", compensate: bool = True,
         inplace: bool = False) -> tuple[nn.Module, SlimReport]:
    r"""Network slimming: remove the ``ratio`` fraction of channels with the smallest ``|γ|``
    and rebuild the layers around them into a smaller model (Liu et al. 2017).

    For every :func:`is_slimmable` normalization layer found on the ``torch.fx`` graph between
    a producer ``Linear``/``Conv*d`` (groups 1) and one or more consumer ``Linear``/``Conv*d``
    layers, reached through channel-wise operations (activations, dropout, pooling, flatten /
    view / squeeze, spatial mean or max), a removed channel ``c`` loses the producer's output
    row ``W_c`` and bias ``b_c``, the norm's ``γ_c, β_c`` and running statistics, and the
    consumer's input channel ``c`` (a Linear after a flatten of ``C×S`` loses the ``S`` columns
    of channel ``c``). With ``γ_c = 0`` the channel carries the constant ``β_c``, so the
    consumer receives ``a_c = act(β_c)`` everywhere; with ``compensate`` it is folded in:

    .. math::
        b'_o = b_o + \sum_{c \text{ removed}} a_c \sum_{k} W_{o,c,k}

    (over the kernel positions ``k``, or the columns of channel ``c``). Removing channels with
    ``γ = 0`` then leaves the model's function unchanged — exactly for Linear consumers and
    convolutions without zero padding; with zero padding the fold is exact away from the
    borders only (those consumers are listed in ``report.inexact``; the paper removes the
    channels without any correction). A consumer without bias followed by a BN has the
    constant folded into that BN's running mean instead; otherwise a bias is added. For
    ``γ_c ≠ 0`` the same fold is the first-order correction.

    Channels are ranked by ``|γ|`` over all prunable layers together (``scope="global"``, as in
    the paper: the number removed is ``⌊ratio · total⌋``) or within each layer
    (``scope="layer"``). Every layer keeps at least its largest-``|γ|`` channel (such layers are
    marked ``clamped``). Layers whose channels meet something slim does not rewrite — a
    residual addition, a concatenation, the model's output, a grouped or shared layer — are
    kept whole and listed with the reason in the report: the result is never silently wrong.
    The slimmed model keeps its class and ``forward`` (new ``nn.Linear``/``nn.Conv*d``/norm
    modules with fewer channels) and is run once on ``example_input`` to check it.

    Args:
        model: a ``torch.fx``-traceable model with BN layers.
        ratio: fraction of the prunable channels to remove, in ``[0, 1)``.
        example_input: one input batch (used to trace shapes, in eval mode, without gradient).
        scope: ``"global"`` (default) or ``"layer"`` ranking.
        compensate: fold the removed channels' constant ``act(β)`` into the consumers.
        inplace: modify ``model`` itself instead of a deep copy (if the final check on
            ``example_input`` then fails, ``model`` is left rebuilt).

    Returns:
        ``(slimmed model, SlimReport)``.

    Raises:
        ConfigError: for ``ratio`` outside ``[0, 1)``, a bad ``scope``, a model without
            slimmable layers or where none can be pruned (the reasons listed), an untraceable
            model, or a slimmed model that fails on ``example_input`` (a ``forward`` that
            hard-codes a channel count).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
        ...                           torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
        >>> with torch.no_grad():
        ...     net[1].weight[:3] = 0.0                   # three channels with γ = 0
        ...     _ = net[1].bias.uniform_(-1, 1)
        >>> x = torch.randn(5, 4)
        >>> small, report = slim(net, 0.5, example_input=x)
        >>> small[0], small[3]
        (Linear(in_features=4, out_features=3, bias=True), Linear(in_features=3, out_features=2, bias=True))
        >>> torch.allclose(small(x), net(x), atol=1e-6), report.params_before - report.params_after
        (True, 27)
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"slim() needs an nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"ratio must be a fraction of channels in [0, 1), got {ratio!r}")
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer', got {scope!r}")
    if not isinstance(example_input, Tensor):
        raise ConfigError(f"example_input must be a Tensor batch, got {type(example_input).__name__}")
    norms = {p: m for p, m in model.named_modules() if is_slimmable(m)}
    if not norms:
        raise ConfigError(f"{type(model).__name__} has no normalization layer with a per-channel "
                          f"γ (BatchNorm with affine=True): there is nothing to slim")
    before = _count(model)
    if not inplace:
        model = copy.deepcopy(model)
    reference = _shapes(_run(model, example_input))
    found = _analyse(model, example_input, is_slimmable)
    plans = {p: v for p, v in found.items() if not isinstance(v, str)}
    if not plans:
        detail = "; ".join(f"{p!r}: {found.get(p, 'it is not called in forward()')}"
                           for p in norms)
        raise ConfigError(f"no normalization layer can be slimmed: {detail}")
    gammas = {p: model.get_submodule(p).weight.detach().abs().double().cpu() for p in plans}
    keep, clamped, threshold = _select(gammas, float(ratio), scope)
    rows = []
    for p, m in norms.items():
        if p in plans:
            rows.append(SlimmedLayer(p, type(m).__name__, m.num_features, int(keep[p].sum()),
                                     plans[p][0], tuple(u.path for u in plans[p][1]),
                                     clamped=p in clamped))
        else:
            reason = found.get(p, "it is not called in forward()")
            rows.append(SlimmedLayer(p, type(m).__name__, m.num_features, m.num_features,
                                     reason=reason))  # type: ignore[arg-type]
    inexact = _rebuild(model, plans, keep, compensate)
    try:
        got = _shapes(_run(model, example_input))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"the slimmed model fails on example_input ({type(e).__name__}: {e}); "
                          f"its forward() probably hard-codes a channel count") from e
    if got != reference:
        raise ConfigError(f"the slimmed model's output has shapes {got} instead of {reference}: "
                          f"a pruned channel count reaches the output")
    return model, SlimReport(tuple(rows), float(ratio), scope, threshold, before, _count(model),
                             tuple(inexact))
