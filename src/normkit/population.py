r"""Layers whitened by population statistics: Natural Neural Networks and GWNN (book ch. 3.1).

A population-whitened layer computes

.. math::
    y = V\,\big(W\,(x - c)\big) + d

where ``c`` (``population_mean``) and ``W`` (``whitening``) are **buffers** estimated from the
layer's input over a few batches at each :func:`refresh`, and ``V`` (``weight``), ``d``
(``bias``) are the learned parameters. Between refreshes ``c`` and ``W`` are constants, so the
layer is an ordinary affine map of ``x`` — equal to ``nn.Linear`` with weight ``VW`` and bias
``d − VWc`` — but gradient descent on ``V`` sees whitened inputs ``z = W(x − c)``: the input
factor ``E[zzᵀ]`` of the layer's Fisher block (K-FAC) is ``I``, so SGD on ``V`` approximates the
natural gradient (Desjardins et al. 2015, "PRONG").

**Re-expression at a refresh.** New statistics give ``c′``, ``W′``; the parameters are rewritten
so the layer computes the same function:

.. math::
    V' = V\,W\,W'^{+}, \qquad d' = d + V\,W\,(c' - c)

Proof (full rank, ``W′⁺ = W′⁻¹``): ``V′W′(x − c′) + d′ = VW(x − c′) + VW(c′ − c) + d
= VW(x − c) + d``. ``W′⁺`` is the pseudo-inverse of the *stored* ``W′``
(``= (Σ′+εI)W′ᵀ``, the coloring matrix for ZCA), computed in float64, so the identity holds for
the matrix the layer actually uses; outputs agree to float rounding. **Low rank** (GWNN's
PCA-compressed variant, ``W′`` of shape ``k × g``): ``W′W′⁺ = I_k`` and ``W′⁺W′ = P′`` projects on
the new top-``k`` principal subspace; the output changes by exactly ``VW(P′ − I)(x − c′)``.
That is zero for every ``x`` iff the row space of the old ``W`` lies in the new subspace (e.g.
unchanged statistics, or the second refresh on inputs supported on a ``k``-dim affine subspace),
and zero for the inputs with ``x − c′`` in the new subspace; otherwise it is the least-squares
re-expression on the refresh batches (the error has mean zero there; ``V′`` minimizes its second
moment for ``ε → 0``). A conv's zero-padded positions (``0 − c′``) are such "other" inputs.

**Grouped** (GWNN): with ``group_size=g`` the ``F`` input features are split into ``F/g``
consecutive groups, each whitened on its own: ``W`` is block-diagonal (stored as ``(G, k, g)``
blocks); ``rank`` then applies per group. ``group_size`` must divide ``F``.

**Conv** (:class:`WhitenedConv2d`): ``W`` acts on the channels at every position (a 1×1
whitening), ``c`` is per channel. The input is zero-padded *first* and then centred and
whitened (a padded position holds ``W(0 − c)``, exactly what a plain ``Conv2d`` with weight
``V·W`` would see), so a change of ``c`` is a constant field over the whole padded input and
folds exactly into the bias: ``d′ = d + Σ_{ij} V_{:,:,i,j}\,W(c′ − c)``.

**Statistics.** :func:`refresh` runs the model in eval mode without gradient and pools, per
layer, the mean and the **unbiased** covariance over every value of every batch (Chan's
count-weighted merge, :class:`normkit.functional.merging.MomentPool`), in float64; ``W′``
comes from :func:`normkit.functional.whiten.whitening_matrix` (``zca``, ``pca`` or
``cholesky``) with ``ε`` added to ``Σ``. Since a full-rank refresh leaves each layer's function
unchanged, the inputs of later layers are unchanged too, so one pass collects the statistics of all
layers at once; after a low-rank layer (which may change its output) the later layers' statistics
are collected again in another pass over the same batches.

Papers: Desjardins, Simonyan, Pascanu, Kavukcuoglu, "Natural Neural Networks", NeurIPS 2015
(https://arxiv.org/abs/1507.00210); Luo, "Learning Deep Architectures via Generalized Whitened
Neural Networks", ICML 2017.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .apply.stats import _call
from .errors import ConfigError, ShapeError
from .functional.merging import MomentPool
from .functional.partition import resolve_groups
from .functional.statistics import unbiased_variance
from .functional.whiten import batch_moments, whitening_matrix

__all__ = ["WhitenedLinear", "WhitenedConv2d", "population_layers", "whiten_layers", "refresh",
           "RefreshEvery"]

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


def population_layers(model: nn.Module) -> list[_PopulationWhitened]:
    """The population-whitened layers of ``model`` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, _PopulationWhitened)]


def whiten_layers(model: nn.Module, *, method: PopulationMethod = "pca", eps: float = 1e-2,
                  skip: Iterable[str] = ()) -> list[str]:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (in place) by a
    :class:`WhitenedLinear` / :class:`WhitenedConv2d` with the same weight and bias, ``c = 0`` and
    ``W = I``: the model computes the same function until the first :func:`refresh`.

    Args:
        model: any module; a bare ``nn.Linear``/``nn.Conv2d`` cannot be replaced in place (wrap it).
        method, eps: of the new layers (see :class:`WhitenedLinear`).
        skip: qualified names of layers to leave as they are.

    Returns:
        The qualified names of the replaced layers, in module order.

    Raises:
        ConfigError: a ``Conv2d`` with ``groups > 1``, non-zero padding mode or string padding
            (none of which the whitened convolution has), or no layer to replace.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 4)
        >>> before = model(x)
        >>> whiten_layers(model, method="zca")
        ['0', '2']
        >>> isinstance(model[0], WhitenedLinear), torch.allclose(model(x), before, atol=1e-6)
        (True, True)
    """
    skip = set(skip)
    targets = [(name, m) for name, m in model.named_modules()
               if name and name not in skip and type(m) in (nn.Linear, nn.Conv2d)]
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear / nn.Conv2d sub-module to "
                          f"whiten (skip={sorted(skip)})")
    for name, m in targets:
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                         or isinstance(m.padding, str)):
            raise ConfigError(f"layer {name!r}: {m} has groups={m.groups}, padding_mode="
                              f"{m.padding_mode!r}, padding={m.padding!r}; WhitenedConv2d needs "
                              f"groups=1 and integer zero padding (pass it in skip=)")
    factory = {"eps": eps, "method": method}
    for name, m in targets:
        like = {"device": m.weight.device, "dtype": m.weight.dtype}
        if isinstance(m, nn.Linear):
            new: _PopulationWhitened = WhitenedLinear(m.in_features, m.out_features,
                                                      bias=m.bias is not None, **factory, **like)
        else:
            new = WhitenedConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                 padding=m.padding, dilation=m.dilation,  # type: ignore[arg-type]
                                 bias=m.bias is not None, **factory, **like)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)  # type: ignore[union-attr]
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return [name for name, _ in targets]


def _collect(model: nn.Module, layers: list[_PopulationWhitened], data: list[Any]
             ) -> tuple[list[_PopulationWhitened], dict[_PopulationWhitened, MomentPool]]:
    """One pass over ``data``: each layer's pooled input statistics, and the layers in the order
    they were first called."""
    pools = {m: MomentPool() for m in layers}
    order: list[_PopulationWhitened] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        stats, m = module._batch_statistics(args[0])  # type: ignore[operator]
        if m > 0:
            if module not in order:
                order.append(module)  # type: ignore[arg-type]
            pools[module].add(stats, m)  # type: ignore[index]

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        for batch in data:
            _call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return order, pools


@torch.no_grad()
def refresh(model: nn.Module, batches: Iterable[Any] | Tensor, *, num_batches: int | None = None,
            optimizer: torch.optim.Optimizer | None = None,
            optimizer_state: OptimizerState = "transform") -> nn.Module:
    r"""Re-estimate ``c``, ``W`` of every population-whitened layer of ``model`` from
    ``batches`` and re-express its parameters so the model computes the same function.

    The model runs in eval mode without gradient (modes restored afterwards); layers are
    refreshed in the order they are called. One pass serves all layers, since a full-rank
    refresh leaves every layer's output unchanged; after each low-rank layer, the later layers'
    statistics are recollected in another pass. The batches are held in a list during the call
    (use ``num_batches`` to bound it); layers the batches never reach are left unchanged with a
    warning, as are layers whose statistics are not finite.

    **Optimizer state.** The re-expression is the linear map ``T(V, d) = (V·WW′⁺, d + VW(c′−c))``
    of the parameters. With ``optimizer`` and ``optimizer_state="transform"`` (default) the same
    ``T`` is applied to the first moments that move like parameters (SGD's ``momentum_buffer``,
    Adam's ``exp_avg``), so a pending momentum step changes the function as it would have
    without the refresh; other state (``exp_avg_sq``, step counts) is left as is. ``"keep"``
    leaves the state untouched (it then refers to the old coordinates), ``"reset"`` deletes the
    state of these parameters (momentum restarts from the next gradient). NNN does not
    transform it. With data parallelism, pass the same batches on every process (statistics are
    not synchronized).

    Args:
        model: any module containing :class:`WhitenedLinear` / :class:`WhitenedConv2d` layers.
        batches: a tensor (one batch) or an iterable of batches as for
            :func:`normkit.apply.recalibrate` (tensors, ``(input, target)`` pairs, keyword
            mappings).
        num_batches: use at most this many batches (default: all).
        optimizer: the optimizer of ``model``'s parameters, for ``optimizer_state``.
        optimizer_state: ``"transform"``, ``"keep"`` or ``"reset"``.

    Returns:
        ``model``.

    Raises:
        ConfigError: no population-whitened layer, no batches, bad ``num_batches`` or
            ``optimizer_state``.

    Example:
        >>> model = nn.Sequential(WhitenedLinear(5, 4), nn.ReLU(), WhitenedLinear(4, 2))
        >>> data = [torch.randn(32, 5) + 1 for _ in range(3)]
        >>> before = model(data[0])
        >>> _ = refresh(model, data)
        >>> torch.allclose(model(data[0]), before, atol=1e-5), int(model[2].num_refreshes)
        (True, 1)
    """
    if num_batches is not None and (not isinstance(num_batches, int)
                                    or isinstance(num_batches, bool) or num_batches <= 0):
        raise ConfigError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if optimizer_state not in _STATES:
        raise ConfigError(f"optimizer_state must be one of {_STATES}, got {optimizer_state!r}")
    layers = population_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no population-whitened layer: use "
                          f"WhitenedLinear / WhitenedConv2d in the model")
    data = ([batches] if isinstance(batches, Tensor)
            else list(itertools.islice(batches, num_batches)))
    if not data:
        raise ConfigError("refresh got no batches: pass a non-empty iterable of inputs")
    modes = {m: m.training for m in model.modules()}
    pending: list[_PopulationWhitened] = layers
    try:
        model.eval()
        first = True
        while pending:
            order, pools = _collect(model, pending, data)
            if first:
                missing = [type(m).__name__ for m in layers if m not in order]
                if missing:
                    warnings.warn(f"refresh: {len(missing)} population-whitened layer(s) got no "
                                  f"input from the batches and were left unchanged: {missing}",
                                  RuntimeWarning, stacklevel=3)
                first = False
            for i, layer in enumerate(order):
                changed = layer._refresh_from(pools[layer], optimizer, optimizer_state)
                if changed and layer.low_rank:  # may change its output: recollect the rest
                    pending = order[i + 1:]
                    break
            else:
                pending = []
    finally:
        for m, training in modes.items():
            m.training = training
    return model


class RefreshEvery:
    """Training-loop callback: :func:`refresh` the model every ``every`` optimizer steps.

    Call :meth:`step` (or the object itself) once after each ``optimizer.step()``; it refreshes
    after steps ``every``, ``2·every``, ... Call :meth:`refresh` once before training so the
    whitening starts from the data (the layers start with ``W = I``)::

        cb = RefreshEvery(model, lambda: loader, every=100, num_batches=4, optimizer=opt)
        cb.refresh()
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
            cb.step()

    Args:
        model: the model (see :func:`refresh`).
        batches: a callable returning an iterable of batches (called at every refresh), or a
            re-iterable such as a list or a ``DataLoader`` (iterated afresh each time).
        every: refresh period ``T`` in steps (NNN: a few hundred).
        num_batches: batches per refresh (default: all that ``batches`` gives).
        optimizer, optimizer_state: as :func:`refresh`.

    Raises:
        ConfigError: ``every`` not a positive int, or ``batches`` a one-shot iterator.

    Example:
        >>> model = torch.nn.Sequential(WhitenedLinear(3, 2))
        >>> data = [torch.randn(16, 3) for _ in range(2)]
        >>> cb = RefreshEvery(model, data, every=2)
        >>> [cb.step() for _ in range(4)], int(model[0].num_refreshes)
        ([False, True, False, True], 2)
    """

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[Any]] | Iterable[Any], *,
                 every: int, num_batches: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 optimizer_state: OptimizerState = "transform") -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ConfigError(f"every must be a positive int (steps between refreshes), "
                              f"got {every!r}")
        if not callable(batches) and iter(batches) is batches:  # type: ignore[arg-type]
            raise ConfigError("batches is a one-shot iterator that the first refresh would use "
                              "up: pass a list, a DataLoader or a callable returning batches")
        self.model, self.batches, self.every = model, batches, every
        self.num_batches, self.optimizer, self.optimizer_state = (num_batches, optimizer,
                                                                  optimizer_state)
        self.steps = 0

    def refresh(self) -> None:
        """Refresh now (does not count as a step)."""
        batches = self.batches() if callable(self.batches) else self.batches
        refresh(self.model, batches, num_batches=self.num_batches, optimizer=self.optimizer,
                optimizer_state=self.optimizer_state)

    def step(self) -> bool:
        """Count one optimizer step; refresh if it is a multiple of ``every``. Returns whether
        it refreshed."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.refresh()
        return True

    __call__ = step
