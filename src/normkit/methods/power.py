"""PowerNorm (book ch. 6, robust estimation): batch normalization for transformers, scaling by a
running quadratic mean with an approximate backward (:mod:`normkit.nop._power`)."""

from __future__ import annotations

from typing_extensions import Unpack

from ..errors import ConfigError
from ..nop._power import PowerScale, check_alpha
from ..registry import register
from ._common import NormKwargs
from .robust import _Stateful

__all__ = ["PowerNorm"]


@register("power_norm", family="robust", aliases=("power_normalization",),
          paper="Shen, Yao, Gholami, Mahoney & Keutzer 2020, arXiv:2003.07845")
class PowerNorm(_Stateful):
    r"""Power normalization: scale by a running quadratic mean, with an approximate backward.

    .. math::
        y = \gamma\,\frac{x}{\sqrt{\psi^2_{t-1} + \epsilon}} + \beta,\qquad
        \psi^2_t = \alpha_{fwd}\,\psi^2_{t-1} + (1 - \alpha_{fwd})\,\mathrm{E}_B[x^2],

    .. math::
        \frac{\partial L}{\partial x} = \frac{g - \nu_{t-1}\,\hat{x}}{\sqrt{\psi^2_{t-1} + \epsilon}},
        \quad
        \nu_t = \nu_{t-1}\big(1 - (1 - \alpha_{bkw})\Gamma\big) + (1 - \alpha_{bkw})\Lambda

    per channel over every other axis (BN's area; with ``channel_axis=-1`` a transformer's
    ``(B, T, D)`` activations are normalized per feature over all ``B·T`` tokens), with no mean
    subtracted; ``x̂ = x/√(ψ²_{t−1} + ε)``, ``g = γ·∂L/∂y``, ``Γ = E_B[x̂²]``, ``Λ = E_B[g·x̂]``.
    ``ψ²`` is the buffer ``running_ms`` (initially 1), updated by every training step with the
    module's ``momentum = 1 − α_fwd`` (``E_B[x²]`` biased; ``momentum=None`` averages
    cumulatively); ``ν`` is ``grad_nu`` (initially 0), updated by the backward of every training
    step that updates ``running_ms`` and read when a backward runs. For the first
    ``warmup_steps`` steps the forward uses the batch's ``E_B[x²]`` instead (RMS batch
    normalization, with its exact gradient ``(g − Λx̂)/√(E_B[x²] + ε)``) while ``ψ²`` and ``ν``
    accumulate. Evaluation uses ``running_ms``: ``y = γx/√(ψ² + ε) + β`` (foldable).

    The backward is the paper's approximation, not the derivative of the forward (which,
    ``ψ_{t−1}`` being a constant, is ``g/ψ_{t−1}``): one autograd Function, first-order only.
    ``alpha_bkw=1`` keeps ``ν = 0``, i.e. that exact derivative, through plain autograd (twice
    differentiable, no ``grad_nu`` buffer). Without running statistics
    (``track_running_stats=False``, also switched off after construction, as torch's rule) training
    uses batch statistics: RMS batch normalization.

    Deviations from the paper and its code: the warm-up is the authors' code's (the paper's
    Algorithm 1 has none), but its backward is the exact one and ``ψ²`` is the same moving average
    throughout (the code averages cumulatively during the warm-up); the input gradient divides by
    ``ψ_{t−1}`` as Algorithm 1 does (the code divides by the batch's quadratic mean). Out of
    scope: the code's padding mask (pass only real tokens) and its per-position group scaling
    before the layer.

    Paper: Shen, Yao, Gholami, Mahoney & Keutzer, *PowerNorm: Rethinking Batch Normalization in
    Transformers*, ICML 2020. arXiv:2003.07845.

    Args:
        num_features: channels ``C`` (a transformer's ``D``).
        alpha_fwd: ``α_fwd``, the weight of the previous ``ψ²`` in ``[0, 1]``; sets
            ``momentum = 1 − alpha_fwd`` (give one of the two). Default ``None``: ``1 − momentum``
            with the default ``momentum=0.1``, i.e. ``0.9``, the authors' value.
        alpha_bkw: ``α_bkw``, the weight of the previous ``ν`` in ``[0, 1]``. Default ``0.9``
            (the authors').
        warmup_steps: training steps with batch statistics first (≥ 0). Default ``10000`` (the
            authors'); ``0`` uses ``ψ²_0 = 1`` at the first step, as Algorithm 1.
        eps: added to ``ψ²`` inside the square root (> 0). Default ``1e-5``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``momentum``, ``channel_axis``, ...).

    Shape:
        ``(N, C, *)`` → same, or ``(N, *, C)`` with ``channel_axis=-1`` (transformers'
        ``(B, T, D)``).

    Raises:
        ConfigError: on ``alpha_fwd``, ``alpha_bkw`` outside ``[0, 1]``, a negative or non-int
            ``warmup_steps``, or both ``alpha_fwd`` and ``momentum``.

    Example:
        >>> import torch
        >>> from normkit.methods.power import PowerNorm
        >>> pn = PowerNorm(8, warmup_steps=1, channel_axis=-1, affine=False)
        >>> a, b = torch.randn(4, 5, 8), torch.randn(4, 5, 8)          # (B, T, D)
        >>> ya = pn(a)                        # warm-up: the batch's quadratic mean
        >>> torch.allclose(ya, a / (a.pow(2).mean((0, 1)) + 1e-5).sqrt(), atol=1e-6)
        True
        >>> psi2 = pn.running_ms.clone()      # 0.9·1 + 0.1·E[a²]
        >>> torch.allclose(pn(b), b / (psi2 + 1e-5).sqrt(), atol=1e-6)   # then ψ²_{t−1}
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        alpha_fwd: float | None = None,
        alpha_bkw: float = 0.9,
        warmup_steps: int = 10000,
        eps: float | None = 1e-5,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        if alpha_fwd is not None:
            check_alpha("alpha_fwd", alpha_fwd, "weight of the previous running quadratic mean")
            if "momentum" in kw:
                raise ConfigError(
                    f"give alpha_fwd ({alpha_fwd!r}) or momentum ({kw['momentum']!r}), not both: "
                    f"momentum = 1 - alpha_fwd is the weight of the new batch"
                )
            kw["momentum"] = 1.0 - alpha_fwd
        op = PowerScale(alpha_bkw=alpha_bkw, warmup_steps=warmup_steps)
        super().__init__(num_features, nop=op, affine=affine, eps=eps, **kw)  # type: ignore[arg-type]

    @property
    def alpha_fwd(self) -> float | None:
        """``1 − momentum`` (``None`` for a cumulative average)."""
        return None if self.momentum is None else 1.0 - self.momentum

    @property
    def alpha_bkw(self) -> float:
        return self.nop.alpha_bkw  # type: ignore[attr-defined,no-any-return]

    @property
    def warmup_steps(self) -> int:
        return self.nop.warmup_steps  # type: ignore[attr-defined,no-any-return]
