"""Generic-table rows of the whitening family (DBN, PCA / Cholesky batch whitening, IterNorm,
group, instance and switchable whitening); appended to ``cases.CASES``. The float64 whitening
matrix is the one reference formula shared with the benchmarks (``normkit._bench.reference``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cases import SP4, Case, ErrorInput, _common_errors, _per_channel
from normkit import ConfigError
from normkit._bench.reference import whitening_matrix  # the float64 formula, shared

Stats = dict[str, Tensor]

CASES: list[Case] = []


# --------------------------------------------------------- float64 reference statistics
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
        # the one-op step differentiates the composition twice (ZCA's composition is first order)
        fused_first_order=False,
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
