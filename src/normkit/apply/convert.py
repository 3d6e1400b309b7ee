"""Model surgery: replace the normalization layers of any torch model with a registry method.

:func:`convert` swaps every normalization layer (torch's BN/SyncBN/IN/GN/LN/RMSNorm and their
subclasses in other libraries, normkit's own) for ``normkit.create(spec, C, ...)``, carrying
``γ, β`` and the running statistics over wherever they mean the same thing, and reports, layer by
layer, what was kept and what was dropped and why.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .. import registry
from ..errors import ConfigError
from ..nop import Whiten
from ..normalization import Normalization

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "is_normalization", "layer_layout"]

_TORCH_NORMS: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_KNOWN = ("torch BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, "
          "RMSNorm (or a subclass), or a normkit Normalization")

Match = Callable[[str, nn.Module], bool] | str | type | tuple[type, ...] | None


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer :func:`convert` and :func:`normkit.apply.fold.
    fold` know: a normkit :class:`~normkit.Normalization`, or torch's ``_NormBase`` (BN, SyncBN,
    IN), ``GroupNorm``, ``LayerNorm``, ``RMSNorm`` — or a subclass of any of them."""
    return isinstance(module, (Normalization, *_TORCH_NORMS))


def layer_layout(path: str, module: nn.Module) -> tuple[int, int]:
    """``(num_features, channel_axis)`` of a normalization layer.

    torch's BN/IN/GN normalize axis 1; torch's ``LayerNorm(C)`` / ``RMSNorm(C)`` the last axis
    (``channel_axis=-1``). normkit modules say it themselves.

    Raises:
        ConfigError: for a LayerNorm/RMSNorm over more than one axis (its ``γ, β`` are not per
            channel), or a LayerNorm/RMSNorm subclass with its own ``forward`` (which axis it
            normalizes is then unknown, e.g. a channels-first "LayerNorm2d").
    """
    if isinstance(module, Normalization):
        return module.num_features, module.channel_axis
    if isinstance(module, _NormBase):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        base = nn.LayerNorm if isinstance(module, nn.LayerNorm) else nn.RMSNorm
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            raise ConfigError(
                f"layer {path!r} ({module!r}) normalizes over {shape}, more than the channel axis, "
                f"and its γ, β have that shape, not one value per channel; no registry method "
                f"maps it. Fix: exclude it with match=, or build it as a normkit LayerNorm(C) "
                f"(over all of C and the positions, per-channel γ, β) yourself"
            )
        if type(module).forward is not base.forward:
            raise ConfigError(
                f"layer {path!r} ({type(module).__name__}) subclasses {base.__name__} with its own "
                f"forward, so which axis it normalizes is unknown (a channels-first LayerNorm2d "
                f"permutes to normalize axis 1). Fix: exclude it with match=, or pass to= a "
                f"callable that builds the replacement you want"
            )
        return shape[0], -1
    raise ConfigError(f"layer {path!r} ({type(module).__name__}) is not a normalization layer "
                      f"normkit knows: expected {_KNOWN}")


# ------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class ConvertedLayer:
    """One row of a :class:`ConversionReport`.

    Attributes:
        path: dotted path of the layer in the model (``""`` for the model itself).
        old: type of the replaced layer.
        new: the replacement, as its type and the keyword arguments it was built with.
        kept: parameters and buffers carried over (``"running_cov←diag(running_var)"`` where a
            statistic was mapped into another form).
        dropped: ``(name, reason)`` of the old layer's tensors that were not carried over.
        fresh: tensors of the new layer left at their initial values.
    """

    path: str
    old: str
    new: str
    kept: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]
    fresh: tuple[str, ...]


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert` changed: one :class:`ConvertedLayer` per replaced layer, in model
    order. ``str(report)`` is a table; ``report[path]`` a row by path."""

    layers: tuple[ConvertedLayer, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[ConvertedLayer]:
        return iter(self.layers)

    def __getitem__(self, path: str) -> ConvertedLayer:
        for row in self.layers:
            if row.path == path:
                return row
        raise KeyError(f"no converted layer at {path!r}; converted: {[r.path for r in self.layers]}")

    def __str__(self) -> str:
        head = ("path", "old", "new", "kept", "dropped (why)", "fresh")
        rows = [(r.path or "<model>", r.old, r.new, ", ".join(r.kept) or "-",
                 "; ".join(f"{n}: {why}" for n, why in r.dropped) or "-", ", ".join(r.fresh) or "-")
                for r in self.layers]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------ selection
def _selected(model: nn.Module, match: Match) -> list[tuple[list[str], nn.Module]]:
    """The layers to convert (each with every path it is registered at), outermost only."""
    explicit = isinstance(match, type) or (isinstance(match, tuple) and bool(match))
    if explicit and not all(isinstance(t, type) for t in (match if isinstance(match, tuple)
                                                          else (match,))):
        raise ConfigError(f"match= tuple must hold types, got {match!r}")
    if not (match is None or explicit or isinstance(match, str) or callable(match)):
        raise ConfigError(f"match= must be None, a glob over dotted paths (str), a type, a tuple "
                          f"of types or a callable f(path, module) -> bool, got {match!r}")
    found: dict[int, tuple[list[str], nn.Module]] = {}
    taken: list[str] = []
    for path, m in model.named_modules(remove_duplicate=False):
        if any(path.startswith(p + ".") for p in taken):
            continue  # inside a layer already selected (its own parts are not layers to convert)
        if explicit:
            hit = isinstance(m, match)  # type: ignore[arg-type]
            if hit and not is_normalization(m):
                raise ConfigError(
                    f"match={match!r} selects {path!r} ({type(m).__name__}), which is not a "
                    f"normalization layer normkit can convert (expected {_KNOWN}). Fix: narrow "
                    f"match= to normalization types")
        else:
            hit = is_normalization(m) and (
                match is None or (fnmatch.fnmatchcase(path, match) if isinstance(match, str)
                                  else bool(match(path, m))))  # type: ignore[operator]
        if hit:
            taken.append(path)
            found.setdefault(id(m), ([], m))[0].append(path)
    if not found and match is not None:
        norms = [p or "<model>" for p, m in model.named_modules() if is_normalization(m)]
        raise ConfigError(f"match={match!r} selects no normalization layer; the model's "
                          f"normalization layers are {norms}")
    return list(found.values())


# ------------------------------------------------------------------------------ building
def _factory_dtype(m: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _affine(m: nn.Module) -> bool:
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return bool(m.elementwise_affine)
    return bool(m.affine)


def _running(m: nn.Module) -> bool:
    if isinstance(m, Normalization):
        return m._running() is not None
    return isinstance(m, _NormBase) and m.running_mean is not None


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _build(path: str, old: nn.Module, to: str | Callable[..., nn.Module]) -> tuple[nn.Module, str]:
    """The replacement of ``old`` and its description. A spec string inherits ``eps``,
    ``affine``, the channel axis, device and dtype of the old layer (the spec's own arguments
    win); a callable is called as ``to(C)`` and moved to the old layer's device and dtype."""
    c, axis = layer_layout(path, old)
    device, dtype = _factory_dtype(old)
    try:
        if isinstance(to, str):
            name, kw = registry.parse_spec(to)
            factory = registry.get(name)
            assert factory is not None  # a str always resolves (or raises)
            inherited: dict[str, Any] = {"eps": old.eps, "device": device, "dtype": dtype}
            if _accepts(factory, "affine"):
                inherited["affine"] = _affine(old)
            if axis != 1:
                inherited["channel_axis"] = axis
            kwargs = {**{k: v for k, v in inherited.items() if _accepts(factory, k)}, **kw}
            new = factory(c, **kwargs)
            shown = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
            desc = f"{type(new).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
            if _running(new) and _running(old) and "momentum" not in kw:
                new.momentum = old.momentum  # torch's meaning in both (None: cumulative)
        else:
            new = to(c)
            if not isinstance(new, nn.Module):
                raise ConfigError(f"to({c}) returned {type(new).__name__}, not an nn.Module")
            new = new.to(device=device, dtype=dtype)
            desc = f"{type(new).__name__} (from {getattr(to, '__name__', repr(to))})"
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"cannot convert layer {path!r} ({old!r}, {c} channels) to {to!r}: {e}. Fix: choose "
            f"arguments that fit {c} channels (e.g. num_groups dividing {c}), or leave this layer "
            f"out with match=") from e
    new.train(old.training)
    return new, desc


# ------------------------------------------------------------------------- state transfer
def _blocks_of(var: Tensor, like: Tensor) -> Tensor:
    """``diag(var)`` laid out as whitening blocks shaped like ``like`` ``(G, d, d)`` (a smaller
    last group keeps the identity in its padding, like the buffers' initial value)."""
    g, d = like.shape[0], like.shape[-1]
    out = torch.eye(d, dtype=torch.float64, device=like.device).repeat(g, 1, 1)
    idx = torch.arange(var.numel(), device=like.device)
    out[idx // d, idx % d, idx % d] = var.to(torch.float64)
    return out


def _diag_of(blocks: Tensor, c: int) -> Tensor:
    return torch.diagonal(blocks, dim1=-2, dim2=-1).reshape(-1)[:c]


@torch.no_grad()
def _transfer(old: nn.Module, new: nn.Module, c: int
              ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Carry ``old``'s parameters and buffers into ``new`` where they map; ``(kept, dropped,
    fresh)``. Parameters of equal shape, dtype and device are the same ``nn.Parameter`` objects
    afterwards (an optimizer holding them keeps working, as torch's ``convert_sync_batchnorm``)."""
    new_t = dict(new.named_parameters(recurse=False))
    new_b = {k: b for k, b in new.named_buffers(recurse=False) if b is not None}
    filled: set[str] = set()
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    kind = type(new).__name__
    whiten = isinstance(new, Normalization) and isinstance(new.nop, Whiten)
    for name, p in old.named_parameters(recurse=False):
        q = new_t.get(name)
        if q is None:
            dropped.append((name, f"{kind} has no parameter {name}"))
        elif q.shape != p.shape:
            dropped.append((name, f"shape {tuple(p.shape)} vs {kind}'s {tuple(q.shape)}"))
        else:
            if q.dtype == p.dtype and q.device == p.device:
                setattr(new, name, p)
            else:
                q.copy_(p)
            kept.append(name)
            filled.add(name)
    for name, b in old.named_buffers(recurse=False):
        if b is None:
            continue
        q = new_b.get(name)
        if q is not None and q.shape == b.shape:
            q.copy_(b)
            kept.append(name)
            filled.add(name)
        elif name == "running_var" and "running_cov" in new_b and b.numel() == c:
            new_b["running_cov"].copy_(_blocks_of(b, new_b["running_cov"]))
            kept.append("running_cov←diag(running_var)")
            filled.add("running_cov")
        elif name == "running_var" and "running_matrix" in new_b and whiten and b.numel() == c:
            eps = new.eps if new.eps is not None else torch.finfo(b.dtype).eps
            cov = _blocks_of(b, new_b["running_matrix"])
            new_b["running_matrix"].copy_(new.nop.whitening({"cov": cov[None]}, eps)[0])
            kept.append("running_matrix←W(diag(running_var))")
            filled.add("running_matrix")
        elif name == "running_cov" and "running_var" in new_b and new_b["running_var"].numel() == c:
            new_b["running_var"].copy_(_diag_of(b, c))
            kept.append("running_var←diag(running_cov)")
            filled.add("running_var")
        elif name == "running_matrix" and "running_var" in new_b:
            dropped.append((name, "a whitening matrix does not give the variances; re-estimate "
                                  "them with normkit.apply.recalibrate"))
        elif not new_b and (name.startswith("running_") or name == "num_batches_tracked"):
            dropped.append((name, f"{kind} keeps no running statistics"))
        elif q is None:
            dropped.append((name, f"{kind} has no buffer {name}"))
        else:
            dropped.append((name, f"shape {tuple(b.shape)} vs {kind}'s {tuple(q.shape)}"))
    fresh = tuple(n for n in (*new_t, *new_b) if n not in filled)
    return tuple(kept), tuple(dropped), fresh


# ------------------------------------------------------------------------------- convert
def convert(
    model: nn.Module,
    to: str | Callable[[int], nn.Module] = "gn:num_groups=8",
    *,
    match: Match = None,
    inplace: bool = False,
) -> nn.Module:
    r"""Replace the normalization layers of ``model`` with a registry method, keeping ``γ, β`` and
    the running statistics wherever they map.

    Every selected layer ``L`` with ``C`` channels becomes ``normkit.create(to, C, **inherited)``:
    ``eps``, ``affine``, the channel axis (``-1`` for torch's ``LayerNorm(C)``/``RMSNorm(C)``),
    device, dtype and train/eval mode are inherited from ``L`` unless ``to`` sets them, and
    ``momentum`` when both layers track running statistics. Then, tensor by tensor:

    ======================================  =================================================
    old → new                               carried over
    ======================================  =================================================
    same name and shape                     as is (``weight``, ``bias``, ``running_mean``,
                                            ``running_var``, ``num_batches_tracked``, ...);
                                            equal parameters stay the same objects
    ``running_var`` → ``running_cov``       ``diag(running_var)`` per whitening group
    ``running_var`` → ``running_matrix``    ``W(diag(running_var))``: the new layer's own
                                            whitening of that covariance (ZCA, Cholesky: exactly
                                            BN's ``1/√(σ² + ε)``; IterNorm: its Newton–Schulz
                                            approximation)
    ``running_cov`` → ``running_var``       the diagonal (the marginal variances)
    anything else                           dropped, with the reason in the report
    ======================================  =================================================

    So BN → ``"dbn"`` or ``"cd_bw"`` keeps the evaluation output exactly; BN → ``"gn"``/``"ln"``
    keeps ``γ, β`` and drops the statistics (per-sample methods keep none).

    Conversion is all or nothing: every replacement is built and filled first, and only then
    put in place, so an error leaves ``model`` untouched, also with ``inplace=True``. Forward
    hooks registered on the old layers are not carried over.

    Args:
        model: any module; if it is itself a selected layer, the replacement is returned.
        to: a registry spec (``"gn:num_groups=8"``, ``"ln"``, ``"iternorm:group_size=16"``,
            ``"bn"``, ``"ibn:ratio=0.5"``) or a callable ``f(C) -> nn.Module`` (called with the
            channel count only; it decides every other setting, and its module is moved to the
            old layer's device and dtype).
        match: which layers to convert. ``None``: every normalization layer (see
            :func:`is_normalization`). A ``str``: a glob over dotted paths (``"layer1.*"``), among
            normalization layers. A callable ``f(path, module) -> bool``: called on the
            normalization layers. A type or tuple of types: every instance, each of which must
            be a normalization layer (else an error).
        inplace: modify ``model`` itself (its parameters reused by the new layers) instead of a
            deep copy.

    Returns:
        The converted model, with the :class:`ConversionReport` as its ``conversion_report``
        attribute (``str()`` of it is a table).

    Raises:
        ConfigError: naming the layer's path, for a layer that cannot be converted (arguments
            that do not fit its channel count, a LayerNorm over more than the channel axis, a
            type match selecting a non-normalization module), an explicit ``match`` that selects
            nothing, or an unknown method (:class:`~normkit.errors.UnknownMethodError`).

    Example:
        >>> import torch, normkit as nk
        >>> from normkit.apply.convert import convert
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16))
        >>> gn = convert(net, "gn:num_groups=4")
        >>> type(gn[1]).__name__, gn[1].num_groups, gn.conversion_report["1"].kept
        ('GroupNorm', 4, ('weight', 'bias'))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> bn = convert(net.eval(), "bn")   # torch BN -> normkit BN: same evaluation output
        >>> torch.allclose(bn(x), net(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"convert() needs an nn.Module, got {type(model).__name__}")
    if not (isinstance(to, str) or callable(to)):
        raise ConfigError(f"to= must be a registry spec string or a callable f(C), got {to!r}")
    if not isinstance(inplace, bool):
        raise ConfigError(f"inplace must be a bool, got {inplace!r}")
    if isinstance(to, str):
        registry.get(registry.parse_spec(to)[0])  # unknown names fail before any work
    if not inplace:
        model = copy.deepcopy(model)
    targets = _selected(model, match)
    plan: list[tuple[list[str], nn.Module]] = []
    rows: list[ConvertedLayer] = []
    for paths, old in targets:  # 1. build and fill every replacement; nothing is changed yet
        new, desc = _build(paths[0], old, to)
        kept, dropped, fresh = _transfer(old, new, layer_layout(paths[0], old)[0])
        plan.append((paths, new))
        rows += [ConvertedLayer(p, type(old).__name__, desc, kept, dropped, fresh) for p in paths]
    root = None
    for paths, new in plan:  # 2. put them in place
        for path in paths:
            if path == "":
                root = new
                continue
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, new)
    out = model if root is None else root
    out.conversion_report = ConversionReport(tuple(rows))  # type: ignore[assignment]
    return out
