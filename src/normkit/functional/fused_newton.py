r"""IterNorm's Newton–Schulz whitening matrix and its gradient in few small ops, for the fused
batch whitening op (:mod:`normkit.functional.fused_batch_whiten`).

The iteration (:func:`~normkit.functional.whiten.newton_schulz_matrix`, the coupled form) on
``A = Σ + εI``, ``t = tr A``, ``Y_0 = A/t``, ``Z_0 = I``:

.. math::
    T_k = ½(3I − Z_{k−1} Y_{k−1}),\quad Y_k = Y_{k−1} T_k,\quad Z_k = T_k Z_{k−1},\qquad
    W = Z_T/\sqrt t

runs on ``(G, D, D)`` blocks (``D = 16`` by default): each product is a few microseconds of call
overhead, not arithmetic, so what counts is the number of torch calls. :func:`newton_fit` runs
the iteration of :func:`~normkit.functional.whiten.newton_schulz_steps` (the composition's, so
``W`` is the same) and keeps its iterates, one stacked ``(3T, G, D, D)`` tensor (61 kB at
``G = 4``, ``D = 16``, ``T = 5`` in float32), for the backward instead of running the iteration
again there;
:func:`newton_input_term` runs the reverse of the iteration on them:

.. math::
    ∂T_k = Y_{k−1}∂Y_k + ∂Z_k Z_{k−1},\quad ∂Y_{k−1} = ∂Y_k T_k − ½ Z_{k−1}∂T_k,\quad
    ∂Z_{k−1} = T_k ∂Z_k − ½ ∂T_k Y_{k−1}

from ``∂Z_T = G_W/√t``, ``∂Y_T = 0``; then ``∂A = ∂Y_0/t + c I``,
``c = −(½⟨G_W, W⟩ + ⟨∂Y_0, Y_0⟩)/t`` (0 where ``t`` is clamped at the dtype's ``tiny``).
Every ``Y_k, Z_k, T_k`` is a polynomial in the symmetric ``Y_0``, hence symmetric: the
transposes of the general reverse (``Y_{k−1}ᵀ∂Y_k``, …) are dropped, which changes the result
only by the iterates' rounding asymmetry (relative ``~u``). The known operands save more:
``∂Y_T = 0`` (the first reverse step has two products fewer), ``Z_0 = I`` (the last has two
products and no ``∂Z_0``); each ``a·b + c·d`` is one ``bmm`` and one ``baddbmm_``. At ``T = 5``:
24 products in the backward instead of 40 products, 30 transposes and the forward's 15 again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .whiten import _check, _check_iterations, _newton_iterate

__all__ = ["newton_fit", "newton_input_term"]


def newton_fit(cov: Tensor, eps: float, iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(W, steps, scale)`` of IterNorm's Newton–Schulz whitening of the covariances ``cov``
    ``(G, D, D)`` (no autograd; ``W`` equals
    :func:`~normkit.functional.whiten.newton_schulz_matrix`'s, the same operations):
    ``steps = [Y_0, Z_0, T_1, Y_1, Z_1, T_2, …, Y_{T−1}, Z_{T−1}, T_T]`` stacked
    ``(3T, G, D, D)``, ``scale = [t, live]`` ``(2, G, 1, 1)`` with ``t = max(tr A, tiny)`` and
    ``live = 1`` where ``t`` is not clamped (else 0): what :func:`newton_input_term` reads.

    Shape:
        ``cov``: ``(G, D, D)``; outputs ``(G, D, D)``, ``(3T, G, D, D)``, ``(2, G, 1, 1)``.

    Example:
        >>> a = torch.randn(2, 3, 8, dtype=torch.float64)
        >>> cov = a @ a.mT / 8
        >>> w, steps, scale = newton_fit(cov, 1e-5, 5)
        >>> from normkit.functional.whiten import newton_schulz_matrix
        >>> torch.allclose(w, newton_schulz_matrix(cov, 5, 1e-5)), tuple(steps.shape)
        (True, (15, 2, 3, 3))
    """
    _check_iterations(iterations)
    cov = _check(cov, eps)
    g, d, _ = cov.shape
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    a = torch.add(cov, eye, alpha=eps)
    # newton_schulz_steps' trace and Y_0 here, to keep the unclamped trace (one trace, one
    # identity: this runs on the small matrices of every training step)
    raw = a.diagonal(dim1=-2, dim2=-1).sum(-1).view(g, 1, 1)
    tr = raw.clamp_min(torch.finfo(a.dtype).tiny)
    z, steps = _newton_iterate(a / tr, iterations, eye.expand(g, d, d))
    live = (raw >= tr).to(tr.dtype)  # the clamp's gradient (float: no bool tensor math)
    saved = torch.stack([m for step in steps for m in step])
    return z * tr.rsqrt(), saved, torch.stack((tr, live))


def newton_input_term(steps: Tensor, scale: Tensor, w: Tensor, gw: Tensor, m: int) -> Tensor:
    r"""``P = (1/m)(∂L/∂Σ + ∂L/∂Σᵀ)`` of ``W = W(Σ)`` of :func:`newton_fit` for ``∂L/∂W = G_W``
    and ``m`` samples: the reverse iteration of the module docstring on the saved ``steps``,
    ``scale`` (``w`` ``(G, D, D)``: the fit's ``W``; ``gw`` not modified).

    Shape:
        ``steps`` ``(3T, G, D, D)``, ``scale`` ``(2, G, 1, 1)``, ``w``, ``gw`` and the output
        ``(G, D, D)``.

    Example:
        >>> a = torch.randn(1, 3, 8, dtype=torch.float64)
        >>> s = (a @ a.mT / 8).requires_grad_()
        >>> w, steps, scale = newton_fit(s.detach(), 1e-5, 5)
        >>> gw = torch.randn(1, 3, 3, dtype=torch.float64)
        >>> from normkit.functional.whiten import newton_schulz_matrix
        >>> (ds,) = torch.autograd.grad(newton_schulz_matrix(s, 5, 1e-5), s, gw)
        >>> torch.allclose(newton_input_term(steps, scale, w, gw, 8), (ds + ds.mT) / 8)
        True
    """
    seq = steps.unbind(0)
    tr, live = scale.unbind(0)
    g, d, _ = gw.shape
    dz = gw * tr.rsqrt()
    dy: Tensor | None = None
    for k in range(len(seq) // 3 - 1, -1, -1):
        y, z, t = seq[3 * k: 3 * k + 3]
        if k == 0:  # Z_0 = I: ∂T = Y ∂Y + ∂Z, ∂Y_0 = ∂Y T − ½∂T (no ∂Z_0)
            dt = dz if dy is None else torch.baddbmm(dz, y, dy)
            dy = dt.mul(-0.5) if dy is None else torch.baddbmm(dt, dy, t, beta=-0.5)
        elif dy is None:  # ∂Y_T = 0: ∂T = ∂Z Z, ∂Y = −½ Z ∂T
            dt = torch.bmm(dz, z)
            dy = torch.baddbmm(dt, z, dt, beta=0.0, alpha=-0.5)
            dz = torch.bmm(t, dz).baddbmm_(dt, y, alpha=-0.5)
        else:
            dt = torch.bmm(y, dy).baddbmm_(dz, z)
            dy = torch.bmm(dy, t).baddbmm_(z, dt, alpha=-0.5)
            dz = torch.bmm(t, dz).baddbmm_(dt, y, alpha=-0.5)
    assert dy is not None
    # s = ½⟨G_W, W⟩ + ⟨∂Y_0, Y_0⟩ (= −c·t unclamped), each inner product one (1 × D²)(D² × 1)
    # product; P = (∂Y_0 + ∂Y_0ᵀ − 2·live·s·I)/(m t)
    s = torch.bmm(dy.reshape(g, 1, d * d), seq[0].reshape(g, d * d, 1)).baddbmm_(
        gw.reshape(g, 1, d * d), w.reshape(g, d * d, 1), alpha=0.5)
    out = dy + dy.mT
    out.diagonal(dim1=-2, dim2=-1).add_(s.mul_(live).view(g, 1), alpha=-2.0)
    return out.mul_(tr.reciprocal().div_(m))
