"""Small models with a pluggable normalization, for ``normkit compare``.

Each model puts the normalization where a BatchNorm would go: after every Linear or Conv layer and
before its activation. The method is a registry name or spec string (``"bn"``,
``"gn:num_groups=8"``), ``"none"`` (``nn.Identity``) or any callable ``f(num_features, **kw)``
such as ``torch.nn.BatchNorm1d``. Models take the dataset's tensors as they are: the MLP flattens
its input, convolutional models add the channel axis to 1-D data ``(N, L) -> (N, 1, L)``.

==========  ===============================  ===============================================
name        inputs                           architecture
==========  ===============================  ===============================================
``mlp``     any                              ``depth`` × (Linear, norm, ReLU), Linear
``cnn1d``   ``(L,)`` or ``(C, L)``           3 × (Conv1d, norm, ReLU), global pool, Linear
``cnn2d``   ``(C, H, W)``                    3 × (Conv2d, norm, ReLU), global pool, Linear
``resnet``  1-D or 2-D                       stem + 3 stages of basic residual blocks
==========  ===============================  ===============================================

Example::

    >>> import torch
    >>> from normkit.experiments.models import build_model
    >>> model = build_model("mlp", (40,), 10, torch.nn.BatchNorm1d, width=64)
    >>> model(torch.randn(8, 40)).shape
    torch.Size([8, 10])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import registry
from ..errors import ConfigError

__all__ = ["MODELS", "Norm", "make_norm", "build_model", "MLP", "ConvNet", "ResNet"]

Norm = str | Callable[..., nn.Module] | None
"""A normalization: registry name or spec string, ``"none"``/``None``, or a layer factory."""


def make_norm(norm: Norm, num_features: int, **kwargs: Any) -> nn.Module:
    """Build one normalization layer over ``num_features`` channels.

    Args:
        norm: ``"none"``/``None`` (identity), a registry name or spec (``"gn:num_groups=8"``),
            or a callable ``f(num_features, **kwargs) -> nn.Module``.
        num_features: number of channels (dim 1 of the layer's input).
        **kwargs: extra keyword arguments for the method (override those of a spec string).

    Returns:
        The layer (``nn.Identity`` for none).

    Example::

        >>> type(make_norm("none", 16)).__name__
        'Identity'
    """
    if norm is None or (isinstance(norm, str) and norm.strip().lower() == "none"):
        return nn.Identity()
    if isinstance(norm, str):
        return registry.create(norm, num_features, **kwargs)
    return norm(num_features, **kwargs)


def _conv(dim: int) -> type[nn.Module]:
    return nn.Conv1d if dim == 1 else nn.Conv2d


class _ToChannels(nn.Module):
    """Adds a channel axis to 1-D examples: ``(N, L) -> (N, 1, L)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def _stem(input_shape: tuple[int, ...]) -> tuple[nn.Module, int, int]:
    """Input adapter, number of input channels and spatial rank for a convolutional model."""
    if len(input_shape) == 1:
        return _ToChannels(), 1, 1
    if len(input_shape) in (2, 3):
        return nn.Identity(), input_shape[0], len(input_shape) - 1
    raise ConfigError(f"convolutional models need (L,), (C, L) or (C, H, W) inputs, got "
                      f"{input_shape}; use --model mlp")


class MLP(nn.Module):
    """Multi-layer perceptron: ``depth`` × (Linear, norm, ReLU), then a Linear classifier.

    Args:
        input_shape: shape of one example (flattened on input).
        num_classes: number of outputs.
        norm: the normalization (see :func:`make_norm`).
        width: hidden units per layer (default 128).
        depth: number of hidden layers (default 3).
        norm_kwargs: extra keyword arguments for every normalization layer.

    Shape:
        Input ``(N, *input_shape)``, output ``(N, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: Norm, *,
                 width: int = 128, depth: int = 3, norm_kwargs: dict[str, Any] | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), make_norm(norm, width, **(norm_kwargs or {})),
                       nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """Plain CNN, 1-D or 2-D from the input rank: (Conv k=3, norm, ReLU) per entry of
    ``channels`` (stride 2 after the first), global average pooling, a Linear classifier.

    Args:
        input_shape: ``(L,)``, ``(C, L)`` (1-D) or ``(C, H, W)`` (2-D).
        num_classes: number of outputs.
        norm: the normalization (see :func:`make_norm`).
        channels: output channels of each conv layer (default ``(32, 64, 64)``; the ``cnn1d``
            of :data:`MODELS` uses :data:`CNN1D_CHANNELS`, four layers).
        norm_kwargs: extra keyword arguments for every normalization layer.

    Shape:
        Input ``(N, *input_shape)``, output ``(N, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: Norm, *,
                 channels: tuple[int, ...] = (32, 64, 64),
                 norm_kwargs: dict[str, Any] | None = None):
        super().__init__()
        adapter, c_in, dim = _stem(input_shape)
        layers: list[nn.Module] = [adapter]
        for i, c_out in enumerate(channels):
            layers += [_conv(dim)(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1),
                       make_norm(norm, c_out, **(norm_kwargs or {})), nn.ReLU()]
            c_in = c_out
        layers += [nn.Flatten(2), _MeanLast(), nn.Linear(c_in, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _MeanLast(nn.Module):
    """Global average pooling over the flattened spatial axis: ``(N, C, S) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1)


class _BasicBlock(nn.Module):
    """Two 3-wide convs with norms and a (projected when the shape changes) shortcut."""

    def __init__(self, dim: int, c_in: int, c_out: int, stride: int, norm: Norm,
                 norm_kwargs: dict[str, Any]):
        super().__init__()
        conv = _conv(dim)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, c_out, **norm_kwargs)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out, **norm_kwargs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False),
                                          make_norm(norm, c_out, **norm_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet, 1-D or 2-D from the input rank: conv stem, one stage of ``blocks`` basic
    blocks per entry of ``widths`` (stride 2 from the second stage), global pooling, Linear.

    Args:
        input_shape: ``(L,)``, ``(C, L)`` (1-D) or ``(C, H, W)`` (2-D).
        num_classes: number of outputs.
        norm: the normalization (see :func:`make_norm`).
        widths: channels of each stage (default ``(32, 64, 64)``: multiples of 32, so GN with
            its default 32 groups fits).
        blocks: residual blocks per stage (default 1).
        norm_kwargs: extra keyword arguments for every normalization layer.

    Shape:
        Input ``(N, *input_shape)``, output ``(N, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: Norm, *,
                 widths: tuple[int, ...] = (32, 64, 64), blocks: int = 1,
                 norm_kwargs: dict[str, Any] | None = None):
        super().__init__()
        kw = norm_kwargs or {}
        adapter, c_in, dim = _stem(input_shape)
        layers: list[nn.Module] = [
            adapter, _conv(dim)(c_in, widths[0], 3, padding=1, bias=False),
            make_norm(norm, widths[0], **kw), nn.ReLU(),
        ]
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(_BasicBlock(dim, c_in, width, stride, norm, kw))
                c_in = width
        layers += [nn.Flatten(2), _MeanLast(), nn.Linear(c_in, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CNN1D_CHANNELS = (32, 64, 64, 64)
"""Default channels of ``cnn1d``: four conv layers, so the last works on 5 positions of a
40-long MNIST-1D sequence: batch statistics there come from ``5 × batch`` values, as few as in the
last stage of an ImageNet ResNet at a small batch (the regime where BN degrades)."""


def _cnn(rank: int) -> Callable[..., nn.Module]:
    def factory(input_shape: tuple[int, ...], num_classes: int, norm: Norm,
                **kwargs: Any) -> nn.Module:
        if (len(input_shape) == 3) != (rank == 2):
            other = "cnn2d" if rank == 1 else "cnn1d"
            needs = "(C, H, W) images" if rank == 2 else "(L,) or (C, L) sequences"
            raise ConfigError(
                f"cnn{rank}d needs {needs}, but the dataset's examples have shape "
                f"{input_shape}; use --model {other}, resnet or mlp"
            )
        if rank == 1:
            kwargs.setdefault("channels", CNN1D_CHANNELS)
        return ConvNet(input_shape, num_classes, norm, **kwargs)

    return factory


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": _cnn(1),
    "cnn2d": _cnn(2),
    "resnet": ResNet,
}
"""Model name -> factory ``(input_shape, num_classes, norm, **kwargs) -> nn.Module``."""


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, norm: Norm,
                **kwargs: Any) -> nn.Module:
    """Build a model of :data:`MODELS` by name with ``norm`` after every Linear/Conv.

    Args:
        name: ``mlp``, ``cnn1d``, ``cnn2d``, ``resnet``, or a ``module:function`` spec of the
            user's model (:mod:`normkit.experiments.user`; ``convert=True`` for a stock model
            whose norms :func:`normkit.convert` replaces).
        input_shape: shape of one example, without the batch axis.
        num_classes: number of outputs.
        norm: the normalization (see :func:`make_norm`).
        **kwargs: model options (``width``, ``depth``, ``channels``, ``widths``, ``norm_kwargs``).

    Returns:
        The model, mapping ``(N, *input_shape)`` to logits ``(N, num_classes)``.

    Raises:
        ConfigError: for an unknown model name or inputs of the wrong rank for it.
        UnknownMethodError: for an unknown normalization name.
    """
    from .user import build_user_model, is_spec

    if is_spec(name):
        if not isinstance(norm, str):
            raise ConfigError(f"a user model ({name}) takes the method as a spec string, got "
                              f"{norm!r}")
        return build_user_model(name, tuple(input_shape), num_classes, norm, **kwargs)
    if kwargs.pop("convert", False):
        raise ConfigError(f"--convert replaces the norms of a user model (--model "
                          f"module:function), not of the built-in {name!r}; drop --convert")
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or give "
                          "module:function")
    return MODELS[name](tuple(input_shape), num_classes, norm, **kwargs)
