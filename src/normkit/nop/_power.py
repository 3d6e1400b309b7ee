r"""The operation of PowerNorm (Shen et al. 2020): scaling by a *running* quadratic mean, with the
paper's approximate backward.

.. math::
    \hat{x} = \frac{x}{\sqrt{\psi^2_{t-1} + \epsilon}},\qquad
    \psi^2_t = \alpha\,\psi^2_{t-1} + (1 - \alpha)\,\mathrm{E}_B[x^2]

per channel, no mean subtracted; ``ψ²`` is the module's running estimate ``running_ms`` (the
buffer of :class:`~normkit.nop.Scale`, updated with the module's ``momentum = 1 − α``). The
backward replaces the batch term of the exact RMS-normalization gradient by a running estimate
``ν`` (buffer ``grad_nu``):

.. math::
    \frac{\partial L}{\partial x} = \frac{g - \nu_{t-1}\,\hat{x}}{\sqrt{\psi^2_{t-1} + \epsilon}},
    \qquad
    \nu_t = \nu_{t-1}\big(1 - (1 - \alpha_{bkw})\,\Gamma\big) + (1 - \alpha_{bkw})\,\Lambda,

with ``g = γ·∂L/∂y``, ``Γ = E_B[x̂²]``, ``Λ = E_B[g·x̂]`` (means over the batch area). Written as
``ν_t = ν_{t−1} + (1 − α_bkw)·E_B[(g − ν_{t−1}x̂)·x̂]`` it is a moving average of ``Λ`` (an EMA
exactly when ``Γ = 1``). With ``α_bkw = 1`` ``ν`` stays 0 and the backward is the exact derivative
of the forward (``ψ_{t−1}`` a constant); then no buffer is kept and plain autograd runs.

For the first ``warmup_steps`` training steps (``num_batches_tracked ≤ warmup_steps``) the
forward uses the batch's own ``E_B[x²]`` — RMS batch normalization,
``Normalization(nap=Batch(), nop=Scale("rms"))`` — with its exact gradient
``(g − Λ x̂)/√(E_B[x²] + ε)``; ``ν`` is recorded from the first step on, so it is warm when the
approximation starts. A plain :class:`~normkit.Normalization` passes no running estimates to
:meth:`PowerScale.fit`, and the operation then is RMS batch normalization throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..functional.fused_robust import constant_standardize
from ..functional.fused_running import power_scale
from ..nap import Partition
from ._base import State, StateSpec, Stats
from ._robust import _int
from ._standard import Scale

__all__ = ["PowerScale", "check_alpha"]


def check_alpha(name: str, value: Any, what: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number in ``[0, 1]``."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not 0 <= value <= 1):
        raise ConfigError(f"{name} must be a number in [0, 1] ({what}), got {value!r}")


@dataclass(frozen=True, repr=False)
class PowerScale(Scale):
    """Scaling by the running quadratic mean with PowerNorm's approximate backward (see the module
    docstring). A ``reads_state`` operation (:meth:`state_buffers`, :meth:`update_state`): the
    module gives it the running estimates, the step counter and ``grad_nu`` in the call's
    :class:`~normkit.nop.State`."""

    kind: Literal["rms"] = field(default="rms", repr=False)
    alpha_bkw: float = 0.9
    warmup_steps: int = 10000
    #: evaluation (the running ``ψ²``, a constant) runs BN's evaluation kernel
    fused: bool = field(default=True, repr=False)
    # read and recorded by the backward when it runs: passed live, never snapshotted
    backward_state = ("grad_nu",)
    reads_state = True

    def eval_moments(self, running: Stats, eps: float) -> tuple[Tensor, Tensor, float] | None:
        ms = running["ms"]  # x/√(ψ² + ε): BN's evaluation with μ = 0
        return torch.zeros_like(ms), ms, eps

    def __post_init__(self) -> None:
        if self.kind != "rms":
            raise ConfigError(f"PowerScale scales by the quadratic mean: kind must be 'rms', "
                              f"got {self.kind!r}")
        check_alpha("alpha_bkw", self.alpha_bkw,
                    "weight of the previous value in the backward running statistic ν")
        _int("warmup_steps", self.warmup_steps, 0)

    def state_buffers(self, nap: Partition, num_features: int) -> StateSpec:
        """``grad_nu`` (``ν``, initially 0), unless ``alpha_bkw = 1`` keeps it at 0 for good."""
        if self.alpha_bkw == 1:
            return {}
        return {"grad_nu": ((nap.stat_size(num_features),), 0.0)}

    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None, state: State | None = None,
    ) -> Stats:
        if state is None:  # no running estimates: RMS batch normalization
            return {"ms": nap.mean_square(v, spatial)}
        nu = state.buffers.get("grad_nu")
        if nu is None:  # plain autograd: exact in both phases
            batch = nap.mean_square(v, spatial)
        else:
            with torch.no_grad():  # the autograd Function below gives the whole input gradient
                batch = nap.mean_square(v, spatial)
        gate = state.step > self.warmup_steps  # past the warm-up: ψ²_{t−1}
        # torch.where makes a new tensor: ψ²_{t−1} is kept when the buffer is updated after fit
        prev = state.running["ms"].to(batch.dtype).reshape(batch.shape)
        stats = {"ms": torch.where(gate, prev, batch), "batch_ms": batch}
        if nu is not None:
            stats["grad_nu"], stats["grad_gate"] = nu, gate
        return stats

    def running(self, stats: Stats, m: int) -> Stats:
        return super().running({"ms": stats.get("batch_ms", stats["ms"])}, m)

    def update_state(self, state: Stats, stats: Stats) -> None:
        """Arms this step's backward to record ``ν`` (only steps that update the running
        estimates record)."""
        if "grad_nu" in stats:
            stats["record_grad"] = stats["grad_nu"]

    def transform(
        self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
        weight: Tensor | None, bias: Tensor | None,
    ) -> Tensor:
        if "grad_nu" not in stats:  # evaluation, no ν kept, or no running estimates
            ms = stats["ms"]
            if self.fused and not ms.requires_grad:  # constant ψ²: BN's kernel with μ = 0
                y = constant_standardize(v, torch.zeros_like(ms), ms, weight, bias, eps)
                if y is not None:
                    return y
            return super().transform(v, stats, nap=nap, eps=eps, m=m, weight=weight, bias=bias)
        return power_scale(
            v, stats["ms"].detach(), weight, bias, eps, nap.dims, nu=stats["grad_nu"],
            gate=stats["grad_gate"], alpha=self.alpha_bkw, record="record_grad" in stats,
            batch_ms=stats["batch_ms"].detach(),
        )
