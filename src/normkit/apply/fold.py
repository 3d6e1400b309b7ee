"""Folding for inference: merge each evaluation-mode batch normalization (and batch whitening)
into the Linear/Conv layer that feeds it, leaving a model without normalization layers.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError
from ..functional.standardize import standardize_coefficients
from ..normalization import Normalization
from .recognize import NormAct, Recognition, looks_like_norm, recognize

__all__ = ["fold", "FoldReport", "FoldedLayer"]

_PRODUCERS = (nn.Linear, _ConvNd)


@dataclass(frozen=True)
class FoldedLayer:
    """One normalization layer seen by :func:`fold`: folded into ``into`` (a Linear/Conv path),
    or left in place with the ``reason`` (``strict=False`` only).

    ``tail``: the layer's activation/dropout kept in its place (``"act=SiLU"``; a norm+act layer
    such as timm's ``BatchNormAct2d``). ``verified``/``max_diff``: the Linear/Conv followed by
    the norm, and the folded Linear/Conv followed by the tail, run on one random probe in eval
    (float64 copies: the check sees the algebra, not float32 rounding), ``max|Δ| ≤ 1e-6·max|y|``;
    a layer that fails it is left, never counted as folded."""

    path: str
    kind: str
    into: str | None
    reason: str = ""
    tail: tuple[str, ...] = ()
    verified: bool | None = None
    max_diff: float | None = None


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold` did, one :class:`FoldedLayer` per normalization layer, and how it found
    the neighbours (``"fx"``: torch.fx graph; ``"sequential"``: ``nn.Sequential`` order, used
    when the model cannot be traced)."""

    layers: tuple[FoldedLayer, ...]
    adjacency: Literal["fx", "sequential"]

    @property
    def folded(self) -> list[str]:
        """Paths of the normalization layers folded into their neighbouring layer."""
        return [r.path for r in self.layers if r.into is not None]

    @property
    def left(self) -> list[str]:
        """Paths of the normalization layers kept in place (each row's ``reason`` says why)."""
        return [r.path for r in self.layers if r.into is None]

    def __str__(self) -> str:
        lines = [f"fold ({self.adjacency} adjacency): {len(self.folded)} folded (each verified "
                 f"on a probe), {len(self.left)} left"]
        for r in self.layers:
            what = (f"-> {r.into}" + (f", then {', '.join(r.tail)} kept" if r.tail else "")
                    + f" (max|Δ| {r.max_diff:.1e})" if r.into is not None else f"left: {r.reason}")
            lines.append(f"  {r.path} ({r.kind}) {what}")
        return "\n".join(lines)


# ------------------------------------------------------------------------ affine maps
def _affine_map(m: nn.Module, rec: Recognition) -> tuple[Tensor, Tensor]:
    """The evaluation map of ``m`` as ``(a, b)`` per channel (``(C,)`` each) or ``(M, b)`` with
    whitening blocks ``M`` ``(G, d, d)``; raises :class:`ConfigError` with the reason when the
    map depends on the input or the batch."""
    if rec.kind == "frozen":  # fixed statistics in both modes
        w, b = _weight_bias(m)
        scale, shift = standardize_coefficients(m.running_mean.double(), m.running_var.double(),
                                                rec.eps if rec.eps is not None else 1e-5)
        return (scale * w, shift * w + b) if w is not None else (scale, shift)
    if m.training:
        raise ConfigError("it is in training mode (batch statistics). Fix: call model.eval() "
                          "first")
    if rec.kind not in ("batch", "instance", "normkit"):
        raise ConfigError(f"{type(m).__name__} normalizes each sample with its own statistics "
                          f"({rec.describe()}); there is nothing fixed to fold")
    if isinstance(m, Normalization):
        return m.folded()  # the library's own evaluation map (standardization or whitening)
    # torch's rule in eval: BN uses its buffers when it has them; IN only when it tracks them
    uses_running = m.running_mean is not None and (
        isinstance(m, _BatchNorm) or m.track_running_stats) if isinstance(m, _NormBase) else False
    if uses_running:
        scale, shift = standardize_coefficients(m.running_mean.double(), m.running_var.double(),
                                                m.eps)
        if m.weight is not None:
            scale, shift = scale * m.weight.double(), shift * m.weight.double() + m.bias.double()
        return scale, shift
    if isinstance(m, _NormBase):
        raise ConfigError("it keeps no running statistics (track_running_stats=False), so it "
                          "normalizes with each batch's or sample's statistics even in eval")
    raise ConfigError(f"{type(m).__name__} normalizes each sample with its own statistics; "
                      f"there is nothing fixed to fold")


def _weight_bias(m: nn.Module) -> tuple[Tensor | None, Tensor]:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    w = w.double() if isinstance(w, Tensor) else None
    b = b.double() if isinstance(b, Tensor) else torch.zeros_like(m.running_mean, dtype=torch.float64)
    return w, b


def _check_target(rec: Recognition, layer: nn.Module, mat: Tensor) -> None:
    """``layer``'s output channels must be the norm's, and a whitening block must not mix the
    outputs of different groups of a grouped convolution."""
    transposed = isinstance(layer, _ConvNd) and layer.transposed
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    c = rec.num_features
    if out != c:
        raise ConfigError(f"it normalizes {c} channels but the layer before gives {out}")
    if isinstance(layer, _ConvNd) and rec.channel_axis != 1:
        raise ConfigError("its channel_axis=-1 does not normalize the Conv's channel axis 1")
    groups = layer.groups if isinstance(layer, _ConvNd) else 1
    if transposed and groups > 1:
        raise ConfigError("folding into a grouped transposed convolution is not supported")
    if mat.dim() == 3 and groups > 1:
        d = mat.shape[-1]
        per = out // groups
        for start in range(0, out, d):
            if start // per != (min(start + d, out) - 1) // per:
                raise ConfigError(
                    f"its whitening groups of {d} channels mix outputs of different groups of "
                    f"the Conv (groups={groups}, {per} channels each); use a group size dividing "
                    f"{per}")


@torch.no_grad()
def _fold_into(layer: nn.Module, mat: Tensor, shift: Tensor) -> None:
    """``W ← M·W``, ``b ← M·b + shift`` over ``layer``'s output channels (``M = diag(a)`` per
    channel), computed in float64 and stored in the layer's dtype."""
    transposed = isinstance(layer, _ConvNd) and layer.transposed
    weight = layer.weight
    w = weight.detach().to(torch.float64).movedim(1 if transposed else 0, 0)
    c = w.shape[0]
    flat = w.reshape(c, -1)
    b = (layer.bias.detach().to(torch.float64) if layer.bias is not None
         else torch.zeros(c, dtype=torch.float64, device=weight.device))
    mat, shift = mat.to(torch.float64), shift.to(torch.float64).reshape(-1)
    if mat.dim() == 1:
        flat, b = mat[:, None] * flat, mat * b + shift
    else:
        full = torch.block_diag(*mat)[:c, :c]
        flat, b = full @ flat, full @ b + shift
    weight.copy_(flat.reshape(w.shape).movedim(0, 1 if transposed else 0).to(weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(b.to(layer.bias.dtype))


# ------------------------------------------------------------------------- adjacency
class _Tracer(fx.Tracer):
    """Normalization layers (normkit's are not in torch.nn) and Linear/Conv are graph leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return looks_like_norm(m) or isinstance(m, _PRODUCERS) or super().is_leaf_module(m, qualname)


def _fx_producers(model: nn.Module) -> dict[str, str | ConfigError]:
    """For each normalization call in the traced graph: the path of the Linear/Conv whose output
    it alone takes as its single input, or why there is none."""
    graph = _Tracer().trace(model)
    nodes = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in nodes)
    out: dict[str, str | ConfigError] = {}
    for n in nodes:
        if not looks_like_norm(model.get_submodule(n.target)):
            continue
        src = n.args[0] if n.args else None
        if calls[n.target] > 1:
            out[n.target] = ConfigError(
                f"it is called {calls[n.target]} times in forward(), each on another input: "
                f"folding it into one layer before it would change the other calls. Fix: give "
                f"each call its own module")
        elif len(n.args) != 1 or n.kwargs:
            out[n.target] = ConfigError("it takes more than one input (a condition?)")
        elif not (isinstance(src, fx.Node) and src.op == "call_module"
                  and isinstance(model.get_submodule(src.target), _PRODUCERS)):
            out[n.target] = ConfigError("its input is not the output of a Linear/Conv layer")
        elif len(src.users) != 1 or calls[src.target] > 1:
            out[n.target] = ConfigError(f"the output of {src.target!r} is used elsewhere too "
                                        f"(or the layer is called twice): folding would change it")
        else:
            out[n.target] = str(src.target)
    return out


def _sequential_producers(model: nn.Module) -> dict[str, str | ConfigError]:
    """Fallback: a normalization layer right after a Linear/Conv in an ``nn.Sequential``."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    out: dict[str, str | ConfigError] = {}
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq.named_children())
        for (pname, prev), (name, m) in zip(items, items[1:], strict=False):
            if looks_like_norm(m) and isinstance(prev, _PRODUCERS) and uses[id(prev)] == 1:
                out[f"{path}.{name}" if path else name] = f"{path}.{pname}" if path else pname
    return out


# ------------------------------------------------------------------------------ fold
def fold(model: nn.Module, *, inplace: bool = False, strict: bool = True) -> nn.Module:
    r"""Fold every evaluation-mode normalization that follows a Linear/Conv into that layer.

    A normalization fixed at inference is an affine map of its input: per channel
    ``y = a ⊙ h + b`` (BN and its variants: ``a = γ/√(σ²_run + ε)``, ``b = β − a·μ_run``), or a
    whitening matrix per channel group ``y = M h + b`` (DBN, IterNorm, Cholesky/PCA whitening,
    from :meth:`normkit.Normalization.folded`). After a layer ``h = W x + c`` it is one layer:

    .. math::
        W' = M W, \qquad c' = M c + b

    over the output channels (for a convolution the map acts on the channels of every position,
    so it is exact whatever the padding). Each folded normalization is replaced by
    ``nn.Identity``; the model keeps its class and ``forward``. A norm+act layer (timm's
    ``BatchNormAct2d``: BN, then its ``drop`` and ``act``, recognised by what it computes, see
    :func:`~normkit.apply.recognize.recognize`) folds its BN and is replaced by
    ``NormAct(Identity(), drop=..., act=...)``: the activation stays. Every fold is verified
    before anything changes: the Linear/Conv and the norm, and the folded Linear/Conv and what
    replaces the norm, run in eval on one random probe (float64 copies) and must agree to
    ``1e-6`` relative; the report gives each ``max_diff``.

    Neighbours are found on the ``torch.fx`` graph: a normalization is folded when its only input
    is the output of a ``Linear``/``Conv*d`` used by nothing else, and both are called once.
    Models ``torch.fx`` cannot trace (data-dependent control flow) fall back to the order of
    ``nn.Sequential`` containers (a norm right after a Linear/Conv in one), which assumes
    ``forward`` runs each Sequential as a whole.

    Not foldable, with the reason (and the fix): a layer in training mode; a module shared by
    several places or called several times; a norm-like layer whose output matches no known
    formula; per-sample statistics (LN, GN, IN without running statistics, RMSNorm — also
    Hugging Face's — group/instance whitening); conditional methods (CBN,
    CIN, AdaIN, SPADE, ...) and those mixing in each input's own statistics (switchable, IBN);
    a norm whose input is not a Linear/Conv output of its own; whitening groups straddling the
    groups of a grouped convolution.

    Args:
        model: any module, in eval mode (``model.eval()``).
        inplace: change ``model`` itself instead of a deep copy.
        strict: raise when any normalization layer cannot be folded (default). ``False`` folds
            what it can and leaves the others, listed in the report.

    Returns:
        The folded model, with a :class:`FoldReport` as its ``fold_report`` attribute.

    Raises:
        ConfigError: (``strict``) naming every layer that cannot be folded and why; nothing is
            changed then.

    Example:
        >>> import torch, normkit as nk
        >>> from normkit.apply.fold import fold
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nk.IterNorm(8, group_size=4),
        ...                           torch.nn.ReLU())
        >>> _ = net(torch.randn(16, 3, 6, 6))           # running statistics away from init
        >>> net = net.eval()
        >>> folded = fold(net)
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(folded(x), net(x), atol=1e-5), type(folded[1]).__name__
        (True, 'Identity')
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fold() needs an nn.Module, got {type(model).__name__}")
    for name, flag in (("inplace", inplace), ("strict", strict)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be a bool, got {flag!r}")
    if not inplace:
        model = copy.deepcopy(model)
    norms: dict[str, nn.Module] = {}
    paths_of: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if looks_like_norm(m) and not any(path.startswith(p + ".") for p in norms):
            norms[path] = m
            paths_of.setdefault(id(m), []).append(path)
    adjacency: Literal["fx", "sequential"] = "fx"
    try:
        producers = _fx_producers(model)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to Sequential order
        adjacency = "sequential"
        producers = _sequential_producers(model)
    plan: list[tuple[str, str, Tensor, Tensor, nn.Module]] = []
    rows: list[FoldedLayer] = []
    for path, m in norms.items():
        try:
            if len(paths_of[id(m)]) > 1:
                raise ConfigError(
                    f"the same module is registered at {paths_of[id(m)]} (shared): folding it "
                    f"into one layer before it would change the other uses. Fix: give each place "
                    f"its own copy (copy.deepcopy)")
            rec = recognize(m, path)
            mat, shift = _affine_map(m, rec)
            src = producers.get(path)
            if src is None:
                raise ConfigError("it does not follow a Linear/Conv layer"
                                  + (" in an nn.Sequential (the model could not be traced by "
                                     "torch.fx)" if adjacency == "sequential" else
                                     " (it is not called in forward())"))
            if isinstance(src, ConfigError):
                raise src
            layer = model.get_submodule(src)
            _check_target(rec, layer, mat)
            tail = {n: getattr(m, n) for n in rec.tail}
            after = NormAct(nn.Identity(), **tail) if tail else nn.Identity()
            ok, diff = _verify(layer, m, after, rec)
            if not ok:
                raise ConfigError(f"folding it would change the output by max|Δ| = {diff:.3g} "
                                  f"on a probe; it is left in place (please report this)")
            plan.append((path, src, mat, shift, after))
            rows.append(FoldedLayer(path, type(m).__name__, src, "",
                                    tuple(f"{n}={type(t).__name__}" for n, t in tail.items()),
                                    ok, diff))
        except ConfigError as e:
            rows.append(FoldedLayer(path, type(m).__name__, None, str(e)))
    left = [r for r in rows if r.into is None]
    if strict and left:
        detail = "; ".join(f"{r.path!r} ({r.kind}): {r.reason}" for r in left)
        raise ConfigError(f"cannot fold {len(left)} normalization layer(s): {detail}. Nothing was "
                          f"changed. Fix: as said for each, or pass strict=False to fold the others "
                          f"and leave these in place")
    for path, src, mat, shift, after in plan:
        _fold_into(model.get_submodule(src), mat, shift)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, after)
    model.fold_report = FoldReport(tuple(rows), adjacency)  # type: ignore[assignment]
    return model


def _probe_for(layer: nn.Module) -> Tensor:
    """A float64 input for a Linear/Conv layer (every kernel position reached)."""
    g = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        return torch.randn(4, layer.in_features, generator=g, dtype=torch.float64)
    size = [(k - 1) * d + 3 for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
    return torch.randn(2, layer.in_channels, *size, generator=g, dtype=torch.float64)


@torch.no_grad()
def _verify(layer: nn.Module, norm: nn.Module, after: nn.Module, rec: Recognition
            ) -> tuple[bool, float]:
    """``norm(layer(x))`` against ``after(folded(x))`` on float64 copies, in eval."""
    lay, nor, aft = (copy.deepcopy(t).double().eval() for t in (layer, norm, after))
    device = next((t.device for t in lay.parameters()), None)
    x = _probe_for(lay).to(device)
    y = nor(lay(x))
    _fold_into(lay, *_affine_map(nor, rec))
    z = aft(lay(x))
    diff = float((z - y).abs().max())
    return diff <= 1e-6 * max(float(y.abs().max()), 1e-12), diff
