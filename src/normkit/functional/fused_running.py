r"""Standardization and scaling whose *backward* averages statistics over training iterations,
as autograd Functions that read (and, on a recording step, update) module state when the
backward runs: moving-average BN's backward (Yan et al. 2020, :func:`moving_average_standardize`)
and PowerNorm's approximate backward (Shen et al. 2020, :func:`power_scale`).

Both are the paper's approximations, not the derivative of their forward, and first order only.
They save the input and per-channel statistics: the backward's batch terms come from ``Σ g`` and
one batched dot product ``Σ g·x`` over the reduced axes, and ``∂x`` is two or three passes.

With ``g = γ·∂L/∂y`` (``γ`` folded into the per-channel sums when it is constant along the
reduced axes) and means ``E`` over the batch area:

.. math::
    \text{MABN:}\quad \frac{\partial L}{\partial x} = \frac{1}{\bar\sigma}\big(g - \bar g -
    \hat{x}\,\bar\psi\big),\qquad \bar g = \overline{\mathrm{E}[g]},\ \
    \bar\psi = \overline{\mathrm{E}[g\,\hat{x}]}

(the bar: the average over the current and the recorded earlier backward passes), and

.. math::
    \text{PowerNorm:}\quad \frac{\partial L}{\partial x} = \frac{g - c\,\hat{x}}{\sqrt{ms + \epsilon}},
    \qquad c = \nu_{t-1} \text{ past the warm-up, else } \Lambda = \mathrm{E}[g\,\hat{x}],
    \qquad \nu_t = \nu_{t-1}\big(1 - (1 - \alpha)\Gamma\big) + (1 - \alpha)\Lambda

(``Γ = E[x̂²]``). The operations that use them are :class:`~normkit.nop.MovingAverageStandardize`
and :class:`~normkit.nop.PowerScale`, which own the history buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .fused import _reduced, _sum_sq
from .fused_robust import _last_first, _sum_dot
from .merging import weighted_mean
from .partition import as_dtype
from .statistics import no_grad
from .whiten import _first_order

__all__ = ["moving_average_standardize", "power_scale", "push_history", "with_history"]


@no_grad
def push_history(history: Tensor, weight: Tensor, entry: Tensor) -> None:
    """Shift register ``(k, …)``: ``entry`` becomes ``history[0]`` (weight 1), the oldest entry
    drops out; ``weight`` ``(k,)`` moves with it.

    Example:
        >>> h, w = torch.zeros(2, 3), torch.zeros(2)
        >>> push_history(h, w, torch.ones(3)); push_history(h, w, 2 * torch.ones(3))
        >>> h[:, 0].tolist(), w.tolist()
        ([2.0, 1.0], [1.0, 1.0])
    """
    history.copy_(torch.cat([entry.unsqueeze(0).to(history.dtype), history[:-1]]))
    weight.copy_(torch.cat([weight.new_ones(1), weight[:-1]]))


def with_history(current: Tensor, history: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The current pair ``(2, size)`` (weight 1) stacked above the ``history`` ``(k, 2, size)``,
    and the weights ``(1 + k, 1, 1)``: the groups that
    :func:`~normkit.functional.merging.pool_moments` and
    :func:`~normkit.functional.merging.weighted_mean` average over axis 0 (both pair members at
    once).

    Example:
        >>> rows, w = with_history(torch.ones(2, 3), torch.zeros(4, 2, 3), torch.zeros(4))
        >>> tuple(rows.shape), tuple(w.shape), w.flatten().tolist()
        ((5, 2, 3), (5, 1, 1), [1.0, 0.0, 0.0, 0.0, 0.0])
    """
    rows = torch.cat([current.unsqueeze(0), as_dtype(history, current.dtype)])
    w = torch.cat([weight.new_ones(1), weight]).to(current.dtype)
    return rows, w.reshape(-1, 1, 1)


def _fold(v: Tensor, gy: Tensor, weight: Tensor | None, dims: tuple[int, ...],
          dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The backward's common start: ``x, ∂L/∂y`` in ``dtype``, ``g`` (``γ·∂L/∂y`` unless ``γ`` is
    constant along the reduced ``dims``, when it folds into the per-channel sums instead) and
    whether it folds."""
    folded = weight is None or all(weight.shape[d] == 1 for d in dims)
    gy = as_dtype(gy, dtype)
    g = gy if folded or weight is None else gy * weight
    return as_dtype(v, dtype), gy, g, folded


class _MovingAverageBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, mean, var, weight, bias, eps, dims, history, hweight, gate, record):  # type: ignore[override]
        inv = torch.rsqrt(var + eps)
        a = inv if weight is None else inv * weight
        b = -mean * a
        b = b if bias is None else b + bias
        ctx.save_for_backward(v, mean, inv, weight)
        ctx.dims, ctx.in_dtype = dims, v.dtype
        ctx.history, ctx.hweight, ctx.gate, ctx.record = history, hweight, gate, record
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        return (as_dtype(v, mean.dtype) * a).add_(b)  # mul + add: a broadcasting addcmul is slower

    @staticmethod
    @_first_order("MABN's moving-average backward",
                  "use cross_iteration_bn (plain autograd) where second derivatives are needed")
    def backward(ctx, gy):  # type: ignore[override]
        v, mean, inv, weight = ctx.saved_tensors
        dims = ctx.dims
        x, gy, g, folded = _fold(v, gy, weight, dims, inv.dtype)
        w = 1.0 if not folded or weight is None else weight
        big = _reduced(x, dims)
        g_sum = _last_first(g, dims)
        dot = _sum_dot(g, x, dims)  # Σ g x
        g_mean = w * g_sum / big  # E[g'], g' = γ·∂L/∂y
        psi = w * inv * (dot - mean * g_sum) / big  # E[g' x̂]
        g_bar, psi_bar = g_mean, psi
        if ctx.history is not None:
            hw = ctx.hweight.to(inv.dtype) * ctx.gate
            current = torch.stack([g_mean.reshape(-1), psi.reshape(-1)])
            bar = weighted_mean(*with_history(current, ctx.history, hw), (0,))[0]
            g_bar, psi_bar = bar[0].reshape(g_mean.shape), bar[1].reshape(psi.shape)
            if ctx.record:
                push_history(ctx.history, ctx.hweight, current)
        c2 = -(inv * inv * psi_bar)  # ∂x = (g' − ḡ − x̂ ψ̄)·s
        gx = (g * (w * inv)).add_(-(inv * g_bar) - c2 * mean).addcmul_(x, c2).to(ctx.in_dtype)
        gw = gb = None
        if weight is not None:
            gw = (inv * (dot - mean * g_sum) if folded else gy * (x - mean) * inv)
            gw = gw.sum_to_size(weight.shape).to(weight.dtype)
        if ctx.bias is not None:
            gb = (g_sum if folded else gy).sum_to_size(ctx.bias[0]).to(ctx.bias[1])
        return gx, None, None, gw, gb, None, None, None, None, None, None


def moving_average_standardize(
    v: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, dims: Sequence[int], *, history: Tensor | None = None,
    history_weight: Tensor | None = None, gate: Tensor | None = None, record: bool = False,
) -> Tensor:
    r"""``y = γ(x − μ̄)/√(σ̄² + ε) + β`` with MABN's moving-average backward (module docstring):
    ``∂x = (g − ḡ − x̂ ψ̄)/σ̄`` with ``ḡ, ψ̄`` averaged over this backward pass and the recorded
    ones in ``history`` ``(k, 2, C)`` (weights ``history_weight`` ``(k,)`` times ``gate``, a 0-d
    0/1 tensor), read when the backward runs; with ``record`` the backward pushes its own
    ``(E[g'], E[g' x̂])`` into the history. Without a history, and with ``mean, var`` the
    batch's own (biased) statistics of ``v`` over ``dims``, this is BN's exact gradient.

    Args:
        v: the input (any shape); ``mean, var, weight, bias`` broadcast against it, constant
            along ``dims`` (``weight``, ``bias`` may be ``None``).
        dims: the reduced axes of the statistics.

    Example:
        >>> x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
        >>> mu, var = x.mean((0, 2), keepdim=True), x.var((0, 2), correction=0, keepdim=True)
        >>> y = moving_average_standardize(x, mu.detach(), var.detach(), None, None, 1e-5, (0, 2))
        >>> ref = (x - mu) / (var + 1e-5).sqrt()
        >>> g = torch.randn_like(y)
        >>> torch.allclose(y, ref), torch.allclose(*(torch.autograd.grad(t, x, g)[0] for t in (y, ref)))
        (True, True)
    """
    return _MovingAverageBackward.apply(  # type: ignore[no-any-return]
        v, mean, var, weight, bias, eps, tuple(dims), history, history_weight, gate, record)


class _PowerBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, ms, weight, bias, eps, dims, nu, gate, alpha, record,  # type: ignore[override]
                batch_ms=None):
        inv = torch.rsqrt(ms + eps)
        x = as_dtype(v, ms.dtype)
        a = inv if weight is None else inv * weight
        y = x * a
        y = y if bias is None else y.add_(bias)  # mul + add: a broadcasting addcmul is slower
        if batch_ms is None:  # E_B[x²] for Γ (the module hands the one fit computed)
            batch_ms = ms if not record else _sum_sq(x, dims) / _reduced(x, dims)
        ctx.save_for_backward(v, inv, batch_ms, weight)
        ctx.dims, ctx.in_dtype = dims, v.dtype
        ctx.nu, ctx.gate, ctx.alpha, ctx.record = nu, gate, alpha, record
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        return y

    @staticmethod
    @_first_order("PowerNorm's approximate backward",
                  "use alpha_bkw=1 (plain autograd) where second derivatives are needed")
    def backward(ctx, gy):  # type: ignore[override]
        v, inv, batch_ms, weight = ctx.saved_tensors
        dims = ctx.dims
        x, gy, g, folded = _fold(v, gy, weight, dims, inv.dtype)
        w = weight if folded and weight is not None else None
        dot = _sum_dot(g, x, dims)  # Σ g x
        wi = inv if w is None else inv * w  # γ r
        lam = wi * dot / _reduced(x, dims)  # Λ = E[g'·x̂]
        nu = ctx.nu.to(inv.dtype).reshape(lam.shape)  # ν_{t−1}
        c = torch.where(ctx.gate, nu, lam)
        gx = (g * wi).addcmul_(x, c * inv * inv, value=-1).to(ctx.in_dtype)
        if ctx.record:
            k = 1 - ctx.alpha
            gamma = inv * inv * as_dtype(batch_ms, inv.dtype).reshape(lam.shape)  # Γ = E[x̂²]
            ctx.nu.copy_((nu * (1 - k * gamma) + k * lam).reshape(-1))
        gw = gb = None
        if weight is not None:
            gw = (inv * dot if folded else gy * x * inv).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.bias is not None:
            gb = gy.sum_to_size(ctx.bias[0]).to(ctx.bias[1])
        return gx, None, gw, gb, None, None, None, None, None, None, None


def power_scale(
    v: Tensor, ms: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    dims: Sequence[int], *, nu: Tensor, gate: Tensor, alpha: float, record: bool,
    batch_ms: Tensor | None = None,
) -> Tensor:
    r"""``y = γ·x/√(ms + ε) + β`` with PowerNorm's backward (module docstring):
    ``∂x = (g − c·x̂)/√(ms + ε)``, ``c = ν`` where ``gate`` (a 0-d bool tensor: past the
    warm-up) else ``Λ = E[g·x̂]`` (the exact gradient of RMS batch normalization when ``ms`` is
    the batch's). ``nu`` ``(C,)`` is read, and with ``record`` updated in place, when the
    backward runs; ``alpha`` is ``α_bkw``; ``batch_ms`` the batch's ``E[x²]`` for ``Γ`` (computed
    from ``v`` when ``None`` and recording).

    Args:
        v: the input; ``ms, weight, bias`` broadcast against it, constant along ``dims``.
        dims: the reduced axes of the statistics.

    Example:
        >>> x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
        >>> ms = x.square().mean((0, 2), keepdim=True)
        >>> nu = torch.zeros(3, dtype=torch.float64)
        >>> y = power_scale(x, ms.detach(), None, None, 1e-5, (0, 2), nu=nu,
        ...                 gate=torch.tensor(False), alpha=0.9, record=True)
        >>> ref = x / (ms + 1e-5).sqrt()   # during the warm-up: RMS batch normalization
        >>> g = torch.randn_like(y)
        >>> torch.allclose(y, ref), torch.allclose(*(torch.autograd.grad(t, x, g)[0] for t in (y, ref)))
        (True, True)
        >>> bool(nu.abs().sum() > 0)   # ν recorded by the backward
        True
    """
    return _PowerBackward.apply(  # type: ignore[no-any-return]
        v, ms, weight, bias, eps, tuple(dims), nu, gate, alpha, record, batch_ms)
