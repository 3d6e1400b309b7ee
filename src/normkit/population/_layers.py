"""The population-whitened layers :class:`WhitenedLinear` and :class:`WhitenedConv2d` and their
shared state and re-expression at a refresh (``_PopulationWhitened``); the model-level procedures
that drive them (:func:`~normkit.population.refresh`, ...) are in ``population/_refresh.py``. The
mathematics is on the package page, :mod:`normkit.population`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, ShapeError
from ..functional.merging import MomentPool
from ..functional.partition import resolve_groups
from ..functional.statistics import unbiased_variance
from ..functional.whiten import batch_moments, whitening_matrix

__all__ = ["WhitenedLinear", "WhitenedConv2d"]

PopulationMethod = Literal["zca", "pca", "cholesky"]
OptimizerState = Literal["transform", "keep", "reset"]
_METHODS = ("zca", "pca", "cholesky")
_STATES = ("transform", "keep", "reset")
_FIRST_MOMENTS = ("momentum_buffer", "exp_avg")  # optimizer state that moves like parameters


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ConfigError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


class _PopulationWhitened(nn.Module):
    """Shared state and refresh logic of :class:`WhitenedLinear` and :class:`WhitenedConv2d`:
    the whitened dimension ``num_features`` (F) in ``G`` groups of ``g``, ``k = rank`` kept
    components per group; ``weight`` ``V`` is ``(out, G·k, *kernel)``."""

    _version = 1
    weight: Tensor
    bias: Tensor | None

    def _setup(self, num_features: int, out_features: int, kernel: tuple[int, ...], *,
               bias: bool, eps: float, method: str, group_size: int | None, rank: int | None,
               device: Any, dtype: Any) -> None:
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ConfigError(f"eps must be a number > 0 (it regularizes Σ + εI), got {eps!r}")
        if method not in _METHODS:
            raise ConfigError(f"method must be one of {_METHODS}, got {method!r}")
        if not isinstance(out_features, int) or out_features <= 0:
            raise ConfigError(f"out_features must be a positive int, got {out_features!r}")
        groups, size = resolve_groups(
            num_features, group_size=num_features if group_size is None else group_size)
        if rank is not None:
            if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= size:
                what = "the group size" if group_size else "the number of input features"
                raise ConfigError(f"rank must be an int in [1, {size}] ({what}), got {rank!r}")
            if method != "pca":
                raise ConfigError(f"rank={rank} keeps the top principal components: it needs "
                                  f"method='pca', got method={method!r}")
        k = size if rank is None else rank
        self.num_features, self.eps, self.method = num_features, float(eps), method
        self.groups, self.group_size, self.rank = groups, size, k
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, groups * k, *kernel, **factory))
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.register_buffer("population_mean", torch.empty(num_features, **factory))
        self.register_buffer("whitening", torch.empty(groups, k, size, **factory))
        self.register_buffer("num_refreshes", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()
        self.reset_statistics()

    def reset_parameters(self) -> None:
        """``V`` and ``d`` initialized as ``nn.Linear``/``nn.Conv2d`` initialize theirs (same
        random draws for the same shapes)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """``c = 0`` and ``W`` = the first ``k`` rows of ``I_g`` per group (``W = I`` at full rank:
        the layer is a plain affine layer until the first :func:`refresh`); the optimizer state
        is not touched, so call it before training."""
        self.population_mean.zero_()
        eye = torch.eye(self.group_size, dtype=self.whitening.dtype, device=self.whitening.device)
        self.whitening.copy_(eye[: self.rank].expand_as(self.whitening))
        self.num_refreshes.zero_()

    @property
    def low_rank(self) -> bool:
        """Whether fewer components than the group size are kept (a refresh may then change the
        function, see the module docstring)."""
        return self.rank < self.group_size

    def effective_weight(self) -> Tensor:
        """``M = V·W`` (block-diagonal ``W`` applied on the input dimension): the weight of the
        plain layer this one equals, ``(out, F, *kernel)``; its bias is ``d − Σ_kernel M c``."""
        v = self.weight.unflatten(1, (self.groups, self.rank))
        return torch.einsum("ogr...,grf->ogf...", v, self.whitening).flatten(1, 2)

    def _sample_view(self, x: Tensor) -> Tensor:
        """``x`` as ``(P, G, g, S)`` for ``batch_moments(shared=True)``; each layer type (the
        subclasses) defines how its input's features and positions map to it."""
        raise NotImplementedError(f"{type(self).__name__} must define _sample_view: the base "
                                  f"class is abstract (use WhitenedLinear or WhitenedConv2d)")

    def _batch_statistics(self, x: Tensor) -> tuple[dict[str, Tensor], int]:
        view = self._sample_view(x)
        m = view.shape[0] * view.shape[3]
        mean, cov, _ = batch_moments(view, shared=True)
        return {"mean": mean.reshape(-1), "cov": unbiased_variance(cov[0], m)}, m

    @torch.no_grad()
    def _refresh_from(self, pool: MomentPool, optimizer: torch.optim.Optimizer | None,
                      state: str) -> bool:
        """Set ``c′``, ``W′`` from the pooled statistics and re-express ``V``, ``d`` (and the
        optimizer's first moments with ``state='transform'``). Returns False if skipped."""
        stats = pool.result()
        mean, cov = stats["mean"], stats["cov"]
        if self.bias is None:  # no d to absorb a mean shift: whiten the second moment, c = 0
            mu = mean.view(self.groups, self.group_size, 1)
            n = max(pool.n, 1)
            cov, mean = cov * ((n - 1) / n) + mu @ mu.transpose(-1, -2), torch.zeros_like(mean)
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            warnings.warn(f"{type(self).__name__}: non-finite input statistics; refresh skipped, "
                          f"buffers and parameters unchanged", RuntimeWarning, stacklevel=3)
            return False
        if pool.n <= self.group_size:
            warnings.warn(f"{type(self).__name__}: {pool.n} samples for groups of "
                          f"{self.group_size} features; the covariance is singular and ε = "
                          f"{self.eps} bounds the whitening gain", RuntimeWarning, stacklevel=3)
        new_w = whitening_matrix(cov, self.method, eps=self.eps)[:, self.group_size - self.rank:]
        dtype = self.whitening.dtype  # re-express against the values the layer will use:
        stored, mean = new_w.to(dtype).double(), mean.to(dtype).double()
        old_w, old_c = self.whitening.double(), self.population_mean.double()
        a = old_w @ torch.linalg.pinv(stored)  # (G, k, k): W W′⁺
        shift = (old_w @ (mean - old_c).view(self.groups, self.group_size, 1)).squeeze(-1)
        params = [(self.weight, self.bias)]
        if optimizer is not None and state == "transform":
            st_w = optimizer.state.get(self.weight, {})
            st_b = optimizer.state.get(self.bias, {}) if self.bias is not None else {}
            for key in _FIRST_MOMENTS:
                buf = st_w.get(key)
                if isinstance(buf, Tensor) and buf.shape == self.weight.shape:
                    b = st_b.get(key)
                    params.append((buf, b if isinstance(b, Tensor) else None))
        for i, (v_t, d_t) in enumerate(params):
            v = v_t.double().unflatten(1, (self.groups, self.rank))
            if d_t is not None:
                d_t.copy_(d_t.double() + torch.einsum("ogr...,gr->o", v, shift))
            new_v = torch.einsum("ogr...,grs->ogs...", v, a).flatten(1, 2).to(v_t.dtype)
            if i == 0 and parametrize.is_parametrized(self, "weight"):
                self.weight = new_v  # through the parametrization's right_inverse
            else:
                v_t.copy_(new_v)
        if optimizer is not None and state == "reset":
            for p in (self.weight, self.bias):
                optimizer.state.pop(p, None)
        self.whitening.copy_(stored)
        self.population_mean.copy_(mean)
        self.num_refreshes += 1
        return True

    def extra_repr(self) -> str:
        s = f"eps={self.eps}, method={self.method!r}"
        if self.groups > 1:
            s += f", group_size={self.group_size}"
        if self.low_rank:
            s += f", rank={self.rank}"
        return s + ("" if self.bias is not None else ", bias=False")


class WhitenedLinear(_PopulationWhitened):
    r"""Linear layer on its population-whitened input (NNN's whitened layer; GWNN's grouped and
    low-rank variants): ``y = V·(W·(x − c)) + d``, see :mod:`normkit.population`.

    ``c`` and ``W`` change only at :func:`refresh` (which re-expresses ``V``, ``d`` so the
    function is unchanged); until the first refresh ``c = 0``, ``W = I`` and the layer equals
    ``nn.Linear`` (same initialization for the same seed).

    Args:
        in_features: input features ``F``.
        out_features: output features.
        bias: learn ``d`` (default True). Without ``d`` a mean shift cannot be absorbed, so
            ``c`` stays 0 and ``W`` whitens the uncentred second moment ``E[xxᵀ]`` (biased).
        eps: added to the covariance, ``W(Σ + εI)Wᵀ = I`` (default ``1e-2``: hidden ReLU features
            can have near-zero variance, and ``ε`` bounds their gain at ``ε^{-1/2}``; with
            ``1e-3`` the MNIST-1D example of ``examples/population_whitening.py`` diverged at
            SGD lr 0.1, with ``1e-2`` it trains up to lr 0.2).
        method: ``"pca"`` (default, NNN's ``Λ^{-1/2}Uᵀ``), ``"zca"`` or ``"cholesky"``.
        group_size: whiten groups of this many consecutive features (block-diagonal ``W``);
            must divide ``in_features``. Default: one group.
        rank: keep the top ``rank`` principal components per group (needs ``method="pca"``);
            ``V`` is then ``(out, F/g · rank)``.
        device, dtype: factory arguments.

    Shape:
        Input ``(*, F)``, output ``(*, out_features)``.

    Example:
        >>> from normkit.population import refresh
        >>> _ = torch.manual_seed(0)
        >>> layer = WhitenedLinear(4, 3, eps=1e-6)
        >>> x = torch.randn(64, 4) @ (torch.eye(4) + 0.5) + 2     # correlated, offset
        >>> before = layer(x)
        >>> _ = refresh(layer, [x])
        >>> torch.allclose(layer(x), before, atol=1e-5)       # same function ...
        True
        >>> z = layer.whiten(x)                              # ... on whitened inputs
        >>> torch.allclose(torch.cov(z.T), torch.eye(4), atol=1e-3)
        True
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 eps: float = 1e-2, method: PopulationMethod = "pca",
                 group_size: int | None = None, rank: int | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._setup(in_features, out_features, (), bias=bias, eps=eps, method=method,
                    group_size=group_size, rank=rank, device=device, dtype=dtype)

    def _check(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"{type(self).__name__} expected input (*, {self.in_features}) "
                             f"with {self.in_features} features, got shape {tuple(x.shape)}")

    def _sample_view(self, x: Tensor) -> Tensor:
        self._check(x)
        flat = x.reshape(-1, self.groups, self.group_size)  # (N, G, g)
        return flat.permute(1, 2, 0).unsqueeze(0)  # (1, G, g, N)

    def whiten(self, x: Tensor) -> Tensor:
        """``z = W(x − c)`` of shape ``(*, G·k)``: the input the parameters ``V`` act on."""
        self._check(x)
        xc = (x - self.population_mean).unflatten(-1, (self.groups, self.group_size))
        return torch.einsum("...gf,grf->...gr", xc, self.whitening).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return F.linear(x - self.population_mean, self.effective_weight(), self.bias)


class WhitenedConv2d(_PopulationWhitened):
    r"""2-d convolution on its population-whitened input channels (NNN's convolutional
    variant): ``y = conv(W ⋆ (pad(x) − c), V) + d`` with ``W`` a 1×1 whitening of the channels
    and ``c`` the per-channel mean, see :mod:`normkit.population`.

    Zero padding is applied to ``x`` before the centring, so the layer always equals a plain
    ``nn.Conv2d`` (weight ``V·W``, bias ``d − Σ_{ij}(V·W)_{:,:,i,j} c``, zero padding of
    ``x``) and a refresh preserves its function exactly (to float rounding) at the borders too.
    Statistics are over all positions of all samples of the (unpadded) input.

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d``.
        stride, padding, dilation: ints or pairs (zero padding only; no ``groups``).
        bias, eps, method, group_size, rank, device, dtype: as :class:`WhitenedLinear`, over the
            input channels.

    Shape:
        Input ``(N, C_in, H, W)``, output ``(N, C_out, H_out, W_out)`` as ``nn.Conv2d``.

    Example:
        >>> from normkit.population import refresh
        >>> _ = torch.manual_seed(0)
        >>> conv = WhitenedConv2d(3, 4, 3, padding=1)
        >>> x = torch.randn(2, 3, 6, 6) + 5
        >>> before = conv(x)
        >>> _ = refresh(conv, [x])
        >>> torch.allclose(conv(x), before, atol=1e-5)
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 *, stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, eps: float = 1e-2,
                 method: PopulationMethod = "pca", group_size: int | None = None,
                 rank: int | None = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ConfigError(f"kernel_size, stride, dilation must be >= 1 and padding >= 0, got "
                              f"{self.kernel_size}, {self.stride}, {self.dilation}, {self.padding}")
        self._setup(in_channels, out_channels, self.kernel_size, bias=bias, eps=eps,
                    method=method, group_size=group_size, rank=rank, device=device, dtype=dtype)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"{type(self).__name__} expected input (N, {self.in_channels}, H, W),"
                             f" got shape {tuple(x.shape)}")

    def _sample_view(self, x: Tensor) -> Tensor:
        self._check(x)
        return x.reshape(x.shape[0], self.groups, self.group_size, -1)  # (N, G, g, H·W)

    def _centred(self, x: Tensor) -> Tensor:
        self._check(x)
        ph, pw = self.padding
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        return xp - self.population_mean.view(1, -1, 1, 1)

    def whiten(self, x: Tensor) -> Tensor:
        """``z = W(pad(x) − c)`` per position, ``(N, G·k, H + 2p_h, W + 2p_w)``."""
        xc = self._centred(x).unflatten(1, (self.groups, self.group_size))
        return torch.einsum("ngf...,grf->ngr...", xc, self.whitening).flatten(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self._centred(x), self.effective_weight(), self.bias, self.stride, 0,
                        self.dilation)
