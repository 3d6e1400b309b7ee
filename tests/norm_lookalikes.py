"""Look-alikes of the norms of other libraries, written as timm and Hugging Face write them
(norm+act subclasses of torch norms, channels-first LayerNorm2d, RMSNorms that are not torch
subclasses), and layers that must be refused: the surgery tests run without either library."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BN, then drop, then act, in one BN subclass."""

    def __init__(self, c: int, act: nn.Module | None = None, drop: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = drop or nn.Identity()
        self.act = act or nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class BNActThenDrop(BNAct):
    """The other order (act before drop): the probe must see it, not assume timm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(nn.BatchNorm2d.forward(self, x)))


class GNAct(nn.GroupNorm):
    def __init__(self, c: int) -> None:
        super().__init__(2, c)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):  # ConvNeXt: channels first
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class FastLayerNorm(nn.LayerNorm):  # timm's LayerNorm: own forward, torch's math
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class GemmaStyleRMSNorm(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class RmsNorm2dWithBias(nn.Module):  # channels-first RMS with a bias
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


# refused: what they compute matches no formula, or not with their own eps / bias
class DoubledBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class HiddenEpsLayerNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-2)  # not self.eps


class BiasIgnoringLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)


class ProjRMSNorm(LlamaStyleRMSNorm):  # an extra child that is not a tail
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.proj = nn.Linear(c, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(super().forward(h)) + h


class FrozenBatchNorm2d(nn.Module):
    """torchvision's: BN with fixed statistics (buffers) in both modes, not a torch subclass."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + bias[None, :, None, None]
