"""Whitening (book ch. 4.2, "beyond standardization"): batch, group and instance whitening."""

from __future__ import annotations

from typing import Literal

from typing_extensions import Unpack

from .. import nap, nop, nrr
from ..errors import ConfigError
from ..normalization import Normalization
from ..registry import register
from ._common import WHITENING_GROUP, NormKwargs, affine_recovery, default_grouping

__all__ = [
    "BatchWhitening",
    "DecorrelatedBatchNorm",
    "PCABatchWhitening",
    "CholeskyBatchWhitening",
    "IterNorm",
    "GroupWhitening",
    "InstanceWhitening",
    "SwitchableWhitening",
]

Estimate = Literal["matrix", "covariance"]
RecoveryChoice = bool | Literal["coloring"]


def _iterations(module: object, method: str, iterations: int | None) -> int | None:
    """The Newton–Schulz steps: ``iterations`` given explicitly with a method that does not
    iterate raises instead of being silently ignored (naming the preset); ``None`` is the
    operation's default (5 for ``"newton"``)."""
    if iterations is None:
        return None
    if method != "newton":
        raise ConfigError(
            f"{type(module).__name__} got iterations={iterations!r}, but its method={method!r} "
            f"does not iterate: iterations applies to method='newton' (IterNorm) only. Remove "
            f"iterations=, or use method='newton' / normkit.IterNorm")
    return iterations


class BatchWhitening(Normalization):
    r"""Batch whitening of groups of ``group_size`` channels: ``y = γ ⊙ W(x − μ_B) + β``.

    Base of :class:`DecorrelatedBatchNorm` (ZCA), :class:`PCABatchWhitening`,
    :class:`CholeskyBatchWhitening` and :class:`IterNorm`. ``W`` whitens the ``d × d``
    covariance ``Σ_B`` of each group of ``d = group_size`` channels over ``(N, *spatial)``:
    ``W (Σ_B + εI) Wᵀ = I``. Training tracks the running mean and either the running whitening
    matrix (``estimate="matrix"``) or the running covariance (``estimate="covariance"``, the
    book's "Sigma" variants; ``W`` is then recomputed from it at evaluation). ``group_size=1``
    is BN. A ``group_size`` that does not divide ``C`` leaves a smaller last group of
    ``r = C mod d`` channels, whitened on its own ``r × r`` covariance (``running_matrix`` /
    ``running_cov`` keep ``⌈C/d⌉`` blocks of ``d × d``, the last one ``r × r`` in its top-left
    corner).

    Args:
        num_features: channels ``C``.
        group_size: channels whitened jointly ``d``; when it does not divide ``C`` the last group
            has the remaining ``C mod d`` channels. Default: the largest divisor of ``C`` up to
            16 (equal groups).
        method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"``.
        iterations: Newton–Schulz steps, ``method="newton"`` only (given with another method, it
            raises rather than being ignored). Default ``5``.
        estimate: running estimate kept for evaluation: ``"matrix"`` or ``"covariance"``.
        affine: per-channel ``γ, β`` (``True``, the default), none (``False``), or
            ``"coloring"``: a learned ``d × d`` matrix per group (:class:`normkit.nrr.Coloring`,
            ``group_size`` must then divide ``C``).
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same. Training needs more than one value per group; fewer values than
        ``group_size`` give a rank-deficient ``Σ_B``, kept finite by ``ε``.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(64, 4, 3, 3, dtype=torch.float64)
        >>> w1 = nk.BatchWhitening(4, group_size=1, dtype=torch.float64)
        >>> torch.allclose(w1(x), nk.BatchNorm(4, dtype=torch.float64)(x), atol=1e-9)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = None,
        method: Literal["zca", "pca", "cholesky", "newton"] = "zca",
        iterations: int | None = None,
        estimate: Estimate = "matrix",
        affine: RecoveryChoice = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        if group_size is None:
            group_size = default_grouping(num_features, WHITENING_GROUP, count=False)
        super().__init__(
            num_features,
            nap=nap.Batch(group_size=group_size),
            nop=nop.Whiten(method=method, iterations=_iterations(self, method, iterations),
                           estimate=estimate),
            nrr=nrr.Coloring(group_size=group_size) if affine == "coloring" else affine_recovery(affine),
            **kw,
        )


@register("dbn", family="whitening", aliases=("zca_bw", "decorrelated_batch_norm"),
          paper="Huang, Yang, Lang & Deng 2018, arXiv:1804.08450")
class DecorrelatedBatchNorm(BatchWhitening):
    r"""Decorrelated batch normalization: ZCA whitening ``W = UΛ^{-1/2}Uᵀ`` per channel group.

    .. math::
        \hat{x} = U \Lambda^{-1/2} U^\top (x - \mu_B), \qquad \Sigma_B + \epsilon I = U\Lambda U^\top

    ZCA is the whitening closest to the input (it minimizes ``‖x̂ − x‖``), so it avoids PCA's
    stochastic axis swapping. Backward through ``Λ^{-1/2}`` uses the divided-difference form:
    finite for repeated eigenvalues. See :class:`BatchWhitening` for arguments.

    Paper: Huang et al., *Decorrelated Batch Normalization*, CVPR 2018. arXiv:1804.08450.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> _ = torch.manual_seed(0)  # a random mix could be near-singular, where ε = 1e-9 shows
        >>> x = torch.randn(512, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
        >>> y = nk.DecorrelatedBatchNorm(4, group_size=4, eps=1e-9, dtype=torch.float64)(x)
        >>> torch.allclose(y.T @ y / 512, torch.eye(4, dtype=torch.float64), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, group_size: int | None = None, estimate: Estimate = "matrix",
                 affine: RecoveryChoice = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, group_size=group_size, method="zca", estimate=estimate,
                         affine=affine, **kw)


@register("pca_bw", family="whitening", aliases=("pca_batch_whitening",),
          paper="Huang, Yang, Lang & Deng 2018, arXiv:1804.08450")
class PCABatchWhitening(BatchWhitening):
    r"""PCA batch whitening ``x̂ = Λ^{-1/2} Uᵀ (x − μ_B)`` (eigenvalues ascending).

    .. math::
        \hat{x} = \Lambda^{-1/2} U^\top (x - \mu_B), \qquad \Sigma_B + \epsilon I = U \Lambda U^\top

    The rotation ``Uᵀ`` changes from batch to batch (stochastic axis swapping), which is why the
    DBN paper prefers ZCA; kept for comparison. Eigenvector gradients for near-equal eigenvalue
    pairs are masked so gradients stay finite. See :class:`BatchWhitening` for arguments.

    Paper: Huang et al., *Decorrelated Batch Normalization*, CVPR 2018. arXiv:1804.08450.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(512, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
        >>> y = nk.PCABatchWhitening(4, group_size=4, eps=1e-9, dtype=torch.float64)(x)
        >>> torch.allclose(y.T @ y / 512, torch.eye(4, dtype=torch.float64), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, group_size: int | None = None, estimate: Estimate = "matrix",
                 affine: RecoveryChoice = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, group_size=group_size, method="pca", estimate=estimate,
                         affine=affine, **kw)


@register("cd_bw", family="whitening", aliases=("cholesky_bw", "cholesky_whitening"),
          paper="Huang, Zhao, Liu, Shao & Zhu 2020, arXiv:2004.03195")
class CholeskyBatchWhitening(BatchWhitening):
    r"""Cholesky batch whitening ``x̂ = L^{-1}(x − μ_B)`` with ``Σ_B + εI = LLᵀ``.

    .. math::
        \hat{x} = L^{-1}(x - \mu_B), \qquad \Sigma_B + \epsilon I = L L^\top

    Computed with a triangular solve (no explicit inverse); ``L^{-1}`` is lower-triangular. See
    :class:`BatchWhitening` for arguments.

    Paper: Huang et al., *An Investigation into the Stochasticity of Batch Whitening*, CVPR 2020.
    arXiv:2004.03195.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(512, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
        >>> y = nk.CholeskyBatchWhitening(4, group_size=4, eps=1e-9, dtype=torch.float64)(x)
        >>> torch.allclose(y.T @ y / 512, torch.eye(4, dtype=torch.float64), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, group_size: int | None = None, estimate: Estimate = "matrix",
                 affine: RecoveryChoice = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, group_size=group_size, method="cholesky", estimate=estimate,
                         affine=affine, **kw)


@register("iternorm", family="whitening", aliases=("iterative_normalization", "itn"),
          paper="Huang, Zhou, Zhu, Liu & Shao 2019, arXiv:1904.03441")
class IterNorm(BatchWhitening):
    r"""Iterative normalization: Newton–Schulz whitening without eigendecomposition.

    .. math::
        \Sigma_N = \Sigma_B / \operatorname{tr}\Sigma_B,\quad P_0 = I,\quad
        P_{k+1} = \tfrac12 (3P_k - P_k^3 \Sigma_N),\quad
        \hat{x} = P_T (x - \mu_B) / \sqrt{\operatorname{tr}\Sigma_B}

    Small ``T`` whitens only partly (the spectrum is squeezed, not flattened), which trades
    whitening for lower stochasticity; ``T → ∞`` is ZCA. Computed in the stable coupled form
    (see :func:`normkit.functional.whiten.newton_schulz_matrix`). See :class:`BatchWhitening`.

    Paper: Huang et al., *Iterative Normalization: Beyond Standardization towards Efficient
    Whitening*, CVPR 2019. arXiv:1904.03441.

    Args:
        iterations: ``T`` (1 to 64). Default ``5``.

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(256, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
        >>> it = nk.IterNorm(4, group_size=4, iterations=40, eps=1e-9, dtype=torch.float64)
        >>> zca = nk.DecorrelatedBatchNorm(4, group_size=4, eps=1e-9, dtype=torch.float64)
        >>> torch.allclose(it(x), zca(x), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, *, group_size: int | None = None, iterations: int = 5,
                 estimate: Estimate = "matrix", affine: RecoveryChoice = True, **kw: Unpack[NormKwargs]) -> None:
        super().__init__(num_features, group_size=group_size, method="newton",
                         iterations=iterations, estimate=estimate, affine=affine, **kw)


@register("group_whitening", family="whitening", aliases=("gw",),
          paper="Huang, Zhou, Liu, Zhu & Shao 2021, arXiv:2009.13333")
class GroupWhitening(Normalization):
    r"""Group whitening: per sample, whiten the ``g`` group-vectors of its channels.

    .. math::
        X_n \in \mathbb{R}^{g \times (C/g \cdot HW)},\quad
        \hat{X}_n = W_n (X_n - \mu_n),\quad W_n(\Sigma_n + \epsilon I)W_n^\top = I

    Batch-independent like GN (the same partition, with whitening instead of standardization);
    one group is LN without affine. ``method`` as in :class:`BatchWhitening` (default ZCA).

    Paper: Huang et al., *Group Whitening: Balancing Learning Efficiency and Representational
    Capacity*, CVPR 2021. arXiv:2009.13333.

    Args:
        num_features: channels ``C``.
        num_groups: ``g`` (must divide ``C``). Default: the largest divisor of ``C`` up to 16.
        method, iterations: as :class:`BatchWhitening`.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *)`` → same; needs ``C/g · spatial ≥ 2``.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
        >>> gw = nk.GroupWhitening(8, num_groups=1, affine=False, dtype=torch.float64)
        >>> torch.allclose(gw(x), nk.LayerNorm(8, affine=False, dtype=torch.float64)(x), atol=1e-9)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        method: Literal["zca", "pca", "cholesky", "newton"] = "zca",
        iterations: int | None = None,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        if num_groups is None:
            num_groups = default_grouping(num_features, WHITENING_GROUP, count=False)
        super().__init__(
            num_features,
            nap=nap.Group(num_groups=num_groups),
            nop=nop.Whiten(method=method, iterations=_iterations(self, method, iterations)),
            nrr=affine_recovery(affine),
            **kw,
        )


@register("instance_whitening", family="whitening", aliases=("iw",),
          paper="Li, Fang, Yang, Wang, Lu & Yang 2017, arXiv:1705.08086")
class InstanceWhitening(Normalization):
    r"""Instance whitening: per sample, whiten groups of ``group_size`` channels over positions.

    .. math::
        \hat{x}_n = W_n (x_n - \mu_n),\quad W_n(\Sigma_n + \epsilon I)W_n^\top = I,\quad
        \Sigma_n \text{ over the positions of sample } n

    The whitening step of WCT style transfer. ``group_size=1`` is IN. Defaults follow IN:
    ``affine=False``, no running statistics.

    Paper: Li et al., *Universal Style Transfer via Feature Transforms*, NeurIPS 2017.
    arXiv:1705.08086.

    Args:
        num_features: channels ``C``.
        group_size: channels whitened jointly (the last group smaller when it does not divide
            ``C``). Default ``C``.
        method, iterations: as :class:`BatchWhitening`.
        affine: per-channel ``γ, β``. Default ``False``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *spatial)`` → same; needs more than one position.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        >>> iw = nk.InstanceWhitening(4, group_size=1, dtype=torch.float64)
        >>> torch.allclose(iw(x), nk.InstanceNorm(4, dtype=torch.float64)(x), atol=1e-9)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = None,
        method: Literal["zca", "pca", "cholesky", "newton"] = "zca",
        iterations: int | None = None,
        affine: bool = False,
        **kw: Unpack[NormKwargs],
    ) -> None:
        kw.setdefault("track_running_stats", False)
        super().__init__(
            num_features,
            nap=nap.Instance(group_size=num_features if group_size is None else group_size),
            nop=nop.Whiten(method=method, iterations=_iterations(self, method, iterations)),
            nrr=affine_recovery(affine),
            **kw,
        )


@register("switchable_whitening", family="whitening", aliases=("sw",),
          paper="Pan, Zhan, Shi, Tang & Luo 2019, arXiv:1904.09739")
class SwitchableWhitening(Normalization):
    r"""Switchable whitening: learn to mix batch/instance whitening and BN/IN statistics.

    .. math::
        \mu_n = \sum_{k\in\Omega} \omega_k \mu_k,\quad
        \Sigma_n = \sum_{k\in\Omega} \omega'_k \Sigma_k,\quad
        y_n = \gamma \odot W(\Sigma_n)(x_n - \mu_n) + \beta

    with ``Ω = modes`` ⊆ {``bw``, ``iw``, ``bn``, ``in``}: batch whitening (``μ_B, Σ_B``),
    instance whitening (per-sample ``μ_n, Σ_n`` over positions), BN (``diag Σ_B``) and IN
    (``diag Σ_n``); ``ω = softmax(mean_weight)``, ``ω' = softmax(cov_weight)`` are learned
    (init: equal weights). ``W`` is ZCA by default. Running estimates track ``μ_B`` and ``Σ_B``
    (``running_mean``, ``running_cov``); evaluation mixes them with the input's instance
    statistics, so the output still depends on each sample's own statistics.

    Paper: Pan et al., *Switchable Whitening for Deep Representation Learning*, ICCV 2019.
    arXiv:1904.09739.

    Args:
        num_features: channels ``C``.
        group_size: channels whitened jointly (the last group smaller when it does not divide
            ``C``). Default: the largest divisor of ``C`` up to 16.
        modes: the statistics mixed. Default ``("bw", "iw", "bn", "in")``.
        method, iterations: as :class:`BatchWhitening`.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs`.

    Shape:
        ``(N, C, *spatial)`` → same; needs more than one position (instance statistics).

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
        >>> sw = nk.SwitchableWhitening(4, group_size=4, modes=("bw",), dtype=torch.float64)
        >>> bw = nk.DecorrelatedBatchNorm(4, group_size=4, dtype=torch.float64)
        >>> torch.allclose(sw(x), bw(x), atol=1e-9)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = None,
        modes: tuple[str, ...] = ("bw", "iw", "bn", "in"),
        method: Literal["zca", "pca", "cholesky", "newton"] = "zca",
        iterations: int | None = None,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        if group_size is None:
            group_size = default_grouping(num_features, WHITENING_GROUP, count=False)
        super().__init__(
            num_features,
            nap=nap.Batch(group_size=group_size),
            nop=nop.SwitchableWhiten(method=method,
                                     iterations=_iterations(self, method, iterations),
                                     estimate="covariance",
                                     modes=tuple(modes)),
            nrr=affine_recovery(affine),
            **kw,
        )
