"""Generic-table rows of the multimode family (book ch. 5); appended to ``cases.CASES``.

The float64 reference formulas are written from the papers' equations with plain tensor
operations on the logical ``(N, C, *spatial)`` input, in a different arrangement from the library
(never by calling normkit): mode moments as weighted sums over every value of a channel (the
library decomposes them into within- and between-sample parts), EM with plain densities channel
by channel (the library works with log-densities on the whole tensor), TaskNorm's variance as
``E[x²] − μ²`` of the blend (the library sums non-negative terms).

Mode normalization's batch statistics depend on its gate parameters, which ``Case.batch_stats``
(a function of the input only) cannot see: :func:`generic_params` reproduces the parameters that
``tests/generic_util.py``'s ``build`` gives the module (seed 0, ``named_parameters`` order), and
``tests/test_multimode.py`` checks that the two stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from cases import S4, SP4, Case, ErrorInput, _common_errors, _per_channel
from normkit import ConfigError

Stats = dict[str, Tensor]
F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def generic_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """The parameters ``generic_util.build(case, seed=seed)`` draws, in ``named_parameters``
    order (``shapes`` must follow it): ``bias`` ~ N(0, 0.25), anything else U[0.5, 1.5), drawn
    in float32 and then cast to float64."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "bias":
            out[name] = (torch.randn(shape, generator=g) * 0.5).double()
        else:
            out[name] = (torch.rand(shape, generator=g) + 0.5).double()
    return out


def _affine(m: Any, y: Tensor) -> Tensor:
    view = (1, -1) + (1,) * (y.dim() - 2)
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if w is not None:
        y = y * w.detach().double().view(view)
    if b is not None:
        y = y + b.detach().double().view(view)
    return y


def _pooled(x: Tensor) -> Tensor:
    """``(N, C)``: each sample's channels averaged over its positions."""
    return x.reshape(x.shape[0], x.shape[1], -1).mean(-1)


# ---------------------------------------------------------------------------- mode norm
def _mode_gates(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return torch.softmax(_pooled(x) @ w.t() + b, dim=1)  # (N, K)


def _mode_stats(num_modes: int, c: int) -> Callable[[Tensor], Stats]:
    """Per mode: gate-weighted mean and (unbiased, BN's m/(m−1)) variance over every value of a
    channel, with the gate parameters of the generic tests' module."""
    p = generic_params({"weight": (c,), "bias": (c,), "gate_weight": (num_modes, c),
                        "gate_bias": (num_modes,)})

    def stats(x: Tensor) -> Stats:
        g = _mode_gates(x, p["gate_weight"], p["gate_bias"])  # (N, K)
        vals = x.reshape(x.shape[0], c, -1)  # (N, C, S)
        s = vals.shape[-1]
        wts = g.t()[:, :, None, None].expand(-1, -1, c, s)  # weight of every value, (K, N, C, S)
        total = wts.sum((1, 3))
        mean = (wts * vals).sum((1, 3)) / total
        var = (wts * (vals - mean[:, None, :, None]) ** 2).sum((1, 3)) / total
        m = x.shape[0] * s
        return {"mean": mean, "var": var * m / (m - 1)}

    return stats


def _mode_eval(m: Any, x: Tensor) -> Tensor:
    g = _mode_gates(x, m.gate_weight.detach().double(), m.gate_bias.detach().double())
    mean, var = m.running_mean.double(), m.running_var.double()
    ones = (1,) * (x.dim() - 2)
    y = torch.zeros_like(x)
    for k in range(mean.shape[0]):
        mu, sd = mean[k].view(1, -1, *ones), torch.sqrt(var[k] + m.eps).view(1, -1, *ones)
        y = y + g[:, k].view(-1, 1, *ones) * (x - mu) / sd
    return _affine(m, y)


# ------------------------------------------------------------------------- mixture norm
def _gmm_fit(values: Tensor, k: int, iterations: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """EM on one channel's values from the documented batch start; plain densities."""
    mu_b = values.mean()
    var_b = ((values - mu_b) ** 2).mean()
    q = torch.tensor([NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)], dtype=F64)
    means = mu_b + q * torch.sqrt(var_b + eps)
    variances = var_b * (1 - (q**2).mean()) * torch.ones(k, dtype=F64)
    priors = torch.full((k,), 1.0 / k, dtype=F64)
    for _ in range(iterations):
        post = _gmm_post(values, means, variances, priors, eps)
        nk = post.sum(1)
        means = (post * values).sum(1) / nk
        variances = (post * (values - means[:, None]) ** 2).sum(1) / nk
        priors = nk / values.numel()
    return means, variances, priors


def _gmm_post(values: Tensor, means: Tensor, variances: Tensor, priors: Tensor,
              eps: float) -> Tensor:
    s = (variances + eps)[:, None]
    dens = priors[:, None] * torch.exp(-((values - means[:, None]) ** 2) / (2 * s)) / torch.sqrt(
        2 * math.pi * s)
    return dens / dens.sum(0)  # (K, M)


def _mixture_stats(k: int, iterations: int, eps: float) -> Callable[[Tensor], Stats]:
    def stats(x: Tensor) -> Stats:
        xc = _per_channel(x)
        m = xc.shape[1]
        fits = [_gmm_fit(row, k, iterations, eps) for row in xc]
        mean = torch.stack([f[0] for f in fits], 1)
        var = torch.stack([f[1] for f in fits], 1) * m / (m - 1)
        log_prior = torch.log(torch.stack([f[2] for f in fits], 1))
        return {"mean": mean, "var": var, "log_prior": log_prior}

    return stats


def _mixture_eval(m: Any, x: Tensor) -> Tensor:
    xc = _per_channel(x)
    mean, var = m.running_mean.double(), m.running_var.double()
    priors = torch.softmax(m.running_log_prior.double(), 0)
    rows = []
    for c, row in enumerate(xc):
        post = _gmm_post(row, mean[:, c], var[:, c], priors[:, c], m.eps)
        rows.append((post * (row - mean[:, c, None]) / torch.sqrt(var[:, c, None] + m.eps)).sum(0))
    y = torch.stack(rows).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
    return _affine(m, y)


# ---------------------------------------------------------------------------- task norm
def _task_stats(x: Tensor) -> Stats:
    xc = _per_channel(x)
    size = torch.tensor([float(x.shape[0])], dtype=F64)
    return {"mean": xc.mean(1), "var": xc.var(1, correction=1), "size": size}


def _task_eval(moments: str) -> Callable[[Any, Tensor], Tensor]:
    def ref(m: Any, x: Tensor) -> Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        mu_bn, var_bn = m.running_mean.double().view(view), m.running_var.double().view(view)
        a, b = m.alpha_scale.detach().double(), m.alpha_offset.detach().double()
        alpha = torch.sigmoid(a * m.running_size.double() + b)
        n, c = x.shape[:2]
        per = x.reshape(n, c, -1) if moments == "instance" else x.reshape(n, 1, -1)
        mu_in = per.mean(-1, keepdim=True)
        var_in = ((per - mu_in) ** 2).mean(-1, keepdim=True)
        mu_in, var_in = (t.reshape(n, -1, *([1] * (x.dim() - 2))) for t in (mu_in, var_in))
        mu = alpha * mu_bn + (1 - alpha) * mu_in
        second = alpha * (var_bn + mu_bn**2) + (1 - alpha) * (var_in + mu_in**2)  # blended E[x²]
        return _affine(m, (x - mu) / torch.sqrt(second - mu**2 + m.eps))

    return ref


# ------------------------------------------------------------------------------ errors
def _int_errors(name: str, span: str = "a positive int", upper: int | None = None
                ) -> tuple[ErrorInput, ...]:
    errs = [
        ErrorInput(f"{name}_zero", ConfigError, rf"{name} must be {span}, got 0", ctor={name: 0}),
        ErrorInput(f"{name}_bool", ConfigError, rf"{name} must be {span}, got True",
                   ctor={name: True}),
        ErrorInput(f"{name}_float", ConfigError, rf"{name} must be {span}, got 2\.0",
                   ctor={name: 2.0}),
    ]
    if upper is not None:
        errs.append(ErrorInput(f"{name}_too_many", ConfigError,
                               rf"{name} must be {span}, got {upper + 1}", ctor={name: upper + 1}))
    return tuple(errs)


_ONE_VALUE = ((1, 4), (1, 4, 1, 1))  # one value per channel: BN's rule
CASES: list[Case] = [
    Case(
        name="mode_norm", method="mode_norm", num_features=4, kwargs={"num_modes": 2}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var"),
        params=("weight", "bias", "gate_weight", "gate_bias"), takes_affine=True, native=None,
        degenerate_shapes=_ONE_VALUE, edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_mode_stats(2, 4), eval_ref=_mode_eval,
        errors=_common_errors(4, (3, 4, 5), 1) + _int_errors("num_modes"), foldable=False,
    ),
    Case(
        name="mixture_norm", method="mixture_norm", num_features=4,
        kwargs={"num_components": 2, "iterations": 2, "init": "batch"}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var", "log_prior"),
        params=("weight", "bias"), takes_affine=True, native=None,
        degenerate_shapes=_ONE_VALUE, edge_shapes=((1, 4, 3), (2, 4, 1, 1)),
        batch_stats=_mixture_stats(2, 2, 1e-5), eval_ref=_mixture_eval,
        errors=_common_errors(4, (3, 4, 5), 1) + _int_errors("num_components")
        + _int_errors("iterations", r"an int in \[1, 100\]", upper=100) + (
            ErrorInput("init_unknown", ConfigError,
                       r"init must be 'running' or 'batch', got 'kmeans'", ctor={"init": "kmeans"}),
        ), foldable=False,
    ),
    Case(
        name="task_norm", method="task_norm", num_features=4, kwargs={}, shapes=S4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var", "size"),
        params=("weight", "bias", "alpha_scale", "alpha_offset"), takes_affine=True, native=None,
        degenerate_shapes=_ONE_VALUE, edge_shapes=((1, 4, 3), (2, 4, 1, 1), (2, 4)),
        batch_stats=_task_stats, eval_ref=_task_eval("instance"),
        errors=_common_errors(4, (3, 4, 5), 1) + (
            ErrorInput("moments_unknown", ConfigError,
                       r"moments must be 'instance' or 'layer', got 'group'",
                       ctor={"moments": "group"}),
        ), foldable=False,
    ),
    Case(
        name="task_norm_layer_channels_last", method="task_norm", num_features=4,
        kwargs={"moments": "layer", "channel_axis": -1, "momentum": None}, shapes=SP4,
        grad_shape=(3, 4, 3), batch_dependent=True, running=("mean", "var", "size"),
        params=("weight", "bias", "alpha_scale", "alpha_offset"), takes_affine=True, native=None,
        channel_axis=-1, degenerate_shapes=((1, 4),), edge_shapes=((1, 4, 3),),
        batch_stats=_task_stats, eval_ref=_task_eval("layer"),
        errors=_common_errors(4, (3, 4, 5), -1), foldable=False,
    ),
]
