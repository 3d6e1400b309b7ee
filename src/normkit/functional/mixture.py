r"""Mixture models of the multi-mode methods (book ch. 5): Mode Normalization's gates and
gate-weighted moments, and a per-channel Gaussian mixture fitted by EM (Mixture Normalization).

Pure tensor functions, plain autograd throughout (gradients flow through every EM step). The
operations :class:`~normkit.nop.ModeStandardize` and :class:`~normkit.nop.MixtureStandardize`
lay the canonical view out for them and turn their results into running estimates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .merging import pool_moments
from .partition import as_dtype

__all__ = [
    "mode_gates",
    "mode_moments",
    "gmm_posterior",
    "gmm_m_step",
    "gmm_em",
    "gmm_start",
    "collapsed",
    "mixture_output",
    "normal_quantiles",
]


def mode_gates(pooled: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Mode Normalization's gate ``g(x_n) = softmax(W·pool(x_n) + b)``.

    Shape:
        pooled ``(N, C)`` (each sample's spatially averaged features), weight ``(K, C)``, bias
        ``(K,)`` → ``(N, K)``, rows summing to 1.
    """
    w, b = as_dtype(weight, pooled.dtype), as_dtype(bias, pooled.dtype)
    return torch.softmax(torch.addmm(b, pooled, w.t()), dim=-1)


def mode_moments(means: Tensor, within: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    r"""Gate-weighted mean and biased variance of each mode over the batch.

    .. math::
        N_k = \sum_n g_{nk},\quad
        \mu_k = \frac{1}{N_k}\sum_n g_{nk}\,\bar{x}_n,\quad
        \sigma^2_k = \frac{1}{N_k}\sum_n g_{nk}\big(v_n + (\bar{x}_n - \mu_k)^2\big)

    with ``x̄_n`` and ``v_n`` each sample's mean and variance over its positions, so
    ``v_n + (x̄_n − μ_k)²`` is the mean of ``(x_n − μ_k)²`` over the positions (exact, every term
    non-negative). The sample means are first centred on their batch average (a shift of the
    data, which stays exact under a large common offset). A mode no sample is assigned to
    (``N_k`` underflowing to 0) gets the batch mean and variance 0, finite.

    Shape:
        means, within ``(N, C)``, gates ``(N, K)`` → mean, var ``(K, C)``.
    """
    shift = means.mean(0, keepdim=True)
    # the samples are the groups (axis 1), pooled once per mode with the mode's gates as weights
    mean, var = pool_moments((means - shift).unsqueeze(0), within.unsqueeze(0), (1,),
                             gates.t().unsqueeze(-1))  # (K, 1, C)
    return mean.squeeze(1) + shift, var.squeeze(1)


def gmm_posterior(z: Tensor, mean: Tensor, var: Tensor, log_prior: Tensor, eps: float) -> Tensor:
    r"""E-step: posteriors ``p(k | z) ∝ π_k 𝒩(z; μ_k, σ²_k + ε)`` of a per-channel Gaussian mixture.

    Shape:
        z ``(N, C, S)``; mean, var, log_prior ``(K, C)`` → ``(K, N, C, S)``, summing to 1 over
        ``K``.
    """
    k, c = mean.shape
    view = (k, 1, c, 1)
    s = (var + eps).reshape(view)
    logits = (log_prior.reshape(view) - 0.5 * torch.log(s)
              - 0.5 * (z.unsqueeze(0) - mean.reshape(view)).square() / s)
    return torch.softmax(logits, dim=0)


def gmm_m_step(z: Tensor, post: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""M-step: posterior-weighted means, biased variances and log mixing weights per channel.

    .. math::
        N_k = \sum_i p_{ik},\quad \mu_k = \frac{1}{N_k}\sum_i p_{ik} z_i,\quad
        \sigma^2_k = \frac{1}{N_k}\sum_i p_{ik}(z_i - \mu_k)^2,\quad \log\pi_k = \log(N_k/m)

    over the ``m = N·S`` values ``i`` of each channel. ``N_k`` is floored at the dtype's smallest
    normal number, so a component that lost every value stays finite (``π_k`` ≈ 0).

    Shape:
        z ``(N, C, S)``, post ``(K, N, C, S)`` → mean, var, log_prior each ``(K, C)``.
    """
    m = z.shape[0] * z.shape[2]
    count = post.sum((1, 3)).clamp_min(torch.finfo(post.dtype).tiny)  # (K, C)
    mean = (post * z.unsqueeze(0)).sum((1, 3)) / count
    var = (post * (z.unsqueeze(0) - mean[:, None, :, None]).square()).sum((1, 3)) / count
    return mean, var, torch.log(count / m)


def gmm_em(z: Tensor, mean: Tensor, var: Tensor, log_prior: Tensor, *, iterations: int,
           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``iterations`` EM steps (E then M) of a per-channel Gaussian mixture from the given start.

    Plain autograd ops throughout: the result is differentiable with respect to ``z`` and to the
    start. With ``eps = 0`` this is exact EM and never decreases the likelihood; ``eps > 0``
    evaluates the densities with ``σ² + ε`` (what the normalization divides by), which keeps a
    collapsed component finite.

    Shape:
        z ``(N, C, S)``; mean, var, log_prior ``(K, C)`` → the same three, ``(K, C)``.
    """
    for _ in range(iterations):
        post = gmm_posterior(z, mean, var, log_prior, eps)
        mean, var, log_prior = gmm_m_step(z, post)
    return mean, var, log_prior


def gmm_start(var_b: Tensor, shift: Tensor, k: int, eps: float,
              running: tuple[Tensor, Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Start of EM on a channel's centred values (mean 0): from the batch, or from a running
    mixture.

    The batch start puts component ``k`` at ``q_k·√(σ²_B + ε)`` (``q_k`` the
    :func:`normal_quantiles`), with variance ``σ²_B·(1 − mean q²)`` and weight ``1/K``. With
    ``running = (mean, var, log_prior)`` (constants, uncentred) a channel starts from them,
    ``(mean − shift, var, log_softmax(log_prior))``, unless its running components all coincide
    (:func:`collapsed`: before the first batch), where it starts from the batch.

    Shape:
        var_b, shift ``(C,)`` (the batch's biased variance and mean); running ``(K, C)`` each →
        mean, var, log_prior ``(K, C)``.
    """
    q = normal_quantiles(k, dtype=var_b.dtype, device=var_b.device)
    mean = q[:, None] * torch.sqrt(var_b + eps)
    var = (var_b * (1 - q.square().mean())).expand_as(mean)
    log_prior = torch.full_like(mean, -math.log(k))
    if running is None:
        return mean, var, log_prior
    rm, rv, rl = running
    same = collapsed(running)
    start = (rm - shift, rv, torch.log_softmax(rl, 0))
    return tuple(torch.where(same, b, r)  # type: ignore[return-value]
                 for b, r in zip((mean, var, log_prior), start, strict=True))


def collapsed(running: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Channels whose running components all coincide (mean, var and log prior equal across
    ``K``): ``(C,)`` bool."""
    same = torch.ones_like(running[0][0], dtype=torch.bool)
    for t in running:
        same = same & (t.amax(0) == t.amin(0))
    return same


def mixture_output(z: Tensor, mean: Tensor, var: Tensor, post: Tensor, eps: float) -> Tensor:
    r"""``x̂ = Σ_k p(k | z)·(z − μ_k)/√(σ²_k + ε)``.

    Shape:
        z ``(N, C, S)``; mean, var ``(K, C)``; post ``(K, N, C, S)`` → ``(N, C, S)``.
    """
    k, c = mean.shape
    inv = torch.rsqrt(var + eps).reshape(k, 1, c, 1)
    return (post * (z.unsqueeze(0) - mean.reshape(k, 1, c, 1)) * inv).sum(0)


def normal_quantiles(k: int, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> Tensor:
    """The ``K`` standard normal quantiles ``Φ⁻¹((i + ½)/K) = √2·erfinv((2i + 1)/K − 1)``,
    ``i = 0..K−1`` (0 for ``K = 1``), computed in float64.

    Example:
        >>> normal_quantiles(3)
        tensor([-0.9674,  0.0000,  0.9674], dtype=torch.float64)
    """
    p = (2 * torch.arange(k, dtype=torch.float64, device=device) + 1) / k - 1
    return (math.sqrt(2) * torch.erfinv(p)).to(dtype)
