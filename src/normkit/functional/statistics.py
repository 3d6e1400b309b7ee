"""Statistics over a partition: the numerics policy, written once.

Policy (every normkit method follows it):

* Statistics accumulate in at least float32 (float64 stays float64); half and bfloat16 inputs are
  upcast for the reduction only.
* Variance is computed in two passes (the mean, then the mean of squared deviations: stable under
  a mean offset of 1e4 in float32) and is never negative.
* Batch statistics use the **biased** variance (``correction=0``) for normalizing; running
  estimates of the variance store the **unbiased** one (``× m/(m−1)``), as torch's BatchNorm does.
* ``eps`` goes inside the square root: ``x̂ = (x − μ) / √(σ² + ε)``.
* Local (sliding-window) moments subtract a per-sample mean first, so ``E[x²] − E[x]²`` does not
  cancel catastrophically.
* Under ``torch.autocast`` statistics are fitted and applied with autocast off
  (:func:`autocast_off`): a matmul inside them (mode gates, Kalman transitions) would otherwise
  run in bfloat16 / float16. The output keeps the input's dtype, as torch's norm layers do.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .partition import as_dtype, stat_count, stats_dtype
from .shifted import inlinable, shifted_moment_sums, shifted_sum

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "compiling_kernels",
    "no_grad",
    "moments",
    "shifted_moments",
    "mean_square",
    "mean_abs_deviation",
    "value_range",
    "range_constant",
    "unbiased_variance",
    "ema_update",
    "autocast_off",
    "box_mean",
    "box_sum",
    "inverse_count",
    "local_moments",
]


def _up(x: Tensor) -> Tensor:
    return as_dtype(x, stats_dtype(x))


def compiling_kernels() -> bool:
    """Whether ``torch.compile`` is tracing for a backend that generates the kernels (inductor),
    not ``torch.export``, whose graph runs eager kernels: where a computation has a form that
    inductor fuses best and another that is faster eager, this picks the first.

    Example:
        >>> compiling_kernels()   # eager
        False
    """
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept as size-1 axes), in ≥ float32.

    Example:
        >>> x = torch.randn(8, 3, 5) + 1e4
        >>> mean, var = moments(x, (0, 2))
        >>> bool((var >= 0).all()), tuple(mean.shape)
        (True, (1, 3, 1))
    """
    # Eager: two passes (mean, then the mean of squared deviations): as stable as Welford under
    # large offsets and, on CPU, several times faster than torch.var_mean over several
    # dimensions. Compiled (not exported): inductor turns var_mean into one Welford reduction —
    # on CPU only past 1024 values per statistic; below, into the two passes. Over outer axes
    # (the innermost axis in memory kept: each pass streams the whole area) the shifted sums
    # are one pass (pn fwd+bwd 1.07x → 0.98x compiled BN at (128, 64, 16, 16), C = 64); over
    # rows in memory (IN, GN, LN over the channels of a channels-last input) the two passes
    # stay (shifted, IN: 0.6x → 0.66x).
    xf = _up(x)
    if compiling_kernels():  # inductor's; an exported graph runs eager kernels: as eager
        if (xf.device.type == "cpu" and xf.stride(-1) == 1 and xf.dim() - 1 not in dims
                and -1 not in dims and stat_count(xf, dims) <= _INDUCTOR_TWO_STEP):
            return shifted_moments(xf, dims)
        var, mean = torch.var_mean(xf, dim=tuple(dims), correction=0, keepdim=True)
        return mean, var
    mean = xf.mean(dim=tuple(dims), keepdim=True)
    d = xf - mean
    return mean, (d * d).mean(dim=tuple(dims), keepdim=True)


#: inductor's CPU backend computes ``var_mean`` in two passes up to this many values per
#: statistic (``torch._inductor.config.cpp.use_two_step_variance_threshold``), by Welford above
_INDUCTOR_TWO_STEP = 1024


def shifted_moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    r"""Mean and biased variance over ``dims`` (kept) from one pass of shifted sums:

    .. math::
        d = x - K,\quad \mu = K + \bar d,\quad \sigma^2 = \max(\overline{d^2} - \bar d^2,\ 0)

    with ``K`` the first value of each statistic's area, held constant (the moments do not
    depend on it: its gradient is exactly zero). Since ``K`` is one of the ``M`` values,
    ``M σ² ≥ (K − μ)²``: the cancellation in ``mean(d²) − mean(d)²`` costs at
    most ``~M`` units of rounding relative to ``σ²`` (a mean offset of any size cancels exactly
    in ``d``). For inductor, which fuses both sums into one loop over ``x`` (where ``var_mean``
    would make two: the mean, then the squared deviations); used by :func:`moments` under
    ``torch.compile`` on CPU for statistics of at most 1024 values over outer axes (the
    innermost axis in memory kept), and by EvoNorm-S0's compiled fit (groups of channels and
    positions, where the two passes would each stream the activations).

    Shape:
        ``x`` any; ``mean`` and ``var`` have ``x``'s shape with ``dims`` of size 1, in at least
        float32.

    Example:
        >>> x = torch.randn(4, 8, 5, dtype=torch.float64) + 1e4
        >>> mean, var = shifted_moments(x, (1,))
        >>> torch.allclose(var, x.var(1, correction=0, keepdim=True))
        True
    """
    xf = _up(x)
    k = xf
    for dim in dims:
        k = k.narrow(dim, 0, 1)
    d = xf - k.detach()
    m1 = d.mean(dim=tuple(dims), keepdim=True)
    m2 = (d * d).mean(dim=tuple(dims), keepdim=True)
    return m1 + k.detach(), (m2 - m1 * m1).clamp_min(0.0)


def mean_square(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``E[x²]`` over ``dims`` (kept), in ≥ float32.

    Computed as ``‖x‖₂²/m`` with ``torch.linalg.vector_norm``: one fused reduction with a cheap
    backward (measured 0.55–0.87× the time of ``(x·x).mean()`` forward+backward on CPU).
    """
    xf = _up(x)
    m = 1
    for d in dims:
        m *= xf.shape[d]
    return torch.linalg.vector_norm(xf, 2, dim=tuple(dims), keepdim=True).square() / max(m, 1)


def mean_abs_deviation(x: Tensor, mean: Tensor, dims: Sequence[int]) -> Tensor:
    """``E|x − μ|`` over ``dims`` (kept), in ≥ float32."""
    return (_up(x) - mean).abs().mean(dim=tuple(dims), keepdim=True)


def value_range(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``max − min`` over ``dims`` (kept), in ≥ float32."""
    xf = _up(x)
    return xf.amax(dim=tuple(dims), keepdim=True) - xf.amin(dim=tuple(dims), keepdim=True)


def range_constant(m: int) -> float:
    """Range-BN's ``C(m) = 1/√(2 ln m)`` (Hoffer et al. 2018), for ``m ≥ 2`` samples."""
    return 1.0 / math.sqrt(2.0 * math.log(m)) if m > 1 else 1.0


def unbiased_variance(var: Tensor, m: int) -> Tensor:
    """``var · m/(m−1)``: the unbiased estimate stored in running buffers (``m`` samples)."""
    return var * (m / (m - 1)) if m > 1 else var


def no_grad(fn: _F) -> _F:
    """``@torch.no_grad()`` for functions called on every forward, often already without
    gradients (nested in another such function): the call skips the context object torch's
    decorator makes per call (~1.6 µs) when gradients are already off. Same semantics; traced,
    the same no-grad region.

    Example:
        >>> @no_grad
        ... def double_(t): t.mul_(2)
        >>> p = torch.ones(2, requires_grad=True)
        >>> double_(p); p
        tensor([2., 2.], requires_grad=True)
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


@no_grad
def ema_update(running: Tensor, batch: Tensor, factor: float | Tensor) -> None:
    """``running ← (1 − factor)·running + factor·batch`` in place (torch's momentum meaning).

    ``factor`` may be a 0-d tensor (the cumulative average's ``1/n`` under ``torch.compile``,
    where reading a buffer as a Python float would be data-dependent); it is rounded to the
    buffer's dtype as a Python float is.
    """
    if isinstance(factor, Tensor):
        factor = as_dtype(factor, running.dtype)
    running.lerp_(as_dtype(batch, running.dtype), factor)


_NO_CONTEXT = contextlib.nullcontext()  # stateless and reentrant: one for every call


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """A context with ``torch.autocast`` disabled on ``x``'s device where it is enabled (a no-op
    otherwise): statistics keep the dtypes of the numerics policy (at least float32) instead of
    the autocast dtype that matmul-like ops would take.

    Example:
        >>> import torch
        >>> from normkit.functional.statistics import autocast_off
        >>> a = torch.randn(3, 3)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with autocast_off(a):
        ...         (a @ a).dtype
        torch.float32
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return _NO_CONTEXT


def box_sum(x: Tensor, dims: Sequence[int], windows: Sequence[int], *, flip: bool = False,
            owned: bool = False) -> Tensor:
    """Sliding-window sum of ``x`` over each ``dims[i]`` with window ``windows[i]`` ("same" size,
    zeros outside): ``w//2`` values before and ``(w−1)//2`` after each position, or the other way
    round with ``flip`` (the adjoint: ``⟨box_sum(a), b⟩ = ⟨a, box_sum(b, flip=True)⟩``).

    A copy per dimension and ``w − 1`` shifted in-place adds: several times faster on CPU than
    an ``avg_pool`` kernel for small windows (not for autograd to record: :func:`box_mean` uses
    the pooling kernels then). ``owned``: ``x`` may be overwritten (its storage takes the next
    copy: one allocation fewer). Compiled by inductor without a graph it is a sum of shifted
    windows of a zero-padded copy (:func:`~normkit.functional.shifted.shifted_sum`), which
    inductor fuses with the pointwise work around it (the local methods' fwd+bwd against
    compiled BN, normkit bench --goals: lrn 2.35x → 1.7x, lcn 1.95x → 1.3x, divisive_norm
    6.80x → 3.0x with :mod:`~normkit.functional.fused_local`'s compiled backward; with the
    saved root and the inline sums of :func:`~normkit.functional.shifted.shifted_sum`
    ``copy=False``, lrn 1.15–1.26x, lcn 1.17–1.29x; divisive_norm 2.8x, and 2.0–2.1x with
    its moments in parts, :mod:`~normkit.functional.local_windows`); exported, or
    recorded by autograd under ``torch.compile``, one custom op (``normkit::box_sum``,
    differentiable: its derivative is the flipped sum) that runs these eager kernels. Returns
    ``x`` itself when every window is 1 (a copy from the custom op).
    """
    if torch.compiler.is_compiling():
        if compiling_kernels() and not (x.requires_grad and torch.is_grad_enabled()):
            return shifted_sum(x, dims, windows, flip)  # fused with the pointwise work
        # exported, or recorded by autograd: one node that runs the eager kernels
        return _box_sum_op(x, list(dims), list(windows), flip)
    spare = None  # a buffer free to take the next copy
    for d, w in zip(dims, windows, strict=True):
        n = x.shape[d]
        before, after = ((w - 1) // 2, w // 2) if flip else (w // 2, (w - 1) // 2)
        if w == 1 or n == 1:
            continue
        acc = x.clone() if spare is None else spare.copy_(x)
        for s in range(1, min(before, n - 1) + 1):  # acc[i] += x[i − s]
            acc.narrow(d, s, n - s).add_(x.narrow(d, 0, n - s))
        for s in range(1, min(after, n - 1) + 1):  # acc[i] += x[i + s]
            acc.narrow(d, 0, n - s).add_(x.narrow(d, s, n - s))
        spare = x if owned else None
        x, owned = acc, True
    return x


@torch.library.custom_op("normkit::box_sum", mutates_args=())
def _box_sum_op(x: Tensor, dims: list[int], windows: list[int], flip: bool) -> Tensor:
    y = box_sum(x, dims, windows, flip=flip)
    return x.clone() if y is x else y


@_box_sum_op.register_fake
def _(x: Tensor, dims: list[int], windows: list[int], flip: bool) -> Tensor:
    return torch.empty_like(x)


def _box_sum_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.spec = inputs[1:]


def _box_sum_grad(ctx, grad):  # type: ignore[no-untyped-def]
    dims, windows, flip = ctx.spec
    return _box_sum_op(grad, dims, windows, not flip), None, None, None


_box_sum_op.register_autograd(_box_sum_grad, setup_context=_box_sum_setup)


def inverse_count(shape: Sequence[int], dims: Sequence[int], windows: Sequence[int],
                  include_pad: bool, like: Tensor) -> Tensor | float:
    """``1/(values in each position's window)`` for :func:`box_sum` over ``dims``: ``1/Πw`` with
    ``include_pad`` (positions outside count as zeros), else the product over ``dims`` of the
    per-axis counts of the positions that exist, a tensor broadcastable against ``shape``
    (dtype and device of ``like``)."""
    if include_pad:
        return 1.0 / math.prod(windows)
    inv: Tensor | float = 1.0
    for d, w in zip(dims, windows, strict=True):
        n = shape[d]
        i = torch.arange(n, dtype=like.dtype, device=like.device)
        count = (i.clamp(max=w // 2) + (n - 1 - i).clamp(max=(w - 1) // 2)).add_(1)
        view = [1] * len(shape)
        view[d] = n
        inv = count.reciprocal_().reshape(view) * inv
    if compiling_kernels() and isinstance(inv, Tensor):
        # made once: an as_strided view reads a buffer, which inductor writes (inlined, each
        # value of the loops that read it would recompute the counts' divisions)
        inv = inv.as_strided(inv.shape, inv.stride())
    return inv


def box_mean(x: Tensor, dims: Sequence[int], windows: Sequence[int], include_pad: bool) -> Tensor:
    """Sliding-window mean of ``x`` over each ``dims[i]`` with window ``windows[i]`` ("same" size).

    The window is centred (``w//2`` before, ``(w−1)//2`` after, like torch's
    ``local_response_norm``). With ``include_pad=True`` positions outside the tensor count as
    zeros (divide by ``w``); otherwise the mean is over the positions that exist. Separable, so it
    works for any number of dimensions; windows over up to three trailing dimensions, all odd,
    take one ``avg_pool`` kernel instead where autograd records the call in eager mode; otherwise
    (and under ``torch.compile``) :func:`box_sum` computes it.
    """
    if not (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return box_sum(x, dims, windows) * inverse_count(x.shape, dims, windows, include_pad, x)
    k = len(dims)
    trailing = tuple(dims) == tuple(range(x.dim() - k, x.dim()))
    fits = all(w % 2 == 1 and w <= x.shape[d] for d, w in zip(dims, windows, strict=True))
    if 0 < k <= 3 and trailing and fits:
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
        lead = x.shape[: x.dim() - k]
        flat = x.reshape(-1, 1, *x.shape[x.dim() - k:])
        out = pool(flat, tuple(windows), stride=1, padding=tuple(w // 2 for w in windows),
                   count_include_pad=include_pad)
        return out.reshape(*lead, *out.shape[2:])
    for dim, w in zip(dims, windows, strict=True):
        if w == 1:
            continue
        moved = x.movedim(dim, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        pooled = F.avg_pool1d(F.pad(flat, (w // 2, (w - 1) // 2)), w, stride=1)
        if not include_pad:
            ones = torch.ones(1, 1, shape[-1], dtype=x.dtype, device=x.device)
            pooled = pooled / F.avg_pool1d(F.pad(ones, (w // 2, (w - 1) // 2)), w, stride=1)
        x = pooled.reshape(shape).movedim(-1, dim)
    return x


def local_moments(
    x: Tensor,
    full_dims: Sequence[int],
    window_dims: Sequence[int],
    windows: Sequence[int],
    include_pad: bool,
    *,
    center: bool = True,
) -> tuple[Tensor, Tensor]:
    """Mean and variance (or ``E[x²]`` if ``center=False``) over a sliding window.

    Statistics are averaged fully over ``full_dims`` (kept as size 1) and over a centred window
    along ``window_dims``. ``x`` is shifted by its mean over ``full_dims`` and ``window_dims``
    first, so ``E[x²] − E[x]²`` stays accurate under large offsets; variance is clamped at 0.
    Returns ``(mean, var)``; with ``center=False`` returns ``(zeros, E[x²])``.
    """
    xf = _up(x)
    if not (xf.requires_grad and torch.is_grad_enabled()):
        return _local_moments_in_place(xf, tuple(full_dims), window_dims, windows, include_pad,
                                       center)
    if center:
        shift = xf.mean(dim=tuple(full_dims) + tuple(window_dims), keepdim=True).detach()
        xs = xf - shift
    else:
        shift, xs = torch.zeros((), dtype=xf.dtype, device=xf.device), xf
    if full_dims:
        m1 = xs.mean(dim=tuple(full_dims), keepdim=True)
        m2 = (xs * xs).mean(dim=tuple(full_dims), keepdim=True)
    else:
        m1, m2 = xs, xs * xs
    m2 = box_mean(m2, window_dims, windows, include_pad)
    if not center:
        return torch.zeros_like(m2), m2
    m1 = box_mean(m1, window_dims, windows, include_pad)
    return m1 + shift, (m2 - m1 * m1).clamp_min(0)


def _local_moments_in_place(x: Tensor, full: tuple[int, ...], dims: Sequence[int],
                            windows: Sequence[int], include_pad: bool, center: bool
                            ) -> tuple[Tensor, Tensor]:
    """:func:`local_moments` without a graph: the same formula in four activation-sized
    allocations (the window sums overwrite their inputs); the mean of ``center=False`` is an
    expanded zero. Compiled by inductor, centred sliding windows alone (no averaged axes) take
    both window sums from one padded copy of ``x − c``
    (:func:`~normkit.functional.shifted.shifted_moment_sums`); uncentred ones off the innermost
    axis sum ``x²`` inline, in the loop that reads ``E[x²]`` (no copy:
    :func:`~normkit.functional.shifted.inlinable`)."""
    shift = x.mean(dim=full + tuple(dims), keepdim=True) if center else None
    if shift is not None and not full and compiling_kernels():  # one padded copy for both
        s1, s2 = shifted_moment_sums(x - shift, dims, windows)
        inv = inverse_count(x.shape, dims, windows, include_pad, x)
        m1 = s1 * inv
        return m1 + shift, (s2 * inv - m1 * m1).clamp_min(0)
    if full:
        m2 = (x.square() if shift is None else (x - shift).square_()).mean(dim=full, keepdim=True)
        m1 = None if shift is None else x.mean(dim=full, keepdim=True).sub_(shift)
    elif shift is None:
        if compiling_kernels() and inlinable(x, dims, windows):  # computed where read
            m2 = shifted_sum(x.square(), dims, windows, copy=False)
            m2 = m2 * inverse_count(m2.shape, dims, windows, include_pad, m2)
            return m2.new_zeros(()).expand_as(m2), m2
        m2, m1 = x.square(), None
    else:
        m1 = x - shift
        m2 = m1.square()
    inv = inverse_count(m2.shape, dims, windows, include_pad, m2)
    m2 = box_sum(m2, dims, windows, owned=True).mul_(inv)
    if m1 is None or shift is None:
        return m2.new_zeros(()).expand_as(m2), m2
    m1 = box_sum(m1, dims, windows, owned=True).mul_(inv)
    var = m2.addcmul_(m1, m1, value=-1).clamp_min_(0)
    return m1.add_(shift), var


_MOVED = {"merge_moments", "MomentPool"}


def __getattr__(name: str) -> object:
    """Deprecated aliases (0.1): the moment merging moved to :mod:`normkit.functional.merging`."""
    if name in _MOVED:
        import warnings

        from . import merging

        warnings.warn(f"normkit.functional.statistics.{name} is deprecated; use "
                      f"normkit.functional.merging.{name}", DeprecationWarning, stacklevel=2)
        return getattr(merging, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
