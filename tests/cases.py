"""The case table of the generic tests: one or more rows per registered method (like torch's
``module_db``).

Each :class:`Case` describes how to build a small instance of a method, which inputs it accepts,
what kind of module it is (batch-dependent, running statistics, affine parameters, torch kernel it
dispatches to), the float64 formulas of its running statistics and of its evaluation output, and
the bad inputs it must reject. ``tests/test_generic.py`` runs every test family over every row;
``test_every_registered_method_has_a_case`` fails when a method is registered without a row.

Shapes in the table are *logical* ``(N, C, *spatial)`` shapes; a case with ``channel_axis=-1``
receives ``x.movedim(1, -1)`` (see :func:`to_layout`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from normkit import ConfigError, ShapeError
from normkit._bench.reference import whitening_matrix  # the float64 formula, shared

__all__ = ["Case", "ErrorInput", "CASES", "CASE_IDS", "ERROR_PARAMS", "ERROR_IDS", "to_layout",
           "from_layout", "layout_shape"]

Shape = tuple[int, ...]
Stats = dict[str, Tensor]


@dataclass(frozen=True)
class ErrorInput:
    """A bad input and what it must raise.

    ``ctor`` overrides the case's constructor keyword arguments (``num_features`` overrides the
    channel count); with ``shape`` set, construction succeeds and a forward on a tensor of that
    (module-layout, not logical) shape must raise instead.
    """

    desc: str
    exc: type[BaseException]
    match: str
    ctor: dict[str, Any] = field(default_factory=dict)
    num_features: int | None = None
    shape: Shape | None = None
    training: bool = True


@dataclass(frozen=True)
class Case:
    """One row of the table.

    Attributes:
        name: test id.
        method: canonical registry name.
        num_features: channel count ``C``.
        kwargs: constructor keyword arguments.
        shapes: logical ``(N, C, *spatial)`` shapes valid in training (first = the main one).
        grad_shape: a tiny logical shape for float64 gradcheck.
        batch_dependent: statistics mix samples of the batch.
        running: names of the tracked statistics (buffers ``running_<name>``), ``()`` for none.
        params: names of the learnable parameters.
        takes_affine: the constructor has an ``affine`` argument.
        native: the ``torch.nn.functional`` kernel the default (``native=True``) path must call
            on CPU, or ``None`` where none is used (no kernel computes the same thing, or the
            kernel is slower than the generic path on CPU, as ``rms_norm``'s composite one).
        native_eval: the kernel is also used in eval (batch-group folds its running statistics
            on the generic path instead).
        channel_axis: the case's channel axis (1 or -1).
        axis_swap_kwargs: extra kwargs that keep the area fixed when ``channel_axis`` is flipped
            (``over`` of LN/RMS/ScaleNorm defaults differently per axis).
        degenerate_shapes: logical shapes whose training forward must raise :class:`ShapeError`
            (one value per statistic); they must work in eval where running statistics exist.
        edge_shapes: logical shapes with batch 1 or spatial size 1 that must work in training.
        batch_stats: float64 formula ``logical x -> {stat: value tracked for this batch}`` shaped
            like the running buffers (variance unbiased, per-sample statistics averaged).
        eval_ref: float64 formula ``(module, logical x) -> logical y`` using the running buffers.
        errors: bad inputs.
        inductor: also compare against ``torch.compile(backend="inductor")`` (slow; ≤ 4 cases).
        double_backward: second derivatives are supported (``gradgradcheck``); ZCA's
            divided-difference backward is first-order only and says so (raises).
        factory: builds the module instead of ``normkit.create(method, C, **kwargs)`` — for
            conditional methods, a module-level subclass whose forward supplies a condition made
            from the input when none is given (so every generic test can call ``m(x)``).
        foldable: ``folded()`` gives the evaluation map (methods whose evaluation depends on
            each input — conditional recoveries, per-input statistics — refuse).
        streaming: training normalizes with the running buffers and updates them sample by
            sample, and the backward updates control buffers (Online Normalization). The
            generic tests that assume a stateless training step (EMA / cumulative-average
            formulas of per-batch statistics, batch statistics with tracking off, training-mode
            gradcheck, two forwards then one backward, buffers after a backward vs after none)
            skip these rows; the method's own test file runs their streaming counterparts.
        fused_first_order: the default (``native=True``) path trains through a fused autograd
            Function that is first-order only (batch whitening); ``native=False`` is then the
            twice-differentiable composition where ``double_backward`` holds.
    """

    name: str
    method: str
    num_features: int
    kwargs: dict[str, Any]
    shapes: tuple[Shape, ...]
    grad_shape: Shape
    batch_dependent: bool
    running: tuple[str, ...]
    params: tuple[str, ...]
    takes_affine: bool
    native: str | None
    native_eval: bool = True
    channel_axis: int = 1
    axis_swap_kwargs: dict[str, Any] = field(default_factory=dict)
    degenerate_shapes: tuple[Shape, ...] = ()
    edge_shapes: tuple[Shape, ...] = ()
    batch_stats: Callable[[Tensor], Stats] | None = None
    eval_ref: Callable[[Any, Tensor], Tensor] | None = None
    errors: tuple[ErrorInput, ...] = ()
    inductor: bool = False
    double_backward: bool = True
    fused_first_order: bool = False
    factory: Callable[..., Any] | None = None
    foldable: bool = True
    streaming: bool = False

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------------- layouts
def to_layout(x: Tensor, channel_axis: int) -> Tensor:
    """Logical ``(N, C, *)`` -> the module's layout (contiguous ``(N, *, C)`` for axis -1)."""
    return x if channel_axis == 1 else x.movedim(1, -1).contiguous()


def from_layout(y: Tensor, channel_axis: int) -> Tensor:
    """Inverse of :func:`to_layout` (a view)."""
    return y if channel_axis == 1 else y.movedim(-1, 1)


def layout_shape(shape: Shape, channel_axis: int) -> Shape:
    return tuple(shape) if channel_axis == 1 else (shape[0], *shape[2:], shape[1])


# --------------------------------------------------------- float64 reference statistics
def _per_channel(x: Tensor) -> Tensor:
    """``(C, N·S)``: every value of each channel."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _bn_stats(x: Tensor) -> Stats:
    xc = _per_channel(x)
    return {"mean": xc.mean(1), "var": xc.var(1, correction=1)}


def _mean_stats(x: Tensor) -> Stats:
    return {"mean": _per_channel(x).mean(1)}


def _l1_stats(x: Tensor) -> Stats:
    xc = _per_channel(x)
    mean = xc.mean(1)
    return {"mean": mean, "scale": math.sqrt(math.pi / 2) * (xc - mean[:, None]).abs().mean(1)}


def _range_stats(x: Tensor) -> Stats:
    xc = _per_channel(x)
    m = xc.shape[1]
    scale = (xc.amax(1) - xc.amin(1)) / math.sqrt(2 * math.log(m))
    return {"mean": xc.mean(1), "scale": scale}


def _batch_group_stats(num_groups: int) -> Callable[[Tensor], Stats]:
    def stats(x: Tensor) -> Stats:
        xg = x.reshape(x.shape[0], num_groups, -1).transpose(0, 1).reshape(num_groups, -1)
        return {"mean": xg.mean(1), "var": xg.var(1, correction=1)}

    return stats


def _per_sample_group_stats(num_groups: int) -> Callable[[Tensor], Stats]:
    """Per-sample statistics of each group (unbiased variance), averaged over the batch (torch's
    InstanceNorm rule for tracked per-sample statistics)."""

    def stats(x: Tensor) -> Stats:
        xg = x.reshape(x.shape[0], num_groups, -1)
        return {"mean": xg.mean(2).mean(0), "var": xg.var(2, correction=1).mean(0)}

    return stats


def _expand(buf: Tensor, c: int) -> Tensor:
    """A running buffer of ``g`` group statistics as ``(C,)`` (channel ``c`` in group ``c // (C/g)``)."""
    buf = buf.detach().double()
    return buf if buf.numel() == c else buf.repeat_interleave(c // buf.numel())


def _eval_ref(kind: str) -> Callable[[Any, Tensor], Tensor]:
    """Eval formula from the running buffers: ``std`` (x−μ)/√(σ²+ε), ``inv`` (x−μ)/(s+ε),
    ``center`` x−μ; then ``·γ + β`` for the parameters present."""

    def ref(m: Any, x: Tensor) -> Tensor:
        c = x.shape[1]
        view = (1, c) + (1,) * (x.dim() - 2)
        mean = _expand(m.running_mean, c).view(view)
        if kind == "std":
            y = (x - mean) / torch.sqrt(_expand(m.running_var, c).view(view) + m.eps)
        elif kind == "inv":
            y = (x - mean) / (_expand(m.running_scale, c).view(view) + m.eps)
        else:
            y = x - mean
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if w is not None:
            y = y * w.detach().double().view(view)
        if b is not None:
            y = y + b.detach().double().view(view)
        return y

    return ref


def _whiten_stats(method: str, d: int, *, estimate: str = "matrix", eps: float = 1e-5,
                  iterations: int = 5) -> Callable[[Tensor], Stats]:
    """Batch whitening in groups of ``d`` channels: running ``mean`` (C,) and ``matrix`` (the
    whitening matrix of the biased covariance) or ``cov`` (the unbiased covariance)."""

    def stats(x: Tensor) -> Stats:
        xc = _per_channel(x)
        c, m = xc.shape
        mean = xc.mean(1)
        g = (xc - mean[:, None]).reshape(c // d, d, m)
        cov = g @ g.transpose(1, 2) / m
        if estimate == "covariance":
            return {"mean": mean, "cov": cov * m / (m - 1)}
        return {"mean": mean, "matrix": whitening_matrix(cov, method, eps, iterations)}

    return stats


def _whiten_eval_ref(d: int, method: str = "zca", iterations: int = 5, coloring: bool = False
                     ) -> Callable[[Any, Tensor], Tensor]:
    """Eval from the running buffers: ``γ ⊙ W_g (x − μ) + β`` per group of ``d`` channels, ``W``
    the running matrix or the whitening matrix of the running covariance (``coloring``:
    ``Γ_g W_g (x − μ) + β`` with the learned ``d × d`` matrices ``Γ``)."""

    def ref(m: Any, x: Tensor) -> Tensor:
        c = x.shape[1]
        xc = _per_channel(x) - m.running_mean.double()[:, None]
        if getattr(m, "running_cov", None) is not None:
            w = whitening_matrix(m.running_cov.double(), method, m.eps, iterations)
        else:
            w = m.running_matrix.double()
        if coloring:
            w = m.weight.detach().double() @ w
        y = (w @ xc.reshape(c // d, d, -1)).reshape(c, -1)
        if coloring:
            y = y + m.bias.detach().double()[:, None]
        elif getattr(m, "weight", None) is not None:
            y = y * m.weight.detach().double()[:, None] + m.bias.detach().double()[:, None]
        return y.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)

    return ref


# -------------------------------------------------------------------------- bad inputs
def _shape_re(shape: Shape) -> str:
    return re.escape(str(tuple(shape)))


def _common_errors(
    c: int, shape: Shape, axis: int, *, uses_eps: bool = True, affine: bool = True
) -> tuple[ErrorInput, ...]:
    """Bad inputs every method must reject. ``shape`` is a valid logical input shape."""
    good = layout_shape(shape, axis)
    wrong = list(good)
    wrong[1 if axis == 1 else -1] = c + 1
    wrong_t = tuple(wrong)
    errs = [
        ErrorInput("wrong_channels", ShapeError,
                   rf"expected {c} channels at axis {axis}, got input of shape "
                   rf"{_shape_re(wrong_t)} with {c + 1}", shape=wrong_t),
        ErrorInput("wrong_channels_eval", ShapeError,
                   rf"expected {c} channels .* with {c + 1}", shape=wrong_t, training=False),
        ErrorInput("rank0", ShapeError, r"rank >= 2 .*got shape \(\)", shape=()),
        ErrorInput("eps_negative", ConfigError, r"eps must be a finite number >= 0, got -0\.001",
                   ctor={"eps": -1e-3}),
        ErrorInput("eps_nan", ConfigError, r"eps must be a finite number >= 0, got nan",
                   ctor={"eps": float("nan")}),
        ErrorInput("momentum_1.5", ConfigError, r"momentum must be in \[0, 1\].* got 1\.5",
                   ctor={"momentum": 1.5}),
        ErrorInput("momentum_-0.1", ConfigError, r"momentum must be in \[0, 1\].* got -0\.1",
                   ctor={"momentum": -0.1}),
        ErrorInput("unknown_kwarg", TypeError, r"unexpected keyword argument 'momentun'",
                   ctor={"momentun": 0.1}),
        ErrorInput("num_features_0", ConfigError, r"num_features must be a positive int, got 0",
                   num_features=0),
        ErrorInput("num_features_-3", ConfigError, r"num_features must be a positive int, got -3",
                   num_features=-3),
        ErrorInput("channel_axis_2", ConfigError, r"channel_axis must be 1 or -1, got 2",
                   ctor={"channel_axis": 2}),
    ]
    if axis == 1:
        errs.append(ErrorInput("rank1", ShapeError, rf"rank >= 2 .*got shape \({c},\)",
                               shape=(c,)))
    else:  # a single (C,) vector is one sample (as torch.nn.LayerNorm): only its size is checked
        errs.append(ErrorInput("vector_wrong_channels", ShapeError,
                               rf"expected {c} channels at axis -1, got input of shape "
                               rf"\({c + 1},\) with {c + 1}", shape=(c + 1,)))
    if uses_eps:
        errs.append(ErrorInput("eps_zero", ConfigError, r"eps=0 .*divides by zero",
                               ctor={"eps": 0.0}))
    if affine:
        errs.append(ErrorInput("affine_not_bool", ConfigError, r"affine must be a bool, got 1",
                               ctor={"affine": 1}))
    return tuple(errs)


def _group_errors(c: int, *, extra_none: dict[str, Any] | None = None) -> tuple[ErrorInput, ...]:
    """``num_groups`` / ``group_size`` validation for a method taking both (C = ``c``)."""
    bad = next(g for g in range(2, c + 2) if c % g)
    none = {"num_groups": None, "group_size": None}
    return (
        ErrorInput("groups_not_dividing", ConfigError,
                   rf"num_features \({c}\) must be divisible by num_groups \({bad}\)",
                   ctor={**none, "num_groups": bad}),
        ErrorInput("group_size_not_dividing", ConfigError,
                   rf"num_features \({c}\) must be divisible by group_size \({bad}\)",
                   ctor={**none, "group_size": bad}),
        ErrorInput("groups_zero", ConfigError, r"num_groups must be a positive int, got 0",
                   ctor={**none, "num_groups": 0}),
        ErrorInput("groups_negative", ConfigError, r"num_groups must be a positive int, got -2",
                   ctor={**none, "num_groups": -2}),
        ErrorInput("group_size_zero", ConfigError, r"group_size must be a positive int, got 0",
                   ctor={**none, "group_size": 0}),
        ErrorInput("groups_bool", ConfigError, r"num_groups must be a positive int, got True",
                   ctor={**none, "num_groups": True}),
        ErrorInput("groups_and_group_size", ConfigError,
                   r"either num_groups \(3\) or group_size \(2\), not both",
                   ctor={"num_groups": 3, "group_size": 2}),
    )


def _over_error() -> ErrorInput:
    return ErrorInput("over_unknown", ConfigError,
                      r"over must be 'all', 'channels' or None, got 'rows'", ctor={"over": "rows"})


# ------------------------------------------------------------------------------- table
S4 = ((6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2))  # every rank, C = 4
SP4 = ((3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2))  # spatial ranks only
SP6 = ((3, 6, 7), (2, 6, 4, 5), (2, 6, 3, 3, 3))

CASES: list[Case] = [
    # ---------------------------------------------------------------- standardization
    Case(
        name="bn", method="bn", num_features=4, kwargs={}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native="batch_norm",
        degenerate_shapes=((1, 4), (1, 4, 1, 1)), edge_shapes=((1, 4, 3), (2, 4, 1, 1), (2, 4, 1)),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1), inductor=True,
    ),
    Case(
        name="bn_noaffine_cma", method="bn", num_features=4,
        kwargs={"affine": False, "momentum": None, "eps": 1e-3}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "var"), params=(), takes_affine=True,
        native="batch_norm", degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 2),),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="bn_channels_last", method="bn", num_features=4, kwargs={"channel_axis": -1},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=True, native="batch_norm", channel_axis=-1,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),),
        batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), -1),
    ),
    Case(  # torch's bias=False: γ only, still the native kernel
        name="bn_nobias", method="bn", num_features=4, kwargs={"bias": False}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"), params=("weight",),
        takes_affine=True, native="batch_norm", degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 3),), batch_stats=_bn_stats, eval_ref=_eval_ref("std"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="batch_group_norm", method="batch_group_norm", num_features=6,
        kwargs={"num_groups": 3}, shapes=((5, 6), (3, 6, 4), (2, 6, 3, 3), (2, 6, 2, 2, 2)),
        grad_shape=(3, 6, 2), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias"), takes_affine=True, native="batch_norm", native_eval=False,
        edge_shapes=((1, 6), (2, 6, 1, 1)),  # 2 channels per group: batch 1 has 2 values
        batch_stats=_batch_group_stats(3), eval_ref=_eval_ref("std"),
        errors=_common_errors(6, (3, 6, 4), 1) + _group_errors(6),
    ),
    Case(
        name="batch_group_norm_gs1", method="batch_group_norm", num_features=6,
        kwargs={"group_size": 1}, shapes=((5, 6), (3, 6, 4)), grad_shape=(3, 6, 2),
        batch_dependent=True, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native="batch_norm", native_eval=False, degenerate_shapes=((1, 6),), edge_shapes=((1, 6, 2),),
        batch_stats=_batch_group_stats(6), eval_ref=_eval_ref("std"),
    ),
    Case(
        name="gn", method="gn", num_features=6, kwargs={"num_groups": 3},
        shapes=((5, 6), (3, 6, 4), (2, 6, 3, 3), (2, 6, 2, 2, 2)), grad_shape=(3, 6, 2),
        batch_dependent=False, running=(), params=("weight", "bias"), takes_affine=True,
        native="group_norm", edge_shapes=((1, 6), (1, 6, 1, 1)),
        errors=_common_errors(6, (3, 6, 4), 1) + _group_errors(6), inductor=True,
    ),
    Case(
        name="gn_group_size1", method="gn", num_features=6, kwargs={"group_size": 1},
        shapes=((3, 6, 4), (2, 6, 3, 3)), grad_shape=(2, 6, 3), batch_dependent=False,
        running=(), params=("weight", "bias"), takes_affine=True, native="group_norm",
        degenerate_shapes=((2, 6), (2, 6, 1, 1)), edge_shapes=((1, 6, 3),),
    ),
    Case(
        name="gn_tracked", method="gn", num_features=6,
        kwargs={"num_groups": 2, "track_running_stats": True, "momentum": 0.2},
        shapes=((5, 6), (3, 6, 4), (2, 6, 3, 3)), grad_shape=(3, 6, 2), batch_dependent=False,
        running=("mean", "var"), params=("weight", "bias"), takes_affine=True, native=None,
        edge_shapes=((1, 6), (1, 6, 1)),
        batch_stats=_per_sample_group_stats(2), eval_ref=_eval_ref("std"),
    ),
    Case(
        name="ln", method="ln", num_features=4, kwargs={"over": "all"}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native="group_norm", edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + (_over_error(),), inductor=True,
    ),
    Case(
        name="ln_channels_last", method="ln", num_features=4, kwargs={"channel_axis": -1},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=False, running=(),
        params=("weight", "bias"), takes_affine=True, native="layer_norm", channel_axis=-1,
        axis_swap_kwargs={"over": "channels"}, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), -1) + (_over_error(),),
    ),
    Case(  # torch's LayerNorm(4, bias=False) on (…, 4) (test_torch_parity: elementwise_affine)
        name="ln_nobias_channels_last", method="ln", num_features=4,
        kwargs={"channel_axis": -1, "bias": False}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=False, running=(), params=("weight",), takes_affine=True,
        native="layer_norm", channel_axis=-1, axis_swap_kwargs={"over": "channels"},
        edge_shapes=((1, 4), (1, 4, 1, 1)),
    ),
    Case(
        name="in", method="in", num_features=4, kwargs={}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=(), takes_affine=True,
        native="instance_norm", degenerate_shapes=((2, 4), (2, 4, 1), (2, 4, 1, 1)),
        edge_shapes=((1, 4, 3), (1, 4, 1, 2)),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="in_affine_tracked", method="in", num_features=4,
        kwargs={"affine": True, "track_running_stats": True}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=("mean", "var"), params=("weight", "bias"),
        takes_affine=True, native="instance_norm", degenerate_shapes=((2, 4, 1),),
        edge_shapes=((1, 4, 3),),
        batch_stats=_per_sample_group_stats(4), eval_ref=_eval_ref("std"),
    ),
    Case(
        name="pn", method="pn", num_features=4, kwargs={}, shapes=SP4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=(), takes_affine=True, native="layer_norm",
        edge_shapes=((1, 4, 1), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="pn_affine", method="pn", num_features=4, kwargs={"affine": True}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native="layer_norm", edge_shapes=((1, 4, 1),),
    ),
    # ------------------------------------------------------------------------ scaling
    Case(
        name="rms_norm", method="rms_norm", num_features=4, kwargs={"over": "all"}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=False, running=(), params=("weight",),
        takes_affine=True, native=None, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + (_over_error(),), inductor=True,
    ),
    Case(
        name="rms_norm_channels_last", method="rms_norm", num_features=4,
        kwargs={"channel_axis": -1, "eps": 1e-6}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=False, running=(), params=("weight",), takes_affine=True,
        native=None, channel_axis=-1, axis_swap_kwargs={"over": "channels"},
        edge_shapes=((1, 4), (1, 4, 1)),
        errors=_common_errors(4, (3, 4, 5), -1),
    ),
    Case(
        name="scale_norm", method="scale_norm", num_features=4, kwargs={"over": "all"},
        shapes=S4, grad_shape=(3, 4, 3), batch_dependent=False, running=(), params=("weight",),
        takes_affine=False, native=None, edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1, affine=False) + (_over_error(),),
    ),
    Case(
        name="mean_only_bn", method="mean_only_bn", num_features=4, kwargs={}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean",), params=("bias",),
        takes_affine=True, native=None,
        edge_shapes=((1, 4), (1, 4, 1, 1)),  # centering needs no spread: batch 1 is defined
        batch_stats=_mean_stats, eval_ref=_eval_ref("center"),
        errors=_common_errors(4, (3, 4, 5), 1, uses_eps=False),
    ),
    Case(
        name="l1_bn", method="l1_bn", num_features=4, kwargs={}, shapes=S4, grad_shape=(3, 4, 3),
        batch_dependent=True, running=("mean", "scale"), params=("weight", "bias"),
        takes_affine=True, native=None, degenerate_shapes=((1, 4),),
        edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_l1_stats, eval_ref=_eval_ref("inv"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="range_bn", method="range_bn", num_features=4, kwargs={}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "scale"),
        params=("weight", "bias"), takes_affine=True, native=None,
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_range_stats, eval_ref=_eval_ref("inv"),
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    # -------------------------------------------------------------------------- local
    Case(
        name="lcn", method="lcn", num_features=6, kwargs={"num_groups": 3, "window": 3},
        shapes=SP6, grad_shape=(2, 6, 3), batch_dependent=False, running=(),
        params=("weight", "bias"), takes_affine=True, native=None,
        edge_shapes=((1, 6, 1), (1, 6, 1, 1)),  # 2 channels per group: spatial 1 has 2 values
        errors=_common_errors(6, (3, 6, 7), 1) + (
            ErrorInput("groups_not_dividing", ConfigError,
                       r"num_features \(6\) must be divisible by num_groups \(4\)",
                       ctor={"num_groups": 4}),
            ErrorInput("groups_zero", ConfigError, r"num_groups must be a positive int, got 0",
                       ctor={"num_groups": 0}),
            ErrorInput("window_zero", ConfigError, r"window sizes must be positive ints, got 0",
                       ctor={"window": 0}),
            ErrorInput("window_rank_mismatch", ConfigError,
                       r"window \(3, 3\) has 2 sizes but the input has 1 spatial dimensions",
                       ctor={"window": (3, 3)}, shape=(3, 6, 7)),
            ErrorInput("track_running_stats", ConfigError, r"cannot be tracked",
                       ctor={"track_running_stats": True}),
        ),
    ),
    Case(
        name="lrn", method="lrn", num_features=6,
        kwargs={"size": 3, "alpha": 0.5, "beta": 0.75, "k": 1.0}, shapes=SP6,
        grad_shape=(2, 6, 4), batch_dependent=False, running=(), params=(),
        takes_affine=False, native="local_response_norm", edge_shapes=((1, 6, 1), (1, 6, 1, 1)),
        errors=_common_errors(6, (3, 6, 7), 1, uses_eps=False, affine=False) + (
            ErrorInput("size_zero", ConfigError, r"window sizes must be positive ints, got 0",
                       ctor={"size": 0}),
            ErrorInput("k_zero", ConfigError, r"k > 0 .*got k=0\.0, alpha=0\.5",
                       ctor={"k": 0.0}),
            ErrorInput("alpha_negative", ConfigError, r"alpha >= 0 .*got k=1\.0, alpha=-1\.0",
                       ctor={"alpha": -1.0}),
        ),
    ),
    Case(
        name="divisive_norm", method="divisive_norm", num_features=4,
        kwargs={"window": 3, "channel_window": 1, "sigma": 0.5}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)),  # 1 channel × 1 position per window
        edge_shapes=((1, 4, 3),),
        errors=_common_errors(4, (3, 4, 5), 1, uses_eps=False) + (
            ErrorInput("sigma_zero", ConfigError, r"k > 0 .*got k=0\.0", ctor={"sigma": 0.0}),
            ErrorInput("channel_window_zero", ConfigError,
                       r"window sizes must be positive ints, got 0", ctor={"channel_window": 0}),
        ),
    ),
    Case(
        name="divisive_norm_channels", method="divisive_norm", num_features=6,
        kwargs={"window": (3, 1), "channel_window": 3, "sigma": 1.0}, shapes=((2, 6, 4, 3),),
        grad_shape=(1, 6, 3, 2), batch_dependent=False, running=(), params=("weight", "bias"),
        takes_affine=True, native=None, edge_shapes=((1, 6, 1, 1),),
    ),
]


# ------------------------------------------------------------------------------ whitening
def _whitening_errors(c: int) -> tuple[ErrorInput, ...]:
    return (
        ErrorInput("group_size_too_large", ConfigError,
                   rf"group_size \({c + 1}\) must be at most num_features \({c}\)",
                   ctor={"group_size": c + 1}),
        ErrorInput("group_size_zero", ConfigError, r"group_size must be a positive int, got 0",
                   ctor={"group_size": 0}),
        ErrorInput("estimate_unknown", ConfigError,
                   r"estimate must be 'matrix' or 'covariance', got 'sigma'",
                   ctor={"estimate": "sigma"}),
    )


_BW_SHAPES = ((6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2))
for _name, _method, _est in (("dbn", "zca", "matrix"), ("pca_bw", "pca", "covariance"),
                             ("cd_bw", "cholesky", "matrix"), ("iternorm", "newton", "matrix"),
                             ("dbn_sigma", "zca", "covariance")):
    CASES.append(Case(
        name=_name, method=_name.removesuffix("_sigma"), num_features=4,
        kwargs={"group_size": 2, "estimate": _est}, shapes=_BW_SHAPES, grad_shape=(4, 4, 2),
        batch_dependent=True, running=("mean", "matrix" if _est == "matrix" else "cov"),
        params=("weight", "bias"), takes_affine=True, native=None,
        degenerate_shapes=((1, 4), (1, 4, 1, 1)), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_whiten_stats(_method, 2, estimate=_est),
        eval_ref=_whiten_eval_ref(2, _method), double_backward=_method != "zca",
        fused_first_order=True,
        errors=(_common_errors(4, (3, 4, 5), 1) + _whitening_errors(4)) if _name != "dbn_sigma" else (),
    ))
CASES.append(Case(
    name="dbn_coloring", method="dbn", num_features=4, kwargs={"group_size": 2, "affine": "coloring"},
    shapes=_BW_SHAPES, grad_shape=(4, 4, 2), batch_dependent=True, running=("mean", "matrix"),
    params=("weight", "bias"), takes_affine=True, native=None,
    degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
    batch_stats=_whiten_stats("zca", 2), eval_ref=_whiten_eval_ref(2, coloring=True),
    double_backward=False, fused_first_order=True,
    errors=(ErrorInput("coloring_group_size_not_dividing", ConfigError,
                       r"num_features \(4\) must be divisible by group_size \(3\)",
                       ctor={"group_size": 3}),),
))
CASES.append(Case(
    name="iternorm_channels_last", method="iternorm", num_features=4,
    kwargs={"group_size": 4, "iterations": 3, "channel_axis": -1}, shapes=_BW_SHAPES,
    grad_shape=(5, 4, 2), batch_dependent=True, running=("mean", "matrix"),
    params=("weight", "bias"), takes_affine=True, native=None, channel_axis=-1,
    degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),),
    batch_stats=_whiten_stats("newton", 4, iterations=3), eval_ref=_whiten_eval_ref(4),
    fused_first_order=True,
    errors=(ErrorInput("iterations_zero", ConfigError, r"iterations must be an int in \[1, 64\], got 0",
                       ctor={"iterations": 0}),),
))
CASES.append(Case(
    name="group_whitening", method="group_whitening", num_features=4, kwargs={"num_groups": 2},
    shapes=((5, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2)), grad_shape=(2, 4, 3),
    batch_dependent=False, running=(), params=("weight", "bias"), takes_affine=True, native=None,
    edge_shapes=((1, 4), (1, 4, 1, 1)), double_backward=False,
    errors=_common_errors(4, (3, 4, 5), 1) + (
        ErrorInput("groups_not_dividing", ConfigError,
                   r"num_features \(4\) must be divisible by num_groups \(3\)",
                   ctor={"num_groups": 3}),
        ErrorInput("method_unknown", ConfigError,
                   r"whitening method must be 'zca', 'pca', 'cholesky' or 'newton', got 'svd'",
                   ctor={"method": "svd"}),
    ),
))
CASES.append(Case(
    name="instance_whitening", method="instance_whitening", num_features=4,
    kwargs={"group_size": 2}, shapes=SP4, grad_shape=(2, 4, 4),
    batch_dependent=False, running=(), params=(), takes_affine=True, native=None,
    degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)), edge_shapes=((1, 4, 3),), double_backward=False,
    errors=_common_errors(4, (3, 4, 5), 1, affine=False) + _whitening_errors(4)[:2],
))



def _sw_eval_ref(d: int) -> Callable[[Any, Tensor], Tensor]:
    """Switchable whitening in eval: softmax-mixed running batch and per-sample instance
    statistics (BN/IN = diagonals of BW/IW), ZCA of the mixture, then ``γ, β``."""

    def ref(m: Any, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        xi = x.reshape(n, c // d, d, -1)
        mi = xi.mean(-1, keepdim=True)
        ci = (xi - mi) @ (xi - mi).transpose(-1, -2) / xi.shape[-1]
        mb = m.running_mean.double().reshape(1, c // d, d, 1)
        cb = m.running_cov.double().unsqueeze(0)
        wm = torch.softmax(m.mean_weight.detach().double(), 0)
        wc = torch.softmax(m.cov_weight.detach().double(), 0)
        means = {"bw": mb, "bn": mb, "iw": mi, "in": mi}
        covs = {"bw": cb, "iw": ci, "bn": torch.diag_embed(cb.diagonal(dim1=-2, dim2=-1)),
                "in": torch.diag_embed(ci.diagonal(dim1=-2, dim2=-1))}
        modes = m.nop.modes
        mean = sum(wm[i] * means[k] for i, k in enumerate(modes))
        cov = sum(wc[i] * covs[k] for i, k in enumerate(modes)).expand(n, -1, -1, -1)
        w = whitening_matrix(cov.reshape(-1, d, d), "zca", m.eps, 0).reshape(cov.shape)
        y = (w @ (xi - mean)).reshape(n, c, -1)
        y = y * m.weight.detach().double()[:, None] + m.bias.detach().double()[:, None]
        return y.reshape(x.shape)

    return ref


CASES.append(Case(
    name="switchable_whitening", method="switchable_whitening", num_features=4,
    kwargs={"group_size": 2}, shapes=SP4, grad_shape=(3, 4, 3),
    batch_dependent=True, running=("mean", "cov"),
    params=("weight", "bias", "mean_weight", "cov_weight"), takes_affine=True, native=None,
    degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)), edge_shapes=((1, 4, 3),), double_backward=False,
    batch_stats=_whiten_stats("zca", 2, estimate="covariance"), eval_ref=_sw_eval_ref(2),
    foldable=False,
    errors=_common_errors(4, (3, 4, 5), 1) + _whitening_errors(4)[:2] + (
        ErrorInput("mode_unknown", ConfigError, r"modes must be distinct names from .*'gn'",
                   ctor={"modes": ("bw", "gn")}),
    ),
))

# families in their own files (each imports Case / ErrorInput / helpers from here)
from cases_combination import CASES as _COMBINATION  # noqa: E402
from cases_conditional import CASES as _CONDITIONAL  # noqa: E402
from cases_ibn import CASES_IBN as _IBN  # noqa: E402
from cases_multimode import CASES as _MULTIMODE  # noqa: E402
from cases_online import CASES as _ONLINE  # noqa: E402
from cases_power import CASES as _POWER  # noqa: E402
from cases_robust import CASES as _ROBUST  # noqa: E402

CASES += _COMBINATION + _IBN + _CONDITIONAL + _MULTIMODE + _ONLINE + _POWER + _ROBUST

CASE_IDS = [c.name for c in CASES]
ERROR_PARAMS = [(c, e) for c in CASES for e in c.errors]
ERROR_IDS = [f"{c.name}-{e.desc}" for c, e in ERROR_PARAMS]
