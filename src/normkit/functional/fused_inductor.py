"""The EvoNorm backwards' sums in the form inductor compiles into few passes over the
activations (``torch.compiler.is_compiling()`` branches of :mod:`normkit.functional.fused`:
the same formulas).

Inductor's CPU backend writes an elementwise expression to memory when it has several users and
reads more than four buffers (``realize_reads_threshold``), or several users and a heavy op such
as a sigmoid; it fuses a reduction with an elementwise node only when both run over the same
loops (a per-channel parameter read keeps samples and channels apart). Eager's form — each
product made once, reused in place — is exactly what it would write. Here every expression that
reads the gradient has one user, or shares its loops with the reduction that reads it.

A sigmoid costs more than a pass over memory (inductor's vectorized ``exp``, ~0.6 ms per 8M
values here against ~0.3 ms for a read-and-write pass): EvoNorm-S0's gate is computed once, in
the forward, and kept for the backward (:func:`apply_saving`), where AOTAutograd's partitioner
would recompute it (compiled fwd+bwd over compiled BN at (128, 64, 16, 16): 1.35–1.40x →
1.23–1.26x, 3 sigmoids → 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []  # helpers of normkit.functional.fused


def _evo_s0_sums_inline(x: Tensor, g: Tensor, s: Tensor, vparam: Tensor, w: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-S0's backward sums in the form inductor fuses into one loop over the activations
    (compiled only): per row ``Σ g``, ``Σ g s x`` and ``γ Σ g s (1 − s) x²`` (``β``'s, ``γ``'s and
    ``v``'s gradients), and the elementwise ``g s (1 + v x (1 − s))`` of ``dx``.

    The gate ``s`` is the forward's, saved (:func:`apply_saving`): a sigmoid costs more than a
    pass over memory on CPU (inductor's vectorized ``exp``), and recomputed it would be made
    twice — once per loop over the activations. ``unit`` (1 per channel) makes the plain row sum
    read a per-channel value too, so that all three sums run over the loops (samples, channels
    | positions) of the products that read ``v`` and ``γ``: one pass for the sums (``g, x, s``),
    one for ``dx``. (Eager makes these products once, in place:
    :class:`~normkit.functional.fused._EvoS0`.)"""
    last = (x.dim() - 1,)
    unit = vparam * 0.0 + 1.0  # 1 per channel (finite v), read in the loop
    sb = torch.ops.aten.sigmoid_backward(g, s)  # g s (1 − s)
    g_sum = (g * unit).sum(last, keepdim=True)
    r_sum = (g * s * x * unit).sum(last, keepdim=True)
    gv_sum = (sb * x * x * (unit if w is None else w)).sum(last, keepdim=True)
    return g_sum, r_sum, gv_sum, g * s + sb * x * vparam


def apply_saving(fn: Callable[..., Tensor], ops: tuple[Any, ...], *args: Any) -> Tensor:
    """``fn(*args)`` with AOTAutograd told to save the outputs of ``ops`` (ATen overloads) for
    the backward, not to recompute them there: selective activation checkpointing's policy
    (``MUST_SAVE`` for ``ops``, recompute preferred for the rest), under ``torch.compile`` for
    inductor only (:func:`~normkit.functional.statistics.compiling_kernels`); elsewhere plain.

    The partitioner recomputes every pointwise op in the backward whose inputs are saved anyway:
    free for a product, but a sigmoid over the activations costs more than the pass that would
    read it back on CPU. The first such compile in a process logs torch's one-time notice
    "Detected that context_fn is passed to torch.utils.checkpoint under torch.compile ... does
    not contain in-place ops": the regions passed here are out of place, so it asks nothing of
    the caller (torch offers no way to silence it for this region alone).
    """
    from .statistics import compiling_kernels

    if not compiling_kernels():
        return fn(*args)
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    def policy(ctx: Any, op: Any, *a: Any, **kw: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return checkpoint(fn, *args, use_reentrant=False,  # type: ignore[no-any-return]
                      context_fn=functools.partial(create_selective_checkpoint_contexts, policy))


def _evo_b0_sums_inline(x: Tensor, g: Tensor, t: Tensor, big_a: Tensor, vparam: Tensor,
                        w: Tensor | None) -> tuple[Tensor, ...]:
    """EvoNorm-B0's backward sums in the form inductor fuses into two passes over the
    activations (compiled only): per row ``Σ g`` (``β``'s gradient), ``Σ g x/den`` (``γ``'s),
    ``Σ h_n``, ``Σ h_{bn}``, ``Σ h_{bn} x``, and the elementwise part of ``dx``,
    ``g_z/den − v h_{bn}`` (``h_n = g_z x/den²``, ``h_{bn}`` where ``t > 0``, ``g_z = γ g``).

    Inductor writes an elementwise expression to memory when it has several users and reads
    more than four buffers (``realize_reads_threshold``): ``den`` and ``t`` read four (``x, v,
    σ_I, A``) and are shared; every expression that reads ``g`` as well has one user (each sum
    masks or scales its own product), so none is written: one pass reads ``g, x`` for the
    sums, one for ``dx``. Each pass divides once per value (``1/den``, shared; a division costs
    several products on CPU), and the plain row sum reads a per-channel 1 (``unit``) so that it
    runs in the loops (samples, channels | positions) of the others. (Eager makes these
    products once, in place: :class:`~normkit.functional.fused._EvoB0`.)"""
    last = (x.dim() - 1,)
    r = torch.reciprocal(t + big_a)  # 1/den
    r2 = r * r
    unit = vparam * 0.0 + 1.0  # 1 per channel (finite v), read in the loop
    gx = g * x
    g_sum = (g * unit).sum(last, keepdim=True)
    gxd = (gx * r).sum(last, keepdim=True)
    sum_hn = (gx * r2).sum(last, keepdim=True)
    tb = torch.ops.aten.threshold_backward  # where t > 0 (the branch B > A)
    sum_hbn = (tb(gx, t, 0) * r2).sum(last, keepdim=True)
    hbnx = (tb(gx * x, t, 0) * r2).sum(last, keepdim=True)
    dx = g * r - tb(g, t, 0) * x * (vparam * r2)
    if w is not None:
        sum_hn, sum_hbn, hbnx, dx = sum_hn * w, sum_hbn * w, hbnx * w, dx * w
    return g_sum, gxd, sum_hn, sum_hbn, hbnx, dx
