"""The rows of a Linear / Conv layer's K-FAC factors (:mod:`normkit.analysis.conditioning`): its
inputs as im2col patches (:func:`conv_patches`) and its output gradients, one row per place the
weight is applied."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ShapeError

__all__ = ["conv_patches", "grad_rows", "weight_rows"]


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> list[int]:
    """``F.pad`` amounts (last dim first) equivalent to the layer's padding."""
    nd = len(module.kernel_size)
    pad: list[int] = []
    for i in reversed(range(nd)):
        if module.padding == "valid":
            lo = hi = 0
        elif module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            lo, hi = total // 2, total - total // 2  # torch puts the odd extra on the right
        else:
            lo = hi = int(module.padding[i])  # type: ignore[index]
        pad += [lo, hi]
    return pad


def conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    r"""im2col rows of a convolution's input: one row per (sample, output position).

    Row ``r`` is the receptive field that ``weight.flatten(1)`` multiplies, so that
    ``conv(x)`` at that position equals ``weight.flatten(1) @ row (+ bias)``. The layer's
    ``padding``/``padding_mode`` is applied first; ``stride`` and ``dilation`` are honoured.

    Shape:
        ``x``: ``(B, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``;
        returns ``(B·L, C_in·∏kernel_size)`` with ``L`` the number of output positions.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        >>> x = torch.randn(2, 2, 4, 5)
        >>> p = conv_patches(conv, x)
        >>> p.shape
        torch.Size([40, 18])
        >>> y = (p @ conv.weight.flatten(1).T).reshape(2, 20, 3).transpose(1, 2)
        >>> torch.allclose(y, conv(x).flatten(2), atol=1e-5)
        True
    """
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    if x.dim() != nd + 2:
        raise ShapeError(f"{type(module).__name__} input must have {nd + 2} (or {nd + 1}) dims, "
                         f"got shape {tuple(x.shape)}")
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, _conv_padding(module), mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if nd == 1:  # Conv1d as a Conv2d over a height-1 image
        x = x.unsqueeze(-2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C·∏k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def weight_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``X`` a Linear / Conv layer's weight multiplies: ``(N, d_in)`` (leading axes
    flattened) or the convolution's :func:`conv_patches`."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return conv_patches(module, x)  # type: ignore[arg-type]


def grad_rows(module: nn.Module, g: Tensor) -> Tensor:
    """The output-gradient rows ``G`` matching :func:`weight_rows`: ``(N, d_out)`` per sample or
    per output position."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    nd = len(module.kernel_size)  # type: ignore[arg-type]
    if g.dim() == nd + 1:
        g = g.unsqueeze(0)
    return g.movedim(1, -1).reshape(-1, g.shape[1])
