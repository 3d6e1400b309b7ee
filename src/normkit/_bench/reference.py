"""Plain references: each method as the papers' reference code writes it, and torch's own module.

The benchmarks (``normkit bench``) time ``ours`` next to these; the tests use the float64
whitening formula :func:`whitening_matrix` as their reference too, so it is written once, here.

* :func:`plain_for` — the straightforward autograd formula of a method, configured like ours, e.g.
  ``(x - x.mean(d)) / torch.sqrt(x.var(d, unbiased=False) + eps) * w + b``;
* :func:`torch_for` — torch's native module computing the same thing, where one exists;
* :func:`whitening_matrix` / :class:`PlainWhitening` — batch whitening from the formulas.

Example:
    >>> import torch
    >>> cov = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 4
    >>> whitening_matrix(cov, "zca", eps=0.0)[0].diagonal()
    tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .timing import ShapeSpec

__all__ = ["Lambda", "PlainWhitening", "SPADEReference", "WindowLRN", "bn_torch", "lrn_at_window", "plain_for",
           "torch_for", "whitening_matrix"]


class _Plain(nn.Module):
    """A reference formulation: ``fn(self, x)`` with torch-named parameters and buffers."""

    def __init__(self, fn: Callable[[Any, Tensor], Tensor], c: int, *, weight: bool = True,
                 bias: bool = True, running: Sequence[str] = (), **attrs: Any) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.ones(c)) if weight else None
        self.bias = nn.Parameter(torch.zeros(c)) if bias else None
        size = attrs.pop("stat_size", c)
        for r in running:
            self.register_buffer(f"running_{r}", (torch.zeros if r == "mean" else torch.ones)(size))
        self.__dict__.update(attrs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


def _affine(m: Any, y: Tensor, shape: Sequence[int]) -> Tensor:
    if m.weight is not None:
        y = y * m.weight.reshape(shape)
    return y + m.bias.reshape(shape) if m.bias is not None else y


def _ema(buf: Tensor, value: Tensor, momentum: float) -> None:
    with torch.no_grad():
        buf.mul_(1 - momentum).add_(value.reshape(-1), alpha=momentum)


def _plain_batch(kind: str) -> Callable[[Any, Tensor], Tensor]:
    """BN-family reference: standardize / center / L1 / range per channel over the batch."""

    def fn(m: Any, x: Tensor) -> Tensor:
        dims = tuple(d for d in range(x.dim()) if d != 1)
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if m.training:
            mean = x.mean(dims, keepdim=True)
            n = x.numel() // x.shape[1]
            if kind == "std":
                s = x.var(dims, unbiased=False, keepdim=True)
                _ema(m.running_var, s * n / (n - 1), m.momentum)
            elif kind == "l1":
                s = math.sqrt(math.pi / 2) * (x - mean).abs().mean(dims, keepdim=True)
            elif kind == "range":
                s = (x.amax(dims, keepdim=True) - x.amin(dims, keepdim=True)) / math.sqrt(2 * math.log(n))
            _ema(m.running_mean, mean, m.momentum)
            if kind in ("l1", "range"):
                _ema(m.running_scale, s, m.momentum)
        else:
            mean = m.running_mean.reshape(shape)
            s = getattr(m, {"std": "running_var", "mean": "running_mean"}.get(kind, "running_scale"))
            s = s.reshape(shape)
        if kind == "mean":
            return _affine(m, x - mean, shape)
        den = torch.sqrt(s + m.eps) if kind == "std" else s + m.eps
        return _affine(m, (x - mean) / den, shape)

    return fn


def _plain_bgn(m: Any, x: Tensor) -> Tensor:
    n, c = x.shape[:2]
    xg = x.reshape(n, m.groups, c // m.groups, -1)
    if m.training:
        mean = xg.mean((0, 2, 3), keepdim=True)
        var = xg.var((0, 2, 3), unbiased=False, keepdim=True)
        k = xg.numel() // m.groups
        _ema(m.running_mean, mean, m.momentum)
        _ema(m.running_var, var * k / (k - 1), m.momentum)
    else:
        mean = m.running_mean.reshape(1, -1, 1, 1)
        var = m.running_var.reshape(1, -1, 1, 1)
    y = ((xg - mean) / torch.sqrt(var + m.eps)).reshape(x.shape)
    return _affine(m, y, [1, c] + [1] * (x.dim() - 2))


def _plain_std(dims_of: Callable[[Tensor], tuple[int, ...]]) -> Callable[[Any, Tensor], Tensor]:
    """LN / IN / PN reference: standardize per sample over ``dims_of(x)``."""

    def fn(m: Any, x: Tensor) -> Tensor:
        d = dims_of(x)
        y = (x - x.mean(d, keepdim=True)) / torch.sqrt(x.var(d, unbiased=False, keepdim=True) + m.eps)
        return _affine(m, y, m.pshape)

    return fn


def _plain_gn(m: Any, x: Tensor) -> Tensor:
    xg = x.reshape(x.shape[0], m.groups, -1)
    y = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + m.eps)
    return _affine(m, y.reshape(x.shape), m.pshape)


def _plain_rms(dims_of: Callable[[Tensor], tuple[int, ...]], l2: bool = False) -> Callable[[Any, Tensor], Tensor]:
    def fn(m: Any, x: Tensor) -> Tensor:
        d = dims_of(x)
        sq = x.pow(2).sum(d, keepdim=True) if l2 else x.pow(2).mean(d, keepdim=True)
        eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps  # RMSNorm's eps=None
        return _affine(m, x * torch.rsqrt(sq + eps), m.pshape)

    return fn


def _plain_lrn(m: Any, x: Tensor) -> Tensor:
    c, size = x.shape[1], m.size
    sq = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, size // 2, (size - 1) // 2)).squeeze(1)
    total = sum(sq[:, i:i + c] for i in range(size))
    return x / (m.k + m.alpha / size * total) ** m.beta


def _box(x: Tensor, w: int) -> Tensor:
    return F.avg_pool2d(x, w, stride=1, padding=w // 2, count_include_pad=False)


def _plain_lcn(m: Any, x: Tensor) -> Tensor:
    xg = x.reshape(x.shape[0] * m.groups, -1, *x.shape[2:])
    mu = _box(xg.mean(1, keepdim=True), m.window)
    var = (_box((xg * xg).mean(1, keepdim=True), m.window) - mu * mu).clamp_min(0)
    y = ((xg - mu) / torch.sqrt(var + m.eps)).reshape(x.shape)
    return _affine(m, y, m.pshape)


def _plain_divisive(m: Any, x: Tensor) -> Tensor:
    mu = _box(x, m.window)
    var = (_box(x * x, m.window) - mu * mu).clamp_min(0)
    return _affine(m, (x - mu) / torch.sqrt(m.k + var), m.pshape)


def _affine_flags(ours: nn.Module) -> dict[str, bool]:
    return {"weight": getattr(ours, "weight", None) is not None,
            "bias": getattr(ours, "bias", None) is not None}


def plain_for(method: str, ours: Any, spec: ShapeSpec) -> nn.Module | None:
    """The reference formulation of ``method`` configured like ``ours``, or ``None``."""
    c, eps = ours.num_features, ours.eps
    rank = len(spec.dims)
    last = getattr(ours, "channel_axis", 1) == -1
    pshape = [c] if last else [1, c] + [1] * (rank - 2)
    common = {"eps": eps, "pshape": pshape, "momentum": ours.momentum or 0.1}
    kinds = {"bn": ("std", ("mean", "var")), "mean_only_bn": ("mean", ("mean",)),
             "l1_bn": ("l1", ("mean", "scale")), "range_bn": ("range", ("mean", "scale"))}
    flags = _affine_flags(ours)
    per_sample = (lambda x: (x.dim() - 1,)) if last else (lambda x: tuple(range(1, x.dim())))
    if method in kinds:
        kind, running = kinds[method]
        return _Plain(_plain_batch(kind), c, running=running, **flags, **common)
    if method == "batch_group_norm":
        g = ours.groups[0]
        return _Plain(_plain_bgn, c, running=("mean", "var"), stat_size=g, groups=g, **flags, **common)
    if method == "ln":
        return _Plain(_plain_std(per_sample), c, **flags, **common)
    if method == "in":
        return _Plain(_plain_std(lambda x: tuple(range(2, x.dim()))), c, **flags, **common)
    if method == "pn":
        return _Plain(_plain_std(lambda x: (1,)), c, **flags, **common)
    if method == "gn":
        return _Plain(_plain_gn, c, groups=ours.groups[0], **flags, **common)
    if method == "rms_norm":
        return _Plain(_plain_rms(per_sample), c, **flags, **common)
    if method == "scale_norm":
        plain = _Plain(_plain_rms(per_sample, l2=True), 1, weight=True, bias=False, **common)
        plain.pshape = [1] * (1 if last else rank)
        with torch.no_grad():
            plain.weight.copy_(ours.weight)
        return plain
    nop = getattr(ours, "nop", None)
    if method == "lrn" and rank == 4:
        return _Plain(_plain_lrn, c, weight=False, bias=False, size=ours.nap.channel_window,
                      k=nop.k, alpha=nop.alpha, beta=nop.beta)
    window = getattr(getattr(ours, "nap", None), "window", None)
    if rank == 4 and isinstance(window, int) and window % 2 == 1:
        if method == "lcn":
            return _Plain(_plain_lcn, c, groups=ours.groups[0], window=window, **flags, **common)
        if method == "divisive_norm" and ours.nap.channel_window == 1:
            return _Plain(_plain_divisive, c, window=window, k=nop.k, **flags, **common)
    return None


# --------------------------------------------------------------------------- torch natives
class Lambda(nn.Module):
    """A module around a function ``y = fn(x)``: torch's functional forms as timed modules.

    Example:
        >>> import torch
        >>> Lambda(torch.tanh)(torch.zeros(2)).tolist()
        [0.0, 0.0]
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def bn_torch(c: int, rank: int) -> nn.Module:
    """torch's BatchNorm for ``c`` channels and an input of ``rank`` dims: ``BatchNorm1d`` for
    ``(N, C)``, else ``BatchNorm2d`` (the baseline every ratio of the benchmark divides by)."""
    return nn.BatchNorm1d(c) if rank == 2 else nn.BatchNorm2d(c)


def torch_for(method: str, ours: Any, spec: ShapeSpec) -> nn.Module | None:
    """torch's module computing what ``ours`` computes, or ``None`` if torch has none."""
    c, eps, rank = ours.num_features, ours.eps, len(spec.dims)
    last = getattr(ours, "channel_axis", 1) == -1
    affine = getattr(ours, "weight", None) is not None
    if method == "bn":
        return bn_torch(c, rank)
    if method == "ln":
        return nn.LayerNorm(c, eps=eps) if last else nn.GroupNorm(1, c, eps=eps)
    if method == "gn":
        return nn.GroupNorm(ours.groups[0], c, eps=eps, affine=affine)
    if method == "in" and rank == 4:
        return nn.InstanceNorm2d(c, eps=eps, affine=affine)
    if method == "rms_norm" and last:
        return nn.RMSNorm(c, eps=eps, elementwise_affine=affine)
    if method == "pn" and not last and rank == 4 and not affine:
        return Lambda(lambda x: F.layer_norm(x.movedim(1, -1), (c,), eps=eps).movedim(-1, 1))
    if method == "lrn" and rank == 4:
        nop = ours.nop
        return nn.LocalResponseNorm(ours.nap.channel_window, alpha=nop.alpha, beta=nop.beta, k=nop.k)
    return None



class WindowLRN(nn.Module):
    r"""torch's local response normalization at a local method's window:
    ``y = x / (k + α·mean_W(x²))^β``, computed as ``F.local_response_norm`` computes it — ``x²``
    padded with zeros and averaged by torch's 3-D pooling kernel, then ``pow`` and a division —
    over the window ``W`` of the method: ``channel_window`` neighbouring channels (or a whole
    group of ``C/num_groups`` channels, averaged by ``mean``: LCN's channel axis does not slide)
    × ``window`` positions. The benchmark's "x LRN" reference for LCN and divisive
    normalization: the same window and the same window statistic (the second moment; the
    centred methods take the mean over it too).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 6, 5, 5)
        >>> ref = torch.nn.LocalResponseNorm(3, alpha=0.3, beta=0.75, k=2.0)(x)
        >>> lrn = WindowLRN(channel_window=3, window=(1, 1), alpha=0.3, beta=0.75, k=2.0)
        >>> torch.allclose(lrn(x), ref, atol=1e-6)
        True
    """

    def __init__(self, *, window: Sequence[int], channel_window: int = 1,
                 num_groups: int | None = None, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 1.0) -> None:
        super().__init__()
        self.window, self.channel_window, self.num_groups = tuple(window), channel_window, num_groups
        self.alpha, self.beta, self.k = alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        sq = x.mul(x)
        if self.num_groups is not None:  # a whole channel group: averaged, not slid over
            sq = sq.reshape(n, self.num_groups, -1, *x.shape[2:]).mean(2).unsqueeze(1)
            kernel = (1, *self.window)
        else:
            sq = sq.unsqueeze(1)
            kernel = (self.channel_window, *self.window)
        pad: list[int] = []
        for w in reversed(kernel):
            pad += [w // 2, (w - 1) // 2]
        pooled = F.avg_pool3d(F.pad(sq, pad), kernel, stride=1).squeeze(1)
        if self.num_groups is not None:
            pooled = pooled.unsqueeze(2).expand(n, self.num_groups, c // self.num_groups,
                                                *x.shape[2:]).reshape(x.shape)
        return x / pooled.mul(self.alpha).add(self.k).pow(self.beta)

    def extra_repr(self) -> str:
        chans = f"{self.channel_window}" if self.num_groups is None else f"C/{self.num_groups}"
        return f"window={chans}x{'x'.join(map(str, self.window))}"


def lrn_at_window(method: str, ours: Any) -> tuple[nn.Module, str] | None:
    """The "x LRN" reference of a local method and its window's label: torch's
    ``LocalResponseNorm`` for ``lrn`` (its own window and constants), :class:`WindowLRN` at the
    window and constants (``k, α, β``) of LCN and divisive normalization (2-D inputs); ``None``
    for other methods."""
    nap, nop = getattr(ours, "nap", None), getattr(ours, "nop", None)
    if method == "lrn":
        size = nap.channel_window
        return nn.LocalResponseNorm(size, alpha=nop.alpha, beta=nop.beta, k=nop.k), f"{size}"
    if method not in ("lcn", "divisive_norm"):
        return None
    window = nap.window if isinstance(nap.window, tuple) else (nap.window,) * 2
    if method == "lcn":
        g = ours.groups[0]
        eps = ours.eps if ours.eps is not None else 1e-5
        mod = WindowLRN(window=window, num_groups=g, alpha=1.0, beta=0.5, k=eps)
        return mod, f"C/{g}x{'x'.join(map(str, window))}"
    cw = nap.channel_window
    mod = WindowLRN(window=window, channel_window=cw, alpha=nop.alpha, beta=nop.beta, k=nop.k)
    return mod, f"{cw}x{'x'.join(map(str, window))}"


class SPADEReference(nn.Module):
    """SPADE as the paper's code writes it (NVlabs/SPADE ``SPADE.forward``), in plain torch:
    ``BatchNorm2d(affine=False)(x) * (1 + γ(m)) + β(m)`` with ``m`` resized to ``x`` by nearest
    neighbour and ``γ, β`` from a copy of ``layer``'s conv net (the same weights), BN with
    ``layer``'s ``eps`` and ``momentum``. Called as ``ref(x, m)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                                 affine=False)
        self.net = copy.deepcopy(layer.spade)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        gamma, beta = self.net(seg)
        return self.bn(x) * (1 + gamma) + beta


def whitening_matrix(cov: Tensor, kind: str, eps: float, iterations: int = 5, *,
                     zca_by_svd: bool = False, pca_sign: bool = True) -> Tensor:
    r"""The whitening matrix :math:`W` of :math:`\Sigma + \epsilon I` straight from the formulas.

    With :math:`\Sigma + \epsilon I = U \Lambda U^\top`: ZCA :math:`U\Lambda^{-1/2}U^\top`; PCA
    :math:`\Lambda^{-1/2}U^\top` (ascending eigenvalues; with ``pca_sign`` each eigenvector's
    largest-magnitude entry is positive, normkit's convention); Cholesky :math:`L^{-1}` by an explicit
    inverse; Newton (IterNorm, uncoupled as in the paper):
    :math:`P_{k+1} = \tfrac12(3P_k - P_k^3\Sigma_N)`, :math:`\Sigma_N = (\Sigma+\epsilon I)/\mathrm{tr}`,
    :math:`W = P_T/\sqrt{\mathrm{tr}}`. ``zca_by_svd`` computes ZCA by ``torch.linalg.svd``, as
    DBN's reference code does (the same matrix for a covariance, slower).

    Shape: ``cov`` ``(..., d, d)`` symmetric positive semi-definite; the result has its shape.
    """
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    s = cov + eps * eye
    if kind == "cholesky":
        return torch.linalg.inv(torch.linalg.cholesky(s))
    if kind == "newton":
        tr = s.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        sn, p = s / tr, eye.expand_as(s)
        for _ in range(iterations):
            p = 0.5 * (3 * p - p @ p @ p @ sn)
        return p / tr.sqrt()
    if kind == "zca" and zca_by_svd:
        u, lam, _ = torch.linalg.svd(s)
        return u @ torch.diag_embed(lam.rsqrt()) @ u.transpose(-1, -2)
    lam, u = torch.linalg.eigh(s)
    if kind == "zca":
        return u @ torch.diag_embed(lam.rsqrt()) @ u.transpose(-1, -2)
    if kind == "pca":
        if pca_sign:
            u = u * u.gather(-2, u.abs().argmax(-2, keepdim=True)).sign()
        return torch.diag_embed(lam.rsqrt()) @ u.transpose(-1, -2)
    raise ValueError(f"unknown whitening kind {kind!r}; use zca, pca, cholesky or newton")


class PlainWhitening(nn.Module):
    """Batch whitening as the papers' reference code writes it (DBN, IterNorm, CD repositories).

    ``x`` → ``(G, d, m)`` by a permute copy, centre, ``Σ = X Xᵀ/m`` by ``bmm``, then ZCA
    ``U diag(1/√(s+ε)) Uᵀ`` from ``torch.linalg.svd``, PCA ``diag(1/√(s+ε)) Uᵀ`` from
    ``torch.linalg.eigh`` (ascending, as ours), Cholesky ``inv(L)`` (explicit inverse), or
    IterNorm's naive ``P ← 1.5P − 0.5P³Σ_N`` loop; whiten by ``bmm``, permute back, affine. Running
    mean and whitening matrix are exponential averages, as ``estimate="matrix"``.
    """

    def __init__(self, kind: str, c: int, d: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 iterations: int = 5) -> None:
        super().__init__()
        self.kind, self.d, self.eps, self.momentum, self.iterations = kind, d, eps, momentum, iterations
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c // d, d, 1))
        self.register_buffer("running_matrix", torch.eye(d).repeat(c // d, 1, 1))

    def _matrix(self, cov: Tensor) -> Tensor:
        return whitening_matrix(cov, self.kind, self.eps, self.iterations, zca_by_svd=True,
                                pca_sign=False)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        xm = x.transpose(0, 1).reshape(c // self.d, self.d, -1)  # the permute copy
        if self.training:
            mean = xm.mean(-1, keepdim=True)
            xc = xm - mean
            wm = self._matrix(torch.bmm(xc, xc.transpose(1, 2)) / xm.shape[-1])
            y = torch.bmm(wm, xc)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_matrix.lerp_(wm, self.momentum)
        else:
            y = torch.bmm(self.running_matrix, xm - self.running_mean)
        y = y.reshape(c, n, *x.shape[2:]).transpose(0, 1).contiguous()
        shape = [1, c] + [1] * (x.dim() - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

