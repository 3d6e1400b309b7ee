"""Generic-table rows of the conditional family (book ch. 4.3); appended to ``cases.CASES``.

The generic tests call ``m(x)``; conditional methods need ``m(x, condition)``. Each row therefore
builds a module-level subclass (picklable) whose forward makes a deterministic condition from the
input when none is given: class indices ``n mod K``, a style ``1 + 2·x`` flipped along the batch,
a segmentation map from the input's first channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cases import S4, SP4, Case, ErrorInput, _bn_stats, _common_errors
from normkit import ConfigError, ShapeError
from normkit.methods.conditional import (
    AdaIN,
    AdaLIN,
    ConditionalBatchNorm,
    ConditionalInstanceNorm,
    SPADENorm,
)

K = 3  # classes of the conditional rows


def classes(x: Tensor) -> Tensor:
    n = x.shape[0] if x.dim() else 1
    return torch.arange(n) % K


def style(x: Tensor) -> Tensor:
    return 1 + 2 * x.flip(0) if x.dim() >= 2 else x


def _floating(x: Tensor) -> Tensor:
    """``x`` itself, or as float32 where it is an integer / bool tensor: the condition is then
    well formed, so the module's own refusal of such an input is what a test sees."""
    return x if x.is_floating_point() else x.float()


def segmentation(x: Tensor) -> Tensor:
    return _floating(x)[:, :2].sigmoid() if x.dim() >= 2 and x.shape[1] >= 2 else x


class CBNCase(ConditionalBatchNorm):
    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        return super().forward(x, classes(x) if condition is None else condition)


class CINCase(ConditionalInstanceNorm):
    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        return super().forward(x, classes(x) if condition is None else condition)


class AdaINCase(AdaIN):
    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        return super().forward(x, style(x) if condition is None else condition)


class SPADECase(SPADENorm):
    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        logical = x.movedim(-1, 1) if self.channel_axis == -1 and x.dim() >= 2 else x
        return super().forward(x, segmentation(logical) if condition is None else condition)


class EmbeddingCBNCase(ConditionalBatchNorm):
    """Embedding condition ``e_n = (sin n, cos n, n/10)``."""

    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        if condition is None:
            condition = _embedding(x).to(x.dtype if x.is_floating_point() else torch.float32)
        return super().forward(x, condition)


def affine_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(γ, β)`` per sample from the input's channel means (a stand-in for U-GAT-IT's FC layers)."""
    if x.dim() < 2:
        return x, x
    p = _floating(x).flatten(2).mean(-1)
    return 1 + 0.5 * p.tanh(), p.sin()


class AdaLINCase(AdaLIN):
    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        logical = x.movedim(-1, 1) if self.channel_axis == -1 and x.dim() >= 2 else x
        return super().forward(x, affine_pair(logical) if condition is None else condition)


def _view(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _bn_eval(m: Any, x: Tensor) -> Tensor:
    v = _view(x)
    return (x - m.running_mean.double().view(v)) / torch.sqrt(m.running_var.double().view(v) + m.eps)


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def _pooled(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1).mean(-1)


def _cbn_eval(m: Any, x: Tensor) -> Tensor:
    c = classes(x)
    w, b = m.weight.detach().double()[c], m.bias.detach().double()[c]
    return _bn_eval(m, x) * _per_sample(w, x) + _per_sample(b, x)


def _embedding(x: Tensor) -> Tensor:
    n = torch.arange(x.shape[0] if x.dim() else 1, dtype=torch.float64)
    return torch.stack([n.sin(), n.cos(), n / 10], 1)


def _cbn_embedding_eval(m: Any, x: Tensor) -> Tensor:
    e = _embedding(x)
    w = m.weight.detach().double() + e @ m.weight_proj.detach().double().T
    b = m.bias.detach().double() + e @ m.bias_proj.detach().double().T
    return _bn_eval(m, x) * _per_sample(w, x) + _per_sample(b, x)


def _spade_eval(m: Any, x: Tensor) -> Tensor:
    net = m.spade
    seg = F.interpolate(segmentation(x), size=x.shape[2:], mode="nearest")
    h = F.relu(F.conv2d(seg, net.shared.weight.double(), net.shared.bias.double(), padding=1))
    gamma = F.conv2d(h, net.gamma.weight.double(), net.gamma.bias.double(), padding=1)
    beta = F.conv2d(h, net.beta.weight.double(), net.beta.bias.double(), padding=1)
    return _bn_eval(m, x) * (1 + gamma) + beta


def _iebn_eval(m: Any, x: Tensor) -> Tensor:
    p = _pooled(x)
    gate = torch.sigmoid(m.gate_weight.detach().double() * p + m.gate_bias.detach().double())
    g = m.weight.detach().double() * gate
    return _bn_eval(m, x) * _per_sample(g, x) + m.bias.detach().double().view(_view(x))


def _attentive_eval(m: Any, x: Tensor) -> Tensor:
    p = _pooled(x)
    lam = torch.sigmoid(p @ m.attention_weight.detach().double().T + m.attention_bias.detach().double())
    g, b = lam @ m.weight.detach().double(), lam @ m.bias.detach().double()
    return _bn_eval(m, x) * _per_sample(g, x) + _per_sample(b, x)


SPADE_SHAPES = ((2, 4, 3, 3), (3, 4, 2, 5))
SPADE_PARAMS = tuple(f"spade.{layer}.{p}" for layer in ("shared", "gamma", "beta")
                     for p in ("weight", "bias"))

CASES: list[Case] = [
    Case(
        name="ilm", method="ilm", num_features=4, kwargs={"num_groups": 2, "reduction": 2},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=False, running=(),
        params=("weight", "bias", "encoder_weight", "encoder_bias", "gamma_weight", "beta_weight"),
        takes_affine=False, native=None, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1, affine=False) + (
            ErrorInput("reduction_zero", ConfigError, r"reduction must be a positive int, got 0",
                       ctor={"reduction": 0}),),
    ),
    Case(
        name="adalin", method="adalin", num_features=4, kwargs={}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=False, running=(), params=("gate",),
        takes_affine=False, native=None, factory=AdaLINCase,
        degenerate_shapes=((2, 4, 1),), edge_shapes=((1, 4, 3),),
        errors=_common_errors(4, (3, 4, 5), 1, affine=False) + (
            ErrorInput("rho_init_out_of_range", ConfigError, r"gate_init must be a number in \[0, 1\]",
                       ctor={"rho_init": 1.5}),
            ErrorInput("tracked", ConfigError, r"no running statistics",
                       ctor={"track_running_stats": True}),
        ),
    ),
    Case(
        name="cbn", method="cbn", num_features=4, kwargs={"num_classes": K}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=False, native=None, factory=CBNCase,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_bn_stats, eval_ref=_cbn_eval, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1, affine=False) + (
            ErrorInput("neither_classes_nor_embedding", ConfigError, r"exactly one of num_classes",
                       ctor={"num_classes": None}),
            ErrorInput("classes_zero", ConfigError, r"must be a positive int, got 0",
                       ctor={"num_classes": 0}),
        ),
    ),
    Case(
        name="cbn_embedding", method="cbn", num_features=4, kwargs={"embedding_dim": 3},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "weight_proj", "bias_proj"), takes_affine=False, native=None,
        factory=EmbeddingCBNCase, degenerate_shapes=((1, 4),),
        batch_stats=_bn_stats, eval_ref=_cbn_embedding_eval, foldable=False,
        errors=(ErrorInput("both", ConfigError, r"exactly one of num_classes",
                           ctor={"num_classes": 2}),),
    ),
    Case(
        name="cin", method="cin", num_features=4, kwargs={"num_classes": K}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=False, native=None, factory=CINCase,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)), edge_shapes=((1, 4, 3),),
        errors=_common_errors(4, (3, 4, 5), 1, affine=False),
    ),
    Case(
        name="adain", method="adain", num_features=4, kwargs={}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=(), takes_affine=False, native=None,
        factory=AdaINCase, degenerate_shapes=((2, 4, 1),), edge_shapes=((1, 4, 3),),
        errors=_common_errors(4, (3, 4, 5), 1, affine=False) + (
            ErrorInput("style_eps_negative", ConfigError, r"got -1", ctor={"style_eps": -1.0}),
        ),
    ),
    Case(
        name="spade", method="spade", num_features=4, kwargs={"label_channels": 2, "hidden": 3},
        shapes=SPADE_SHAPES, grad_shape=(2, 4, 2, 2), batch_dependent=True,
        running=("mean", "var"), params=SPADE_PARAMS, takes_affine=False, native=None,
        factory=SPADECase, degenerate_shapes=((1, 4, 1, 1),), edge_shapes=((1, 4, 2, 2),),
        batch_stats=_bn_stats, eval_ref=_spade_eval, foldable=False,
        errors=(
            ErrorInput("kernel_even", ConfigError, r"kernel_size must be odd", ctor={"kernel_size": 2}),
            ErrorInput("rank3_input", ShapeError, r"expects inputs of rank 4", shape=(2, 4, 5)),
        ),
    ),
    Case(
        name="iebn", method="iebn", num_features=4, kwargs={}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "gate_weight", "gate_bias"), takes_affine=False, native=None,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),), batch_stats=_bn_stats,
        eval_ref=_iebn_eval, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1, affine=False),
    ),
    Case(
        name="attentive_norm", method="attentive_norm", num_features=4, kwargs={"num_affines": 2},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "attention_weight", "attention_bias"), takes_affine=False,
        native=None, degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),), batch_stats=_bn_stats,
        eval_ref=_attentive_eval, foldable=False,
        errors=(ErrorInput("affines_zero", ConfigError, r"num_affines must be a positive int, got 0",
                           ctor={"num_affines": 0}),),
    ),
    Case(
        name="dynamic_ln", method="dynamic_ln", num_features=4, kwargs={"channel_axis": -1},
        channel_axis=-1, axis_swap_kwargs={"over": "channels"}, shapes=SP4, grad_shape=(2, 4, 3), batch_dependent=False, running=(),
        params=("weight", "bias", "weight_proj", "bias_proj"), takes_affine=False, native=None,
        edge_shapes=((1, 4, 1),),
        errors=_common_errors(4, (3, 4, 5), -1, affine=False),
    ),
]

