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
from .whiten import _first_order

__all__ = ["online_affine", "robust_scale", "robust_scale_plain"]


def _control(gy: Tensor, yy: Tensor, hm_of: Any, u: Tensor, v: Tensor, k: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two recursions of the control process over the samples (small tensors): ``v`` from
    ``gy = ⟨g' x̂⟩`` and ``yy = ⟨x̂²⟩``, then ``u`` from ``hm_of(v_before) = ⟨h⟩``. Returns
    ``(v_before, u_before, v_T, u_T)``."""
    vs = []
    for t in range(gy.shape[0]):  # v_t = v_{t−1} + ⟨g'_t x̂_t⟩ − k v_{t−1} ⟨x̂_t²⟩
        vs.append(v)
        v = v + gy[t] - k * v * yy[t]
    v_before = torch.stack(vs)
    hm = hm_of(v_before)
    us = []
    for t in range(gy.shape[0]):  # u_t = u_{t−1} + ⟨h_t⟩ − k u_{t−1}
        us.append(u)
        u = u + hm[t] - k * u
    return v_before, torch.stack(us), v, u


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
        return torch.addcmul(b, x, a)

    @staticmethod
    @_first_order("Online Normalization's control-process backward",
                  "second derivatives through streaming statistics are not defined")
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, s, sm, sv, weight, bias = ctx.saved_tensors
        grad_mean, grad_proj = ctx.buffers
        k, size = ctx.k, x.shape[-1]
        g = g.to(x.dtype)
        last = (x.dim() - 1,)
        g_sum = g.sum(last, keepdim=True)  # Σ g per sample and channel
        gxh = s * (_dot(g, x, last) - mean * g_sum)  # Σ g x̂
        w = None if weight is None else weight.to(x.dtype)
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
        dx = torch.addcmul(-(c2 * mean) - k * u_b, g, ws).addcmul_(x, c2)
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
