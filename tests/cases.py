"""The case table of the generic tests: one or more rows per registered method (like torch's
``module_db``).

Each :class:`Case` describes how to build a small instance of a method, which inputs it accepts,
what kind of module it is (batch-dependent, running statistics, affine parameters, torch kernel it
dispatches to), the float64 formulas of its running statistics and of its evaluation output, and
the bad inputs it must reject. ``tests/test_generic*.py`` run every test family over every row;
``test_every_registered_method_has_a_case`` fails when a method is registered without a row.

Shapes in the table are *logical* ``(N, C, *spatial)`` shapes; a case with ``channel_axis=-1``
receives ``x.movedim(1, -1)`` (see :func:`to_layout`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from normkit import ConfigError, ShapeError

__all__ = ["Case", "ErrorInput", "CASES", "STATEFUL", "CASE_IDS", "ERROR_PARAMS", "ERROR_IDS",
           "to_layout", "from_layout", "layout_shape"]

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
        stateful: the training step reads state a fresh module lacks besides EMA-type running
            statistics (a renormalization schedule, momentum buffers, a history of batches,
            PowerNorm's running quadratic mean past its warm-up). Such rows are in ``STATEFUL``,
            not ``CASES`` (which other test files iterate as functions of the batch alone); the
            generic battery runs them except ``test_case_matches_module`` (every buffer a
            running statistic) and ``test_gradcheck`` (hundreds of training forwards on one
            module), which the family's own file replaces.
        backward_state: backward passes update buffers (MABN's backward statistics, PowerNorm's
            ``grad_nu``): ``test_two_forwards_one_backward`` (one backward through two recorded
            forwards differs from two by design) and ``test_low_precision`` (it compares the
            buffers of a module that ran backward passes with one that did not) skip the row;
            the family's own file tests the defined behaviour instead.
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
    stateful: bool = False
    backward_state: bool = False

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


# ------------------------------------------------------------------------ shared shapes
S4 = ((6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2))  # every rank, C = 4
SP4 = ((3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2))  # spatial ranks only


# The rows live in one file per family; each imports Case / ErrorInput / the helpers above from
# here, so this module defines them before importing the families.
from cases_combination import CASES as _COMBINATION  # noqa: E402
from cases_conditional import CASES as _CONDITIONAL  # noqa: E402
from cases_ibn import CASES_IBN as _IBN  # noqa: E402
from cases_multimode import CASES as _MULTIMODE  # noqa: E402
from cases_online import CASES as _ONLINE  # noqa: E402
from cases_power import CASES as _POWER  # noqa: E402
from cases_power import STATEFUL as _POWER_STATEFUL  # noqa: E402
from cases_robust import CASES as _ROBUST  # noqa: E402
from cases_robust import STATEFUL as _ROBUST_STATEFUL  # noqa: E402
from cases_standard import CASES as _STANDARD  # noqa: E402
from cases_whitening import CASES as _WHITENING  # noqa: E402

CASES: list[Case] = (_STANDARD + _WHITENING + _COMBINATION + _IBN + _CONDITIONAL + _MULTIMODE
                     + _ONLINE + _POWER + _ROBUST)
# Configurations that keep state across training steps (Case.stateful): not rows of CASES, which
# other test files iterate as functions of the batch alone; the generic battery runs them too.
STATEFUL: list[Case] = _ROBUST_STATEFUL + _POWER_STATEFUL

CASE_IDS = [c.name for c in CASES]
ERROR_PARAMS = [(c, e) for c in CASES for e in c.errors]
ERROR_IDS = [f"{c.name}-{e.desc}" for c, e in ERROR_PARAMS]
