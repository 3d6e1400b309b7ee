"""The EvoNorm backwards' sums in the form inductor compiles into few passes over the
activations (``torch.compiler.is_compiling()`` branches of :mod:`normkit.functional.fused`:
the same formulas).

Inductor's CPU backend writes an elementwise expression to memory when it has several users and
reads more than four buffers (``realize_reads_threshold``), or several users and a heavy op such
as a sigmoid; it fuses a reduction with an elementwise node only when both run over the same
loops (a per-channel parameter read keeps samples and channels apart). Eager's form — each
product made once, reused in place — is exactly what it would write. Here every expression that
reads the gradient has one user, or shares its loops with the reduction that reads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []  # helpers of normkit.functional.fused


def _evo_s0_sums_inline(x: Tensor, g: Tensor, s: Tensor, vparam: Tensor, w: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """EvoNorm-S0's backward sums in the form inductor fuses into one loop over the activations
    (compiled only): per row ``Σ g s x`` and ``γ Σ g s (1 − s) x²`` (``γ``'s and ``v``'s
    gradients), and the elementwise ``g s (1 + v x (1 − s))`` of ``dx``.

    Inductor writes the gate ``s`` to memory (a sigmoid with several users), in a pass of its
    own unless a reduction over the same loops (samples, channels | positions) reads it. The
    first sum recomputes its gate from ``v x`` (written ``v·x``, not the forward's ``x·v``, so
    graph CSE keeps it apart: one user, inlined) and the second reads ``γ``: both read a
    per-channel parameter, so both run in the loop that writes ``s`` — the backward reads
    ``g, x`` there and ``g, x, s`` for ``dx``. (Eager makes these products once, in place:
    :class:`~normkit.functional.fused._EvoS0`.)"""
    last = (x.dim() - 1,)
    r_sum = (g * x * torch.sigmoid(vparam * x)).sum(last, keepdim=True)
    sb = torch.ops.aten.sigmoid_backward(g, s)  # g s (1 − s)
    gv = sb * x * x
    gv_sum = (gv if w is None else gv * w).sum(last, keepdim=True)
    return r_sum, gv_sum, g * s + sb * x * vparam


def _evo_b0_sums_inline(x: Tensor, g: Tensor, t: Tensor, big_a: Tensor, vparam: Tensor,
                        w: Tensor | None) -> tuple[Tensor, ...]:
    """EvoNorm-B0's backward sums in the form inductor fuses into two passes over the
    activations (compiled only): per row ``Σ g x/den`` (``γ``'s gradient), ``Σ h_n``, ``Σ h_{bn}``,
    ``Σ h_{bn} x``, and the elementwise part of ``dx``, ``g_z/den − v h_{bn}`` (``h_n = g_z
    x/den²``, ``h_{bn}`` where ``t > 0``, ``g_z = γ g``).

    Inductor writes an elementwise expression to memory when it has several users and reads
    more than four buffers (``realize_reads_threshold``): ``den`` and ``t`` read four (``x, v,
    σ_I, A``) and are shared; every expression that reads ``g`` as well has one user (each sum
    masks or divides its own product), so none is written: one pass reads ``g, x`` for the
    sums, one for ``dx``. (Eager makes these products once, in place:
    :class:`~normkit.functional.fused._EvoB0`.)"""
    last = (x.dim() - 1,)
    den = t + big_a
    den2 = den * den
    gx = g * x
    gxd = (gx / den).sum(last, keepdim=True)
    sum_hn = (gx / den2).sum(last, keepdim=True)
    tb = torch.ops.aten.threshold_backward  # where t > 0 (the branch B > A)
    sum_hbn = (tb(gx, t, 0) / den2).sum(last, keepdim=True)
    hbnx = (tb(gx * x, t, 0) / den2).sum(last, keepdim=True)
    dx = g / den - tb(g, t, 0) * x * (vparam / den2)
    if w is not None:
        sum_hn, sum_hbn, hbnx, dx = sum_hn * w, sum_hbn * w, hbnx * w, dx * w
    return gxd, sum_hn, sum_hbn, hbnx, dx
