"""Mixture normalization's fused training step as custom ops, for ``torch.compile``: the fit,
the apply and the apply's backward of :mod:`normkit.functional.fused_mixture`, each one opaque
node running the eager code (inductor's own lowering of that code is several times slower than
eager). The apply is first order here: a second derivative raises (use ``native=False``, the
plain composition).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_mixture import _backward, _basis, _chunk, _fit_eager, _forward
from .partition import stats_dtype
from .whiten import _first_order

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
