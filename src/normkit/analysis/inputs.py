r"""Chapter 2 as tools: how input preprocessing conditions a linear model, and K-FAC factors.

*Linear least squares* with a bias, :math:`L(W) = \frac{1}{2n}\lVert \tilde X W - Y\rVert_F^2`
(``Y`` one-hot, ``X̃ = [X, 1]``), has the constant Hessian (per output column)

.. math::

    H = \tfrac1n \tilde X^\top \tilde X
      = \begin{pmatrix} \Sigma + \mu\mu^\top & \mu \\ \mu^\top & 1 \end{pmatrix},

so centring (``μ = 0``) decouples the bias, scaling equalizes the diagonal and whitening makes
``H = I``: condition number :math:`\kappa = \lambda_{\max}/\lambda_{\min} = 1`. Gradient descent
from ``W₀ = 0`` with the optimal constant step :math:`\eta = 2/(\lambda_{\max} + \lambda_{\min})`
contracts the error by at least :math:`(\kappa - 1)/(\kappa + 1)` per step; on a quadratic it
decouples in the eigenbasis :math:`H = U \Lambda U^\top`, so the loss after ``t`` steps is exact
in closed form,

.. math::

    L(W_t) - L^\ast = \tfrac12 \textstyle\sum_k \lambda_k (1 - \eta\lambda_k)^{2t}
        \lVert (U^\top W^\ast)_k \rVert^2,

and the steps to the target :math:`L \le (1 + \text{rel\_tol})\,L^\ast` are found by bisection
(the excess is non-increasing in ``t``), for millions of steps at no cost. ``L*`` is the same for
every preprocessing: each is an invertible affine map, so the model class is unchanged.

*Logistic regression* (softmax cross entropy) is run by plain full-batch GD from ``W = 0``. Its
Hessian at ``W = 0`` is :math:`H \otimes \frac1K (I - \frac1K \mathbf 1\mathbf 1^\top)`: on its
non-null space the condition number is that of ``H``, which is what is reported. The step is
``η = 1/L_smooth = 2/λ_max(H)``, the global smoothness bound (the softmax Hessian in the logits
is ``≼ ½ I``); the target is an absolute training loss (``target_loss``, default 0.1 nats; digits
is nearly separable, so ``L*`` may be 0).

*Zero-variance inputs.* Features constant on the data (digits has several always-zero pixels) are
dropped first: they add exact null directions to ``H`` in every preprocessing, along which GD
never moves and the loss does not depend. Any eigenvalue still ``≤ rtol·λ_max`` counts as null and
is left out of ``κ`` and ``η`` (none on digits).

*Preprocessings* are :class:`~normkit.input_norm.InputNormalizer` fitted on the data itself
(float64): ``raw`` (as loaded), ``centred`` (``center``), ``standardized`` (``standardize``),
``whitened`` (``zca``; ``eps`` tiny so the whitened covariance is ``Σ(Σ + εI)⁻¹ ≈ I``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..input_norm import InputNormalizer
from .conditioning import DEFAULT_RTOL, LossFn, condition_numbers, layer_statistics

__all__ = [
    "PREPROCESSINGS",
    "InputConditioning",
    "drop_constant_features",
    "input_conditioning",
    "kfac_factors",
    "linear_hessian",
]

PREPROCESSINGS: dict[str, str | None] = {
    "raw": None, "centred": "center", "standardized": "standardize", "whitened": "zca",
}
"""Label → :class:`~normkit.input_norm.InputNormalizer` method (``None``: unchanged)."""

Loss = Literal["least_squares", "logistic"]


@dataclass
class InputConditioning:
    """One preprocessing's row of the chapter-2 table.

    ``steps`` is ``None`` when the target was not reached within ``max_steps``; ``final_loss``
    is the loss after ``steps`` (or ``max_steps``). ``curve_steps``/``curve_loss`` sample the
    GD loss curve for plotting. ``optimum_loss`` is ``L*`` (least squares) or ``nan``.
    """

    preprocessing: str
    loss: str
    cond: float
    lambda_max: float
    lambda_min: float
    step_size: float
    steps: int | None
    target: float
    final_loss: float
    optimum_loss: float
    curve_steps: Tensor
    curve_loss: Tensor


def drop_constant_features(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x[:, keep]`` and the boolean ``keep`` of the features that are not constant over ``x``.

    Shape:
        ``x``: ``(n, d)``; returns ``(n, d_kept)`` and ``(d,)``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]])
        >>> drop_constant_features(x)[1].tolist()
        [False, True, False]
    """
    keep = (x.amax(0) > x.amin(0)) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.bool)
    return x[:, keep], keep


def linear_hessian(x: Tensor, *, bias: bool = True) -> Tensor:
    r"""Hessian ``X̃ᵀX̃/n`` of the least-squares loss ``‖X̃w − y‖²/(2n)`` (float64), ``X̃ = [X, 1]``
    with ``bias=True``.

    Example:
        >>> h = linear_hessian(torch.tensor([[1.0], [3.0]]))
        >>> h.tolist()                                  # [[E x², E x], [E x, 1]]
        [[5.0, 2.0], [2.0, 1.0]]
    """
    if x.dim() != 2:
        raise ShapeError(f"expected inputs (n, d), got shape {tuple(x.shape)}; flatten them")
    xt = _with_bias(x.to(torch.float64), bias)
    return xt.T @ xt / max(xt.shape[0], 1)


def _with_bias(x: Tensor, bias: bool) -> Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if bias else x


def __getattr__(name: str) -> Any:
    if name == "load_inputs":  # deprecated alias (0.1): the analysis tools take data, not names
        warnings.warn("normkit.analysis.inputs.load_inputs moved to "
                      "normkit.experiments.data.load_inputs; import it from there",
                      DeprecationWarning, stacklevel=2)
        return _experiments_loader()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _experiments_loader() -> Any:
    """The dataset loader of ``normkit compare``, for the deprecated paths only (the one import
    of this module from the experiments' layer; tests/test_layers.py names it)."""
    from ..experiments.data import load_inputs

    return load_inputs


def _nonnull(h: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    lam, u = torch.linalg.eigh(0.5 * (h + h.T))
    keep = lam > rtol * lam.max()
    return lam[keep], u[:, keep]


def _first_step(excess_at, target: float, max_steps: int) -> int | None:  # type: ignore[no-untyped-def]
    """Smallest ``t ≤ max_steps`` with ``excess_at(t) ≤ target`` (non-increasing in ``t``)."""
    if excess_at(0) <= target:
        return 0
    if excess_at(max_steps) > target:
        return None
    lo, hi = 0, max_steps  # excess(lo) > target >= excess(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if excess_at(mid) <= target else (mid, hi)
    return hi


def _least_squares(xt: Tensor, y1: Tensor, rel_tol: float, max_steps: int, rtol: float,
                   ) -> tuple[dict[str, float], int | None, object]:
    n = xt.shape[0]
    h = xt.T @ xt / n
    lam, u = _nonnull(h, rtol)
    coef = (u.T @ (xt.T @ y1 / n)) / lam[:, None]  # Uᵀ W* (minimum-norm optimum)
    w_star = u @ coef
    optimum = float((xt @ w_star - y1).square().sum() / (2 * n))
    weight = lam * coef.square().sum(1)  # λ_k ‖(UᵀW*)_k‖²
    eta = 2.0 / float(lam.max() + lam.min())
    rate = (1 - eta * lam).abs()

    def excess_at(t: int) -> float:
        return 0.5 * float((weight * rate.pow(2 * t)).sum())

    steps = _first_step(excess_at, rel_tol * optimum, max_steps)
    info = {"lambda_max": float(lam.max()), "lambda_min": float(lam.min()), "eta": eta,
            "optimum": optimum, "target": (1 + rel_tol) * optimum}
    return info, steps, lambda t: optimum + excess_at(t)


def _logistic(xt: Tensor, y: Tensor, target: float, max_steps: int, rtol: float,
              ) -> tuple[dict[str, float], int | None, list[float]]:
    n = xt.shape[0]
    lam, _ = _nonnull(xt.T @ xt / n, rtol)
    eta = 2.0 / float(lam.max())  # 1/L with L = λ_max(H)/2 ≥ the softmax CE's curvature
    k = int(y.max()) + 1
    w = xt.new_zeros(xt.shape[1], k)
    onehot = F.one_hot(y, k).to(xt.dtype)
    losses: list[float] = []
    steps = None
    rows = torch.arange(n)
    for t in range(max_steps + 1):
        log_p = torch.log_softmax(xt @ w, 1)
        loss = -float(log_p[rows, y].mean())  # cross entropy
        losses.append(loss)
        if loss <= target:
            steps = t
            break
        if t < max_steps:
            w -= (eta / n) * (xt.T @ (log_p.exp() - onehot))
    info = {"lambda_max": float(lam.max()), "lambda_min": float(lam.min()), "eta": eta,
            "optimum": math.nan, "target": target}
    return info, steps, losses


def input_conditioning(
    x: Tensor | None = None,
    y: Tensor | None = None,
    *,
    preprocessings: Sequence[str] = tuple(PREPROCESSINGS),
    loss: Loss = "least_squares",
    eps: float = 1e-10,
    rel_tol: float = 0.01,
    target_loss: float = 0.1,
    max_steps: int | None = None,
    rtol: float = DEFAULT_RTOL,
    curve_points: int = 120,
) -> list[InputConditioning]:
    r"""Hessian condition number and GD steps to the target of a linear model per preprocessing.

    See the module docstring for the model, the closed-form GD, the step sizes and how constant
    features and null directions are handled.

    Args:
        x: inputs ``(n, *shape)``, e.g. digits' training set
            (:func:`normkit.experiments.data.load_inputs`); leaving it out is deprecated (it
            loads digits).
        y: integer labels ``(n,)`` (required with ``x``).
        preprocessings: labels of :data:`PREPROCESSINGS`. Default all four, in order.
        loss: ``"least_squares"`` (one-hot targets) or ``"logistic"`` (softmax CE).
        eps: ``InputNormalizer``'s ``eps`` (absolute; the default suits unit-scale data).
        rel_tol: least squares: target ``L ≤ (1 + rel_tol)·L*``. Default 0.01.
        target_loss: logistic: target training loss. Default 0.1.
        max_steps: GD budget; default ``10**9`` (least squares, closed form) or ``5000``.
        rtol: eigenvalues ``≤ rtol·λ_max`` are null. Default ``1e-10``.
        curve_points: samples of each loss curve (least squares). Default 120.

    Returns:
        One :class:`InputConditioning` per preprocessing, in order.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([1, 5, 50.]) + 7
        >>> y = torch.randint(0, 2, (200,), generator=g)
        >>> rows = input_conditioning(x, y)
        >>> [r.preprocessing for r in rows], round(rows[-1].cond, 6), rows[-1].steps
        (['raw', 'centred', 'standardized', 'whitened'], 1.0, 1)
        >>> [r.steps for r in rows] == sorted((r.steps for r in rows), reverse=True)
        True
    """
    if x is None:
        warnings.warn("input_conditioning() without inputs is deprecated: pass x, y, e.g. "
                      "normkit.experiments.data.load_inputs('digits')", DeprecationWarning,
                      stacklevel=2)
        x, y = _experiments_loader()()
    with torch.no_grad():
        return _input_conditioning(x, y, preprocessings, loss, eps, rel_tol, target_loss,
                                   max_steps, rtol, curve_points)


def _input_conditioning(x: Tensor, y: Tensor | None, preprocessings: Sequence[str], loss: Loss,
                        eps: float, rel_tol: float, target_loss: float, max_steps: int | None,
                        rtol: float, curve_points: int) -> list[InputConditioning]:
    if y is None:
        raise ConfigError("pass the labels y with the inputs x (integer classes, shape (n,))")
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ShapeError(f"expected x (n, *shape) and y (n,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    unknown = [p for p in preprocessings if p not in PREPROCESSINGS]
    if unknown or not preprocessings:
        raise ConfigError(f"preprocessings must be among {list(PREPROCESSINGS)}, got "
                          f"{list(preprocessings)}")
    if loss not in ("least_squares", "logistic"):
        raise ConfigError(f"loss must be 'least_squares' or 'logistic', got {loss!r}")
    if not rel_tol > 0 or not target_loss > 0:
        raise ConfigError(f"rel_tol and target_loss must be > 0, got {rel_tol}, {target_loss}")
    if max_steps is None:
        max_steps = 10**9 if loss == "least_squares" else 5000
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    x64, _ = drop_constant_features(x.flatten(1).to(torch.float64))
    y = y.to(torch.int64)
    y1 = F.one_hot(y, int(y.max()) + 1).to(torch.float64)
    rows: list[tuple[str, dict[str, float], int | None, object]] = []
    for label in preprocessings:
        method = PREPROCESSINGS[label]
        z = x64 if method is None else InputNormalizer(
            method=method, eps=eps, dtype=torch.float64).fit(x64)(x64)  # type: ignore[arg-type]
        xt = _with_bias(z, True)
        if loss == "least_squares":
            rows.append((label, *_least_squares(xt, y1, rel_tol, max_steps, rtol)))
        else:
            rows.append((label, *_logistic(xt, y, target_loss, max_steps, rtol)))
    reached = [s for _, _, s, _ in rows if s is not None]
    horizon = min(max_steps, max(10, 2 * max(reached, default=max_steps)))
    out = []
    for label, info, steps, curve in rows:
        if isinstance(curve, list):  # logistic: every step up to where it stopped
            grid = torch.arange(len(curve))
            values = torch.tensor(curve, dtype=torch.float64)
            final = curve[-1]
        else:
            grid = torch.unique(torch.logspace(0, math.log10(horizon), curve_points,
                                               dtype=torch.float64).round().long())
            grid = torch.cat([torch.zeros(1, dtype=torch.long), grid])
            values = torch.tensor([curve(int(t)) for t in grid], dtype=torch.float64)  # type: ignore[operator]
            final = curve(max_steps if steps is None else steps)  # type: ignore[operator]
        spectrum = torch.tensor([info["lambda_max"], info["lambda_min"]], dtype=torch.float64)
        out.append(InputConditioning(
            preprocessing=label, loss=loss, cond=condition_numbers(spectrum, (), rtol=0.0)["cond"],
            lambda_max=info["lambda_max"], lambda_min=info["lambda_min"], step_size=info["eta"],
            steps=steps, target=info["target"], final_loss=float(final),
            optimum_loss=info["optimum"], curve_steps=grid, curve_loss=values))
    return out


def kfac_factors(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor | None = None,
    loss_fn: LossFn | None = None,
    *,
    layers: Iterable[str] | None = None,
    bias: bool = False,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    r"""K-FAC factors ``(A, G)`` of every Linear/Conv layer, from the hooks of
    :func:`~normkit.analysis.conditioning.layer_statistics`.

    .. math::

        F_W \approx A \otimes G, \qquad A = \mathbb E[a a^\top], \qquad
        G = \mathbb E[\delta \delta^\top]

    ``a`` is the layer's input row (an im2col patch for a convolution) and ``δ`` the per-row
    output gradient (scaling in :mod:`normkit.analysis.conditioning`); ``A`` is uncentred, so a
    layer whose input is whitened (zero mean, identity covariance) has ``A = I``. With
    ``bias=True`` ``A`` is that of ``(a, 1)``, ``(d_in + 1)²``. ``G`` is ``None`` without a loss
    (no ``targets``/``loss_fn``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 3, generator=g) @ torch.tensor([[3.0, 0, 0], [1, 1, 0], [0, 2, 1]])
        >>> model = nn.Sequential(InputNormalizer(3, method="zca", eps=1e-9).fit(x), nn.Linear(3, 2))
        >>> a, g_factor = kfac_factors(model, x)["1"]
        >>> torch.allclose(a, torch.eye(3, dtype=torch.float64), atol=1e-5), g_factor
        (True, None)
    """
    stats = layer_statistics(model, inputs, targets, loss_fn, layers=layers,
                             keep_covariances=True)
    return {name: lc.kfac_factors(bias=bias) for name, lc in stats.items()}
