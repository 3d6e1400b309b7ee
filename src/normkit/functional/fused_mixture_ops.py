"""Mixture normalization's fused training step: the entry points :func:`mixture_fit` and
:func:`mixture_affine` (the eager Function of :mod:`normkit.functional.fused_mixture`; compiled
by inductor, the traceable form of :mod:`normkit.functional.fused_mixture_traced`), and the
custom ops they run in an exported graph (``torch.export``, which runs eager kernels; see
:func:`~normkit.functional.statistics.compiling_kernels`): the fit, the apply and the apply's
backward, each one opaque node running the eager code. The apply
is first order there: a second derivative raises (use ``native=False``, the plain composition).
The entry points live here, above the math, so no import runs back up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_mixture import _backward, _basis, _chunk, _fit_eager, _forward, _Mixture
from .fused_mixture_traced import mixture_affine_traced, mixture_fit_traced
from .partition import stats_dtype
from .standardize import affine_transform
from .statistics import compiling_kernels
from .whiten import _first_order

__all__ = ["mixture_affine", "mixture_fit"]

_FIRST_ORDER = ("the compiled mixture normalization backward",
                "build the module with native=False for the plain autograd composition")


@torch.library.custom_op("normkit::mixture_fit", mutates_args=())
def _fit_op(v: Tensor, running: Tensor | None, k: int, iterations: int, eps: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    st = _fit_eager(v, k, iterations, eps,
                    None if running is None else (running[0], running[1], running[2]))
    return (st["mean"].contiguous(), st["var"].contiguous(), st["log_prior"].contiguous(),
            st["batch_trajectory"], st["batch_centered"], st["batch_same"], st["batch_var"])


@_fit_op.register_fake
def _(v: Tensor, running: Tensor | None, k: int, iterations: int, eps: float
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    dt = stats_dtype(v)
    kc = v.new_empty((k, c), dtype=dt)
    return (kc, torch.empty_like(kc), torch.empty_like(kc),
            v.new_empty((iterations + 1, 4, c, k), dtype=dt), v.new_empty((c, n * s), dtype=dt),
            v.new_empty((c,), dtype=dt), v.new_empty((c,), dtype=dt))


def _fit_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.mark_non_differentiable(*output)  # constants: the apply op differentiates through them


def _fit_grad(ctx, *grads):  # type: ignore[no-untyped-def]
    return None, None, None, None, None


_fit_op.register_autograd(_fit_grad, setup_context=_fit_setup)


@torch.library.custom_op("normkit::mixture_apply", mutates_args=())
def _apply_op(v: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor, traj: Tensor,
              same: Tensor, var_b: Tensor, eps: float) -> Tensor:
    n, c, s = v.shape[0], v.shape[1], v.shape[3]
    size = _chunk(n, s)
    j = n * s // size
    work = torch.empty(2, c * j, size, dtype=z.dtype, device=z.device) if traj.shape[-1] == 2 \
        else None
    return _forward(v, weight, bias, z, _basis(z.view(c * j, size)), traj, work, eps)


@_apply_op.register_fake
def _(v: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor, traj: Tensor,
      same: Tensor, var_b: Tensor, eps: float) -> Tensor:
    return v.new_empty(v.shape, dtype=z.dtype)


@torch.library.custom_op("normkit::mixture_apply_backward", mutates_args=())
def _apply_backward_op(g: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None,
                       z: Tensor, traj: Tensor, same: Tensor, var_b: Tensor, eps: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    gx, g_weight, g_bias = _backward(g, v, weight, bias, z, traj, same, var_b, eps,
                                     weight is not None, bias is not None)
    return (gx, z.new_zeros(()) if g_weight is None else g_weight,
            z.new_zeros(()) if g_bias is None else g_bias)


@_apply_backward_op.register_fake
def _(g: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None, z: Tensor,
      traj: Tensor, same: Tensor, var_b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            z.new_zeros(()) if weight is None else torch.empty_like(weight),
            z.new_zeros(()) if bias is None else torch.empty_like(bias))


def _apply_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    v, weight, bias, z, traj, same, var_b, eps = inputs
    ctx.save_for_backward(v, weight, bias, z, traj, same, var_b)
    ctx.eps = eps


@_first_order(*_FIRST_ORDER)
def _apply_grad(ctx, g):  # type: ignore[no-untyped-def]
    v, weight, bias, z, traj, same, var_b = ctx.saved_tensors
    gx, g_weight, g_bias = _apply_backward_op(g, v, weight, bias, z, traj, same, var_b, ctx.eps)
    return (gx, None if weight is None else g_weight, None if bias is None else g_bias,
            None, None, None, None, None)


_apply_op.register_autograd(_apply_grad, setup_context=_apply_setup)


# the entry points: the eager Function; compiled, the traceable form; exported, the custom ops
def mixture_fit(v: Tensor, *, k: int, iterations: int, eps: float,
                running: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """EM on the canonical view ``v`` ``(N, C, 1, S)`` without a graph, for :func:`mixture_affine`.

    Returns the fitted mixture as :class:`~normkit.nop.MixtureStandardize` reports it (``mean``
    uncentred, ``var``, ``log_prior``, each ``(K, C)``) and what the Function reads:
    ``batch_trajectory`` ``(T + 1, 4, C, K)`` (centred mean, variance, log weight and raw count
    of the start and of every step), ``batch_centered`` ``(C, M)``, ``batch_basis`` ``(C·J, 3,
    L)`` (in runs of :func:`_chunk`), ``batch_same`` (1 where a channel started from the batch),
    ``batch_var`` ``(C,)``, for a running start ``batch_running`` ``(3, K, C)`` and for two
    components ``batch_work``, the posteriors' planes ``(2, C·J, L)``. The Function spends the
    basis and the planes. Under ``torch.compile`` the traceable fit
    (:func:`~normkit.functional.fused_mixture_traced.mixture_fit_traced`, its own keys, which
    :func:`mixture_affine` hands to a Function with a traceable backward); exported, one custom
    op (``normkit::mixture_fit``) runs it, without the basis and the planes (the apply op builds
    its own).
    """
    if compiling_kernels():
        return mixture_fit_traced(v, k=k, iterations=iterations, eps=eps, running=running)
    if torch.compiler.is_compiling():
        names = ("mean", "var", "log_prior", "batch_trajectory", "batch_centered", "batch_same",
                 "batch_var")
        out = dict(zip(names, _fit_op(v, None if running is None else torch.stack(running), k,
                                      iterations, eps), strict=True))
        if running is not None:
            out["batch_running"] = torch.stack(running)
        return out
    return _fit_eager(v, k, iterations, eps, running)


def mixture_affine(v: Tensor, stats: dict[str, Tensor], weight: Tensor | None,
                   bias: Tensor | None, *, eps: float) -> Tensor:
    r"""``γ·Σ_k p(k | z)·(z − μ_k)/√(σ²_k + ε) + β`` of the mixture :func:`mixture_fit` fitted
    to ``v``, differentiable through the EM steps (equal to :func:`mixture_plain` and its
    gradients).

    Shape:
        v ``(N, C, 1, S)``; weight, bias ``C`` values (per channel) or ``None`` → ``(N, C, 1,
        S)``, in at least float32. Per-value ``γ, β`` are applied after the Function.

    Example:
        >>> import torch
        >>> from normkit.functional.fused_mixture import mixture_plain
        >>> v = torch.randn(8, 3, 1, 16, dtype=torch.float64, requires_grad=True)
        >>> stats = mixture_fit(v, k=2, iterations=3, eps=1e-5)
        >>> y = mixture_affine(v, stats, None, None, eps=1e-5)
        >>> ref = mixture_plain(v, None, None, None, 2, 3, 1e-5)
        >>> bool(torch.allclose(y, ref))
        True
        >>> g, = torch.autograd.grad(y.square().sum(), v)
        >>> g_ref, = torch.autograd.grad(ref.square().sum(), v)
        >>> bool(torch.allclose(g, g_ref))
        True
    """
    c = v.shape[1]
    per_channel = all(t is None or t.numel() == c for t in (weight, bias))
    w, b = (weight, bias) if per_channel else (None, None)
    if "traced_trajectory" in stats:  # compiled for inductor: the traceable Function
        y = mixture_affine_traced(v, stats, w, b, eps=eps)
        return y if per_channel else affine_transform(y, None, None, weight, bias)
    if torch.compiler.is_compiling():  # exported: one opaque node (first order)
        y = _apply_op(v, w, b, stats["batch_centered"], stats["batch_trajectory"],
                      stats["batch_same"], stats["batch_var"], eps)
    else:
        y = _Mixture.apply(v, w, b, stats["batch_centered"], stats["batch_basis"],
                           stats["batch_trajectory"], stats["batch_same"], stats["batch_var"],
                           stats.get("batch_running"), stats.get("batch_work"), eps)
    return y if per_channel else affine_transform(y, None, None, weight, bias)
