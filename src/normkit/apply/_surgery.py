r"""The surgery engine behind :func:`~normkit.apply.slim.slim`: find, on a ``torch.fx`` graph, the
layers around each normalization layer (the producer ``Linear``/``Conv*d`` before it and the
consumers its channels reach through channel-wise operations), then rebuild those layers with a
subset of the channels, folding what a removed channel passed on into the consumers' biases.

It knows nothing of *which* channels go (that is the slimming policy in
:mod:`normkit.apply.slim`: the ``|γ|`` ranking, the γ-L1 penalty, the report): :func:`_analyse`
takes the predicate that selects the normalization layers, :func:`_rebuild` the keep-masks.

For a removed channel ``c`` that carries the constant ``a_c`` (``act(β_c)`` when ``γ_c = 0``),
each consumer's bias becomes

.. math::
    b'_o = b_o + \sum_{c \text{ removed}} a_c \sum_{k} W_{o,c,k}

over the kernel positions ``k`` (Conv) or the columns of channel ``c`` (Linear after a flatten).
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..methods.standard import BatchNorm
from ..normalization import Normalization
from .convert import is_normalization

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


def _analyse(model: nn.Module, example_input: Tensor, selects: Callable[[nn.Module], bool]
             ) -> dict[str, tuple[str, list[_Use]] | str]:
    """For every call of a norm ``selects`` accepts: ``(producer path, consumers)``, or the
    reason it stays."""
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
        if n.op != "call_module" or not selects(m := model.get_submodule(str(n.target))):
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
