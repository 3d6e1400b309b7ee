r"""Hand-derived backwards for the scaling and robust operations (Online Normalization's control
process with the affine recovery, L1 and range standardization over the batch).

The pattern of :mod:`normkit.functional.fused`: each Function computes its forward in a few
passes, saves the input (already alive) and per-sample or per-channel statistics, and derives the
gradients in closed form. Shapes are the canonical view ``(N, A, B, S)``; statistics and
parameters are views broadcastable against it.

Online Normalization (Chiley et al. 2019) with ``y = γ x̂ + β``, ``x̂_t = (x_t − μ_t) s_t`` (the
streaming estimates before sample ``t``), ``g' = γ g`` and ``k = 1 − α_b``: the control process of
:func:`~normkit.functional.online.online_control_backward` needs only per-sample sums of the
gradient, because ``x̂`` is affine in ``x`` per sample:

.. math::
    \langle g' \hat x_t\rangle = \gamma s_t(\langle g x\rangle - \mu_t\langle g\rangle),\quad
    \langle \hat x_t^2\rangle = s_t^2\big(\sigma^2(x_t) + (\mu(x_t) - \mu_t)^2\big),

    \partial x_t = \gamma s_t\, g - k v_{t-1} s_t^2 (x_t - \mu_t) - k u_{t-1}

(``μ(x_t), σ²(x_t)`` the sample's own moments): two reductions and two passes for ``∂x``.

L1 and range standardization ``y = γ (x − μ)/(c\,\rho + ε) + β`` over the reduced axes (``M``
values, ``ρ = E|x − μ|`` or ``\max − \min``), ``r = 1/(cρ + ε)``, ``g' = γ g``:

.. math::
    \frac{\partial L}{\partial x} = r\,(g' - \langle g'\rangle)
        - c\,r^2 \Big(\sum g'(x - \mu)\Big)\,\frac{\partial \rho}{\partial x},

with ``∂ρ/∂x = (sign(x − μ) − ⟨sign(x − μ)⟩)/M`` (L1) or ``[x = \max]/n_{\max} − [x =
\min]/n_{\min}`` (range: ties share, as autograd's ``amax``/``amin``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .fused import _compute_dtype, _dot, _param_grad, _plain_vjp, _reduced
from .fused_online import linear_scan
from .merging import pool_moments
from .partition import as_dtype
from .statistics import compiling_kernels
from .whiten import _first_order

__all__ = ["constant_standardize", "moments", "moments_plain", "online_affine", "robust_scale", "robust_scale_plain",
           "standardize_affine", "standardize_affine_plain"]


def _last_first(t: Tensor, dims: tuple[int, ...], op: Any = torch.sum) -> Tensor:
    """``op`` (``torch.sum``, ``torch.amax``, ``torch.amin``) over ``dims`` (kept), the last
    (contiguous) axis first: several times faster on CPU than one reduction over ``(0, 3)``."""
    last = t.dim() - 1
    if last not in dims or len(dims) == 1:
        return op(t, dims, keepdim=True)
    rest = tuple(d for d in dims if d != last)
    return op(op(t, last, keepdim=True), rest, keepdim=True)


def _moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(μ, σ²)`` over ``dims`` (kept, biased), around the mean (no cancellation), each
    reduction over the last axis first (a vector norm over ``(0, 3)`` is ~10× one over the last
    axis on CPU).

    Compiled (inductor, not exported): one Welford reduction (``var_mean``) over the last axis
    per row, then the rows' moments pooled (:func:`~normkit.functional.merging.pool_moments`,
    exact for rows of equal size), which inductor fuses with any other reduction of the same
    rows — the pooled mean over positions of a conditional recovery (dynamic LN, ILM) no longer
    costs a pass of its own — and, over ``(N, S)``, runs faster than its one Welford reduction
    over both axes (conditional BN's forward 1.14x → 0.81x compiled BN's, minima)."""
    last = x.dim() - 1
    if compiling_kernels() and last in dims and len(dims) > 1:
        var, mean = torch.var_mean(x, last, correction=0, keepdim=True)
        return pool_moments(mean, var, tuple(d for d in dims if d != last))
    big = _reduced(x, dims)
    mean = _last_first(x, dims) / big
    d = x - mean
    if last in dims:
        ss = torch.linalg.vector_norm(d, 2, (last,), keepdim=True).square()
        rest = tuple(k for k in dims if k != last)
        ss = ss.sum(rest, keepdim=True) if rest else ss
    else:
        ss = torch.linalg.vector_norm(d, 2, dims, keepdim=True).square()
    return mean, ss / big


def _control(gy: Tensor, yy: Tensor, hm_of: Any, u: Tensor, v: Tensor, k: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two recursions of the control process over the samples (small tensors), as linear
    scans (:func:`~normkit.functional.fused_online.linear_scan`): ``v`` from ``gy = ⟨g' x̂⟩``
    and ``yy = ⟨x̂²⟩``, then ``u`` from ``hm_of(v_before) = ⟨h⟩``. Returns
    ``(v_before, u_before, v_T, u_T)``."""
    # v_t = v_{t−1} + ⟨g'_t x̂_t⟩ − k v_{t−1} ⟨x̂_t²⟩
    v_before, v = linear_scan(1 - k * yy, gy, v)
    hm = hm_of(v_before)
    # u_t = u_{t−1} + ⟨h_t⟩ − k u_{t−1}
    u_before, u = linear_scan(hm.new_full((1,) * hm.dim(), 1 - k), hm, u)
    return v_before, u_before, v, u


class _OnlineAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, scale: Tensor,  # type: ignore[override]
                sample_mean: Tensor, sample_var: Tensor, weight: Tensor | None,
                bias: Tensor | None, grad_mean: Tensor, grad_proj: Tensor, k: float) -> Tensor:
        a = scale if weight is None else scale * weight
        b = -mean * a
        b = b if bias is None else b + bias
        ctx.save_for_backward(x, mean, scale, sample_mean, sample_var, weight, bias)
        ctx.buffers, ctx.k = (grad_mean, grad_proj), k
        return (x * a).add_(b)  # mul + add: a broadcasting addcmul is slower on CPU

    @staticmethod
    @_first_order("Online Normalization's control-process backward",
                  "second derivatives through streaming statistics are not defined")
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, s, sm, sv, weight, bias = ctx.saved_tensors
        grad_mean, grad_proj = ctx.buffers
        k, size = ctx.k, x.shape[-1]
        g = as_dtype(g, x.dtype)
        last = (x.dim() - 1,)
        g_sum = g.sum(last, keepdim=True)  # Σ g per sample and channel
        gxh = s * (_dot(g, x, last) - mean * g_sum)  # Σ g x̂
        w = None if weight is None else as_dtype(weight, x.dtype)
        ws = s if w is None else s * w  # γ s
        gy = (gxh if w is None else gxh * w) / size  # ⟨g' x̂⟩
        s2 = s * s
        dev = sm - mean  # ⟨x − μ_t⟩
        yy = s2 * (sv + dev * dev)  # ⟨x̂²⟩
        shape = mean.shape[1:]
        u0, v0 = (t.reshape(shape).to(x.dtype) for t in (grad_mean, grad_proj))
        gm = ws * g_sum / size  # ⟨γ s g⟩
        v_b, u_b, v, u = _control(gy, yy, lambda vb: gm - k * vb * s2 * dev, u0, v0, k)
        grad_mean.copy_(u.reshape(-1))
        grad_proj.copy_(v.reshape(-1))
        c2 = -k * v_b * s2  # ∂x = γ s g + c2 (x − μ_t) − k u_{t−1}
        dx = (g * ws).add_(-(c2 * mean) - k * u_b).addcmul_(x, c2)
        g_weight = _param_grad(weight, gxh)
        g_bias = _param_grad(bias, g_sum)
        return dx, None, None, None, None, g_weight, g_bias, None, None, None


def online_affine(x: Tensor, mean: Tensor, scale: Tensor, *, sample_mean: Tensor,
                  sample_var: Tensor, weight: Tensor | None, bias: Tensor | None,
                  grad_mean: Tensor, grad_proj: Tensor, k: float) -> Tensor:
    r"""``y = γ (x − μ_t) s_t + β`` per sample with Online Normalization's control-process
    backward (see the module docstring), updating the control buffers ``u`` (``grad_mean``) and
    ``v`` (``grad_proj``) in place when the backward runs. The statistics are constants: the
    control process replaces differentiation through them.

    Args:
        x: the canonical view ``(N, A, B, S)`` (≥ float32).
        mean, scale: ``μ_t`` and ``s_t = 1/√(σ²_t + ε)`` each sample is normalized with,
            ``(N, A, B, 1)``.
        sample_mean, sample_var: each sample's own moments over ``S`` (biased), ``(N, A, B, 1)``.
        weight, bias: ``γ, β`` broadcastable against ``x`` (``(1, A, B, 1)``), or ``None``.
        grad_mean, grad_proj: the control buffers ``u``, ``v`` (``A·B`` values).
        k: ``1 − α_b`` (> 0).

    Example:
        >>> x = torch.randn(3, 2, 1, 5, dtype=torch.float64)
        >>> m, s = torch.zeros(3, 2, 1, 1, dtype=x.dtype), torch.ones(3, 2, 1, 1, dtype=x.dtype)
        >>> u, v = torch.zeros(2, dtype=x.dtype), torch.zeros(2, dtype=x.dtype)
        >>> sv, sm = torch.var_mean(x, 3, correction=0, keepdim=True)
        >>> y = online_affine(x, m, s, sample_mean=sm, sample_var=sv, weight=None, bias=None,
        ...                   grad_mean=u, grad_proj=v, k=0.1)
        >>> torch.equal(y, x)
        True
    """
    return _OnlineAffine.apply(x, mean.detach(), scale.detach(),  # type: ignore[no-any-return]
                               sample_mean.detach(), sample_var.detach(), weight, bias,
                               grad_mean, grad_proj, k)


def _sum_dot(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ a·b`` over ``dims`` (kept): a batched dot product over the last axis, then a sum of
    the small result over the others."""
    last = a.dim() - 1
    if last not in dims:
        return (a * b).sum(dims, keepdim=True)
    out = _dot(a, b, (last,))
    rest = tuple(d for d in dims if d != last)
    return out.sum(rest, keepdim=True) if rest else out


def _mask(x: Tensor, value: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``[x = value]`` as floats (a comparison written straight into a float tensor: no bool
    tensor, slow on CPU) and its count over ``dims``. The float tensor is contiguous whatever
    ``x``'s layout: dynamo cannot trace an ``out=`` into a non-contiguous (e.g. channels-last)
    tensor."""
    e = torch.eq(x, value, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return e, _last_first(e, dims)


class _RobustScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, mean: Tensor, scale: Tensor,  # type: ignore[override]
                weight: Tensor | None, bias: Tensor | None, eps: float, dims: tuple[int, ...],
                kind: str, c: float) -> Tensor:
        x = as_dtype(v, _compute_dtype(v))
        r = 1.0 / (as_dtype(scale, x.dtype) + eps)
        mean = as_dtype(mean, x.dtype)
        a = r if weight is None else r * as_dtype(weight, x.dtype)
        b = -mean * a
        b = b if bias is None else b + as_dtype(bias, x.dtype)
        ctx.save_for_backward(v, mean, r, weight, bias)
        ctx.eps, ctx.dims, ctx.kind, ctx.c = eps, dims, kind, c
        return (x * a).add_(b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, mean, r, weight, bias = ctx.saved_tensors
        dims, kind, c = ctx.dims, ctx.kind, ctx.c
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            dv, dw, db = _plain_vjp(robust_scale_plain, (v, weight, bias, ctx.eps, dims, kind, c),
                                    g)[:3]
            return dv, None, None, dw, db, None, None, None, None
        x = as_dtype(v, r.dtype)
        g = as_dtype(g, r.dtype)
        g_sum = _last_first(g, dims)
        k = _sum_dot(g, x, dims) - mean * g_sum  # Σ g (x − μ)
        g_weight = _param_grad(weight, r * k) if weight is not None else None
        g_bias = _param_grad(bias, g_sum)
        dx = None
        if ctx.needs_input_grad[0]:
            w = r if weight is None else r * as_dtype(weight, r.dtype)  # γ r
            big = _reduced(x, dims)
            q = c * r * w * k  # c γ r² Σ g (x − μ): the factor of ∂ρ/∂x
            if kind == "l1":  # ∂ρ/∂x = (sign(x − μ) − ⟨sign⟩)/M
                s = torch.sub(x, mean).sign_()
                q = q / big
                dx = (g * w).add_(q * _last_first(s, dims) / big - w * g_sum / big)
                dx = dx.addcmul_(s, q, value=-1)
            else:  # ∂ρ/∂x = [x = max]/n_max − [x = min]/n_min (ties share, as amax/amin)
                e_max, n_max = _mask(x, _last_first(x, dims, torch.amax), dims)
                e_min, n_min = _mask(x, _last_first(x, dims, torch.amin), dims)
                dx = (g * w).add_(-w * g_sum / big)
                dx = dx.addcmul_(e_max, q / n_max, value=-1).addcmul_(e_min, q / n_min)
            dx = as_dtype(dx, v.dtype)
        return dx, None, None, g_weight, g_bias, None, None, None, None


def robust_scale(v: Tensor, dims: tuple[int, ...], *, kind: str, mean: Tensor, scale: Tensor,
                 c: float, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    r"""L1 (``kind="l1"``) or range (``"range"``) standardization ``y = γ (x − μ)/(cρ + ε) +
    β`` over ``dims`` with the hand-derived backward (see the module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)``.
        dims: the reduced axes; ``γ, β`` must be constant along them.
        kind: ``"l1"`` (``ρ = E|x − μ|``) or ``"range"`` (``ρ = max − min``).
        mean, scale: ``μ`` and ``cρ`` of ``v`` over ``dims`` (their derivative is still taken).
        c: the constant ``c`` of ``cρ``.
        weight, bias: ``γ, β`` broadcastable against ``v``, or ``None``.
        eps: the stability constant.

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> mu = x.mean((0, 3), keepdim=True)
        >>> rho = x.amax((0, 3), keepdim=True) - x.amin((0, 3), keepdim=True)
        >>> y = robust_scale(x, (0, 3), kind="range", mean=mu, scale=0.5 * rho, c=0.5,
        ...                  weight=None, bias=None, eps=1e-5)
        >>> torch.allclose(y, (x - mu) / (0.5 * rho + 1e-5))
        True
    """
    return _RobustScale.apply(v, mean.detach(), scale.detach(), weight, bias,  # type: ignore[no-any-return]
                              eps, tuple(dims), kind, c)


def robust_scale_plain(v: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                       dims: tuple[int, ...], kind: str, c: float) -> Tensor:
    """:func:`robust_scale` as the plain autograd composition of its formula."""
    x = as_dtype(v, _compute_dtype(v))
    mean = x.mean(dims, keepdim=True)
    rho = ((x - mean).abs().mean(dims, keepdim=True) if kind == "l1"
           else x.amax(dims, keepdim=True) - x.amin(dims, keepdim=True))
    y = (x - mean) / (c * rho + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


class _Moments(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, dims: tuple[int, ...]  # type: ignore[override]
                ) -> tuple[Tensor, Tensor]:
        mean, var = _moments(as_dtype(v, _compute_dtype(v)), dims)
        ctx.save_for_backward(v, mean)
        ctx.dims = dims
        return mean, var

    @staticmethod
    def backward(ctx: Any, g_mean: Tensor, g_var: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor | None, None]:
        v, mean = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            y = moments_plain(v, ctx.dims)
            (dv,) = torch.autograd.grad(y, v, (g_mean, g_var), create_graph=True)
            return dv, None
        x = as_dtype(v, mean.dtype)
        big = _reduced(x, ctx.dims)
        c = g_var * (2.0 / big)  # ∂σ²/∂x = 2(x − μ)/M, ∂μ/∂x = 1/M
        dx = (x * c).add_(g_mean / big - c * mean)
        return as_dtype(dx, v.dtype), None


def moments(v: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    r"""``(μ, σ²)`` over ``dims`` (kept; biased; ≥ float32) in three passes (the mean, then
    ``‖x − μ‖²``), with a backward of two: ``∂x = g_μ/M + 2 g_{σ²}(x − μ)/M``.

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> mean, var = moments(x, (0, 3))
        >>> torch.allclose(var, x.var((0, 3), correction=0, keepdim=True))
        True
    """
    return _Moments.apply(v, tuple(dims))  # type: ignore[no-any-return]


def moments_plain(v: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """:func:`moments` as the plain autograd composition."""
    x = as_dtype(v, _compute_dtype(v))
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).square().mean(dims, keepdim=True)


class _StandardizeAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, mean: Tensor, var: Tensor,  # type: ignore[override]
                weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        x = as_dtype(v, _compute_dtype(v))
        s = torch.rsqrt(var + eps)
        a = s if weight is None else s * as_dtype(weight, x.dtype)
        b = -mean * a
        b = b if bias is None else b + as_dtype(bias, x.dtype)
        ctx.save_for_backward(v, mean, var, s, weight, bias)
        ctx.eps = eps
        return (x * a).add_(b)  # mul + add: a broadcasting addcmul is slower on CPU

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, mean, var, s, weight, bias = ctx.saved_tensors
        # the axes the statistics broadcast along (size-1 axes of the input included: a sum
        # over none would reduce everything)
        dims = tuple(d for d in range(v.dim()) if s.shape[d] == 1)
        if torch.is_grad_enabled() or not dims:  # create_graph: differentiate the composition
            with torch.enable_grad():
                return (*_plain_vjp(standardize_affine_plain,
                                    (v, mean, var, weight, bias, ctx.eps), g)[:5], None)
        x = as_dtype(v, s.dtype)
        g = as_dtype(g, s.dtype)
        g_sum = _last_first(g, dims)
        k = _sum_dot(g, x, dims) - mean * g_sum  # Σ g (x − μ)
        w = s if weight is None else s * as_dtype(weight, s.dtype)  # γ s
        need = ctx.needs_input_grad
        dx = (g * w).to(v.dtype) if need[0] else None
        g_mean = -(w * g_sum) if need[1] else None
        g_var = (-0.5 * s * s) * w * k if need[2] else None
        g_weight = _param_grad(weight, s * k) if weight is not None else None
        g_bias = _param_grad(bias, g_sum)
        return dx, g_mean, g_var, g_weight, g_bias, None


def standardize_affine(v: Tensor, mean: Tensor, var: Tensor, *, weight: Tensor | None,
                       bias: Tensor | None, eps: float) -> Tensor:
    r"""``y = γ (x − μ)/√(σ² + ε) + β`` with ``μ, σ²`` inputs that keep their gradient (from
    :func:`moments` through any blend with other statistics): the backward gives
    ``∂x = γ s g`` directly and ``∂μ = −γ s Σ g``, ``∂σ² = −½ γ s³ Σ g (x − μ)`` over the axes the
    statistics broadcast along (``s = (σ² + ε)^{−1/2}``), in three passes.

    Args:
        v: the canonical view ``(N, A, B, S)``.
        mean, var: the statistics, broadcastable against ``v``.
        weight, bias: ``γ, β``, constant along the axes ``mean`` broadcasts along, or ``None``.
        eps: the stability constant.

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> mean, var = moments(x, (0, 3))
        >>> y = standardize_affine(x, mean, var, weight=None, bias=None, eps=1e-5)
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True))
        True
    """
    return _StandardizeAffine.apply(v, mean, var, weight, bias, eps)  # type: ignore[no-any-return]


def standardize_affine_plain(v: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                             bias: Tensor | None, eps: float) -> Tensor:
    """:func:`standardize_affine` as the plain autograd composition."""
    y = (as_dtype(v, _compute_dtype(v)) - mean) * torch.rsqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def constant_standardize(v: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                         bias: Tensor | None, eps: float) -> Tensor | None:
    """``γ (x − μ)/√(σ² + ε) + β`` with constant per-channel statistics (evaluation with the
    running estimates) through BN's evaluation kernel, in one pass; ``None`` where the
    statistics or ``γ, β`` are not one value per channel of the ``(N, C, 1, S)`` view.

    Example:
        >>> x = torch.randn(4, 3, 1, 5)
        >>> mean, var = torch.randn(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.5
        >>> y = constant_standardize(x, mean, var, None, None, 1e-5)
        >>> torch.allclose(y, (x - mean) / (var + 1e-5).sqrt(), atol=1e-6)
        True
    """
    n, c, b, _ = v.shape
    if b != 1 or any(t is not None and t.numel() != c for t in (mean, var, weight, bias)):
        return None
    if mean.shape[1] != c or var.shape[1] != c:
        return None
    x = v.to(torch.promote_types(v.dtype, mean.dtype)).reshape(n, c, -1)
    flat = [None if t is None else t.reshape(-1).to(x.dtype) for t in (weight, bias)]
    y = torch.batch_norm(x, flat[0], flat[1], mean.reshape(-1).to(x.dtype),
                         var.reshape(-1).to(x.dtype), False, 0.0, eps, False)
    return y.reshape(v.shape)
