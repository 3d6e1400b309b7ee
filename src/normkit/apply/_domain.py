r"""Domain-specific normalization (ch. 10.1), part of :mod:`normkit.apply.adapt` (import it from
there): :class:`DomainSpecificNorm` (DSBN: one copy of a normalization per domain),
:func:`domain_specific` and :func:`use_domain` (a whole model), and :class:`TransNorm`
(per-domain statistics, shared ``γ, β``, transferability attention ``1 + α``).

References: Chang et al. 2019 (DSBN, CVPR); Wang et al. 2019 (TransNorm, NeurIPS).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .. import registry
from ..errors import ConfigError, ShapeError
from ..functional.standardize import standardize_coefficients
from ..functional.statistics import moments
from .convert import is_normalization, layer_layout
from .stats import statistics_modules

__all__ = ["DomainSpecificNorm", "TransNorm", "domain_specific", "use_domain"]


# ------------------------------------------------------------------------ domain-specific norm
def _check_domain(domain: Any, num_domains: int) -> int:
    if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < num_domains:
        raise ConfigError(f"domain must be an int in [0, {num_domains - 1}] ({num_domains} "
                          f"domains), got {domain!r}")
    return domain


class DomainSpecificNorm(nn.Module):
    r"""Domain-specific normalization (DSBN, Chang et al. 2019): ``K`` independent copies of a
    normalization layer — each with its own statistics and ``γ, β`` — one per domain:

    .. math::
        y = \mathrm{Norm}_d(x) = \gamma_d \frac{x - \mu_d}{\sqrt{\sigma^2_d + \epsilon}} + \beta_d

    where ``d`` is the domain of the batch. The layers around it (convolutions, linear layers)
    are shared by all domains. The domain is the ``domain=`` argument of :meth:`forward`, or,
    for a whole model whose ``forward`` does not pass it, set on every domain-specific module by
    :func:`use_domain`.

    Args:
        num_features: channels ``C``.
        num_domains: number of domains ``K`` (≥ 1).
        norm: the per-domain layer: a registry spec (``"bn"``, ``"gn:num_groups=8"``) or a
            factory ``f(C, **kwargs) -> nn.Module``.
        **kwargs: keyword arguments for every copy (``eps``, ``momentum``, ``affine``, ...).

    Shape:
        That of the per-domain layer (``(N, C, *)`` for BN).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> dsbn = DomainSpecificNorm(3, num_domains=2)
        >>> _ = dsbn(torch.randn(8, 3) + 4, domain=1)       # only domain 1's statistics move
        >>> [round(float(m.running_mean.mean()), 1) for m in dsbn.domains]
        [0.0, 0.4]
    """

    def __init__(self, num_features: int, num_domains: int = 2, *,
                 norm: str | Callable[..., nn.Module] = "bn", **kwargs: Any) -> None:
        super().__init__()
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ConfigError(f"num_domains must be an int ≥ 1, got {num_domains!r}")
        if not (isinstance(norm, str) or callable(norm)):
            raise ConfigError(f"norm must be a registry spec or a factory f(C, **kw), got {norm!r}")
        make = (lambda: registry.create(norm, num_features, **kwargs)) if isinstance(norm, str) \
            else (lambda: norm(num_features, **kwargs))
        self.num_features = num_features
        self.domains = nn.ModuleList(make() for _ in range(num_domains))
        self.active_domain: int | None = None

    @classmethod
    def from_module(cls, module: nn.Module, num_domains: int = 2) -> DomainSpecificNorm:
        """``num_domains`` deep copies of a (trained) normalization layer, each starting with its
        parameters and statistics.

        Example:
            >>> import torch
            >>> dsbn = DomainSpecificNorm.from_module(torch.nn.BatchNorm2d(4), 3)
            >>> len(dsbn.domains), type(dsbn.domains[2]).__name__
            (3, 'BatchNorm2d')
        """
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ConfigError(f"num_domains must be an int ≥ 1, got {num_domains!r}")
        num_features = layer_layout(type(module).__name__, module)[0] \
            if is_normalization(module) else getattr(module, "num_features", None)
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.num_features = num_features
        out.domains = nn.ModuleList(copy.deepcopy(module) for _ in range(num_domains))
        out.active_domain = None
        out.train(module.training)
        return out

    @property
    def num_domains(self) -> int:
        """Number of domains ``K``."""
        return len(self.domains)

    def _domain(self, domain: int | None) -> int:
        if domain is None:
            domain = self.active_domain
        if domain is None:
            raise ConfigError(
                f"{type(self).__name__}: no domain given; call it with domain=k or run the "
                f"model inside `with normkit.apply.adapt.use_domain(model, k):` "
                f"(k in [0, {self.num_domains - 1}])")
        return _check_domain(domain, self.num_domains)

    def forward(self, x: Tensor, domain: int | None = None) -> Tensor:
        """Normalize ``x`` with the layer of ``domain`` (default: the active domain)."""
        return self.domains[self._domain(domain)](x)

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, active_domain={self.active_domain}"


def domain_specific(model: nn.Module, num_domains: int = 2) -> nn.Module:
    """Make every statistics module of ``model`` (BN, batch whitening, ...:
    :func:`~normkit.apply.stats.statistics_modules`) a :class:`DomainSpecificNorm` of
    ``num_domains`` copies of it, in place; every other weight stays shared. Modules already
    inside a domain-specific module are left as they are.

    Returns:
        ``model`` (or the wrapper, if ``model`` itself is a statistics module).

    Raises:
        ConfigError: for a model without statistics modules.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> net = domain_specific(net, 2)
        >>> with use_domain(net, 1):
        ...     net(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """
    inside = {id(m) for d in model.modules() if isinstance(d, DomainSpecificNorm)
              for m in d.domains.modules()}
    targets = {id(m) for m in statistics_modules(model) if id(m) not in inside}
    if not targets:
        raise ConfigError(f"domain_specific: {type(model).__name__} has no statistics module "
                          f"(BatchNorm, batch whitening, ...) to make domain-specific")
    if id(model) in targets:
        return DomainSpecificNorm.from_module(model, num_domains)
    wrapped: dict[int, DomainSpecificNorm] = {}  # a module shared at two paths stays shared
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                if id(child) not in wrapped:
                    wrapped[id(child)] = DomainSpecificNorm.from_module(child, num_domains)
                setattr(parent, name, wrapped[id(child)])
    return model


@contextmanager
def use_domain(model: nn.Module, domain: int) -> Iterator[nn.Module]:
    """Inside the context, every :class:`DomainSpecificNorm` (and :class:`TransNorm`) of
    ``model`` uses ``domain`` when called without ``domain=``; the previous choice is restored
    on exit.

    Raises:
        ConfigError: for a model without domain-specific modules, or ``domain`` out of range
            for one of them.

    Example:
        >>> import torch
        >>> dsbn = DomainSpecificNorm(3, 2).eval()
        >>> with use_domain(dsbn, 0):
        ...     y = dsbn(torch.randn(4, 3))
        >>> dsbn.active_domain is None
        True
    """
    mods = [m for m in model.modules() if isinstance(m, DomainSpecificNorm)]
    if not mods:
        raise ConfigError(f"use_domain: {type(model).__name__} has no DomainSpecificNorm or "
                          f"TransNorm; make it domain-specific first (domain_specific(model, K))")
    for m in mods:
        _check_domain(domain, m.num_domains)
    saved = [(m, m.active_domain) for m in mods]
    try:
        for m in mods:
            m.active_domain = domain
        yield model
    finally:
        for m, previous in saved:
            m.active_domain = previous


# ------------------------------------------------------------------------------------ TransNorm
def _uses_batch_stats(m: nn.Module) -> bool:
    """torch's rule: batch statistics in training or when no running statistics exist."""
    return m.training or getattr(m, "running_mean", None) is None


class TransNorm(DomainSpecificNorm):
    r"""Transferable Normalization (Wang et al. 2019): BN with separate statistics for the
    source (domain 0) and the target (domain 1), shared ``γ, β``, and a per-channel
    transferability attention that amplifies the channels whose normalized means agree across
    the domains:

    .. math::
        d_c = \Big|\frac{\mu_{s,c}}{\sqrt{\sigma^2_{s,c} + \epsilon}}
                  - \frac{\mu_{t,c}}{\sqrt{\sigma^2_{t,c} + \epsilon}}\Big|, \qquad
        \alpha_c = \frac{C\,(1 + d_c)^{-1}}{\sum_{j=1}^{C} (1 + d_j)^{-1}}, \qquad
        y = (1 + \alpha_c)\,\big(\gamma_c \hat x_{c} + \beta_c\big)

    with :math:`\hat x` normalized by the statistics of its own domain (``α`` averages to 1 over
    the channels). The statistics in ``d`` are those used to normalize: the batch's in training
    (or inside :func:`~normkit.apply.stats.batch_statistics`), the running ones in evaluation.

    Called with ``domain=k`` (or inside :func:`use_domain`), the whole batch is of domain ``k``
    and the other domain's running statistics enter ``d``. Called without a domain, the batch
    is the paper's joint batch: its first half the source, its second half the target, and ``d``
    uses both halves' statistics (gradients flow through ``α`` into both).

    Args:
        num_features: channels ``C`` (axis 1).
        eps: added to the variance (normalization and ``d``).
        momentum: of the running statistics (``None``: cumulative average).
        affine: learn the shared ``γ, β``.
        device, dtype: factory arguments.

    Shape:
        ``(N, C, *)``; without a domain ``N`` must be even.

    Example:
        >>> import torch
        >>> tn = TransNorm(4)
        >>> y = tn(torch.randn(8, 4, 5))                  # joint batch: 4 source, 4 target
        >>> alpha = tn.attention(tn.domains[0].running_mean, tn.domains[0].running_var,
        ...                      tn.domains[1].running_mean, tn.domains[1].running_var)
        >>> round(float(alpha.mean()), 6), y.shape
        (1.0, torch.Size([8, 4, 5]))
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, 2, norm="bn", affine=False, eps=eps, momentum=momentum,
                         device=device, dtype=dtype)
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def attention(self, mean_s: Tensor, var_s: Tensor, mean_t: Tensor, var_t: Tensor) -> Tensor:
        r"""The transferability attention :math:`\alpha` (shape ``(C,)``) from the two domains'
        per-channel means and variances."""
        _, shift_s = standardize_coefficients(mean_s.reshape(-1), var_s.reshape(-1), self.eps)
        _, shift_t = standardize_coefficients(mean_t.reshape(-1), var_t.reshape(-1), self.eps)
        inv = 1.0 / (1.0 + (shift_s - shift_t).abs())  # shift = −μ/√(σ² + ε)
        return inv.numel() * inv / inv.sum()

    def _stats(self, k: int, x: Tensor | None) -> tuple[Tensor, Tensor]:
        m = self.domains[k]
        if x is not None and _uses_batch_stats(m):
            mean, var = moments(x, [d for d in range(x.dim()) if d != 1])
            return mean.reshape(-1), var.reshape(-1)
        if m.running_mean is None:
            raise ConfigError(
                f"TransNorm: domain {k} has no running statistics for the attention; call it "
                f"with a joint batch (no domain) or keep track_running_stats")
        return m.running_mean, m.running_var

    def forward(self, x: Tensor, domain: int | None = None) -> Tensor:
        """Normalize ``x`` (all of ``domain``, or a joint source/target batch; see above)."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ShapeError(f"TransNorm({self.num_features}) needs (N, {self.num_features}, *) "
                             f"inputs, got shape {tuple(x.shape)}")
        if domain is None:
            domain = self.active_domain
        if domain is None:
            if x.shape[0] % 2:
                raise ShapeError(
                    f"TransNorm without a domain takes a joint batch [source; target] of even "
                    f"size, got {x.shape[0]} samples; pass domain=k for a one-domain batch")
            xs, xt = x.chunk(2)
            xhat = torch.cat([self.domains[0](xs), self.domains[1](xt)])
            alpha = self.attention(*self._stats(0, xs), *self._stats(1, xt))
        else:
            k = _check_domain(domain, 2)
            xhat = self.domains[k](x)
            own, other = self._stats(k, x), self._stats(1 - k, None)
            alpha = self.attention(*(own + other if k == 0 else other + own))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.affine:
            xhat = xhat * self.weight.view(shape) + self.bias.view(shape)
        return xhat * (1 + alpha.to(xhat.dtype)).view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, " + \
            super().extra_repr()
