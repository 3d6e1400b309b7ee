"""Feature-statistics style transfer (book ch. 10.2): AdaIN and the whitening–coloring transform.

Both act on feature maps ``(N, C, *spatial)`` of any encoder and replace the content's per-channel
statistics by the style's, per sample, over the spatial positions:

=========  ===================================================================  ===============
function   output                                                               matches
=========  ===================================================================  ===============
``adain``  ``σ(s)·(c − μ(c))/σ(c) + μ(s)`` per channel (Huang & Belongie 2017)  mean, std
``wct``    ``Σ_s^{1/2} Σ_c^{-1/2} (c − μ_c) + μ_s`` (Li et al. 2017)            mean, covariance
=========  ===================================================================  ===============

then blend with the content, ``α·y + (1 − α)·c`` (``α = 0`` returns the content). No second copy of
any math: :func:`adain` runs normkit's ``AdaIN`` module (:class:`normkit.methods.conditional.AdaIN`,
instance standardization with the style's statistics as recovery); :func:`wct` is built from
:func:`~normkit.functional.whiten.batch_moments`,
:func:`~normkit.functional.whiten.whitening_matrix` (exact ZCA or IterNorm's Newton–Schulz) and
:func:`~normkit.functional.whiten.coloring_matrix` (the symmetric square root ``U Λ^{1/2} Uᵀ``).

Statistics are the **biased** (population) ones over the spatial positions of each sample —
``σ² = mean((x − μ)²)``, ``Σ = X_c X_cᵀ / HW`` — as in the AdaIN paper and normkit's instance
normalization; computed in at least float32, returned in the content's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..functional.whiten import (
    MAX_ITERATIONS,
    batch_moments,
    coloring_matrix,
    grouped_matmul,
    whitening_matrix,
)
from ..registry import create

__all__ = ["adain", "wct", "feature_moments"]

StyleWhitening = Literal["zca", "newton", "newton_schulz"]


def _check_pair(content: Tensor, style: Tensor) -> None:
    for name, t in (("content", content), ("style", style)):
        if not isinstance(t, Tensor) or t.dim() < 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ShapeError(f"{name} must be feature maps (N, C, *spatial) with at least one "
                             f"spatial axis, got {got}; add a spatial axis with x.unsqueeze(-1)")
    if style.dim() != content.dim():
        raise ShapeError(f"style has rank {style.dim()} ({tuple(style.shape)}), content rank "
                         f"{content.dim()} ({tuple(content.shape)}); pass features of the same kind")
    if style.shape[1] != content.shape[1]:
        raise ShapeError(f"style has {style.shape[1]} channels, content {content.shape[1]}; "
                         f"take both from the same encoder layer")
    if style.shape[0] not in (1, content.shape[0]):
        raise ShapeError(f"style batch must be 1 (one style for all) or the content's "
                         f"{content.shape[0]}, got {style.shape[0]}")


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ConfigError(f"alpha must be a number in [0, 1] (0: content, 1: fully stylized), "
                          f"got {alpha!r}")
    return float(alpha)


def _blend(y: Tensor, content: Tensor, alpha: float) -> Tensor:
    y = y.to(content.dtype)
    return y if alpha == 1.0 else torch.lerp(content, y, alpha)  # α·y + (1 − α)·c


def adain(content: Tensor, style: Tensor, *, alpha: float = 1.0, eps: float = 1e-5) -> Tensor:
    r"""Adaptive instance normalization (Huang & Belongie 2017, arXiv:1703.06868).

    .. math::
        y = σ(s)\,\frac{c − μ(c)}{\sqrt{σ²(c) + ε}} + μ(s),\qquad
        \mathrm{out} = α\,y + (1 − α)\,c

    per sample and channel, over the spatial positions. ``σ²`` is the **biased** variance
    (``correction=0``) of both inputs and ``σ(s) = √σ²(s)`` exactly (no ε on the style), so the
    output's per-channel mean is ``μ(s)`` and its biased std is ``σ(s)·√(σ²(c)/(σ²(c) + ε))``
    (``σ(s)`` up to ``ε/σ²(c)``). Runs normkit's ``AdaIN`` module (``nk.create("adain", C)``).

    Args:
        content: content features ``(N, C, *spatial)``.
        style: style features ``(N or 1, C, *spatial_s)`` (spatial sizes may differ).
        alpha: content/style blend in ``[0, 1]``; 0 returns ``content``.
        eps: added to the content variance (> 0).

    Shape:
        ``(N, C, *spatial)`` in the content's dtype.

    Example:
        >>> c, s = torch.randn(2, 3, 8, 8), 2 + 3 * torch.randn(1, 3, 5, 5)
        >>> y = adain(c, s, eps=1e-8)
        >>> torch.allclose(y.std((2, 3), correction=0), s.std((2, 3), correction=0).expand(2, 3),
        ...                rtol=1e-4)
        True
    """
    _check_pair(content, style)
    alpha = _check_alpha(alpha)
    n, c = content.shape[:2]
    if n == 0:
        return content.clone()
    module = create("adain", c, eps=eps, style_eps=0.0)
    y = module(content, style.expand(n, *style.shape[1:]))
    return _blend(y, content, alpha)


def feature_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample channel mean ``(N, C)`` and biased covariance ``(N, C, C)`` of feature maps
    ``(N, C, *spatial)`` over the positions (``Σ = X_c X_cᵀ / HW``), in at least float32.

    Example:
        >>> x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        >>> mean, cov = feature_moments(x)
        >>> torch.allclose(cov[1], torch.cov(x[1].flatten(1), correction=0))
        True
    """
    if x.dim() < 3:
        raise ShapeError(f"expected feature maps (N, C, *spatial), got {tuple(x.shape)}")
    mean, cov, _ = batch_moments(x.reshape(x.shape[0], 1, x.shape[1], -1), shared=False)
    return mean[:, 0, :, 0], cov[:, 0]


def wct(
    content: Tensor,
    style: Tensor,
    *,
    alpha: float = 1.0,
    eps: float = 1e-5,
    whitening: StyleWhitening = "zca",
    iterations: int | None = None,
) -> Tensor:
    r"""Whitening–coloring transform (Li et al. 2017, Universal Style Transfer, arXiv:1705.08086).

    Per sample, with ``f_c`` the content features as ``C × HW``:

    .. math::
        y = Σ_s^{1/2}\, W_c\, (f_c − μ_c) + μ_s,\qquad W_c ≈ (Σ_c + εI)^{-1/2},\qquad
        \mathrm{out} = α\,y + (1 − α)\,f_c

    ``W_c`` is the exact ZCA matrix (``whitening="zca"``, eigendecomposition) or IterNorm's
    Newton–Schulz approximation (``"newton"``, ``T = iterations`` steps on ``Σ_c/tr Σ_c``; the
    error falls with ``T``, and a spread-out spectrum needs more steps: the smallest normalized
    eigenvalue ``λ/tr Σ`` grows only by ×2.25 per step before quadratic convergence starts).
    ``Σ_s^{1/2}`` is the symmetric square root (no ε), so the output covariance is
    ``Σ_s^{1/2} W_c Σ_c W_cᵀ Σ_s^{1/2} = Σ_s − ε Σ_s^{1/2}(Σ_c + εI)^{-1}Σ_s^{1/2}`` with ZCA:
    the style's, up to ``ε/λ_min(Σ_c)``. The output mean is ``μ_s``.

    Gradients exist w.r.t. both inputs; the style's needs a covariance with distinct positive
    eigenvalues (more positions than channels), as any eigen square root does.

    Args:
        content: content features ``(N, C, *spatial)``.
        style: style features ``(N or 1, C, *spatial_s)`` (spatial sizes may differ).
        alpha: content/style blend in ``[0, 1]``; 0 returns ``content``.
        eps: ridge on the content covariance (≥ 0; needed when channels are constant or
            ``HW < C``).
        whitening: ``"zca"`` or ``"newton"`` (alias ``"newton_schulz"``).
        iterations: Newton–Schulz steps (1 … 64); ``None``: 30 for ``"newton"``. Given with
            ``"zca"`` (which does not iterate) it raises instead of being ignored.

    Shape:
        ``(N, C, *spatial)`` in the content's dtype.

    Example:
        >>> c = torch.randn(2, 4, 9, 9, dtype=torch.float64)
        >>> mix = torch.randn(4, 4, dtype=torch.float64)
        >>> s = (mix @ torch.randn(4, 49, dtype=torch.float64)).reshape(1, 4, 7, 7)
        >>> y = wct(c, s, eps=0.0)
        >>> torch.allclose(feature_moments(y)[1], feature_moments(s)[1].expand(2, 4, 4))
        True
    """
    _check_pair(content, style)
    alpha = _check_alpha(alpha)
    method = {"zca": "zca", "newton": "newton", "newton_schulz": "newton"}.get(whitening)
    if method is None:
        raise ConfigError(f"whitening must be 'zca' or 'newton' ('newton_schulz'), got "
                          f"{whitening!r}; both approximate the symmetric Σ^(-1/2) WCT needs")
    if iterations is not None and method != "newton":
        raise ConfigError(f"wct got iterations={iterations!r}, but whitening={whitening!r} does not "
                          f"iterate: iterations applies to whitening='newton' only. Remove "
                          f"iterations=, or use whitening='newton'")
    iterations = 30 if iterations is None else iterations
    if not isinstance(iterations, int) or not 0 < iterations <= MAX_ITERATIONS:
        raise ConfigError(f"iterations must be an int in [1, {MAX_ITERATIONS}], got {iterations!r}")
    n, c = content.shape[:2]
    if n == 0:
        return content.clone()
    _, cov_c, centred = batch_moments(content.reshape(n, 1, c, -1), shared=False)
    mean_s, cov_s, _ = batch_moments(style.reshape(style.shape[0], 1, c, -1), shared=False)
    white = whitening_matrix(cov_c[:, 0], method, eps=eps, iterations=iterations)  # (N, C, C)
    colour = coloring_matrix(cov_s[:, 0], eps=0.0).to(white.dtype)  # (N or 1, C, C)
    y = grouped_matmul((colour @ white).unsqueeze(1), centred, mean_s.to(white.dtype))
    return _blend(y.reshape(content.shape), content, alpha)
