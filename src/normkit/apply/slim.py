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
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from ..gradient._hooks import _check_positive, _install
from ..methods.standard import BatchNorm
from ..nop import L1, Range, Standardize
from ..nop._robust import Ghost
from ..normalization import Normalization
from .convert import is_normalization
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


# ------------------------------------------------------------------------------ graph analysis
_PRODUCERS = (nn.Linear, _ConvNd)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                        nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                        nn.Hardtanh, nn.Softplus, nn.Identity)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ELEMENTWISE_FNS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu,
                    F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish,
                    F.hardtanh, F.softplus}
_POOL_FNS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d,
             F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
             F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_AVG_POOL_FNS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, "flatten", "view", "reshape",
             "squeeze", "contiguous"}
_REDUCES = {torch.mean, torch.amax, "mean", "amax"}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh"}
_METADATA = {"size", "dim", getattr}
_NAMED = {operator.add: "a residual addition (+)", operator.iadd: "a residual addition (+=)",
          torch.add: "a residual addition (torch.add)", torch.cat: "a concatenation (torch.cat)",
          operator.mul: "a multiplication (gating)"}


class _Tracer(fx.Tracer):
    """normkit's normalization modules (not in torch.nn) are graph leaves, as torch's are."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_normalization(m) or super().is_leaf_module(m, qualname)


@dataclass
class _Use:
    """A consumer reached from a norm: its path, block size ``S`` of the input columns per
    channel (Linear after a flatten) or 0 (Conv), the ops mapping β to the constant it sees,
    and whether that constant is exact everywhere (no zero padding on the way)."""

    path: str
    block: int
    ops: tuple[Callable[[Tensor], Tensor], ...]
    exact: bool
    absorber: str | None = None  # a BN right after the consumer, whose running mean absorbs


def _shape(n: fx.Node) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _apply_op(u: fx.Node, cur: fx.Node) -> Callable[[Tensor], Tensor]:
    """``u``'s operation on a channel vector in place of ``cur`` (other arguments as given)."""
    def sub(a: object, v: Tensor) -> object:
        return v if a is cur else a
    if u.op == "call_method":
        return lambda v: getattr(v, str(u.target))(*[sub(a, v) for a in u.args[1:]], **u.kwargs)
    return lambda v: u.target(*[sub(a, v) for a in u.args], **u.kwargs)  # type: ignore[operator]


def _avg_pool_exact(u: fx.Node, mod: nn.Module | None) -> bool:
    """A constant stays constant through an average pool unless zero padding is averaged in."""
    if mod is not None:
        pad, include, div = mod.padding, mod.count_include_pad, mod.divisor_override
    else:
        a = list(u.args) + [None] * 7
        pad = u.kwargs.get("padding", a[3] if a[3] is not None else 0)
        include = u.kwargs.get("count_include_pad", a[5] if a[5] is not None else True)
        div = u.kwargs.get("divisor_override", a[6])
    padded = any(p > 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))
    return not (padded and include) and div is None


def _consumers(model: nn.Module, start: fx.Node, calls: Counter, owners: Counter
               ) -> tuple[list[_Use], str]:
    """The Linear/Conv layers fed by norm node ``start`` through channel-wise ops, or why the
    norm's channels cannot be removed."""
    uses: list[_Use] = []
    stack: list[tuple[fx.Node, int | None, tuple, bool]] = [(start, None, (), True)]
    while stack:
        cur, block, ops, exact = stack.pop()
        shape = _shape(cur)
        for u in cur.users:
            if u.op == "output":
                return [], "its channels reach the model's output"
            tensors = [a for a in u.all_input_nodes if _shape(a) is not None]
            target = u.target
            if u.op in ("call_method", "call_function") and target in _METADATA:
                continue  # x.size(0): checked by running the slimmed model
            if tensors != [cur]:
                what = _NAMED.get(target, f"{u.op} {getattr(target, '__name__', target)}")
                return [], f"its channels reach {what} together with other tensors"
            out = _shape(u)
            mod = model.get_submodule(str(target)) if u.op == "call_module" else None
            step: tuple[int | None, tuple, bool] | None = None
            if isinstance(mod, (nn.Linear, _ConvNd)):
                if calls[target] > 1 or owners[id(mod)] > 1 or parametrize.is_parametrized(mod):
                    return [], f"its consumer {target!r} is shared, called twice or parametrized"
                linear = isinstance(mod, nn.Linear)
                if linear and (shape is None or len(shape) != 2):
                    return [], f"Linear {target!r} gets a tensor of shape {shape}, not (N, C·S)"
                if not linear and (block is not None or mod.groups != 1 or mod.transposed):
                    return [], f"consumer {target!r} is a grouped/transposed conv or gets a " \
                               f"flattened input"
                nxt = next(iter(u.users)) if len(u.users) == 1 else None
                bn = nxt is not None and nxt.op == "call_module" and calls[nxt.target] == 1 \
                    and isinstance(model.get_submodule(str(nxt.target)), (_BatchNorm, BatchNorm))
                uses.append(_Use(str(target), (block or 1) if linear else 0, ops, exact,
                                 str(nxt.target) if bn else None))  # type: ignore[union-attr]
                continue
            if isinstance(mod, _ELEMENTWISE_MODULES) or target in _ELEMENTWISE_FNS \
                    or (u.op == "call_method" and target in _ELEMENTWISE_METHODS):
                step = (block, ops + ((mod if mod is not None else _apply_op(u, cur)),), exact)
            elif isinstance(mod, _DROPOUT) or target in (F.dropout, F.dropout1d, F.dropout2d):
                step = (block, ops, exact)  # identity in eval; its mean in training
            elif isinstance(mod, _POOL_MODULES) or target in _POOL_FNS or target in _AVG_POOL_FNS:
                if getattr(mod, "return_indices", False) or block is not None:
                    return [], f"pooling {target!r} returns indices or follows a flatten"
                avg = isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) \
                    or target in _AVG_POOL_FNS
                step = (block, ops, exact and (not avg or _avg_pool_exact(u, mod)))
            elif (isinstance(mod, nn.Flatten) or target in _RESHAPES) and shape and out:
                if out == shape:
                    step = (block, ops, exact)
                elif block is None and out[:2] == shape[:2]:
                    step = (None, ops, exact)  # spatial axes merged or squeezed
                elif block is None and len(out) == 2 and out[0] == shape[0] \
                        and out[1] == math.prod(shape[1:]):
                    step = (math.prod(shape[2:]), ops, exact)  # (N, C, *S) -> (N, C·S)
            elif target in _REDUCES and block is None and shape:
                dim = u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else None)
                dims = dim if isinstance(dim, (tuple, list)) else (dim,)
                if dim is not None and all(isinstance(d, int) and d % len(shape) >= 2
                                           for d in dims):
                    step = (None, ops, exact)  # mean / max over spatial axes
            if step is None:
                name = _NAMED.get(target, f"{u.op} {getattr(target, '__name__', target)}"
                                  + (f" ({type(mod).__name__})" if mod is not None else ""))
                return [], f"its channels reach {name}, which slim does not rewrite"
            stack.append((u, *step))
    if not uses:
        return [], "its channels reach no Linear/Conv layer"
    return uses, ""


def _analyse(model: nn.Module, example_input: Tensor) -> dict[str, tuple[str, list[_Use]] | str]:
    """For every slimmable norm call: ``(producer path, consumers)``, or the reason it stays."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is the user's model
        raise ConfigError(f"slim() traces the model with torch.fx to find each norm's neighbours, "
                          f"and {type(model).__name__} cannot be traced ({type(e).__name__}: {e}); "
                          f"remove data-dependent control flow from forward()") from e
    gm = fx.GraphModule(model, graph)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"the model fails on example_input of shape "
                          f"{tuple(example_input.shape)}: {type(e).__name__}: {e}") from e
    finally:
        for m, t in modes.items():
            m.training = t
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    owners = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    out: dict[str, tuple[str, list[_Use]] | str] = {}
    for n in graph.nodes:
        if n.op != "call_module" or not is_slimmable(m := model.get_submodule(str(n.target))):
            continue
        src = n.args[0] if n.args else None
        prod = model.get_submodule(str(src.target)) \
            if isinstance(src, fx.Node) and src.op == "call_module" else None
        shape = _shape(n)
        if calls[n.target] > 1 or owners[id(m)] > 1:
            out[n.target] = "it is called or registered more than once"
        elif shape is None or len(shape) < 2 or shape[1] != m.num_features:
            out[n.target] = f"its channels are not axis 1 of its input (shape {shape})"
        elif not isinstance(prod, _PRODUCERS) or len(n.args) != 1 or n.kwargs:
            out[n.target] = "its input is not the output of a Linear/Conv layer"
        elif (len(src.users) != 1 or calls[src.target] > 1 or owners[id(prod)] > 1
              or parametrize.is_parametrized(prod)
              or (isinstance(prod, _ConvNd) and (prod.groups != 1 or prod.transposed))):
            out[n.target] = (f"its producer {src.target!r} is used elsewhere, called twice, "
                             f"parametrized, grouped or transposed")
        else:
            uses, reason = _consumers(model, n, calls, owners)
            out[n.target] = reason or (str(src.target), uses)
    return out


# ------------------------------------------------------------------------------ rebuilding
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


def _zero_padded(conv: _ConvNd) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding keeps a constant constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _new_layer(m: nn.Module, in_idx: Tensor | None, out_idx: Tensor | None,
               add: Tensor | None) -> nn.Module:
    """A copy of Linear/Conv ``m`` with input channels ``in_idx`` and output channels
    ``out_idx`` (``None``: all) and ``add`` (full output size) added to its bias."""
    w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
    if add is not None:
        b = ((b.double() if b is not None else 0.0) + add).to(w.dtype)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    if out_idx is not None:
        w = w.index_select(0, out_idx)
        b = None if b is None else b.index_select(0, out_idx)
    new = copy.deepcopy(m)
    new.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    new.bias = None if b is None else nn.Parameter(b.clone(), requires_grad=m.weight.requires_grad)
    if isinstance(m, nn.Linear):
        new.out_features, new.in_features = w.shape[:2]
    else:
        new.out_channels, new.in_channels = w.shape[:2]
    return new


def _new_norm(m: nn.Module, idx: Tensor) -> nn.Module:
    """A copy of slimmable norm ``m`` keeping channels ``idx`` (γ, β and running statistics)."""
    c = m.num_features
    state = {k: v.index_select(0, idx) if v.dim() == 1 and len(v) == c else v
             for k, v in m.state_dict().items()}
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    new = copy.deepcopy(m)
    if isinstance(m, Normalization):
        # re-run the composition's constructor so that every channel-dependent attribute
        # (groups, buffer shapes, bound operation) is rebuilt for the new count; the preset's
        # class and any attribute it set itself are kept by the copy
        Normalization.__init__(new, len(idx), nap=m.nap, nop=m.nop, nrr=m.nrr, eps=m.eps,
                               momentum=m.momentum, track_running_stats=m.track_running_stats,
                               channel_axis=m.channel_axis, native=m.native,
                               process_group=m.process_group, device=m.weight.device,
                               dtype=m.weight.dtype)
        new.train(m.training)
    else:
        new.num_features = len(idx)
        for name, p in m.named_parameters(recurse=False):
            setattr(new, name, nn.Parameter(torch.empty_like(p[: len(idx)])))
        for name, b in m.named_buffers(recurse=False):
            if b.dim() == 1:
                setattr(new, name, torch.empty_like(b[: len(idx)]))
    new.load_state_dict(state)
    for n, p in new.named_parameters():
        p.requires_grad_(grads[n])
    return new


def _constant(norm: nn.Module, ops: tuple[Callable[[Tensor], Tensor], ...]) -> Tensor:
    """What each channel passes on when its ``γ = 0``: the activation chain applied to ``β``."""
    v = norm.bias.detach().double().clone() if getattr(norm, "bias", None) is not None \
        else torch.zeros(norm.num_features, dtype=torch.float64)
    for op in ops:
        v = op(v.clone())
    return v


@torch.no_grad()
def _rebuild(model: nn.Module, plans: dict[str, tuple[str, list[_Use]]],
             keep: dict[str, Tensor], compensate: bool) -> list[str]:
    out_idx: dict[str, Tensor] = {}
    in_idx: dict[str, Tensor] = {}
    adds: dict[str, Tensor] = {}
    inexact: list[str] = []
    for path, (producer, uses) in plans.items():
        mask, norm = keep[path], model.get_submodule(path)
        out_idx[producer] = mask.nonzero().flatten()
        for use in uses:
            layer = model.get_submodule(use.path)
            w = layer.weight.detach().double()
            if use.block:  # Linear: column j belongs to channel j // block
                channel = torch.arange(w.shape[1]) // use.block
                cols = mask[channel]
                in_idx[use.path] = cols.nonzero().flatten()
                gone, w_gone = channel[~cols], w[:, ~cols]
            else:  # Conv: the constant channel meets the whole kernel
                in_idx[use.path] = mask.nonzero().flatten()
                gone, w_gone = (~mask).nonzero().flatten(), w[:, ~mask].flatten(2).sum(-1)
            if not compensate or not len(gone):
                continue
            add = w_gone @ _constant(norm, use.ops).to(w.device)[gone]
            if not add.any():
                continue
            if not use.exact or (isinstance(layer, _ConvNd) and _zero_padded(layer)):
                inexact.append(use.path)
            bn = model.get_submodule(use.absorber) if use.absorber else None
            if layer.bias is None and bn is not None:
                if bn.running_mean is not None:  # BN(z + a) with μ  ==  BN(z) with μ − a
                    bn.running_mean.sub_(add.to(bn.running_mean.dtype))
                continue  # without running statistics the batch mean absorbs the constant
            adds[use.path] = adds.get(use.path, 0) + add
    new: dict[str, nn.Module] = {}
    for path in {*out_idx, *in_idx}:
        new[path] = _new_layer(model.get_submodule(path), in_idx.get(path), out_idx.get(path),
                               adds.get(path))
    for path in plans:
        new[path] = _new_norm(model.get_submodule(path), keep[path].nonzero().flatten())
    for path, m in new.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, m)
    return sorted(set(inexact))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(out: object) -> object:
    if isinstance(out, Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shapes(o) for o in out]
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return type(out).__name__


def _run(model: nn.Module, x: Tensor) -> object:
    """``model(x)`` in eval mode without gradient, every module's mode restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        for m, t in modes.items():
            m.training = t


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
    found = _analyse(model, example_input)
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
