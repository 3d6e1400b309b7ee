"""Conditional and input-dependent recoveries (book ch. 4.3): ``γ, β`` computed per sample.

Each gives ``(γ, β)`` per sample ``(N, C)`` (or per position, SPADE) from a condition passed as the
module's second argument (``module(x, condition)``) or from the input itself; they are therefore
not foldable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..functional.fused import _var_mean
from ..functional.partition import canonical_view
from ._base import Recovery

__all__ = ["ConditionalAffine", "DynamicAffine", "AdaptiveInstance", "SPADE", "InstanceGate",
           "AttentiveAffine", "ExternalAffine", "MetaAffine"]


def _positive_int(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")


def _per_sample(t: Tensor, groups: tuple[int, int]) -> Tensor:
    """``(N, C)`` → ``(N, A, B, 1)`` against the canonical view."""
    return t.reshape(t.shape[0], groups[0], groups[1], 1)


def _pooled(x: Tensor, channel_axis: int) -> Tensor:
    """The input's mean over its positions, ``(N, C)`` (at least float32)."""
    v = canonical_view(x, (1, x.shape[channel_axis]), channel_axis)
    return v.to(torch.promote_types(v.dtype, torch.float32)).mean(-1).flatten(1)


class _Conditional(Recovery):
    conditional = True

    def views(self, params: dict[str, Any], groups: tuple[int, int]) -> tuple[None, None]:
        raise ConfigError(f"{self!r} computes γ, β from each input; there is nothing fixed to fold")


@dataclass(frozen=True, repr=False)
class ConditionalAffine(_Conditional):
    r"""Conditional affine ``y = γ(c) ⊙ x̂ + β(c)``: the recovery of conditional BN / IN.

    With ``num_classes=K`` the condition is a class index per sample (integer ``(N,)``) and
    ``γ, β`` are rows of learned tables ``weight, bias`` of shape ``(K, C)`` (de Vries et al. 2017;
    Dumoulin et al. 2017, conditional instance norm). With ``embedding_dim=E`` the condition is an
    embedding ``e`` ``(N, E)`` and ``γ = γ₀ + e W_γᵀ``, ``β = β₀ + e W_βᵀ`` with ``weight`` /
    ``bias`` ``(C,)`` and ``weight_proj`` / ``bias_proj`` ``(C, E)`` starting at 0 (so training
    starts from the plain affine; BigGAN-style class-conditional BN).

    Args:
        num_classes: number of classes ``K`` (a table per class).
        embedding_dim: embedding size ``E`` (a linear map of the embedding). Exactly one.
    """

    num_classes: int | None = None
    embedding_dim: int | None = None
    needs_condition = True

    def __post_init__(self) -> None:
        if (self.num_classes is None) == (self.embedding_dim is None):
            raise ConfigError("pass exactly one of num_classes= (class indices) or embedding_dim= "
                              "(embedding vectors)")
        if self.num_classes is not None:
            _positive_int(self.num_classes, "num_classes")
        else:
            _positive_int(self.embedding_dim, "embedding_dim")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, Any]:
        if self.num_classes is not None:
            shape = (self.num_classes, num_features)
            return {"weight": nn.Parameter(torch.empty(shape, **factory)),
                    "bias": nn.Parameter(torch.empty(shape, **factory))}
        proj = (num_features, self.embedding_dim)
        return {"weight": nn.Parameter(torch.empty(num_features, **factory)),
                "bias": nn.Parameter(torch.empty(num_features, **factory)),
                "weight_proj": nn.Parameter(torch.empty(proj, **factory)),
                "bias_proj": nn.Parameter(torch.empty(proj, **factory))}

    @torch.no_grad()
    def reset(self, params: dict[str, Any], num_features: int) -> None:
        params["weight"].fill_(1.0)
        params["bias"].zero_()
        for k in ("weight_proj", "bias_proj"):
            if params.get(k) is not None:
                params[k].zero_()

    def check_condition(self, condition: Any, x: Tensor) -> None:
        super().check_condition(condition, x)
        n = x.shape[0] if x.dim() > 1 else 1
        if self.num_classes is not None:
            ok = isinstance(condition, Tensor) and not condition.is_floating_point() \
                and not condition.is_complex() and condition.shape == (n,)
            if not ok:
                got = tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__
                raise ShapeError(f"expected integer class indices of shape ({n},), got {got}")
        elif not (isinstance(condition, Tensor) and condition.shape == (n, self.embedding_dim)):
            got = tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__
            raise ShapeError(f"expected an embedding of shape ({n}, {self.embedding_dim}), got {got}")

    def _gamma_beta(self, params: dict[str, Any], e: Tensor) -> tuple[Tensor, Tensor]:
        if self.num_classes is not None:
            return params["weight"][e], params["bias"][e]
        e = e.to(params["weight_proj"].dtype)
        return (params["weight"] + e @ params["weight_proj"].T,
                params["bias"] + e @ params["bias_proj"].T)

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        g, b = self._gamma_beta(params, condition)
        return _per_sample(g, groups), _per_sample(b, groups)


@dataclass(frozen=True, repr=False)
class DynamicAffine(ConditionalAffine):
    r"""Dynamic affine (dynamic layer normalization, Kim, Song & Lee 2017, Interspeech):
    ``γ, β`` predicted from a summary of the input itself, its mean over positions ``s`` (e.g.
    over time for ``(B, T, D)`` sequences): ``γ = γ₀ + s W_γᵀ``, ``β = β₀ + s W_βᵀ`` with
    ``W`` ``(C, C)`` starting at 0. Takes no condition.
    """

    needs_condition = False

    def __post_init__(self) -> None:
        if self.num_classes is not None or self.embedding_dim is not None:
            raise ConfigError("DynamicAffine predicts γ, β from the input; it takes no num_classes "
                              "or embedding_dim")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, Any]:
        return ConditionalAffine(embedding_dim=num_features).create(num_features, factory)

    def check_condition(self, condition: Any, x: Tensor) -> None:
        Recovery.check_condition(self, condition, x)

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        s = _pooled(x, channel_axis).to(params["weight_proj"].dtype)
        g = params["weight"] + s @ params["weight_proj"].T
        b = params["bias"] + s @ params["bias_proj"].T
        return _per_sample(g, groups), _per_sample(b, groups)


@dataclass(frozen=True, repr=False)
class AdaptiveInstance(_Conditional):
    r"""AdaIN's recovery (Huang & Belongie 2017, arXiv:1703.06868): the statistics of a style
    input ``s`` (the condition, shaped like ``x`` up to its spatial size):
    ``γ = √(σ²(s) + ε)``, ``β = μ(s)``, per sample and channel over ``s``'s positions. With IN as
    the operation, ``y = σ(s)·(x − μ(x))/σ(x) + μ(s)``. No parameters.

    Args:
        eps: added to the style variance.
    """

    eps: float = 1e-5
    needs_condition = True

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {self.eps!r}")

    def check_condition(self, condition: Any, x: Tensor) -> None:
        super().check_condition(condition, x)
        if not (isinstance(condition, Tensor) and condition.dim() == x.dim()
                and condition.shape[0] == x.shape[0]):
            got = tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__
            raise ShapeError(f"expected a style tensor with the input's rank and batch size "
                             f"{x.shape[0]}, got {got}")

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        if condition.shape[channel_axis] != x.shape[channel_axis]:
            raise ShapeError(f"style has {condition.shape[channel_axis]} channels, the input "
                             f"{x.shape[channel_axis]}")
        v = canonical_view(condition, (1, x.shape[channel_axis]), channel_axis)
        v = v.to(torch.promote_types(v.dtype, torch.float32))
        if v.numel() == 0:  # an empty batch: nothing to take statistics of
            return (v.new_ones(v.shape[0], *groups, 1), v.new_zeros(v.shape[0], *groups, 1))
        var, mean = _var_mean(v, (v.dim() - 1,))  # two passes; torch.var_mean is ~10× slower
        return (_per_sample((var + self.eps).sqrt().flatten(1), groups),
                _per_sample(mean.flatten(1), groups))


class _SpadeNet(nn.Module):
    """SPADE's shared conv + ReLU, then one conv each for ``γ`` and ``β``."""

    def __init__(self, label_channels: int, num_features: int, hidden: int, kernel_size: int,
                 spatial_dims: int, factory: dict[str, Any]) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        pad = kernel_size // 2
        self.shared = conv(label_channels, hidden, kernel_size, padding=pad, **factory)
        self.gamma = conv(hidden, num_features, kernel_size, padding=pad, **factory)
        self.beta = conv(hidden, num_features, kernel_size, padding=pad, **factory)

    def forward(self, seg: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.shared(seg))
        return self.gamma(h), self.beta(h)


@dataclass(frozen=True, repr=False)
class SPADE(_Conditional):
    r"""Spatially-adaptive recovery (SPADE, Park et al. 2019, arXiv:1903.07291): from a
    segmentation map ``m`` (the condition, ``(N, L, *size)``, resized to the input's size by
    nearest neighbour) a small conv net predicts per-position ``γ(m), β(m)`` ``(N, C, *spatial)``;
    ``y = x̂ ⊙ (1 + γ(m)) + β(m)``. Its convolutions are a submodule ``spade`` of the module.

    Args:
        label_channels: channels ``L`` of the map.
        hidden: channels of the shared layer (the paper: 128).
        kernel_size: odd kernel size (3).
        spatial_dims: 1, 2 or 3.
    """

    label_channels: int = 1
    hidden: int = 128
    kernel_size: int = 3
    spatial_dims: int = 2
    needs_condition = True

    def __post_init__(self) -> None:
        for what in ("label_channels", "hidden", "kernel_size"):
            _positive_int(getattr(self, what), what)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (same-size output), got {self.kernel_size}")
        if self.spatial_dims not in (1, 2, 3):
            raise ConfigError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, Any]:
        net = _SpadeNet(self.label_channels, num_features, self.hidden, self.kernel_size,
                        self.spatial_dims, factory)
        return {"weight": None, "bias": None, "spade": net}

    def reset(self, params: dict[str, Any], num_features: int) -> None:
        for m in params["spade"].children():
            m.reset_parameters()

    def check_condition(self, condition: Any, x: Tensor) -> None:
        super().check_condition(condition, x)
        want = 2 + self.spatial_dims  # the map is channels-first whatever the input's layout
        if x.dim() != want:
            raise ShapeError(f"SPADE with spatial_dims={self.spatial_dims} expects inputs of rank "
                             f"{want}, got shape {tuple(x.shape)}")
        if not (isinstance(condition, Tensor) and condition.dim() == want
                and condition.shape[:2] == (x.shape[0], self.label_channels)):
            got = tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__
            raise ShapeError(f"expected a map of shape ({x.shape[0]}, {self.label_channels}, ...), "
                             f"got {got}")

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        net = params["spade"]
        size = x.shape[2:] if channel_axis == 1 else x.shape[1:-1]
        seg = F.interpolate(condition.to(net.shared.weight.dtype), size=size, mode="nearest")
        gamma, beta = net(seg)  # (N, C, *size) whatever the input's layout: the map is a map
        shape = (x.shape[0], groups[0], groups[1], math.prod(size))
        return (1 + gamma).reshape(shape), beta.reshape(shape)


@dataclass(frozen=True, repr=False)
class InstanceGate(_Conditional):
    r"""Instance-enhanced affine (IEBN, Liang et al. 2020, arXiv:1908.04008): the per-channel
    ``γ`` is gated per sample by the input's own pooled response ``p_{n,c}`` (mean over
    positions): ``y = γ_c·σ(v_c p_{n,c} + b_c) ⊙ x̂ + β_c``, with ``gate_weight = v`` at 0 and
    ``gate_bias = b`` at 0 (gate 0.5; the paper initializes the gate's parameters as constants).
    """

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, Any]:
        return {k: nn.Parameter(torch.empty(num_features, **factory))
                for k in ("weight", "bias", "gate_weight", "gate_bias")}

    @torch.no_grad()
    def reset(self, params: dict[str, Any], num_features: int) -> None:
        params["weight"].fill_(1.0)
        for k in ("bias", "gate_weight", "gate_bias"):
            params[k].zero_()

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        p = _pooled(x, channel_axis).to(params["weight"].dtype)
        gate = torch.sigmoid(params["gate_weight"] * p + params["gate_bias"])
        b = params["bias"].expand(p.shape)
        return _per_sample(params["weight"] * gate, groups), _per_sample(b, groups)


@dataclass(frozen=True, repr=False)
class AttentiveAffine(_Conditional):
    r"""Attentive normalization's recovery (Li, Sun & Wu 2019, arXiv:1908.01259): a mixture of
    ``K`` affines weighted per sample by attention from the input's pooled response ``p``:
    ``λ = sigmoid(p Aᵀ + a)`` ``(N, K)``, ``γ = λ Γ``, ``β = λ B`` with ``Γ, B`` ``(K, C)``
    (``weight``, ``bias``), ``A`` ``(K, C)`` (``attention_weight``) and ``a`` ``(K,)``
    (``attention_bias``).

    Args:
        num_affines: ``K``.
    """

    num_affines: int = 4

    def __post_init__(self) -> None:
        _positive_int(self.num_affines, "num_affines")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, Any]:
        k = self.num_affines
        return {"weight": nn.Parameter(torch.empty(k, num_features, **factory)),
                "bias": nn.Parameter(torch.empty(k, num_features, **factory)),
                "attention_weight": nn.Parameter(torch.empty(k, num_features, **factory)),
                "attention_bias": nn.Parameter(torch.empty(k, **factory))}

    @torch.no_grad()
    def reset(self, params: dict[str, Any], num_features: int) -> None:
        # λ starts at 1/2 for every affine; Γ = 2/K so that γ = 1, β = 0: the plain normalization
        params["weight"].fill_(2.0 / self.num_affines)
        params["bias"].zero_()
        params["attention_weight"].zero_()
        params["attention_bias"].zero_()

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        p = _pooled(x, channel_axis).to(params["weight"].dtype)
        lam = torch.sigmoid(p @ params["attention_weight"].T + params["attention_bias"])
        return _per_sample(lam @ params["weight"], groups), _per_sample(lam @ params["bias"], groups)


@dataclass(frozen=True, repr=False)
class ExternalAffine(_Conditional):
    r"""``y = γ ⊙ x̂ + β`` with ``(γ, β)`` given by the caller as the condition, each ``(N, C)``
    (AdaLIN in U-GAT-IT: computed by fully connected layers from another network's features;
    style modulation in general). No parameters.
    """

    needs_condition = True

    def check_condition(self, condition: Any, x: Tensor) -> None:
        super().check_condition(condition, x)
        if not (isinstance(condition, (tuple, list)) and len(condition) == 2
                and all(isinstance(t, Tensor) for t in condition)):
            raise ShapeError(f"expected the condition (gamma, beta), two tensors of shape (N, C), "
                             f"got {type(condition).__name__}")

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        gamma, beta = condition
        want = (x.shape[0], groups[0] * groups[1])
        if gamma.shape != want or beta.shape != want:
            raise ShapeError(f"expected the condition (gamma, beta), each of shape {want}, got "
                             f"{tuple(gamma.shape)} and {tuple(beta.shape)}")
        return _per_sample(gamma, groups), _per_sample(beta, groups)


@dataclass(frozen=True, repr=False)
class MetaAffine(_Conditional):
    r"""Instance-level meta recovery (ILM, Jia, Chen & Huang 2019, arXiv:1904.03516): an
    encoder-decoder on the input's pooled response ``p`` ``(N, C)`` predicts per-sample
    corrections of the affine:

    .. math::
        h = \mathrm{ReLU}(p E^\top + e),\quad
        \gamma = \gamma_0 + \tanh(h D_\gamma^\top),\quad
        \beta = \beta_0 + \tanh(h D_\beta^\top)

    ``E`` ``(C/r, C)`` (``encoder_weight``, ``encoder_bias``), ``D_γ, D_β`` ``(C, C/r)``
    (``gamma_weight``, ``beta_weight``) starting at 0, so the layer starts as the plain
    normalization with ``γ₀ = 1``, ``β₀ = 0`` (``weight``, ``bias``).

    Args:
        reduction: ``r``, the encoder's bottleneck ``C/r`` (at least 1 unit).
    """

    reduction: int = 4

    def __post_init__(self) -> None:
        _positive_int(self.reduction, "reduction")

    def create(self, num_features: int, factory: dict[str, Any]) -> dict[str, Any]:
        h = max(1, num_features // self.reduction)
        shapes = {"weight": (num_features,), "bias": (num_features,),
                  "encoder_weight": (h, num_features), "encoder_bias": (h,),
                  "gamma_weight": (num_features, h), "beta_weight": (num_features, h)}
        return {k: nn.Parameter(torch.empty(shape, **factory)) for k, shape in shapes.items()}

    @torch.no_grad()
    def reset(self, params: dict[str, Any], num_features: int) -> None:
        params["weight"].fill_(1.0)
        params["bias"].zero_()
        enc = params["encoder_weight"]
        # nn.Linear's default range for the encoder, from a fixed seed: reset_parameters() is
        # reproducible (the decoders start at 0, so the layer starts as the plain normalization)
        gen = torch.Generator(device=enc.device).manual_seed(0)
        bound = 1 / math.sqrt(enc.shape[1])
        for t in (enc, params["encoder_bias"]):
            t.copy_(torch.rand(t.shape, generator=gen, device=t.device, dtype=t.dtype) * 2 * bound - bound)
        params["gamma_weight"].zero_()
        params["beta_weight"].zero_()

    def conditional_views(self, params: dict[str, Any], groups: tuple[int, int], *, x: Tensor,
                          condition: Any, channel_axis: int) -> tuple[Tensor, Tensor]:
        p = _pooled(x, channel_axis).to(params["weight"].dtype)
        h = torch.relu(p @ params["encoder_weight"].T + params["encoder_bias"])
        g = params["weight"] + torch.tanh(h @ params["gamma_weight"].T)
        b = params["bias"] + torch.tanh(h @ params["beta_weight"].T)
        return _per_sample(g, groups), _per_sample(b, groups)
