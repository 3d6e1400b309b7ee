"""Installing weight normalization on layers and models: ``apply``, ``apply_to_model``, ``remove``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, UnknownMethodError
from ..normalization import Normalization
from . import _parametrizations as P
from ._layout import LAYER_TYPES, unit_dim

__all__ = ["METHODS", "LAYER_TYPES", "apply", "apply_to_model", "remove", "remove_from_model",
           "parametrization", "is_normalized"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}

METHODS: dict[str, str] = {
    "weight_norm": "W = g·V/‖V‖ per unit (Salimans & Kingma 2016)",
    "centered_weight_norm": "W = g·(V − mean V)/‖V − mean V‖ per unit (Huang et al. 2017)",
    "weight_standardization": "W = (V − mean V)/√(var V + ε) per unit (Qiao et al. 2019)",
    "spectral_norm": "W = V/σ_max(V), power iteration (Miyato et al. 2018)",
    "own": "W = (ZZᵀ)^{-1/2} Z, Z the centred rows, groups (Huang et al. 2018)",
    "oni": "W = Newton–Schulz (ZZᵀ)^{-1/2} Z, T iterations (Huang et al. 2020)",
    "cosine_norm": "output = cos(w, x) (Luo et al. 2018)",
}
_ALIASES = {"wn": "weight_norm", "cwn": "centered_weight_norm", "ws": "weight_standardization",
            "sn": "spectral_norm", "cos": "cosine_norm"}
_HOOK = "_normkit_cosine_hook"
# torch's normalization layers (and so their subclasses: timm's BatchNormAct2d, LayerNorm2d, ...)
_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)


def _refuse_norm_affine(module: nn.Module, name: str, weight: Tensor, path: str) -> None:
    """Raise :class:`ConfigError` when ``module.<name>`` is a normalization layer's recovery
    parameter (γ, β): any tensor of a normkit :class:`~normkit.Normalization` or of torch's norm
    layers and their subclasses, or a 1-D parameter of another module whose class name says it
    normalizes (timm's ``RmsNorm``, Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    known = isinstance(module, (Normalization, *_TORCH_NORMS))
    named = ("norm" in type(module).__name__.lower() and weight.ndim <= 1
             and not isinstance(module, LAYER_TYPES))
    if known or named:
        where = (f"{path}.{name} ({type(module).__name__})" if path
                 else f"{type(module).__name__}.{name}")
        raise ConfigError(
            f"{where} of shape {tuple(weight.shape)} is the affine parameter of a "
            f"normalization layer, not a layer's weight matrix: weight normalization applies to "
            f"the weights of Linear/Conv layers ({', '.join(t.__name__ for t in LAYER_TYPES)}). "
            f"Apply it to the Linear/Conv layer instead (normkit.weight.apply_to_model only "
            f"selects those)")


def _resolve(method: str) -> str:
    key = str(method).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        close = difflib.get_close_matches(key, [*METHODS, *_ALIASES], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown weight method {method!r}{hint} Known: {', '.join(METHODS)}")
    return key


def parametrization(method: str, weight: Tensor, *, dim: int = 0, **kw: Any) -> nn.Module:
    """The parametrization module of ``method`` for ``weight`` (``kw``: its options)."""
    key = _resolve(method)
    try:
        if key == "weight_norm":
            return P.WeightNorm(dim, **kw)
        if key == "centered_weight_norm":
            return P.CenteredWeightNorm(dim, **kw)
        if key == "weight_standardization":
            return P.WeightStandardization(dim, **kw)
        if key == "spectral_norm":
            return P.SpectralNorm(weight, dim=dim, **kw)
        if key == "own":
            return P.OrthogonalWeightNorm(dim, **kw)
        if key == "oni":
            return P.OrthogonalNewton(dim, **kw)
        return P.UnitNorm(dim, **kw)
    except TypeError as e:  # an option this method does not take
        raise ConfigError(f"{key}: {e}") from None


def is_normalized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is parametrized."""
    return parametrize.is_parametrized(module, name)


def apply(module: nn.Module, method: str, *, name: str = "weight", dim: int | None = None,
          **kw: Any) -> nn.Module:
    """Parametrize ``module.<name>`` with ``method`` (in place; returns ``module``).

    ``method`` is one of :data:`METHODS` (aliases ``wn``, ``cwn``, ``ws``, ``sn``, ``cos``);
    ``dim`` (the output-unit dimension) defaults to 1 for ConvTranspose layers and 0 otherwise;
    ``kw`` are the method's options (``eps``, ``n_power_iterations``, ``iterations``,
    ``group_size``, ``scale``, ...; see :mod:`normkit.weight`). ``cosine_norm`` also divides the
    layer's output (bias excluded) by the norm of each input patch. Undo with :func:`remove`.

    Raises:
        ConfigError: no such parameter, already parametrized, an option the method lacks, or
            a normalization layer's γ/β (a normkit or torch norm layer, or a 1-D parameter of a
            module whose class name contains "Norm", as timm's and Hugging Face's norms).

    Example:
        >>> import torch, normkit as nk
        >>> conv = nk.weight.apply(torch.nn.Conv2d(3, 8, 3), "ws")
        >>> torch.allclose(conv.weight.mean((1, 2, 3)), torch.zeros(8), atol=1e-6)
        True
        >>> _ = nk.weight.remove(conv)   # keeps the current (standardized) weight
    """
    key = _resolve(method)
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ConfigError(f"{type(module).__name__} has no tensor {name!r} to normalize")
    _refuse_norm_affine(module, name, weight, "")
    if is_normalized(module, name):
        raise ConfigError(
            f"{type(module).__name__}.{name} is already parametrized; call normkit.weight.remove first")
    dim = unit_dim(module) if dim is None else dim
    if key == "cosine_norm" and not isinstance(module, (nn.Linear, *_CONV)):
        raise ConfigError(f"cosine_norm supports Linear and Conv1d/2d/3d, got {type(module).__name__}")
    p = parametrization(key, weight.detach(), dim=dim, **kw)
    parametrize.register_parametrization(module, name, p)
    if key == "weight_norm":  # torch's pre-parametrize checkpoints: weight_g / weight_v
        module._register_load_state_dict_pre_hook(_weight_norm_compat(name))
    if key == "cosine_norm":
        setattr(module, _HOOK, module.register_forward_hook(_cosine_output))
    return module


def remove(module: nn.Module, *, name: str = "weight", leave_parametrized: bool = True) -> nn.Module:
    """Remove the parametrization of ``module.<name>``, keeping the current weight (or the stored
    original with ``leave_parametrized=False``); also removes cosine normalization's hook."""
    if not is_normalized(module, name):
        raise ConfigError(f"{type(module).__name__}.{name} is not parametrized")
    parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)
    handle = getattr(module, _HOOK, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK)
    return module


def _matches(exclude: Callable[[str, nn.Module], bool] | Iterable[str]) -> Callable[[str, nn.Module], bool]:
    if callable(exclude):
        return exclude
    names = set(exclude)
    return lambda n, _m: n in names


def apply_to_model(model: nn.Module, method: str, *, types: tuple[type[nn.Module], ...] = LAYER_TYPES,
                   exclude: Callable[[str, nn.Module], bool] | Iterable[str] = (),
                   **kw: Any) -> list[str]:
    """Apply ``method`` to every submodule of ``types`` not excluded (by name, or a predicate
    ``(name, module) -> bool``); returns the names converted, in order.

    Example:
        >>> import torch, normkit as nk
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> nk.weight.apply_to_model(net, "sn", exclude=["2"])
        ['0']
    """
    skip = _matches(exclude)
    done = []
    for n, m in model.named_modules():
        if isinstance(m, types) and not skip(n, m) and not is_normalized(m):
            weight = getattr(m, "weight", None)
            if isinstance(weight, Tensor):
                _refuse_norm_affine(m, "weight", weight, n)
            apply(m, method, **kw)
            done.append(n)
    return done


def remove_from_model(model: nn.Module) -> list[str]:
    """Remove every weight parametrization of ``model``; returns the names, in order."""
    done = []
    for n, m in model.named_modules():
        if is_normalized(m):
            remove(m)
            done.append(n)
    return done


def _weight_norm_compat(name: str) -> Callable[..., None]:
    def hook(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for old, new in ((f"{name}_g", "original0"), (f"{name}_v", "original1")):
            if prefix + old in state_dict:
                state_dict[f"{prefix}parametrizations.{name}.{new}"] = state_dict.pop(prefix + old)
    return hook


def _input_norm(module: nn.Module, x: Tensor) -> Tensor:
    """‖x‖ over each input patch the layer sees, shaped like the output's channels."""
    if isinstance(module, nn.Linear):
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    sq = x * x
    padding: Any = module.padding
    if module.padding_mode != "zeros":  # the layer pads x this way first; (pad x)² = pad(x²)
        sq = F.pad(sq, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    g = module.groups
    ones = sq.new_ones(g, module.in_channels // g, *module.kernel_size)
    conv = next(fn for cls, fn in _CONV.items() if isinstance(module, cls))
    patch = conv(sq, ones, None, module.stride, padding, module.dilation, g)
    return patch.clamp_min(0).sqrt().repeat_interleave(module.out_channels // g, dim=1)


def _cosine_output(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Cosine normalization: ``(W x)/‖x‖`` with unit-norm rows ``W`` (the parametrization), the
    bias added after; a zero patch gives 0."""
    bias = module.bias
    shape = (-1,) if isinstance(module, nn.Linear) else (-1, *([1] * (output.dim() - 2)))
    y = output if bias is None else output - bias.view(shape)
    y = P._safe_div(y, _input_norm(module, args[0]))
    return y if bias is None else y + bias.view(shape)
