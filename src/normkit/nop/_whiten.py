"""Whitening operations: ``x̂ = W (x − μ)`` on the ``(Gn, Gc, D, M)`` matrix view."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..functional import fused_batch_whiten as FB
from ..functional import fused_whiten as FW
from ..functional import standardize as Fs
from ..functional import statistics as S
from ..functional import whiten as W
from ..functional import whiten_ops as WO
from ..functional.collectives import synced_covariance
from ..functional.partition import as_dtype, matrix_sizes, matrix_view, unmatrix_view
from ..nap import Partition, Synced
from ._base import Coefficients, Operation, Stats

__all__ = ["Whiten"]

_BATCH_ROLES = ("M", "G", "D", "M")


def _in_place(v: Tensor, roles: Sequence[str]) -> bool:
    """Batch whitening runs on the (N, A, B, S) view itself when there are at least as many
    positions as features per group (S ≥ d): its per-sample d×d blocks then cost no more than the
    input. With few positions (e.g. (N, C) inputs) the (A, B, N·S) matrix layout is cheaper."""
    return tuple(roles) == _BATCH_ROLES and v.shape[3] >= v.shape[2]


def _float32(method: Callable) -> Callable:
    """Run an operation's ``method(self, v_or_stats, ...)`` with autocast off: under
    ``torch.autocast`` whitening keeps its statistics, matrices and products in float32 and
    returns the input's dtype (torch's batch norm's rule)."""

    @functools.wraps(method)
    def wrapped(self, first, *args, **kwargs):  # type: ignore[no-untyped-def]
        t = first if isinstance(first, Tensor) else next(iter(first.values()))
        with W._full_precision(t):
            return method(self, first, *args, **kwargs)

    return wrapped


def _synced(nap: Partition) -> bool:
    """Whether ``nap`` merges statistics across processes (:class:`normkit.nap.Synced`)."""
    return isinstance(nap, Synced)


@dataclass(frozen=True, repr=False)
class Whiten(Operation):
    r"""Whitening ``x̂ = W (x − μ)`` with ``W (Σ + εI) Wᵀ = I``: decorrelates the ``D`` features.

    The partition's ``D`` axes are whitened jointly (``Batch(group_size=d)``: groups of ``d``
    channels over the batch; ``Group(g)``: the ``g`` group-vectors of each sample;
    ``Instance(group_size=d)``: groups of channels over positions). ``D = 1`` is standardization.

    Args:
        method: ``"zca"`` (``UΛ^{-1/2}Uᵀ``), ``"pca"`` (``Λ^{-1/2}Uᵀ``), ``"cholesky"``
            (``L^{-1}``) or ``"newton"`` (IterNorm's Newton–Schulz, ``iterations`` steps); see
            :mod:`normkit.functional.whiten`.
        iterations: Newton–Schulz steps ``T`` (``method="newton"`` only); ``None``: 5 for
            ``"newton"``, none for the others. Given with a method that does not iterate, it
            raises (it would be ignored).
        estimate: what running estimates track for evaluation: ``"matrix"`` (the whitening
            matrix, the original DBN/IterNorm) or ``"covariance"`` (``Σ``, the whitening matrix
            recomputed from it at evaluation: the book's "Sigma" variants).
        fused: train with batch statistics through ``torch.library`` custom ops whose
            backward is derived by hand: batch whitening in place through one op
            (:mod:`normkit.functional.fused_batch_whiten`: statistics once without autograd,
            ``∂Σ`` in closed form, the input gradient in one buffer, nothing saved beyond the
            input; a second derivative
            differentiates the plain composition); the matrix layout and a padded last group
            through two
            (:mod:`normkit.functional.whiten_ops`: fewer passes over the activations, only
            ``x − μ`` saved; first order only); per-sample ZCA — group and instance
            whitening — through :mod:`normkit.functional.fused_whiten` (one op with the eigen
            backward in closed form; first order only). One graph node each under
            ``torch.compile``. ``False``: the plain autograd composition (what
            ``native=False`` selects; twice differentiable for ``cholesky``, ``newton`` and
            ``pca``).
    """

    method: Literal["zca", "pca", "cholesky", "newton"] = "zca"
    iterations: int | None = None
    estimate: Literal["matrix", "covariance"] = "matrix"
    fused: bool = field(default=True, repr=False)
    last_group: int | None = field(default=None, repr=False)

    block_eval_fold = True  # evaluation: one block-diagonal matmul of fold()'s (M, b)

    def __post_init__(self) -> None:
        if self.last_group is not None and (not isinstance(self.last_group, int)
                                            or self.last_group < 1):
            raise ConfigError(f"last_group must be a positive int or None, got {self.last_group!r}")
        if self.method not in ("zca", "pca", "cholesky", "newton"):
            raise ConfigError(
                f"whitening method must be 'zca', 'pca', 'cholesky' or 'newton', got {self.method!r}"
            )
        if self.estimate not in ("matrix", "covariance"):
            raise ConfigError(f"estimate must be 'matrix' or 'covariance', got {self.estimate!r}")
        if self.iterations is None:  # the default: 5 steps for Newton–Schulz, none otherwise
            if self.method == "newton":
                object.__setattr__(self, "iterations", 5)
        elif self.method != "newton":
            raise ConfigError(
                f"{type(self).__name__} got iterations={self.iterations!r}, but its "
                f"method={self.method!r} does not iterate: iterations applies to "
                f"method='newton' only. Remove iterations=, or use method='newton'")
        if self.iterations is not None and (
                not isinstance(self.iterations, int) or not 0 < self.iterations <= W.MAX_ITERATIONS):
            raise ConfigError(
                f"iterations must be an int in [1, {W.MAX_ITERATIONS}], got {self.iterations!r}"
            )

    @property
    def stat_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mean", "matrix") if self.estimate == "matrix" else ("mean", "cov")

    def _matrix(self, cov: Tensor, eps: float, data_dtype: torch.dtype | None = None) -> Tensor:
        """Whitening matrices ``(Gn, Gc, D, D)`` of covariances ``(Gn, Gc, D, D)``; with a
        :attr:`last_group` ``r`` the last ``Gc`` block is ``W(Σ[:r, :r]) ⊕ I``. ``data_dtype``:
        the input's dtype when ``cov`` comes from a batch (PCA's gap tolerance, see
        :func:`~normkit.functional.whiten.pca_matrix`)."""
        if self.last_group is None:
            return self._blocks(cov, eps, data_dtype)
        r, d = self.last_group, cov.shape[-1]
        last = self._blocks(cov[:, -1:, :r, :r], eps, data_dtype)
        padding = (torch.arange(d, device=cov.device) >= r).to(last.dtype)
        last = torch.nn.functional.pad(last, (0, d - r, 0, d - r)) + torch.diag(padding)
        if cov.shape[1] == 1:
            return last
        return torch.cat([self._blocks(cov[:, :-1], eps, data_dtype), last], 1)

    def _blocks(self, cov: Tensor, eps: float, data_dtype: torch.dtype | None) -> Tensor:
        flat = cov.reshape(-1, *cov.shape[-2:])
        w = W.whitening_matrix(flat, self.method, eps=eps, iterations=self.iterations,
                               data_dtype=data_dtype)
        return w.reshape(cov.shape)

    def bind(self, nap: Partition, num_features: int) -> Whiten:
        """Set :attr:`last_group` when ``nap``'s group size does not divide ``num_features``."""
        a, b = nap.groups(num_features)
        if a * b == num_features:
            return self
        gc, d = matrix_sizes((a, b), nap.roles)
        if (gc, d) != (a, b):
            raise ConfigError(f"{nap!r}: only a group_size split may have a smaller last group")
        return replace(self, last_group=num_features - (a - 1) * b)

    def buffers(self, nap: Partition, num_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        gc, d = matrix_sizes(nap.groups(num_features), nap.roles)
        return {"mean": ((num_features,), "0"), self.stat_names[1]: ((gc, d, d), "eye")}

    @staticmethod
    def _layout(v: Tensor, nap: Partition) -> tuple[bool, tuple[str, ...] | None]:
        """How the samples are laid out as ``(P, G, D, S)`` for
        :func:`~normkit.functional.whiten.batch_moments`: the canonical view itself for in-place
        batch whitening (``shared``, no roles; always when synchronized), else the matrix view (a
        copy, with the ``roles`` that map it back)."""
        shared = _in_place(v, nap.roles) or _synced(nap)
        return shared, None if shared else tuple(nap.roles)

    def _moments(self, v: Tensor, nap: Partition) -> tuple[Tensor, Tensor, Tensor]:
        """Mean ``(Gn, Gc, D, 1)``, biased covariance ``(Gn, Gc, D, D)`` and centred samples (in
        the layout of :meth:`_layout`), with autograd."""
        if _synced(nap):
            return synced_covariance(v, nap.group)
        shared, roles = self._layout(v, nap)
        return W.batch_moments(v if roles is None else matrix_view(v, roles), shared)

    @_float32
    def fit(
        self, v: Tensor, nap: Partition, spatial: Sequence[int], *, eps: float = 0.0,
        params: Stats | None = None,
    ) -> Stats:
        # ``centered`` is reused by transform(): the batch is whitened as W (x − μ), exact under
        # large offsets, and autograd saves the one tensor for both products.
        if not self._use_fused(nap):  # the plain autograd composition
            mean, cov, centered = self._moments(v, nap)
            return {"mean": mean, "cov": cov, "matrix": self._matrix(cov, eps, v.dtype),
                    "centered": centered}
        shared, roles = self._layout(v, nap)
        if self._one_op(roles):
            # Batch whitening in place on the canonical view: statistics once, without
            # autograd; transform's one custom op differentiates through μ, Σ and W(Σ).
            # No centred copy: the op centres x chunk by chunk where it reads it (the key
            # "inplace_mean" marks these statistics for transform()).
            mean, cov, f, u, w = FB.batch_whiten_fit(
                v, self.method, eps, iterations=self.iterations, data_dtype=v.dtype)
            eig = {} if u is None else {"eig_f": f, "eig_u": u}
            return {"mean": mean, "cov": cov, "matrix": w, "inplace_mean": mean, **eig}
        if (roles is not None and roles[0] == "G" and self.method == "zca"
                and self.last_group is None):
            # Per-sample ZCA (instance / group whitening: the batch axis is a G axis; batch
            # whitening keeps its own fused ops below): statistics once, without autograd;
            # transform's custom op
            # differentiates through them (hand-derived eigen backward, no autograd on W(Σ)).
            with torch.no_grad():
                mean, cov, centered, f, u, w = FW.sample_zca_fit(v, roles, eps)
            return {"mean": mean, "cov": cov, "matrix": w, "centered": centered,
                    "eig_f": f, "eig_u": u}
        # Fused: two custom ops (one graph node each under torch.compile / export) with a
        # hand-derived backward; only W(Σ) is autograd math, on (D × D) tensors.
        mean, cov, centered = WO.whiten_moments(v, shared=shared, roles=roles)
        return {"mean": mean, "cov": cov, "matrix": self._matrix(cov, eps, v.dtype),
                "centered": centered}

    def _one_op(self, roles: tuple[str, ...] | None) -> bool:
        """Whether the fused step is :mod:`~normkit.functional.fused_batch_whiten`'s one op:
        batch whitening in place (no ``roles``), every group full."""
        return roles is None and self.last_group is None

    def _use_fused(self, nap: Partition) -> bool:
        """Whether batch statistics go through the fused custom ops: not when synchronized
        (the collectives need autograd), nor under a ``torch.func`` transform (``grad``,
        ``vmap``, ...), which custom ops with a registered autograd do not support."""
        if not self.fused or _synced(nap):
            return False
        return torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active()

    def _num_padded(self, d: int) -> int:
        return 0 if self.last_group is None else d - self.last_group

    def running(self, stats: Stats, m: int) -> Stats:
        mean = stats["mean"].mean(0).reshape(-1)
        mean = mean[: mean.numel() - self._num_padded(stats["mean"].shape[-2])]
        if self.estimate == "covariance":
            return {"mean": mean, "cov": S.unbiased_variance(stats["cov"].mean(0), m)}
        return {"mean": mean, "matrix": stats["matrix"].mean(0)}

    def from_running(self, running: Stats, nap: Partition, num_features: int) -> Stats:
        gc, d = matrix_sizes(nap.groups(num_features), nap.roles)
        dtype = torch.promote_types(running["mean"].dtype, torch.float32)  # half buffers
        mean = torch.nn.functional.pad(as_dtype(running["mean"], dtype), (0, self._num_padded(d)))
        out = {"mean": mean.reshape(1, gc, d, 1)}
        key = self.stat_names[1]
        return {**out, key: running[key].to(dtype).unsqueeze(0)}

    def whitening(self, stats: Stats, eps: float) -> Tensor:
        """The whitening matrix ``(Gn, Gc, D, D)`` of fitted or running statistics (from the
        running covariance when that is what is tracked)."""
        if "matrix" in stats:
            return stats["matrix"]
        return self._matrix(stats["cov"], eps)

    @_float32
    def transform(
        self,
        v: Tensor,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        m: int,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        w = self.whitening(stats, eps)
        centered = stats.get("centered")
        if (centered is not None or "inplace_mean" in stats) and self._use_fused(nap):
            return self._fused_transform(v, stats, w, nap, eps, weight, bias)
        if self._layout(v, nap)[0]:  # (N, A, B, S) in place, see fit()
            x = as_dtype(v, w.dtype) if centered is None else centered
            folded = self._fold(w, None if centered is not None else stats["mean"], weight, bias, nap)
            if folded is None:  # cannot happen for per-channel recoveries; kept for safety
                out = torch.matmul(w, x if centered is not None else x - stats["mean"])
                return Fs.affine_transform(out, None, None, weight, bias)
            return W.grouped_matmul(folded[0], x, folded[1])
        if centered is None:  # running statistics: fold μ into the bias, one matmul over x
            mat = matrix_view(v, nap.roles).to(w.dtype)
            folded = self._fold(w, stats["mean"], weight, bias, nap)
        else:  # batch statistics: whiten the centred batch fit() already made
            mat = centered
            folded = self._fold(w, None, weight, bias, nap)
        if folded is not None:  # y = (γ ⊙ W) x + (β − (γ ⊙ W) μ)
            lead = mat.shape[:2]
            m_, b_ = (None if t is None else t.expand(*lead, *t.shape[2:]).flatten(0, 1)
                      for t in folded)
            out = torch.baddbmm(b_, m_, mat.flatten(0, 1)) if b_ is not None else torch.bmm(
                m_, mat.flatten(0, 1))
            return unmatrix_view(out.reshape(mat.shape), v.shape, nap.roles)
        out = torch.matmul(w, mat if centered is not None else mat - stats["mean"])
        out = unmatrix_view(out, v.shape, nap.roles)
        return Fs.affine_transform(out, None, None, weight, bias)

    def _fused_transform(self, v: Tensor, stats: Stats, w: Tensor, nap: Partition, eps: float,
                         weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Batch statistics, fused: :func:`~normkit.functional.fused_batch_whiten.batch_whiten_apply`
        (batch whitening in place), :func:`~normkit.functional.fused_whiten.sample_zca_apply`
        (per-sample ZCA) or :func:`~normkit.functional.whiten_ops.whiten_with_gradient`
        with the recovery folded into ``W`` when it is per row (else applied after)."""
        rows = [None if t is None else matrix_view(t, nap.roles) for t in (weight, bias)]
        foldable = all(r is None or r.shape[-1] == 1 for r in rows)
        shared, roles = self._layout(v, nap)
        kept = [r if foldable else None for r in rows]
        centered = stats.get("centered")
        if centered is None:  # batch whitening in place (see fit)
            out = FB.batch_whiten_apply(
                v, (stats["inplace_mean"], stats["cov"], stats.get("eig_u"), stats.get("eig_f"), w),
                method=self.method, eps=eps, iterations=self.iterations, data_dtype=v.dtype,
                weight=kept[0], bias=kept[1])
        elif "eig_u" in stats and roles is not None:  # per-sample ZCA (see fit)
            # a per-channel γ, β that varies within a matrix (group whitening's): inside the op
            inside = not foldable and all(t is None or (t.dim() == 4 and t.shape[0] == 1
                                                        and t.shape[3] == 1)
                                          for t in (weight, bias))
            out = FW.sample_zca_apply(v, (centered, stats["eig_f"], stats["eig_u"], w),
                                      roles=roles, weight=kept[0], bias=kept[1],
                                      post_weight=weight if inside else None,
                                      post_bias=bias if inside else None)
            if inside:
                return unmatrix_view(out, v.shape, roles)
        else:
            out = WO.whiten_with_gradient(v, centered, w, shared=shared, roles=roles,
                                          weight=kept[0], bias=kept[1])
        out = out if roles is None else unmatrix_view(out, v.shape, roles)
        return out if foldable else Fs.affine_transform(out, None, None, weight, bias)

    @staticmethod
    def _fold(
        w: Tensor, mean: Tensor | None, weight: Tensor | None, bias: Tensor | None, nap: Partition
    ) -> tuple[Tensor, Tensor | None] | None:
        """``(γ ⊙ W, β − (γ ⊙ W) μ)`` in the matrix layout, or ``None`` when the recovery varies
        along a sample axis (e.g. group whitening's per-channel γ) and cannot be folded."""
        rows = [None if t is None else matrix_view(t, nap.roles) for t in (weight, bias)]
        if any(r is not None and r.shape[-1] != 1 for r in rows):
            return None
        g, b = rows
        mat = w if g is None else w * as_dtype(g, w.dtype)
        shift = None if mean is None else -torch.matmul(mat, mean)
        if b is not None:
            shift = as_dtype(b, w.dtype) if shift is None else shift + as_dtype(b, w.dtype)
        return mat, shift

    @_float32
    def fold(
        self,
        stats: Stats,
        *,
        nap: Partition,
        eps: float,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """``(M, b)`` with ``y = M x + b`` per group: ``M`` of shape ``(Gc, D, D)``, ``b`` ``(C,)``."""
        folded = self._fold(self.whitening(stats, eps), stats["mean"], weight, bias, nap)
        if folded is None:
            raise ConfigError(f"the recovery of {nap!r} varies within a whitening group; cannot fold")
        shift = folded[1] if folded[1] is not None else torch.zeros_like(stats["mean"])
        return folded[0][0], shift[0].reshape(-1)

    def coefficients(self, stats: Stats, eps: float, m: int) -> Coefficients:
        raise ConfigError("whitening is a matrix transform; use transform() or fold()")
