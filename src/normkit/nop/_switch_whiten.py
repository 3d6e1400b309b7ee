"""Switchable whitening (Pan et al. 2019): whitening with a learned mixture of batch and instance
statistics on the ``(Gn, Gc, D, M)`` matrix view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import fused_switch_whiten as FW
from ..functional import whiten as W
from ..functional.partition import matrix_view, unmatrix_view
from ..nap import Partition
from ._base import Stats
from ._whiten import Whiten, _float32

__all__ = ["SwitchableWhiten"]

_MODES = ("bw", "iw", "bn", "in")


@dataclass(frozen=True, repr=False)
class SwitchableWhiten(Whiten):
    r"""Switchable whitening: whiten with a learned mixture of batch and instance statistics.

    .. math::
        \mu_n = \sum_k \omega_k \mu_k,\quad
        \Sigma_n = \sum_k \omega'_k \Sigma_k,\quad
        \hat{x}_n = W(\Sigma_n)(x_n - \mu_n),\quad \omega = \mathrm{softmax}(\lambda),\
        \omega' = \mathrm{softmax}(\lambda')

    over ``modes`` ⊆ {``"bw"`` batch whitening, ``"iw"`` instance whitening, ``"bn"``
    (``diag Σ_bw``), ``"in"`` (``diag Σ_iw``)}; BN/IN share the means of BW/IW. The logits
    ``mean_weight``, ``cov_weight`` (one per mode, init 0: equal mixture) are parameters of the
    module. Running estimates track the batch mean and covariance; evaluation mixes them with the
    input's instance statistics. Use with ``Batch(group_size=d)``.

    Training with ZCA (``fused=True``, the default) runs two custom ops with a hand-derived
    backward (:func:`~normkit.functional.fused_switch_whiten.switch_whiten_fit`, ``switch_whiten_apply``:
    the batch moments pooled from the instance ones, the input the only activation saved);
    ``native=False`` runs the plain composition.
    """

    modes: tuple[str, ...] = ("bw", "iw")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.modes or len(set(self.modes)) != len(self.modes) or not set(self.modes) <= set(_MODES):
            raise ConfigError(f"modes must be distinct names from {_MODES}, got {self.modes!r}")
        if self.estimate != "covariance":
            raise ConfigError("SwitchableWhiten tracks the batch covariance: use estimate='covariance'")

    def count(self, v: Tensor, nap: Partition, spatial: Sequence[int]) -> int:
        m = nap.count(v, spatial)
        return min(m, v.shape[3]) if {"iw", "in"} & set(self.modes) else m

    def create_parameters(
        self, num_features: int, nap: Partition, factory: dict
    ) -> dict[str, nn.Parameter]:
        k = len(self.modes)
        return {"mean_weight": nn.Parameter(torch.zeros(k, **factory)),
                "cov_weight": nn.Parameter(torch.zeros(k, **factory))}

    @torch.no_grad()
    def reset_parameters(self, params: dict[str, nn.Parameter]) -> None:
        for p in params.values():
            p.zero_()

    @staticmethod
    def _instance_view(v: Tensor, nap: Partition) -> Tensor:
        """Per-sample ``(N, Gc, D, S)`` view of the samples (≥ float32)."""
        mat = matrix_view(v, nap.roles)
        mat = mat.to(torch.promote_types(mat.dtype, torch.float32))
        gc, d = mat.shape[1:3]
        return mat.reshape(gc, d, v.shape[0], -1).permute(2, 0, 1, 3)

    def _instance(self, v: Tensor, nap: Partition) -> tuple[Tensor, Tensor]:
        """Per-sample mean and covariance over positions, ``(N, Gc, D, 1)`` and ``(N, Gc, D, D)``."""
        inst = self._instance_view(v, nap)
        mean = inst.mean(-1, keepdim=True)
        d = inst.shape[2]
        cov = W.covariance((inst - mean).flatten(0, 1)).reshape(*inst.shape[:2], d, d)
        return mean, cov

    def _mix(self, batch_mean: Tensor, batch_cov: Tensor, inst_mean: Tensor, inst_cov: Tensor,
             params: Stats, eps: float, data_dtype: torch.dtype) -> Stats:
        uniform = torch.zeros(len(self.modes), dtype=inst_mean.dtype, device=inst_mean.device)
        wm = torch.softmax(params.get("mean_weight", uniform), 0).to(inst_mean.dtype)
        wc = torch.softmax(params.get("cov_weight", uniform), 0).to(inst_cov.dtype)
        parts_m = {"bw": batch_mean, "bn": batch_mean, "iw": inst_mean, "in": inst_mean}
        parts_c = {"bw": batch_cov, "iw": inst_cov,
                   "bn": torch.diag_embed(batch_cov.diagonal(dim1=-2, dim2=-1)),
                   "in": torch.diag_embed(inst_cov.diagonal(dim1=-2, dim2=-1))}
        mean = sum(wm[i] * parts_m[k] for i, k in enumerate(self.modes))
        cov = sum(wc[i] * parts_c[k] for i, k in enumerate(self.modes))
        return {"mix_mean": mean, "matrix": self._matrix(cov, eps, data_dtype)}

    def _coefficients(self, params: Stats, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_B, (c_bw, c_bn, c_iw, c_in))``: the batch share of the mixed mean and the
        covariance weights (0 for the modes not mixed), with autograd to the logits."""
        dt = torch.promote_types(like.dtype, torch.float32)
        uniform = torch.zeros(len(self.modes), dtype=dt, device=like.device)
        wm = torch.softmax(params.get("mean_weight", uniform), 0).to(dt)
        wc = torch.softmax(params.get("cov_weight", uniform), 0).to(dt)
        # constant selections (every logit keeps a gradient, 0 where it has no effect)
        batch = [1.0 if k in ("bw", "bn") else 0.0 for k in self.modes]
        order = [[1.0 if k == j else 0.0 for j in ("bw", "bn", "iw", "in")] for k in self.modes]
        a_b = (wm * torch.tensor(batch, dtype=dt, device=like.device)).sum()
        return a_b, wc @ torch.tensor(order, dtype=dt, device=like.device)

    @_float32
    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        if self.method == "zca" and self.last_group is None and self._use_fused(nap):
            # Fused: statistics once without autograd (the batch moments pooled from the
            # instance ones); transform's custom op differentiates through them.
            a_b, coef = self._coefficients(params or {}, v)
            with torch.no_grad():
                xt, ci, delta, mb, cb, f, u, w = FW.switch_whiten_fit(v, coef, eps)
            return {"mean": mb, "cov": cb, "matrix": w, "sw_centered": xt, "sw_cov": ci,
                    "sw_delta": delta, "eig_f": f, "eig_u": u, "mean_coef": a_b, "coef": coef}
        mean, cov, _ = self._moments(v, nap)  # no batch whitening matrix: the mixture's is used
        inst_mean, inst_cov = self._instance(v, nap)
        mixed = self._mix(mean, cov, inst_mean, inst_cov, params or {}, eps, v.dtype)
        return {"mean": mean, "cov": cov, **mixed}

    @_float32
    def eval_stats(
        self, v: Tensor, running: Stats, *, nap: Partition, spatial: Sequence[int],
        num_features: int, eps: float, params: Stats | None = None,
    ) -> Stats:
        batch = self.from_running(running, nap, num_features)
        inst_mean, inst_cov = self._instance(v, nap)
        return self._mix(batch["mean"], batch["cov"], inst_mean, inst_cov, params or {}, eps,
                         v.dtype)

    @_float32
    def transform(
        self, v: Tensor, stats: Stats, *, nap: Partition, eps: float, m: int,
        weight: Tensor | None, bias: Tensor | None,
    ) -> Tensor:
        if "sw_centered" in stats:  # fused training step (see fit)
            rows = [None if t is None else matrix_view(t, nap.roles) for t in (weight, bias)]
            if any(r is not None and r.shape[-1] != 1 for r in rows):
                raise ConfigError("switchable whitening needs a per-channel recovery foldable per group")
            parts = (stats["sw_centered"], stats["sw_cov"], stats["sw_delta"], stats["cov"],
                     stats["eig_f"], stats["eig_u"], stats["matrix"])
            return FW.switch_whiten_apply(v, parts, stats["mean_coef"], stats["coef"],
                                          weight=rows[0], bias=rows[1])
        inst = self._instance_view(v, nap)  # the statistics were computed by fit / eval_stats
        folded = self._fold(stats["matrix"], stats["mix_mean"], weight, bias, nap)
        if folded is None:
            raise ConfigError("switchable whitening needs a per-channel recovery foldable per group")
        mat, shift = folded
        out = torch.matmul(mat, inst)
        out = out if shift is None else out + shift
        gc, d = out.shape[1:3]
        out = out.permute(1, 2, 0, 3).reshape(1, gc, d, -1)
        return unmatrix_view(out, v.shape, nap.roles)

    @_float32
    def fold(self, stats: Stats, *, nap: Partition, eps: float, weight: Tensor | None,
             bias: Tensor | None) -> tuple[Tensor, Tensor]:
        raise ConfigError("switchable whitening mixes in each input's own statistics; nothing fixed to fold")
