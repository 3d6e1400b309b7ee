"""Generic-table rows of the combination family (book ch. 5); appended to cases.CASES.

The float64 reference formulas below are written from the papers' equations with plain tensor
operations on the logical ``(N, C, *spatial)`` input (never by calling normkit): per-channel
views, per-instance views, and an explicit simplex projection for the sparse mixture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cases import S4, SP4, Case, ErrorInput, _bn_stats, _common_errors, _group_errors
from normkit import ConfigError

Stats = dict[str, Tensor]


# ----------------------------------------------------------------------------- helpers
def _view(c: int, x: Tensor) -> tuple[int, ...]:
    return (1, c) + (1,) * (x.dim() - 2)


def _p(m: Any, name: str) -> Tensor:
    return getattr(m, name).detach().double()


def _affine(m: Any, y: Tensor) -> Tensor:
    """``y·γ + β`` with the module's per-channel parameters, where present."""
    view = _view(y.shape[1], y)
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if w is not None:
        y = y * w.detach().double().view(view)
    if b is not None:
        y = y + b.detach().double().view(view)
    return y


def _instance(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and biased variance over the positions, ``(N, C, 1, ...)``."""
    dims = tuple(range(2, x.dim()))
    return x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)


def _running(m: Any, x: Tensor, name: str) -> Tensor:
    return _p(m, f"running_{name}").view(_view(x.shape[1], x))


def _simplex_projection(z: Tensor) -> Tensor:
    """argmin_p ‖p − z‖² over the probability simplex, by trying every support size: the
    solution is max(z − τ, 0) for the τ making it sum to 1 (Held, Wolfe & Crowder 1974)."""
    vals = sorted(z.tolist(), reverse=True)
    for k in range(len(vals), 0, -1):
        tau = (sum(vals[:k]) - 1) / k
        if vals[k - 1] > tau:
            return (z - tau).clamp_min(0)
    raise AssertionError("unreachable: k = 1 always satisfies the condition")


# ------------------------------------------------------------------------- switchable
def _sn_eval_ref(m: Any, x: Tensor) -> Tensor:
    """SN in eval: IN and LN moments of the input, BN's running mean and variance, mixed with
    softmax (or the simplex projection) of the logits in the order of ``modes``."""
    n = x.shape[0]
    mean_in, var_in = _instance(x)
    flat = x.reshape(n, -1)
    mean_ln = flat.mean(1).view(n, *([1] * (x.dim() - 1)))
    var_ln = flat.var(1, correction=0).view(n, *([1] * (x.dim() - 1)))
    moments = {"in": (mean_in, var_in), "ln": (mean_ln, var_ln),
               "bn": (_running(m, x, "mean"), _running(m, x, "var"))}
    phi = _simplex_projection if m.nop.sparse else (lambda z: torch.softmax(z, 0))
    wm, wv = phi(_p(m, "mean_weight")), phi(_p(m, "var_weight"))
    modes = m.nop.modes
    mean = sum(wm[i] * moments[k][0] for i, k in enumerate(modes))
    var = sum(wv[i] * moments[k][1] for i, k in enumerate(modes))
    return _affine(m, (x - mean) / torch.sqrt(var + m.eps))


# ----------------------------------------------------------------------- batch-instance
def _bin_eval_ref(m: Any, x: Tensor) -> Tensor:
    """BIN in eval: ρ·BN(running) + (1 − ρ)·IN(input), ρ = clip(gate, 0, 1), then γ, β."""
    rho = _p(m, "gate").clamp(0, 1).view(_view(x.shape[1], x))
    bn = (x - _running(m, x, "mean")) / torch.sqrt(_running(m, x, "var") + m.eps)
    mean_in, var_in = _instance(x)
    inn = (x - mean_in) / torch.sqrt(var_in + m.eps)
    return _affine(m, rho * bn + (1 - rho) * inn)


# ------------------------------------------------------------------------------ EvoNorm
def _b0_stats(x: Tensor) -> Stats:
    return {"var": _bn_stats(x)["var"]}


def _b0_eval_ref(m: Any, x: Tensor) -> Tensor:
    """x / max(√(running var + ε), v·x + √(instance var + ε)) · γ + β."""
    v = _p(m, "v").view(_view(x.shape[1], x))
    _, var_in = _instance(x)
    den = torch.maximum(torch.sqrt(_running(m, x, "var") + m.eps), v * x + torch.sqrt(var_in + m.eps))
    return _affine(m, x / den)


# ------------------------------------------------------------------------ batch-channel
def _bcn_eval_ref(groups: int) -> Callable[[Any, Tensor], Tensor]:
    """h = γ_b·(x − running mean)/√(running var + ε) + β_b; GN of h in ``groups``; γ, β."""

    def ref(m: Any, x: Tensor) -> Tensor:
        view = _view(x.shape[1], x)
        h = (x - _running(m, x, "mean")) / torch.sqrt(_running(m, x, "var") + m.eps)
        h = h * _p(m, "bn_weight").view(view) + _p(m, "bn_bias").view(view)
        hg = h.reshape(x.shape[0], groups, -1)
        hg = (hg - hg.mean(2, keepdim=True)) / torch.sqrt(hg.var(2, correction=0, keepdim=True) + m.eps)
        return _affine(m, hg.reshape(x.shape))

    return ref


_S0_SHAPES = S4  # C = 4 with 2 groups: 2 channels per group, fine even without positions


CASES: list[Case] = [
    Case(
        name="switchable_norm", method="switchable_norm", num_features=4, kwargs={}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "mean_weight", "var_weight"), takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)),  # IN: one position per statistic
        edge_shapes=((1, 4, 3),), batch_stats=_bn_stats, eval_ref=_sn_eval_ref, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("mode_unknown", ConfigError,
                       r"modes must be a non-empty tuple of distinct names from .*got \('in', 'gn'\)",
                       ctor={"modes": ("in", "gn")}),
            ErrorInput("modes_empty", ConfigError, r"modes must be a non-empty tuple .*got \(\)",
                       ctor={"modes": ()}),
            ErrorInput("sparse_not_bool", ConfigError, r"sparse must be a bool, got 'yes'",
                       ctor={"sparse": "yes"}),
            ErrorInput("track_without_bn", ConfigError,
                       r"modes \('in', 'ln'\) use no batch statistics.*track_running_stats=True",
                       ctor={"modes": ("in", "ln"), "track_running_stats": True}),
        ),
    ),
    Case(
        name="switchable_norm_sparse", method="switchable_norm", num_features=4,
        kwargs={"sparse": True, "momentum": None}, shapes=((3, 4, 5), (2, 4, 3, 3)),
        grad_shape=(2, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "mean_weight", "var_weight"), takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1),), edge_shapes=((1, 4, 2),),
        batch_stats=_bn_stats, eval_ref=_sn_eval_ref, foldable=False,
    ),
    Case(
        name="switchable_norm_in_ln", method="switchable_norm", num_features=4,
        kwargs={"modes": ("in", "ln")}, shapes=((3, 4, 5), (2, 4, 3, 3)), grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=("weight", "bias", "mean_weight", "var_weight"),
        takes_affine=True, native=None, degenerate_shapes=((2, 4, 1),),
        edge_shapes=((1, 4, 2),), foldable=False,
    ),
    Case(
        name="bin", method="bin", num_features=4, kwargs={"gate_init": 0.5}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "gate"), takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)), edge_shapes=((1, 4, 3),),
        batch_stats=_bn_stats, eval_ref=_bin_eval_ref, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("gate_init_above_1", ConfigError,
                       r"gate_init must be a number in \[0, 1\].*got 1\.5", ctor={"gate_init": 1.5}),
            ErrorInput("gate_init_negative", ConfigError,
                       r"gate_init must be a number in \[0, 1\].*got -0\.1", ctor={"gate_init": -0.1}),
        ),
    ),
    Case(
        name="evonorm_b0", method="evonorm_b0", num_features=4, kwargs={}, shapes=SP4,
        grad_shape=(2, 4, 3), batch_dependent=True, running=("var",),
        params=("weight", "bias", "v"), takes_affine=True, native=None,
        degenerate_shapes=((2, 4, 1), (2, 4, 1, 1)), edge_shapes=((1, 4, 3),),
        batch_stats=_b0_stats, eval_ref=_b0_eval_ref, foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1),
    ),
    Case(
        name="evonorm_s0", method="evonorm_s0", num_features=4, kwargs={"num_groups": 2},
        shapes=_S0_SHAPES, grad_shape=(2, 4, 3), batch_dependent=False, running=(),
        params=("weight", "bias", "v"), takes_affine=True, native=None,
        edge_shapes=((1, 4), (1, 4, 1, 1)),
        errors=_common_errors(4, (3, 4, 5), 1) + _group_errors(4), foldable=False,
    ),
    Case(
        name="frn", method="frn", num_features=4, kwargs={}, shapes=S4, grad_shape=(2, 4, 3),
        batch_dependent=False, running=(), params=("weight", "bias", "tau"), takes_affine=True,
        native=None, edge_shapes=((1, 4), (1, 4, 1, 1)),  # ν² needs no spread
        foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("track_running_stats", ConfigError,
                       r"keeps no running estimates; got track_running_stats=True",
                       ctor={"track_running_stats": True}),
            ErrorInput("tlu_not_bool", ConfigError, r"tlu must be a bool, got 1", ctor={"tlu": 1}),
            ErrorInput("learnable_eps_not_bool", ConfigError,
                       r"learnable_eps must be a bool, got 'no'", ctor={"learnable_eps": "no"}),
        ),
    ),
    Case(
        name="frn_learned_eps_no_tlu", method="frn", num_features=4,
        kwargs={"tlu": False, "learnable_eps": True}, shapes=((5, 4), (2, 4, 3, 3)),
        grad_shape=(2, 4, 3), batch_dependent=False, running=(),
        params=("weight", "bias", "learned_eps"), takes_affine=True, native=None,
        edge_shapes=((1, 4),), foldable=False,
    ),
    Case(
        name="bcn", method="bcn", num_features=4, kwargs={"num_groups": 2}, shapes=S4,
        grad_shape=(3, 4, 2), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "bn_weight", "bn_bias"), takes_affine=True,
        native="group_norm", native_eval=False,  # training: BN's kernel (aten), then GN's
        degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_bn_stats, eval_ref=_bcn_eval_ref(2), foldable=False,
        errors=_common_errors(4, (3, 4, 5), 1) + _group_errors(4) + (
            ErrorInput("bn_affine_not_bool", ConfigError, r"bn_affine must be a bool, got 0",
                       ctor={"bn_affine": 0}),
        ),
    ),
]
