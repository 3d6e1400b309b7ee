r"""Recognising a normalization layer by what it computes, for model surgery.

:func:`recognize` tells :func:`~normkit.apply.convert.convert`, :func:`~normkit.apply.fold.fold`
and :func:`normkit.sync` what a layer is. torch's own classes and normkit's are known by class;
anything else that looks like a norm — a subclass of a torch norm with its own ``forward`` or
extra children (timm's ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNorm2d``), or a class that is
not a torch subclass but is named like one and has a 1-D ``weight`` (Hugging Face's
``LlamaRMSNorm``, ``T5LayerNorm``, timm's ``RmsNorm``) — is run on a small random probe in
float64, with randomized ``γ, β`` and running statistics, and its output compared with candidate
formulas, per position ``p`` over the ``C`` channels of the axis ``a`` (last, or 1):

.. math::
    \text{LN: } \gamma\frac{x - \mu_a}{\sqrt{\sigma_a^2 + \epsilon}} + \beta, \qquad
    \text{RMS: } (o + \gamma)\frac{x}{\sqrt{\overline{x^2}_a + \epsilon}} (+ \beta)

(``o = 0``, or ``o = 1`` for Gemma's ``(1 + weight)``), a frozen BN (its running statistics in
train mode too, torchvision's ``FrozenBatchNorm2d``), or, for a torch subclass, the torch base
class's own ``forward`` (BN, IN, GN). A layer with children is recognised as its norm followed by
its children in the order the probe shows (timm: ``drop`` then ``act``), checked in eval and in
train mode under one random seed; :class:`NormAct` is that composition with a normkit norm.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..errors import ConfigError
from ..normalization import Normalization

__all__ = ["NormAct", "Recognition", "looks_like_norm", "recognize"]

_TORCH_NORMS: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_NAME = re.compile(r"(Layer|RMS|Rms|Group|Batch|Instance)Norm")
Kind = Literal["batch", "frozen", "instance", "group", "layer", "rms", "normkit"]
_RTOL, _ATOL = 1e-5, 1e-6  # a float64 probe; HF norms compute in float32 inside (~1e-7)


@dataclass(frozen=True)
class Recognition:
    """What a normalization layer computes.

    Attributes:
        kind: ``"batch"`` (BN, SyncBN), ``"frozen"`` (BN with its running statistics in train
            mode too: torchvision's ``FrozenBatchNorm2d``), ``"instance"``, ``"group"``,
            ``"layer"``, ``"rms"`` or ``"normkit"`` (a normkit :class:`~normkit.Normalization`,
            which says it itself).
        num_features: channels ``C``.
        channel_axis: ``1`` (channels first) or ``-1`` (channels last).
        over: ``"channels"`` for LN/RMS over the ``C`` channels of each position, else ``None``.
        eps: the layer's ``eps`` (or ``variance_epsilon``).
        weight_offset: ``1.0`` where the gain is ``1 + weight`` (Gemma), else ``0.0``.
        tail: names of the layer's children applied after the norm, in order (``("drop",
            "act")`` for timm's norm+act layers); ``()`` for a plain norm.
        how: ``"class"`` (known type) or ``"probe"`` (recognised by its output).
        probe_shape: an input shape the layer accepts (channels on ``channel_axis``).
        normalized_shape: for a LN/RMS over several trailing dimensions (torch's
            ``LayerNorm((C, H, W))``, ``RMSNorm([T, D])``), torch's ``normalized_shape``; its
            ``γ, β`` have that shape, ``num_features`` is its product (the values of each
            position, flattened), ``channel_axis=-1``. ``None`` otherwise.
    """

    kind: Kind
    num_features: int
    channel_axis: int
    over: Literal["channels"] | None = None
    eps: float | None = None
    weight_offset: float = 0.0
    tail: tuple[str, ...] = ()
    how: Literal["class", "probe"] = "class"
    probe_shape: tuple[int, ...] = field(default=(), compare=False)
    normalized_shape: tuple[int, ...] | None = None

    def describe(self) -> str:
        """A short phrase: ``"LN over the last dim"``, ``"BN + drop, act"``,
        ``"LN over the last 3 dims (4, 6, 6)"``."""
        what = {"batch": "BN", "frozen": "frozen BN", "instance": "IN", "group": "GN", "layer": "LN", "rms": "RMS",
                "normkit": "normkit"}[self.kind]
        shape = self.normalized_shape
        if shape is not None:
            what += f" over the last {len(shape)} dims {shape}"
        elif self.kind in ("layer", "rms"):
            what += " over the last dim" if self.channel_axis == -1 else " over dim 1"
        if self.weight_offset:
            what += f" with gain ({self.weight_offset:g} + weight)"
        return what + (f" + {', '.join(self.tail)}" if self.tail else "")


class NormAct(nn.Module):
    r"""A normalization followed by the modules that came after it inside a norm+activation
    layer: ``y = tail_k(…tail_1(norm(x)))``.

    :func:`~normkit.apply.convert.convert` builds it from timm's ``BatchNormAct2d``/``GroupNormAct``
    (``NormAct(nk.BatchNorm(C), drop=..., act=...)``, the original ``drop``/``act`` modules
    moved in, not copied). State-dict keys are ``norm.*`` plus the tail's own; a state dict
    saved from the norm+act layer (``weight``, ``running_mean``, … at its top level) loads too.

    Args:
        norm: the normalization module.
        **tail: the modules applied after it, in keyword order (names kept as attributes).

    Shape:
        as ``norm``.

    Example:
        >>> import torch, normkit as nk
        >>> from normkit.apply.recognize import NormAct
        >>> layer = NormAct(nk.BatchNorm(4), drop=torch.nn.Identity(), act=torch.nn.SiLU())
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(layer(x), torch.nn.functional.silu(layer.norm(x)))
        True
    """

    def __init__(self, norm: nn.Module, /, **tail: nn.Module) -> None:
        super().__init__()
        if "norm" in tail:
            raise ConfigError("NormAct: a tail module cannot be named 'norm'")
        for name, mod in tail.items():
            if not isinstance(mod, nn.Module):
                raise ConfigError(f"NormAct: tail {name}={mod!r} is not an nn.Module")
        self.norm = norm
        self.tail_names = tuple(tail)
        for name, mod in tail.items():
            self.add_module(name, mod)
        self._register_load_state_dict_pre_hook(self._flat_keys)

    @property
    def weight(self) -> Tensor | None:
        """The norm's ``γ`` (model initialisers such as timm RegNet's ``zero_init_last`` set
        ``layer.weight`` of a norm+act layer, which in timm *is* a BN)."""
        return getattr(self.norm, "weight", None)

    @property
    def bias(self) -> Tensor | None:
        """The norm's ``β``."""
        return getattr(self.norm, "bias", None)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        for name in self.tail_names:
            x = getattr(self, name)(x)
        return x

    def _flat_keys(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Keys of the norm+act layer's own tensors (``prefix + "weight"``) → ``norm.weight``."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if "." not in rest and rest not in self.tail_names:
                state_dict[f"{prefix}norm.{rest}"] = state_dict.pop(key)


# ------------------------------------------------------------------------------ detection
def _torch_base(m: nn.Module) -> type | None:
    """The torch class ``m`` is (a subclass of): the first ``torch.nn`` class in its MRO."""
    if not isinstance(m, _TORCH_NORMS):
        return None
    return next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))


def _weight(m: nn.Module) -> Tensor | None:
    w = getattr(m, "weight", None)
    return w if isinstance(w, Tensor) else None


def looks_like_norm(m: nn.Module) -> bool:
    """Whether ``m`` is, or looks like, a normalization layer: a normkit
    :class:`~normkit.Normalization`, torch's BN/SyncBN/IN/GN/LN/RMSNorm or a subclass, or a class
    named like one (``…LayerNorm``, ``…RMSNorm``/``…RmsNorm``, ``…GroupNorm``, ``…BatchNorm``,
    ``…InstanceNorm``) with a 1-D ``weight`` or a ``normalized_shape``."""
    if isinstance(m, (Normalization, *_TORCH_NORMS)):
        return True
    if not _NAME.search(type(m).__name__):
        return False
    w = _weight(m)
    return (w is not None and w.dim() == 1) or hasattr(m, "normalized_shape")


def _eps(m: nn.Module) -> float | None:
    for name in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(m, name):
            return getattr(m, name)
    raise ConfigError("it has no eps / variance_epsilon attribute")


def _channels(m: nn.Module) -> tuple[int, tuple[int, ...] | None]:
    """``C``, and torch's ``normalized_shape`` where it spans several dimensions (then ``C`` is
    its product)."""
    for name in ("num_features", "num_channels"):
        if isinstance(getattr(m, name, None), int):
            return getattr(m, name), None
    shape = getattr(m, "normalized_shape", None)
    if shape is not None:
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        return math.prod(shape), (shape if len(shape) > 1 else None)
    w = _weight(m)
    if w is not None and w.dim() == 1:
        return w.numel(), None
    raise ConfigError("its channel count is unknown (no num_features, num_channels, "
                      "normalized_shape or 1-D weight)")


def _sizes(c: int) -> tuple[int, int]:
    small = [s for s in (3, 5, 7, 11) if s != c]
    return small[0], small[1]


def _probe(shape: tuple[int, ...], axis: int, dtype: torch.dtype, device: torch.device | None,
           seed: int = 0) -> Tensor:
    """Random input: each sample at its own scale (some small, so that ``eps`` shows) and an
    offset per channel (so that centering shows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.logspace(-1.5, 0.5, shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
    off = torch.rand(shape[axis], generator=g, dtype=torch.float64) * 2 - 0.5
    off = off.reshape([-1 if i == axis % len(shape) else 1 for i in range(len(shape))])
    return (x * scale + off * scale).to(dtype=dtype, device=device)


@torch.no_grad()
def _randomized(m: nn.Module) -> nn.Module:
    """A float64 copy of ``m`` with random ``γ, β`` and running statistics (so that a forward that
    ignores one of them shows)."""
    p = copy.deepcopy(m).double()
    g = torch.Generator().manual_seed(1)
    for name, t in (*p.named_parameters(recurse=False), *p.named_buffers(recurse=False)):
        if t is None or not t.is_floating_point():
            continue
        if name in ("weight", "running_var"):
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
        elif name in ("bias", "running_mean"):
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)
    return p


Core = Callable[[nn.Module, Tensor], Tensor]


def _along(axis: int, f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return f if axis == -1 else (lambda x: f(x.movedim(1, -1)).movedim(-1, 1))


def _candidates(m: nn.Module, c: int, eps: float | None, base: type | None,
                shape: tuple[int, ...] | None = None
                ) -> list[tuple[Kind, int, float, tuple[int, ...], Core]]:
    """``(kind, channel_axis, weight_offset, probe_shape, core(p, x))`` to try for ``m``; over
    the trailing ``shape`` (torch's multi-dimensional ``normalized_shape``): LN and RMS only."""
    if shape is not None:
        out_: list[tuple[Kind, int, float, tuple[int, ...], Core]] = []
        if base is None or base is nn.LayerNorm:
            out_.append(("layer", -1, 0.0, (4, *shape), lambda p, x: F.layer_norm(
                x, shape, _weight(p), getattr(p, "bias", None), eps if eps is not None else 1e-5)))
        if base is None or base is nn.RMSNorm:
            out_.append(("rms", -1, 0.0, (4, *shape), lambda p, x: _rms(p, x, shape, eps, 0.0)))
        return out_
    s1, s2 = _sizes(c)
    first, last = (4, c, s1, s2), (4, s1, c)
    if base is not None and issubclass(base, _NormBase):
        kind: Kind = "batch" if issubclass(base, nn.modules.batchnorm._BatchNorm) else "instance"
        shape = next((sh for sh in ((4, c, s1, s2), (4, c, s1), (4, c), (4, c, 2, s1, s2))
                      if _accepts_rank(m, base, len(sh))), first)
        return [(kind, 1, 0.0, shape, lambda p, x: base.forward(p, x))]
    if base is nn.GroupNorm:
        return [("group", 1, 0.0, first, lambda p, x: nn.GroupNorm.forward(p, x))]
    out: list[tuple[Kind, int, float, tuple[int, ...], Core]] = []
    if base is None and all(isinstance(getattr(m, n, None), Tensor)
                            for n in ("running_mean", "running_var")):
        out.append(("frozen", 1, 0.0, first, lambda p, x: F.batch_norm(
            x, p.running_mean, p.running_var, _weight(p), getattr(p, "bias", None), False, 0.0,
            eps if eps is not None else 1e-5)))
    for axis, shape in ((-1, last), (1, first)):
        if base is None or base is nn.LayerNorm:
            out.append(("layer", axis, 0.0, shape, lambda p, x, a=axis: _along(a, lambda t: F.layer_norm(
                t, (c,), _weight(p), getattr(p, "bias", None), eps if eps is not None else 1e-5))(x)))
        if base is None or base is nn.RMSNorm:
            for off in ((0.0, 1.0) if base is None and _weight(m) is not None else (0.0,)):
                out.append(("rms", axis, off, shape,
                            lambda p, x, a=axis, o=off: _along(a, lambda t: _rms(p, t, c, eps, o))(x)))
    return out


def _rms(p: nn.Module, t: Tensor, c: int | tuple[int, ...], eps: float | None, offset: float
         ) -> Tensor:
    w = _weight(p)
    y = F.rms_norm(t, (c,) if isinstance(c, int) else c, None if w is None else w + offset, eps)
    b = getattr(p, "bias", None)
    return y + b if isinstance(b, Tensor) else y


def _accepts_rank(m: nn.Module, base: type, rank: int) -> bool:
    try:
        base._check_input_dim(m, torch.empty((1,) * rank))  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        return False
    return True


def _apply_tail(p: nn.Module, order: tuple[str, ...], y: Tensor) -> Tensor:
    for name in order:
        y = getattr(p, name)(y)
    return y


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=_RTOL, atol=_ATOL))


def _matches(m: nn.Module, core: Core, order: tuple[str, ...], shape: tuple[int, ...],
             axis: int) -> bool:
    """``m(x) == tail(core(x))`` on a float64 probe, in eval and in train mode, each side on its
    own copy under one random seed (dropout masks alike)."""
    device = next((t.device for t in (*m.parameters(), *m.buffers())), None)
    x = _probe(shape, axis, torch.float64, device)
    rngs = [device] if device is not None and device.type == "cuda" else []  # restored after
    for training in (False, True):
        outs = []
        for use_core in (False, True):
            p = _randomized(m).train(training)
            with torch.random.fork_rng(devices=rngs):
                torch.manual_seed(2)
                try:
                    y = _apply_tail(p, order, core(p, x.clone())) if use_core else p(x.clone())
                except Exception:  # noqa: BLE001 - a candidate that cannot run does not match
                    return False
            outs.append(y)
        if not (isinstance(outs[0], Tensor) and isinstance(outs[1], Tensor)
                and _same(outs[0], outs[1].to(outs[0].dtype))):
            return False
    return True


def recognize(m: nn.Module, path: str = "") -> Recognition:
    """What normalization ``m`` computes (see the module docstring).

    torch's classes used as they are, their subclasses that keep torch's ``forward`` and add no
    children, and normkit modules are known by class; anything else is probed.

    Args:
        m: the layer.
        path: its dotted path, for messages.

    Returns:
        A :class:`Recognition`.

    Raises:
        ConfigError: naming ``path`` and what was found, for a module that does not look like a
            norm (:func:`looks_like_norm`) or whose output matches none of the formulas.

    Example:
        >>> import torch
        >>> from normkit.apply.recognize import recognize
        >>> class LayerNorm2d(torch.nn.LayerNorm):  # channels-first, as ConvNeXt's
        ...     def forward(self, x):
        ...         return super().forward(x.movedim(1, -1)).movedim(-1, 1)
        >>> r = recognize(LayerNorm2d(8))
        >>> r.kind, r.channel_axis, r.over, r.how
        ('layer', 1, 'channels', 'probe')
    """
    where = f"layer {path!r} ({type(m).__name__})"
    if isinstance(m, Normalization):
        shape = (4, m.num_features, 3, 5) if m.channel_axis == 1 else (4, 3, m.num_features)
        return Recognition("normkit", m.num_features, m.channel_axis, None, m.eps,
                           probe_shape=shape)
    if not looks_like_norm(m):
        raise ConfigError(f"{where} is not a normalization layer: expected a normkit "
                          f"Normalization, a torch norm (or subclass), or a class named like a norm "
                          f"(LayerNorm, RMSNorm, GroupNorm, BatchNorm) with a 1-D weight")
    try:
        c, shape = _channels(m)
        eps = _eps(m)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}. Fix: leave it out (match= of convert), or replace "
                          f"it yourself") from None
    base = _torch_base(m)
    children = tuple(n for n, _ in m.named_children())
    plain = base is not None and type(m).forward is base.forward and not children
    orders = [children] + ([children[::-1]] if len(children) == 2 else [])
    for kind, axis, off, probe, core in _candidates(m, c, eps, base, shape):
        if plain:  # torch's own forward: known by class, no probe needed
            axis = -1 if kind in ("layer", "rms") else 1
            if shape is None and axis == -1:
                probe = (4, _sizes(c)[0], c)
            return Recognition(kind, c, axis, "channels" if axis == -1 and kind in ("layer", "rms")
                               else None, eps, probe_shape=probe, normalized_shape=shape)
        for order in orders:
            if _matches(m, core, order, probe, axis):
                over = "channels" if kind in ("layer", "rms") else None
                tail = tuple(n for n in order
                             if not isinstance(getattr(m, n), nn.Identity))
                return Recognition(kind, c, axis, over, eps, off, tail, "probe", probe, shape)
    tried = ", ".join(dict.fromkeys(
        Recognition(k, c, a, None, eps, o, normalized_shape=shape).describe()
        for k, a, o, _, _ in _candidates(m, c, eps, base, shape)))
    found = f" and children {list(children)}" if children else ""
    raise ConfigError(
        f"{where} has its own forward{found}, and its output matches none of: {tried}"
        + (f" (followed by {' then '.join(children)})" if children else "")
        + ". Fix: leave it out (match= of convert), or replace it yourself")
