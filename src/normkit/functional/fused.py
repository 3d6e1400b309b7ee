r"""Hand-derived backwards for the composite operations (FRN + TLU, EvoNorm-S0, EvoNorm-B0).

Autograd through a composition of ``k`` elementwise ops and reductions makes about ``2k``
passes over the activations and saves most intermediates. Each Function here computes the
forward in a few passes, saves the input (already alive) and per-sample statistics — plus at
most a 1-byte mask — and derives the input gradient in closed form, so the backward reads the
activations a few times. Shapes are the canonical view ``(N, A, B, S)``; ``dims`` are the
reduced axes of the statistic (per sample: never ``0``); parameters are views broadcastable
against it (``(1, A, B, 1)``). The statistics are computed in at least float32 (the output has
that dtype; the caller casts back). A second derivative (``create_graph=True``) differentiates
the plain composition instead (:func:`frn_plain`, :func:`evo_s0_plain`): exact, at autograd's
cost.

FRN + TLU (Singh & Krishnan 2020), with ``M`` the number of reduced values and
``r = (\nu^2 + \epsilon)^{-1/2}``, ``\nu^2 = \frac1M\sum x^2``:

.. math::
    y = \max(\gamma r x + \beta,\ \tau),\qquad
    \frac{\partial L}{\partial x} = \gamma r\Big(g_m - x\,r^2\,\frac{1}{M}\sum g_m x\Big),\quad
    g_m = g\,[\gamma r x + \beta > \tau]

EvoNorm-S0 (Liu et al. 2020), ``s = \mathrm{sigmoid}(v x)``, ``d = (\sigma^2 + \epsilon)^{-1/2}``
with ``\sigma^2`` the (biased) variance over the group:

.. math::
    y = \gamma\,d\,x s + \beta,\qquad
    \frac{\partial L}{\partial x} = g_\gamma d\, s\,(1 + v x (1 - s))
        - (x - \mu)\,d^3\,\frac{1}{M}\sum g_\gamma x s,\quad g_\gamma = \gamma g

EvoNorm-B0, ``A = \sqrt{\sigma_B^2 + \epsilon}`` per channel (batch), ``B = v x +
\sqrt{\sigma_I^2 + \epsilon}`` per element (``\sigma_I^2`` per sample and channel), ``y =
\gamma x/\max(A, B) + \beta``: where ``B > A`` the element's gradient runs through ``x``, ``v``
and ``\sigma_I``, elsewhere through ``x`` and ``\sigma_B`` (:func:`evo_b0`).

Compiled (``torch.compiler.is_compiling()``), the EvoNorm backwards write the same sums as
expressions inductor fuses (:mod:`normkit.functional.fused_inductor`): eager's products, made
once and reused in place, are what inductor would write to memory; EvoNorm-S0's gate is made
once, in the forward, and kept for the backward
(:func:`~normkit.functional.fused_inductor.apply_saving`: a sigmoid costs more than reading it
back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .fused_inductor import _evo_b0_sums_inline, _evo_s0_sums_inline, apply_saving
from .partition import as_dtype

__all__ = ["evo_b0", "evo_b0_plain", "evo_s0", "evo_s0_plain", "frn", "frn_plain"]


def _compute_dtype(v: Tensor) -> torch.dtype:
    return torch.promote_types(v.dtype, torch.float32)


def _reduced(x: Tensor, dims: Sequence[int]) -> int:
    n = 1
    for d in dims:  # a loop, not a generator: torch.compile traces the backward too
        n *= x.shape[d]
    return n


def _trailing(x: Tensor, dims: Sequence[int]) -> bool:
    return x.is_contiguous() and sorted(dims) == list(range(x.dim() - len(dims), x.dim()))


def _sum_sq(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ x²`` over ``dims`` (kept), in one pass."""
    return torch.linalg.vector_norm(x, 2, dims, keepdim=True).square()


def _var_mean(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(σ², μ)`` over ``dims`` (kept, biased): two passes around the mean (no cancellation),
    several times faster than ``torch.var_mean`` over several axes on CPU."""
    mean = x.mean(dims, keepdim=True)
    return _sum_sq(x - mean, dims) / _reduced(x, dims), mean


def _dot(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ a·b`` over ``dims`` (kept): one pass (a batched dot product) when ``dims`` are the
    trailing axes of contiguous tensors of one shape."""
    if a.shape == b.shape and _trailing(a, dims) and _trailing(b, dims):
        k = len(dims)
        lead, m = a.shape[: a.dim() - k], math.prod(a.shape[a.dim() - k:])
        out = torch.bmm(a.reshape(-1, 1, m), b.reshape(-1, m, 1))
        return out.reshape(*lead, *([1] * k))
    return (a * b).sum(dims, keepdim=True)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a·b`` over the last axis (kept). ``torch.linalg.vecdot`` (a product and a sum): on
    CPU 2–4× faster than :func:`_dot`'s ``bmm`` of many 1×S by S×1 products at S = 256."""
    return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)


def _plain_vjp(plain: Any, args: tuple[Any, ...], g: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients of ``plain(*args)`` for the tensors of ``args`` that need one, with a graph
    (a second derivative through the saved inputs)."""
    wanted = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    y = plain(*args)
    grads = torch.autograd.grad(y, [args[i] for i in wanted], g, create_graph=True,
                                allow_unused=True)
    out: list[Tensor | None] = [None] * len(args)
    for i, gi in zip(wanted, grads, strict=True):
        out[i] = gi
    return tuple(out)


def _param_grad(t: Tensor | None, g: Tensor | None) -> Tensor | None:
    if t is None or g is None or not t.requires_grad:
        return None
    return _sum_to(g, t.shape).to(t.dtype)


def _sum_to(g: Tensor, shape: Sequence[int]) -> Tensor:
    """``g.sum_to_size(shape)``, the last axis (the positions) first when it is summed: a
    contiguous row reduction, then a small one — eager, 2.4× faster than one reduction over the
    batch and positions at (128, 64, 1, 256) on CPU; compiled, inductor fuses the row sum into the
    loop of the backward's other row sums instead of a strided pass of its own."""
    if g.dim() > 1 and g.shape[-1] > 1 and (len(shape) == 0 or shape[-1] == 1):
        g = g.sum(-1, keepdim=True)
    return g.sum_to_size(shape)


def _tlu_margin(x: Tensor, a: Tensor, bias: Tensor | None, tau: Tensor) -> Tensor:
    """FRN's TLU margin ``a x + β − τ`` (``a = γ r``; positive where the threshold passes) as
    ``a x − (τ − β)``: one product and one difference with a small term (eager: two passes, not
    three); saved for the backward's mask."""
    t = as_dtype(tau, x.dtype)
    return torch.mul(x, a).sub_(t if bias is None else t - as_dtype(bias, x.dtype))


class _FRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                tau: Tensor | None, extra: Tensor | None, eps: float, dims: tuple[int, ...],
                ms: Tensor | None) -> Tensor:
        dt = _compute_dtype(v)
        x = as_dtype(v, dt)
        ms = _sum_sq(x, dims) / _reduced(x, dims) if ms is None else as_dtype(ms, dt)
        if extra is not None:
            ms = ms + as_dtype(extra, dt)
        r = torch.rsqrt(ms + eps)
        a = r if weight is None else r * as_dtype(weight, dt)
        above = None
        if tau is None:
            y = x * a if bias is None else (x * a).add_(as_dtype(bias, dt))
        else:  # y = τ + relu(γ r x + β − τ); the backward masks with `above`
            above = _tlu_margin(x, a, bias, tau)
            y = torch.relu(above).add_(as_dtype(tau, dt))
        ctx.save_for_backward(v, r, weight, bias, tau, extra, above)
        ctx.dims, ctx.eps = dims, eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, r, weight, bias, tau, extra, above = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return (*_plain_vjp(frn_plain, (v, weight, bias, tau, extra, ctx.eps, dims), g), None)
        x = as_dtype(v, r.dtype)
        g = as_dtype(g, r.dtype)
        g_tau = None
        # where γ r x + β > τ (relu's backward kernel: no bool tensors, slow on CPU)
        gm = g if above is None else torch.ops.aten.threshold_backward(g, above, 0)
        if tau is not None and tau.requires_grad:  # Σ g where the threshold holds
            g_tau = (_sum_to(g, tau.shape) - _sum_to(gm, tau.shape)).to(tau.dtype)
        big = _reduced(x, dims)
        acc = _dot(gm, x, dims)  # Σ g_m x per statistic
        w = None if weight is None else as_dtype(weight, r.dtype)
        c = r if w is None else w * r  # γ r
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (gm * c).addcmul_(x, c * r * r * acc / big, value=-1)
        g_weight = _param_grad(weight, acc * r) if weight is not None else None
        g_bias = _param_grad(bias, gm)
        g_extra = None
        if extra is not None and extra.requires_grad:  # ∂r/∂ε_l = −r³/2
            g_extra = _param_grad(extra, -0.5 * c * r * r * acc)
        return (None if dx is None else as_dtype(dx, v.dtype), g_weight, g_bias, g_tau, g_extra,
                None, None, None)


def frn(v: Tensor, dims: Sequence[int], *, weight: Tensor | None, bias: Tensor | None,
        tau: Tensor | None, eps: float, extra_eps: Tensor | None = None,
        ms: Tensor | None = None) -> Tensor:
    r"""``y = max(γ x/√(ν² + ε + ε_l) + β, τ)``, ``ν² = mean(x²)`` over ``dims``, with the
    hand-derived backward (see the module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)``.
        dims: the axes ``ν²`` is taken over (per sample: not ``0``).
        weight, bias, tau: ``γ, β, τ`` broadcastable against ``v`` (or ``None``: none, no TLU).
        eps: the stability constant.
        extra_eps: a learned ``|ε_l|`` added to ``ν²`` (broadcastable), or ``None``.
        ms: ``ν²`` of ``v`` if already computed (its derivative is still taken), or ``None``.

    Example:
        >>> x = torch.randn(2, 3, 1, 5, dtype=torch.float64)
        >>> ref = torch.relu(x / (x.square().mean(3, keepdim=True) + 1e-6).sqrt())
        >>> torch.allclose(frn(x, (3,), weight=None, bias=None, tau=x.new_zeros(()), eps=1e-6), ref)
        True
    """
    if ms is not None and (ms.requires_grad or torch.compiler.is_compiling()):
        ms = ms.detach()  # (eager: fitted under no_grad, nothing to detach — a ~1 µs call)
    return _FRN.apply(v, weight, bias, tau, extra_eps,  # type: ignore[no-any-return]
                      eps, tuple(dims), ms)


class _EvoS0(torch.autograd.Function):
    # Saves the gate ``s`` (the only activation-sized tensor beside the input); two
    # activation-sized tensors are made per direction (forward: ``s``, ``y``; backward: ``g s``,
    # which becomes ``dx``, and one scratch), the rest runs in place.
    @staticmethod
    def forward(ctx: Any, v: Tensor, vparam: Tensor, weight: Tensor | None,  # type: ignore[override]
                bias: Tensor | None, eps: float, dims: tuple[int, ...],
                mean: Tensor | None, var: Tensor | None) -> Tensor:
        dt = _compute_dtype(v)
        x = as_dtype(v, dt)
        if mean is None or var is None:
            var, mean = _var_mean(x, dims)
        else:
            mean, var = as_dtype(mean, dt), as_dtype(var, dt)
        d = torch.rsqrt(var + eps)
        if torch.compiler.is_compiling():  # out of place: the op apply_saving keeps; the
            # 1 per sample and group (finite d) puts the gate in the output's loops (samples,
            # groups, channels | positions), so inductor writes s and y in one pass
            s = torch.sigmoid(x * as_dtype(vparam, dt) * (d * 0.0 + 1.0))
        else:
            s = torch.mul(x, as_dtype(vparam, dt)).sigmoid_()
        a = d if weight is None else d * as_dtype(weight, dt)
        if torch.compiler.is_compiling():  # out of place in a checkpointed region (apply_saving)
            y = x * s * a
            y = y if bias is None else y + as_dtype(bias, dt)
        else:
            y = torch.mul(x, s).mul_(a)  # (an addcmul with a broadcast first operand is slower)
            if bias is not None:
                y = y.add_(as_dtype(bias, dt))
        ctx.save_for_backward(v, s, mean, d, vparam, weight, bias)
        ctx.dims, ctx.eps = dims, eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, s, mean, d, vparam, weight, bias = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return (*_plain_vjp(evo_s0_plain, (v, vparam, weight, bias, ctx.eps, dims), g),
                    None, None)
        dt = s.dtype
        x = as_dtype(v, dt)
        g = as_dtype(g, dt)
        # per sample and channel, over the positions (S, the last axis): every statistic and
        # parameter is constant along them
        w = None if weight is None else as_dtype(weight, dt)
        wd = d if w is None else w * d  # γ d, per sample and channel
        vp = as_dtype(vparam, dt)
        if torch.compiler.is_compiling():
            g_sum, r_sum, gv_sum, dx = _evo_s0_sums_inline(x, g, s, vp, w)
            g_bias = _param_grad(bias, g_sum)
        else:
            g_bias = _param_grad(bias, g)
            gs = torch.mul(g, s)  # becomes dx
            u = torch.mul(gs, x)  # scratch: g s x, then g s x (1 − s), then g s x² (1 − s)
            r_sum = u.sum(-1, keepdim=True)  # Σ_S g s x, per sample and channel
            u = u.addcmul_(u, s, value=-1)  # g s x (1 − s)
            dx = gs.addcmul_(u, vp)  # g s (1 + v x (1 − s))
            gv_sum = u.mul_(x).sum(-1, keepdim=True) if vparam.requires_grad else None
            gv_sum = gv_sum if gv_sum is None or w is None else gv_sum * w
        g_weight = _param_grad(weight, r_sum * d) if weight is not None else None
        g_v = _param_grad(vparam, gv_sum * d) if vparam.requires_grad else None
        if ctx.needs_input_grad[0]:  # γ d g s (1 + v x (1 − s)) − (x − μ) d³ Σ g_γ x s / M
            acc = (r_sum if w is None else r_sum * w).sum(dims, keepdim=True)  # Σ g_γ x s
            c = d * d * d * acc / _reduced(x, dims)
            dx = dx.mul_(wd).addcmul_(x, c, value=-1).add_(mean * c).to(v.dtype)
        else:
            dx = None
        return dx, g_v, g_weight, g_bias, None, None, None, None


def evo_s0(v: Tensor, dims: Sequence[int], *, vparam: Tensor, weight: Tensor | None,
           bias: Tensor | None, eps: float, moments: tuple[Tensor, Tensor] | None = None
           ) -> Tensor:
    r"""EvoNorm-S0 ``y = γ·x·sigmoid(v x)/√(σ² + ε) + β`` with ``σ²`` the biased variance over
    ``dims``, with the hand-derived backward (see the module docstring).

    Args:
        v: the canonical view ``(N, A, B, S)`` (``Group(g)``: ``A = g`` groups).
        dims: the axes ``σ²`` is taken over (per sample: not ``0``).
        vparam: ``v``, broadcastable against ``v`` (per channel ``(1, A, B, 1)``).
        weight, bias: ``γ, β`` broadcastable against ``v``, or ``None``.
        eps: the stability constant.
        moments: ``(μ, σ²)`` of ``v`` over ``dims`` if already computed (their derivative is
            still taken), or ``None``.

    Example:
        >>> x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
        >>> var = x.var((2, 3), correction=0, keepdim=True)
        >>> ref = x * torch.sigmoid(x) / (var + 1e-5).sqrt()
        >>> torch.allclose(evo_s0(x, (2, 3), vparam=x.new_ones(()), weight=None, bias=None,
        ...                       eps=1e-5), ref)
        True
    """
    mean, var = (None, None) if moments is None else (moments[0].detach(), moments[1].detach())
    # compiled for inductor: the gate saved for the backward (fused_inductor.apply_saving)
    return apply_saving(_EvoS0.apply, (torch.ops.aten.sigmoid.default,),
                        v, vparam, weight, bias, eps, tuple(dims), mean, var)


def frn_plain(v: Tensor, weight: Tensor | None, bias: Tensor | None, tau: Tensor | None,
              extra_eps: Tensor | None, eps: float, dims: Sequence[int]) -> Tensor:
    """:func:`frn` as the plain autograd composition of its formula."""
    x = as_dtype(v, _compute_dtype(v))
    ms = x.square().mean(tuple(dims), keepdim=True)
    if extra_eps is not None:
        ms = ms + extra_eps
    y = x * torch.rsqrt(ms + eps)
    y = y if weight is None else y * weight
    y = y if bias is None else y + bias
    return y if tau is None else torch.maximum(y, as_dtype(tau, y.dtype))


def evo_s0_plain(v: Tensor, vparam: Tensor, weight: Tensor | None, bias: Tensor | None,
                 eps: float, dims: Sequence[int]) -> Tensor:
    """:func:`evo_s0` as the plain autograd composition of its formula."""
    x = as_dtype(v, _compute_dtype(v))
    var = x.var(tuple(dims), correction=0, keepdim=True)
    y = x * torch.sigmoid(vparam * x) * torch.rsqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _instance_and_batch(x: Tensor, batch: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(μ_I, σ²_I, μ_B, σ²_B)`` of ``x`` ``(N, C, 1, S)``: per sample and channel over the
    positions, and per channel over the batch and positions (pooled: the mean of ``σ²_I`` plus
    the variance of ``μ_I``; ``μ_B, σ²_B`` are ``None`` unless ``batch``)."""
    vi, mi = _var_mean(x, (x.dim() - 1,))
    if not batch:
        return mi, vi, None, None  # type: ignore[return-value]
    mb = mi.mean(0, keepdim=True)
    vb = vi.mean(0, keepdim=True) + (mi - mb).square().mean(0, keepdim=True)
    return mi, vi, mb, vb


class _EvoB0(torch.autograd.Function):
    # Saves ``t = relu(B − A) ≥ 0`` (one activation-sized tensor): the denominator is ``A + t``
    # and the branch mask is ``t > 0`` (relu's backward kernel reads it, no bool tensor).
    # Activation-sized temporaries are few and reused in place: on CPU each fresh one costs
    # page faults comparable to several elementwise passes.
    @staticmethod
    def forward(ctx: Any, v: Tensor, vparam: Tensor, weight: Tensor | None,  # type: ignore[override]
                bias: Tensor | None, batch_var: Tensor | None, eps: float,
                mi: Tensor | None, vi: Tensor | None, mb: Tensor | None, vb: Tensor | None
                ) -> Tensor:
        dt = _compute_dtype(v)
        x = as_dtype(v, dt)
        if mi is None or vi is None:
            mi, vi, mb, vb = _instance_and_batch(x, batch_var is None)
        else:
            mi, vi = as_dtype(mi, dt), as_dtype(vi, dt)
            mb = None if mb is None else as_dtype(mb, dt)
            vb = None if vb is None else as_dtype(vb, dt)
        big_a = torch.sqrt((vb if batch_var is None else as_dtype(batch_var, dt)) + eps)
        sigma_i = torch.sqrt(vi + eps)
        # relu(B − A) (mul + add: an addcmul with a broadcast first operand is slower on CPU)
        t = torch.mul(x, as_dtype(vparam, dt)).add_(sigma_i - big_a).relu_()
        y = torch.add(t, big_a)  # max(A, B)
        # into the fresh max (eager: no second activation-sized allocation); dynamo traces no
        # out= into a non-contiguous tensor (channels-last input), inductor plans the memory
        y = torch.div(x, y) if torch.compiler.is_compiling() else torch.div(x, y, out=y)
        if weight is not None:
            y = y.mul_(as_dtype(weight, dt))
        if bias is not None:
            y = y.add_(as_dtype(bias, dt))
        ctx.save_for_backward(v, t, big_a, sigma_i, mi, mb, vparam, weight, bias, batch_var)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, t, big_a, sigma_i, mi, mb, vparam, weight, bias, batch_var = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composition
            return (*_plain_vjp(evo_b0_plain, (v, vparam, weight, bias, batch_var, ctx.eps), g),
                    None, None, None, None)
        dt = t.dtype
        x = as_dtype(v, dt)
        g = as_dtype(g, dt)
        last = (x.dim() - 1,)
        w = None if weight is None else as_dtype(weight, dt)
        vp = as_dtype(vparam, dt)
        if torch.compiler.is_compiling():
            g_sum, gxd, sum_hn, sum_hbn, hbnx, dx = _evo_b0_sums_inline(x, g, t, big_a, vp, w)
            g_bias = _param_grad(bias, g_sum)
        else:
            g_bias = _param_grad(bias, g)
            z = torch.add(t, big_a)  # den
            gd = torch.div(g, z)  # g/den, becomes dx
            z = torch.div(x, z, out=z)  # x/den
            gxd = _row_dot(gd, x) if weight is not None else None
            if w is not None:
                gd = gd.mul_(w)  # g_z/den, g_z = γ g: ∂L/∂x through the numerator
            hn = z.mul_(gd)  # −∂L/∂den = g_z x/den²
            sum_hn = hn.sum(last, keepdim=True) if batch_var is None else None
            # where B > A (t > 0) the denominator is v x + σ_I: relu's backward kernel masks
            hbn = torch.ops.aten.threshold_backward.grad_input(hn, t, 0, grad_input=hn)
            sum_hbn = hbn.sum(last, keepdim=True)
            dx = gd.addcmul_(hbn, vp, value=-1)  # direct 1/den, and v through B
            hbnx = hbn.mul_(x).sum(last, keepdim=True) if vparam.requires_grad else None
        g_weight = _param_grad(weight, gxd) if weight is not None else None
        g_v = _param_grad(vparam, hbnx.neg()) if vparam.requires_grad else None
        if ctx.needs_input_grad[0]:
            s = x.shape[-1]
            k = sum_hbn / (sigma_i * -s)  # ∂L/∂σ_I / (σ_I S), through σ²_I = mean((x − μ_I)²)
            shift = k * mi
            if batch_var is None:  # ∂L/∂A / (A N S) per channel, through σ²_B of this batch
                ka = (sum_hn - sum_hbn).sum(0, keepdim=True) / (big_a * -(x.shape[0] * s))
                k = k + ka
                shift = shift + ka * mb
            dx = dx.addcmul_(x, k).sub_(shift).to(v.dtype)
        else:
            dx = None
        return dx, g_v, g_weight, g_bias, None, None, None, None, None, None


def evo_b0(v: Tensor, *, vparam: Tensor, weight: Tensor | None, bias: Tensor | None,
           eps: float, batch_var: Tensor | None = None,
           moments: tuple[Tensor | None, ...] | None = None) -> Tensor:
    r"""EvoNorm-B0 ``y = γ·x/max(√(σ²_B + ε), v x + √(σ²_I + ε)) + β`` on the BN view
    ``(N, C, 1, S)`` with the hand-derived backward (see the module docstring).

    Args:
        v: the canonical view ``(N, C, 1, S)`` of ``Batch()``.
        vparam: ``v`` per channel, broadcastable (``(1, C, 1, 1)``).
        weight, bias: ``γ, β`` broadcastable against ``v``, or ``None``.
        eps: the stability constant.
        batch_var: ``σ²_B`` to use (``(1, C, 1, 1)``, e.g. the running estimate at evaluation;
            a constant), or ``None`` for this batch's (biased, differentiated).
        moments: ``(μ_I, σ²_I, μ_B, σ²_B)`` of ``v`` if already computed (the batch pair
            ``None`` with ``batch_var``; their derivatives are still taken), or ``None``.

    Example:
        >>> x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
        >>> vb = x.var((0, 3), correction=0, keepdim=True)
        >>> vi = x.var(3, correction=0, keepdim=True)
        >>> ref = x / torch.maximum((vb + 1e-5).sqrt(), x + (vi + 1e-5).sqrt())
        >>> torch.allclose(evo_b0(x, vparam=x.new_ones(()), weight=None, bias=None, eps=1e-5), ref)
        True
    """
    mi = vi = mb = vb = None
    if moments is not None:
        mi, vi, mb, vb = [None if t is None else t.detach() for t in moments]
    return _EvoB0.apply(v, vparam, weight, bias, batch_var, eps,  # type: ignore[no-any-return]
                        mi, vi, mb, vb)


def evo_b0_plain(v: Tensor, vparam: Tensor, weight: Tensor | None, bias: Tensor | None,
                 batch_var: Tensor | None, eps: float) -> Tensor:
    """:func:`evo_b0` as the plain autograd composition of its formula."""
    x = as_dtype(v, _compute_dtype(v))
    vi = x.var(3, correction=0, keepdim=True)
    vb = x.var((0, 3), correction=0, keepdim=True) if batch_var is None else batch_var
    y = x / torch.maximum(torch.sqrt(vb + eps), vparam * x + torch.sqrt(vi + eps))
    y = y if weight is None else y * weight
    return y if bias is None else y + bias
