"""A ``norm_layer=`` factory for model libraries (timm) that build normalization and activation
as one layer, and activations by name.

timm's EfficientNet, RegNet, DenseNet, ResNetV2, … resolve ``norm_layer=`` through
``timm.layers.get_norm_act_layer``: a torch norm class or a ``functools.partial`` of one is
*replaced by timm's own norm+act class with the same class name* (``GroupNorm`` →
``GroupNormAct``), and any other class fails with ``No equivalent norm_act layer``. A plain
function is the one thing timm calls as given, with its norm+act keywords. :func:`norm_act`
returns such a function; it builds a :class:`~normkit.apply.recognize.NormAct` (normkit method →
dropout → activation, the order of timm's ``BatchNormAct2d``) — the class model surgery also
uses for norm+act layers. normkit does not import timm.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import registry
from ..errors import ConfigError
from .recognize import NormAct

__all__ = ["norm_act", "activation"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "selu": nn.SELU, "celu": nn.CELU, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish,
    "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid, "prelu": nn.PReLU, "softplus": nn.Softplus,
    "identity": nn.Identity,
}

ActLayer = str | type | Callable[..., nn.Module] | None


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()


def activation(act_layer: ActLayer, *, inplace: bool | None = None,
               **act_kwargs: Any) -> nn.Module:
    """Build an activation module from a name, a module class, a callable returning a module, or
    ``None`` (:class:`torch.nn.Identity`).

    Names (case, ``-`` and ``_`` ignored): ``relu``, ``relu6``, ``leaky_relu``, ``elu``, ``selu``,
    ``celu``, ``silu`` (= ``swish``), ``mish``, ``gelu``, ``sigmoid``, ``tanh``, ``hardswish``,
    ``hardsigmoid``, ``prelu``, ``softplus``, ``identity``. ``inplace`` is passed only to
    activations whose constructor takes it (like timm's ``create_act_layer``).

    Raises:
        ConfigError: for an unknown name, listing the known ones, or a callable that does not
            return an ``nn.Module``.

    Example:
        >>> from normkit.apply.norm_act import activation
        >>> activation("silu"), activation("relu", inplace=True)
        (SiLU(), ReLU(inplace=True))
    """
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        key = act_layer.lower().replace("_", "").replace("-", "")
        if key not in _ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {act_layer!r}; known names: {sorted(_ACTIVATIONS)}. Fix: "
                f"use one of them or pass the activation class (e.g. torch.nn.GELU)")
        act_layer = _ACTIVATIONS[key]
    if not callable(act_layer):
        raise ConfigError(f"act_layer must be a name, an nn.Module class, a callable returning a "
                          f"module or None, got {act_layer!r}")
    if inplace is not None and _takes(act_layer, "inplace"):
        act_kwargs = {**act_kwargs, "inplace": inplace}
    act = act_layer(**act_kwargs)
    if not isinstance(act, nn.Module):
        raise ConfigError(f"act_layer {act_layer!r} returned {type(act).__name__}, not an "
                          f"nn.Module")
    return act


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def norm_act(
    method: str | type | functools.partial,
    /,
    *,
    act_layer: ActLayer | _Required = _REQUIRED,
    act_kwargs: dict[str, Any] | None = None,
    inplace: bool = True,
    drop_layer: Callable[[], nn.Module] | None = None,
    **norm_kwargs: Any,
) -> Callable[..., NormAct]:
    r"""A ``norm_layer=`` for timm models that build norm + activation layers (EfficientNet,
    RegNet, …): a plain function that timm calls as it is.

    The returned ``f(num_features, *, apply_act=True, act_layer=…, act_kwargs=…, inplace=…,
    drop_layer=…, device=None, dtype=None, **more)`` builds
    ``NormAct(create(method, num_features, **norm_kwargs, **more), act=…, drop=…)``, with
    ``act(drop(norm(x)))`` as in timm's ``BatchNormAct2d``; its keywords are exactly those timm
    passes (``apply_act=False`` leaves the activation out; ``more`` are method arguments such as
    ``eps`` that override ``norm_kwargs``).

    .. math::
        y = \phi\big(\mathrm{drop}(\mathrm{norm}(x))\big)

    ``act_layer`` is required: timm passes the model's activation to its own norm+act classes but
    **not** to a function, so the function must know it (EfficientNet uses ``"silu"``, RegNet and
    ResNet ``"relu"``). A default would silently change the model's activation.

    Args:
        method: registry name, spec string (``"iternorm:group_size=8"``), class or partial.
        act_layer: activation: a name (``"relu"``, ``"silu"``, ``"gelu"``, … see
            :func:`activation`), an ``nn.Module`` class, a callable returning a module, or
            ``None`` for no activation.
        act_kwargs: keyword arguments of the activation.
        inplace: default in-place flag of the activation (timm passes ``inplace=True`` in most
            blocks), used where the activation takes one.
        drop_layer: a callable returning the dropout module placed between norm and activation.
        **norm_kwargs: keyword arguments of the method (``group_size=8``, ``eps=1e-3``, …).

    Returns:
        ``f(num_features, **kw) -> NormAct``, a plain Python function.

    Shape:
        as the method: ``(N, C, *)`` → same (``(N, *, C)`` with ``channel_axis=-1``).

    Raises:
        ConfigError: for a missing ``act_layer``, an unknown method
            (:class:`~normkit.errors.UnknownMethodError`) or activation name — here rather than
            inside the model.

    Example:
        >>> import torch, normkit as nk
        >>> f = nk.norm_act("gn", num_groups=2, act_layer="silu")
        >>> layer = f(8, inplace=True)               # how timm calls it
        >>> x = torch.randn(2, 8, 4, 4)
        >>> torch.allclose(layer(x), torch.nn.functional.silu(layer.norm(x)))
        True
        >>> f(8, apply_act=False).act
        Identity()
    """
    factory = registry.get(method)
    if factory is None:
        raise ConfigError("norm_act() needs a method, got None")
    if isinstance(act_layer, _Required):
        raise ConfigError(
            f"norm_act({method!r}) needs act_layer=: timm passes the model's activation to its own "
            f"norm+act classes but not to a function, so it must be given here. Fix: "
            f"act_layer='silu' for EfficientNet, 'relu' for RegNet/ResNet, None for none")
    activation(act_layer, **(act_kwargs or {}))  # a bad activation fails here, not in the model
    bound_act, bound_kwargs, bound_inplace, bound_drop = act_layer, act_kwargs, inplace, drop_layer

    def build(num_features: int, *, apply_act: bool = True, act_layer: ActLayer = bound_act,
              act_kwargs: dict[str, Any] | None = bound_kwargs, inplace: bool | None = None,
              drop_layer: Callable[[], nn.Module] | None = bound_drop,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              **more: Any) -> NormAct:
        norm = factory(num_features, **{**norm_kwargs, **more}, device=device, dtype=dtype)
        act = None
        if apply_act:
            kw = dict(act_kwargs or {})  # timm's rule: act_kwargs' own inplace wins
            kw.setdefault("inplace", bound_inplace if inplace is None else inplace)
            act = activation(act_layer, **kw)
        drop = drop_layer() if drop_layer is not None else nn.Identity()
        # keyword order is the order applied: drop, then act (timm's BatchNormAct2d)
        return NormAct(norm, drop=drop, act=nn.Identity() if act is None else act)

    label = registry.parse_spec(method)[0] if isinstance(method, str) else getattr(
        getattr(method, "func", method), "__name__", "method")
    build.__name__ = build.__qualname__ = f"norm_act_{label}"
    build.__doc__ = f"norm_layer= factory: NormAct({method!r}, act_layer={bound_act!r})"
    return build
