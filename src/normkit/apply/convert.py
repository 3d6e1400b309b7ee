"""Model surgery: replace the normalization layers of any torch model with a registry method.

:func:`convert` swaps every normalization layer — recognised by what it computes
(:mod:`normkit.apply.recognize`: torch's BN/SyncBN/IN/GN/LN/RMSNorm, their subclasses in other
libraries such as timm's norm+act layers and ``LayerNorm2d``, Hugging Face's RMSNorms, normkit's
own) — for ``normkit.create(spec, C, ...)``, carrying ``γ, β`` and the running statistics over
wherever they mean the same thing, keeping a layer's activation and dropout, and reports, layer by
layer, what was kept, what was dropped and why, and whether the output was measured unchanged.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .. import registry
from ..errors import ConfigError
from ..nop import Whiten
from ..normalization import Normalization
from .convert_report import ConversionReport, ConvertedLayer
from .recognize import NormAct, Recognition, _probe, looks_like_norm, recognize

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "is_normalization", "layer_layout"]

_TORCH_NORMS: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_KNOWN = ("torch BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, "
          "RMSNorm (or a subclass), a normkit Normalization, or a class named like a norm "
          "(LayerNorm, RMSNorm, GroupNorm, BatchNorm) with a 1-D weight")
_VERIFY_RTOL = 1e-5  # float32 evaluation outputs, relative to max|y|

Match = Callable[[str, nn.Module], bool] | str | type | tuple[type, ...] | None


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer by class: a normkit
    :class:`~normkit.Normalization`, or torch's ``_NormBase`` (BN, SyncBN, IN), ``GroupNorm``,
    ``LayerNorm``, ``RMSNorm`` — or a subclass of any of them. :func:`convert` also takes the
    classes :func:`~normkit.apply.recognize.looks_like_norm` accepts (Hugging Face's RMSNorm)."""
    return isinstance(module, (Normalization, *_TORCH_NORMS))


def layer_layout(path: str, module: nn.Module) -> tuple[int, int]:
    """``(num_features, channel_axis)`` of a normalization layer, from what it computes
    (:func:`~normkit.apply.recognize.recognize`).

    torch's BN/IN/GN normalize axis 1; torch's ``LayerNorm(C)`` / ``RMSNorm(C)``, timm's
    ``LayerNorm`` and Hugging Face's RMSNorms the last axis (``channel_axis=-1``); a channels-first
    ``LayerNorm2d`` axis 1. normkit modules say it themselves.

    Raises:
        ConfigError: naming ``path``, for a LayerNorm/RMSNorm over more than one axis (its
            ``γ, β`` are not per channel), or a layer whose output matches no known formula.
    """
    rec = recognize(module, path)
    return rec.num_features, rec.channel_axis


# ------------------------------------------------------------------------------ selection
Target = tuple[list[str], nn.Module, Recognition]


def _selected(model: nn.Module, match: Match) -> tuple[list[Target], list[tuple[str, str]]]:
    """The layers to convert (each with every path it is registered at and what it computes),
    outermost only; and ``(path, reason)`` of the look-alikes refused (``match=None`` only: a
    layer selected explicitly that cannot be recognised raises)."""
    explicit = isinstance(match, type) or (isinstance(match, tuple) and bool(match))
    if explicit and not all(isinstance(t, type) for t in (match if isinstance(match, tuple)
                                                          else (match,))):
        raise ConfigError(f"match= tuple must hold types, got {match!r}")
    if not (match is None or explicit or isinstance(match, str) or callable(match)):
        raise ConfigError(f"match= must be None, a glob over dotted paths (str), a type, a tuple "
                          f"of types or a callable f(path, module) -> bool, got {match!r}")
    found: dict[int, Target] = {}
    refused: list[tuple[str, str]] = []
    taken: list[str] = []
    for path, m in model.named_modules(remove_duplicate=False):
        if any(path.startswith(p + ".") or p == "" for p in taken):
            continue  # inside a layer already selected (its own parts are not layers to convert)
        if explicit:
            hit = isinstance(m, match)  # type: ignore[arg-type]
            if hit and not looks_like_norm(m):
                raise ConfigError(
                    f"match={match!r} selects {path!r} ({type(m).__name__}), which is not a "
                    f"normalization layer normkit can convert (expected {_KNOWN}). Fix: narrow "
                    f"match= to normalization types")
        else:
            hit = looks_like_norm(m) and (
                match is None or (fnmatch.fnmatchcase(path, match) if isinstance(match, str)
                                  else bool(match(path, m))))  # type: ignore[operator]
        if not hit:
            continue
        if id(m) in found:
            found[id(m)][0].append(path)
            taken.append(path)
            continue
        try:
            found[id(m)] = ([path], m, recognize(m, path))
            taken.append(path)
        except ConfigError as e:
            if match is not None:
                raise
            refused.append((path, str(e)))  # its own children are still looked at
    if not found and not refused and match is not None:
        norms = [p or "<model>" for p, m in model.named_modules() if looks_like_norm(m)]
        raise ConfigError(f"match={match!r} selects no normalization layer; the model's "
                          f"normalization layers are {norms}")
    return list(found.values()), refused


# ------------------------------------------------------------------------------ building
def _factory_dtype(m: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _affine(m: nn.Module) -> bool:
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return bool(m.elementwise_affine)
    if hasattr(m, "affine"):
        return bool(m.affine)
    return isinstance(getattr(m, "weight", None), Tensor)


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


def _build(path: str, old: nn.Module, rec: Recognition, to: str | Callable[..., nn.Module]
           ) -> tuple[nn.Module, str]:
    """The replacement of ``old`` (without its tail) and its description. A spec string inherits
    ``eps``, ``affine``, the channel axis, ``over="channels"`` (LN/RMS per position), device and
    dtype of the old layer, and ``track_running_stats`` from a BN/IN to a BN/IN (the spec's own
    arguments win); a callable is called as ``to(C)`` and moved to the old layer's device and
    dtype."""
    c, axis = rec.num_features, rec.channel_axis
    device, dtype = _factory_dtype(old)
    try:
        if isinstance(to, str):
            name, kw = registry.parse_spec(to)
            factory = registry.get(name)
            assert factory is not None  # a str always resolves (or raises)
            inherited: dict[str, Any] = {"eps": rec.eps, "device": device, "dtype": dtype}
            if _accepts(factory, "affine"):
                inherited["affine"] = _affine(old)
            if axis != 1:
                inherited["channel_axis"] = axis
            if rec.over is not None and "over" in inspect.signature(factory).parameters:
                inherited["over"] = rec.over
            if _NK_KIND.get(getattr(factory, "__name__", "")) == rec.kind in ("batch", "instance"):
                inherited["track_running_stats"] = _running(old)  # BN without, IN with them
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


_NK_KIND = {"BatchNorm": "batch", "InstanceNorm": "instance", "GroupNorm": "group",
            "LayerNorm": "layer", "RMSNorm": "rms"}


def _computes(m: nn.Module, rec: Recognition | None = None) -> tuple | None:
    """``(kind, channel_axis, over, groups, eps)`` of a plain norm, ``None`` if not one of those
    (two layers with equal tuples compute the same function given the same tensors)."""
    if isinstance(m, Normalization):
        from ..methods import scaling, standard

        kind = next((k for n, k in _NK_KIND.items()
                     if type(m) is getattr(standard, n, None) or type(m) is getattr(scaling, n, None)),
                    None)
        if kind is None:
            return None
        over = None
        if kind in ("layer", "rms"):
            over = "channels" if type(m.nap).__name__ == "Position" else "all"
        if kind == "layer" and over == "all":
            kind, over = "group", None  # LN over all of C and the positions = GN(1)
        groups = getattr(m, "num_groups", 1) if kind == "group" else None
        return kind, m.channel_axis, over, groups, m.eps
    try:
        rec = rec or recognize(m)
    except ConfigError:
        return None
    groups = getattr(m, "num_groups", None) if rec.kind == "group" else None
    return rec.kind, rec.channel_axis, rec.over, groups, rec.eps


@torch.no_grad()
def _verify(old: nn.Module, new: nn.Module, rec: Recognition) -> tuple[bool | None, float | None]:
    """Evaluation outputs of ``old`` and ``new`` on one float32 probe: ``(max|Δ| ≤ 1e-5·max|y|,
    max|Δ|)``, or ``(None, None)`` when either cannot run on it alone (a conditional layer, a
    module for another layout)."""
    a, b = copy.deepcopy(old).float().eval(), copy.deepcopy(new).float().eval()
    device = next((t.device for t in (*a.parameters(), *a.buffers())), None)
    x = _probe(rec.probe_shape, rec.channel_axis, torch.float32, device, seed=3)
    try:
        y, z = a(x.clone()), b(x.clone())
    except Exception:  # noqa: BLE001 - a conditional layer, a callable's module for another layout
        return None, None
    if not (isinstance(y, Tensor) and isinstance(z, Tensor)) or z.shape != y.shape:
        return None, None
    diff = float((z - y).abs().max())
    return diff <= _VERIFY_RTOL * max(float(y.abs().max()), 1e-12), diff


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
def _transfer(old: nn.Module, new: nn.Module, c: int, offset: float = 0.0
              ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Carry ``old``'s parameters and buffers into ``new`` where they map; ``(kept, dropped,
    fresh)``. Parameters of equal shape, dtype and device are the same ``nn.Parameter`` objects
    afterwards (an optimizer holding them keeps working, as torch's ``convert_sync_batchnorm``);
    a ``(offset + weight)`` gain (Gemma) becomes ``weight ← offset + weight``."""
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
        elif name == "weight" and offset:
            q.copy_(p + offset)
            kept.append(f"weight←{offset:g}+weight")
            filled.add(name)
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
        elif q is None and name in new_t and new_t[name].shape == b.shape:  # buffer → parameter
            new_t[name].copy_(b)
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
    r"""Replace the normalization layers of ``model`` with a registry method, keeping ``γ, β``,
    the running statistics wherever they map, and each layer's activation and dropout.

    Layers are recognised by what they compute (:func:`~normkit.apply.recognize.recognize`):
    torch's classes and normkit's by class; subclasses with their own ``forward`` or children
    (timm's ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNorm``, ``LayerNorm2d``) and norm-named
    classes that are not torch subclasses (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``,
    ``GemmaRMSNorm``; timm's ``RmsNorm``) by running them on a probe: BN, IN, GN, LN or RMS over
    the last axis or over axis 1, with or without bias, Gemma's ``(1 + weight)`` gain.

    Every selected layer ``L`` with ``C`` channels becomes ``normkit.create(to, C, **inherited)``:
    ``eps``, ``affine``, ``track_running_stats`` (BN/IN to BN/IN), the channel axis (``-1`` for a
    norm over the last axis: torch's
    ``LayerNorm(C)``/``RMSNorm(C)``, ViT's, Hugging Face's), ``over="channels"`` for a LN/RMS per
    position (also the channels-first ``LayerNorm2d`` of ConvNeXt), device, dtype and train/eval
    mode are inherited from ``L`` unless ``to`` sets them, and ``momentum`` when both layers track
    running statistics. A norm+act layer becomes ``NormAct(new, drop=L.drop, act=L.act)``
    (:class:`~normkit.apply.recognize.NormAct`; the original modules, moved, in the order the
    probe showed; ``Identity`` ones left out). Then, tensor by tensor:

    ======================================  =================================================
    old → new                               carried over
    ======================================  =================================================
    same name and shape                     as is (``weight``, ``bias``, ``running_mean``,
                                            ``running_var``, ``num_batches_tracked``, ...);
                                            equal parameters stay the same objects
    ``(1 + weight)`` gain (Gemma)           ``weight ← 1 + weight`` (the same function)
    ``running_var`` → ``running_cov``       ``diag(running_var)`` per whitening group
    ``running_var`` → ``running_matrix``    ``W(diag(running_var))``: the new layer's own
                                            whitening of that covariance (ZCA, Cholesky: exactly
                                            BN's ``1/√(σ² + ε)``; IterNorm: its Newton–Schulz
                                            approximation)
    ``running_cov`` → ``running_var``       the diagonal (the marginal variances)
    anything else                           dropped, with the reason in the report
    ======================================  =================================================

    So BN → ``"bn"``, ``"dbn"`` or ``"cd_bw"`` keeps the evaluation output exactly; BN →
    ``"gn"``/``"ln"`` keeps ``γ, β`` and drops the statistics (per-sample methods keep none).

    Every replacement is checked: old and new layer (with its tail) run in eval mode on one
    float32 probe, and the report records ``verified`` (``max|Δ| ≤ 1e-5·max|y|``) and
    ``max_diff``. Where the replacement computes the same function by construction (same kind,
    layout, groups and ``eps`` — torch BN → ``"bn"``, LN → ``"ln"``, an RMSNorm → ``"rms_norm"``;
    ``equivalent=True``), a failed check raises instead of changing the model.

    Conversion is all or nothing: every replacement is built, filled and checked first, and only
    then put in place, so an error leaves ``model`` untouched, also with ``inplace=True``. With
    ``match=None``, a module that looks like a norm but is not recognised (an unknown
    ``forward``, unknown children, a LayerNorm over several axes) is left as it is, listed in the
    report's ``refused`` and warned about (:class:`UserWarning`); selected explicitly by
    ``match=``, it raises. Forward hooks registered on the old layers are not carried over.

    Args:
        model: any module; if it is itself a selected layer, the replacement is returned.
        to: a registry spec (``"gn:num_groups=8"``, ``"ln"``, ``"iternorm:group_size=16"``,
            ``"bn"``, ``"ibn:ratio=0.5"``) or a callable ``f(C) -> nn.Module``, called with the
            channel count of each recognised layer only (it decides every other setting,
            layout included; the module is moved to the old layer's device and dtype, followed
            by the layer's kept activation/dropout, and checked like any other).
        match: which layers to convert. ``None``: every normalization layer (see
            :func:`~normkit.apply.recognize.looks_like_norm`). A ``str``: a glob over dotted
            paths (``"layer1.*"``), among normalization layers. A callable
            ``f(path, module) -> bool``: called on the normalization layers. A type or tuple of
            types: every instance, each of which must be a normalization layer (else an error).
        inplace: modify ``model`` itself (its parameters reused by the new layers) instead of a
            deep copy.

    Returns:
        The converted model, with the :class:`ConversionReport` as its ``conversion_report``
        attribute (``str()`` of it is a table).

    Raises:
        ConfigError: naming the layer's path, for a layer that cannot be converted (arguments
            that do not fit its channel count, an explicitly selected layer that is not
            recognised, a type match selecting a non-normalization module, a replacement meant
            to be equivalent whose output differs), an explicit ``match`` that selects nothing,
            or an unknown method (:class:`~normkit.errors.UnknownMethodError`).

    Example:
        >>> import torch, normkit as nk
        >>> from normkit.apply.convert import convert
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16))
        >>> gn = convert(net, "gn:num_groups=4")
        >>> type(gn[1]).__name__, gn[1].num_groups, gn.conversion_report["1"].kept
        ('GroupNorm', 4, ('weight', 'bias'))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> bn = convert(net.eval(), "bn")   # torch BN -> normkit BN: same evaluation output
        >>> torch.allclose(bn(x), net(x), atol=1e-6), bn.conversion_report["1"].verified
        (True, True)
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
    targets, refused = _selected(model, match)
    plan: list[tuple[list[str], nn.Module]] = []
    rows: list[ConvertedLayer] = []
    for paths, old, rec in targets:  # 1. build, fill and check every replacement; nothing changes
        new, desc = _build(paths[0], old, rec, to)
        kept, dropped, fresh = _transfer(old, new, rec.num_features, rec.weight_offset)
        tail = {n: getattr(old, n) for n in rec.tail}
        out = NormAct(new, **tail) if tail else new
        verified, diff = _verify(old, out, rec)
        before = _computes(old, rec) if rec.kind != "normkit" else _computes(old)
        equivalent = before is not None and before == _computes(new)
        if equivalent and not verified:
            raise ConfigError(
                f"converting layer {paths[0]!r} ({type(old).__name__}, {rec.describe()}) to "
                f"{desc} should keep its output, but on a probe the outputs differ by "
                f"{diff if diff is not None else 'an error'} (max|Δ|). Nothing was changed. Fix: "
                f"leave this layer out with match= (with a registry spec for to=, this is a "
                f"normkit bug: please report it)")
        plan.append((paths, out))
        shown = tuple(f"{n}={type(m).__name__}" for n, m in tail.items())
        rows += [ConvertedLayer(p, type(old).__name__, desc, kept, dropped, fresh,
                                f"{rec.describe()} ({rec.how})", shown, equivalent, verified, diff)
                 for p in paths]
    root = None
    for paths, new in plan:  # 2. put them in place
        for path in paths:
            if path == "":
                root = new
                continue
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, new)
    if refused:
        warnings.warn(f"convert: {len(refused)} module(s) that look like normalization layers were "
                      f"left as they are: " + "; ".join(f"{p or '<model>'}: {why}"
                                                        for p, why in refused), stacklevel=2)
    out = model if root is None else root
    out.conversion_report = ConversionReport(tuple(rows), tuple(refused))  # type: ignore[assignment]
    return out
