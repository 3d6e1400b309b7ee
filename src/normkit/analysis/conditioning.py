r"""Layer-wise conditioning: spectra of the K-FAC factors of every Linear / Conv layer.

Huang, Qin, Liu, Zhu & Shao, "Layer-wise Conditioning Analysis in Exploring the Learning Dynamics
of DNNs", ECCV 2020 (https://arxiv.org/abs/1905.10244). For a layer :math:`h = W x` the Fisher
block of :math:`W` is approximated (K-FAC) by a Kronecker product of two small matrices,

.. math::

    F_W \approx \Sigma_x \otimes \Sigma_\delta, \qquad
    \Sigma_x = \tfrac{1}{N} X^\top X, \qquad
    \Sigma_\delta = \tfrac{1}{N} \sum_n (N g_n)(N g_n)^\top = N\, G^\top G,

so the conditioning of the layer's optimization problem is governed by the spectra of
:math:`\Sigma_x` (input, "A" factor) and :math:`\Sigma_\delta` (output gradient, "G" factor).

*Rows.* ``X`` (``N × d_in``) and ``G`` (``N × d_out``) have one row per place the weight is
applied: per sample for ``nn.Linear`` (leading dimensions flattened), per output position for a
convolution. For ``nn.Conv1d``/``nn.Conv2d`` each row of ``X`` is one im2col patch
(:func:`torch.nn.functional.unfold` after the layer's own padding, ``d_in = C_in·∏kernel``, flattened
in the channel-major order of ``weight.flatten(1)``), and ``N = batch · output positions``. ``Σ_x``
is the *uncentred* second moment and excludes the bias' homogeneous coordinate. For a grouped
convolution ``Σ_x`` spans all input channels; each group's K-FAC factor is a diagonal block of it.

*Scaling of* ``Σ_δ``. ``g_n`` is the autograd gradient :math:`\partial L/\partial h_n` of the batch
loss. For a mean-reduced loss :math:`L = \frac1N\sum_n \ell_n` (the default cross entropy),
:math:`N g_n = \partial \ell_n / \partial h_n` is the per-row gradient, so :math:`\Sigma_\delta =
N G^\top G` is its second moment :math:`\mathbb E[\delta\delta^\top]`, independent of ``N``; this is
the paper's scaling. (For a conv layer with a per-sample mean loss the per-row gradient is
``B·g`` rather than ``N·g``; ``Σ_δ`` then carries an extra factor ``L = N/B`` per output, the
number of output positions, which leaves every condition number unchanged.)

*Condition numbers.* Spectra are :func:`torch.linalg.eigvalsh` in float64, sorted descending
(:math:`\lambda_1 \ge \dots \ge \lambda_d`). Eigenvalues ``≤ rtol·λ_1`` (default ``rtol = 1e-10``)
count as zero: float64 round-off leaves the zero eigenvalues of a rank-deficient ``Σ`` at about
``1e-16·d·λ_1``, far below the floor, while a true condition number above ``1e10`` is beyond what
fp32 training resolves anyway. ``cond = λ_1/λ_d`` is ``inf`` when ``λ_d`` is at or below the floor
(e.g. ``N < d``), and the generalized condition number ``κ_k = λ_1/λ_k`` likewise; both are
``nan`` for the zero matrix. ``k`` is a count (``int``, 1-based) or a fraction of the spectrum
(``float`` in ``(0, 1]``, ``k = ⌈frac·d⌉``); κ_k stays finite for ``k ≤ rank`` when ``N < d``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> x = torch.diag(torch.tensor([2.0, 1.0, 1.0]))      # 3 orthogonal rows, N = 3
    >>> stats = layer_statistics(nn.Sequential(nn.Linear(3, 2)), x)
    >>> stats["0"].input.spectrum.tolist()                  # eig(XᵀX/3) = (4, 1, 1)/3
    [1.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    >>> round(stats["0"].input.cond, 12), stats["0"].grad is None   # no loss: no backward
    (4.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ._rows import conv_patches, grad_rows, weight_rows

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_RTOL",
    "ConditioningTracker",
    "LayerConditioning",
    "SpectrumStats",
    "condition_numbers",
    "conv_patches",
    "layer_statistics",
]

DEFAULT_KS: tuple[int | float, ...] = (0.5, 0.8)
"""Default ``ks`` of the generalized condition numbers: half and 80 % of the spectrum."""

DEFAULT_RTOL: float = 1e-10
"""Eigenvalues ``≤ DEFAULT_RTOL·λ_max`` count as zero (see the module docstring)."""

LossFn = Callable[[Tensor, "Tensor | None"], Tensor]
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _kappa_key(k: int | float) -> str:
    return f"kappa_{k}" if isinstance(k, int) else f"kappa_{k!r}"


def _resolve_k(k: int | float, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, int):
        if not 1 <= k <= d:
            raise ConfigError(f"k = {k} is outside 1..{d} for a spectrum of {d} eigenvalues; "
                              f"pass a count in that range or a fraction in (0, 1]")
        return k
    if not 0.0 < k <= 1.0:
        raise ConfigError(f"fraction k = {k!r} must lie in (0, 1]; pass an int for a count")
    # ⌈frac·d⌉ with a guard so that e.g. 0.3·10 = 3.0000000000000004 gives 3, not 4.
    return max(1, math.ceil(k * d - 1e-9))


def condition_numbers(
    spectrum: Tensor, ks: Sequence[int | float] = DEFAULT_KS, *, rtol: float = DEFAULT_RTOL
) -> dict[str, float]:
    r"""Scalar conditioning metrics of an eigenvalue spectrum (any order).

    .. math::

        \mathrm{cond} = \lambda_1/\lambda_d, \qquad \kappa_k = \lambda_1/\lambda_k,
        \qquad \lambda_1 \ge \dots \ge \lambda_d,

    with ``inf`` where the denominator is ``≤ rtol·λ_1`` and ``nan`` when ``λ_1 ≤ 0``.

    Args:
        spectrum: eigenvalues of a symmetric PSD matrix.
        ks: counts (``int``, 1-based) or fractions (``float`` in ``(0, 1]``, ``k = ⌈frac·d⌉``).
            Default ``(0.5, 0.8)``.
        rtol: relative floor below which an eigenvalue counts as zero. Default ``1e-10``.

    Returns:
        ``{"lambda_max", "lambda_min", "cond", "rank", "kappa_<k>" for each k}`` as Python
        numbers; the key of a count is ``kappa_5``, of a fraction ``kappa_0.5``.

    Shape:
        ``spectrum``: ``(d,)``, ``d ≥ 1``.

    Example:
        >>> import torch
        >>> m = condition_numbers(torch.tensor([8.0, 4.0, 2.0, 1.0]), ks=(2, 0.75))
        >>> m["cond"], m["kappa_2"], m["kappa_0.75"], m["rank"]
        (8.0, 2.0, 4.0, 4)
    """
    if spectrum.dim() != 1 or spectrum.numel() == 0:
        raise ShapeError(f"spectrum must be a non-empty 1-D tensor, got shape "
                         f"{tuple(spectrum.shape)}")
    if not rtol >= 0.0:
        raise ConfigError(f"rtol must be >= 0, got {rtol!r}")
    lam = torch.sort(spectrum.detach().to(torch.float64), descending=True).values
    d = lam.numel()
    lam_max, lam_min = float(lam[0]), float(lam[-1])
    floor = rtol * lam_max

    def ratio(den: float) -> float:
        if lam_max <= 0.0:
            return math.nan
        return lam_max / den if den > floor else math.inf

    out: dict[str, float] = {
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "cond": ratio(lam_min),
        "rank": int((lam > floor).sum()) if lam_max > 0.0 else 0,
    }
    for k in ks:
        out[_kappa_key(k)] = ratio(float(lam[_resolve_k(k, d) - 1]))
    return out


@dataclass
class SpectrumStats:
    """Spectrum of one covariance (descending, float64) and its scalar metrics.

    ``metrics`` is :func:`condition_numbers` of ``spectrum``; ``cov`` is the ``(d, d)`` matrix
    itself, or ``None`` when not kept.
    """

    spectrum: Tensor
    metrics: dict[str, float]
    cov: Tensor | None = None

    @property
    def lambda_max(self) -> float:
        """Largest eigenvalue ``λ_1``."""
        return self.metrics["lambda_max"]

    @property
    def lambda_min(self) -> float:
        """Smallest eigenvalue ``λ_d`` (raw, may be ``≈ 0`` or slightly negative)."""
        return self.metrics["lambda_min"]

    @property
    def cond(self) -> float:
        """``λ_1/λ_d``; ``inf`` when ``λ_d`` is below the floor."""
        return self.metrics["cond"]

    @classmethod
    def from_cov(
        cls, cov: Tensor, ks: Sequence[int | float], rtol: float, keep_cov: bool
    ) -> SpectrumStats:
        """Eigen-decompose a symmetric ``cov`` (float64) and compute its metrics."""
        cov = 0.5 * (cov + cov.T)  # exact symmetry for eigvalsh
        spectrum = torch.linalg.eigvalsh(cov).flip(0)
        return cls(spectrum, condition_numbers(spectrum, ks, rtol=rtol), cov if keep_cov else None)


@dataclass
class LayerConditioning:
    """Conditioning of one layer: its input covariance ``Σ_x`` and output-gradient covariance
    ``Σ_δ`` (``grad`` is ``None`` when no backward pass was run or the output needs no grad)."""

    name: str
    kind: str
    n_rows: int
    input: SpectrumStats
    grad: SpectrumStats | None = None
    input_mean: Tensor | None = None
    """Mean input row ``E[a]`` (float64, ``(d_in,)``), for the bias' homogeneous coordinate."""

    def kfac_factors(self, *, bias: bool = False) -> tuple[Tensor, Tensor | None]:
        r"""The K-FAC factors ``(A, G)`` of the layer: ``A = E[a aᵀ] = Σ_x`` (the uncentred
        input second moment) and ``G = E[δ δᵀ] = Σ_δ`` (``None`` without a backward pass).

        With ``bias=True`` ``A`` is that of the homogeneous input ``ã = (a, 1)``, i.e. of the
        weight and bias together: ``A = [[E[a aᵀ], E[a]], [E[a]ᵀ, 1]]``, ``(d_in + 1)²``.
        Needs the covariances (``layer_statistics(..., keep_covariances=True)``, the default).
        """
        if self.input.cov is None:
            raise ConfigError(f"layer {self.name!r} kept no covariances: call layer_statistics "
                              f"with keep_covariances=True for its K-FAC factors")
        a = self.input.cov
        if bias:
            mean = self.input_mean if self.input_mean is not None else a.new_zeros(a.shape[0])
            one = a.new_ones(1, 1)
            a = torch.cat([torch.cat([a, mean[:, None]], 1), torch.cat([mean[None], one], 1)], 0)
        return a, None if self.grad is None else self.grad.cov

    def scalars(self) -> dict[str, float]:
        """Flat ``{"n_rows", "x/<metric>", "delta/<metric>"}`` dict of Python numbers."""
        out: dict[str, float] = {"n_rows": self.n_rows}
        out.update({f"x/{k}": v for k, v in self.input.metrics.items()})
        if self.grad is not None:
            out.update({f"delta/{k}": v for k, v in self.grad.metrics.items()})
        return out


def _select_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    named = {n: m for n, m in model.named_modules() if isinstance(m, _SUPPORTED)}
    if layers is None:
        return named
    all_modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for name in layers:
        if name not in all_modules:
            raise ConfigError(f"model has no module named {name!r}; Linear/Conv layers: "
                              f"{sorted(named)}")
        if name not in named:
            raise ConfigError(f"module {name!r} is a {type(all_modules[name]).__name__}; "
                              f"conditioning supports {[c.__name__ for c in _SUPPORTED]}")
        chosen[name] = named[name]
    return chosen


def _default_loss(output: Tensor, targets: Tensor | None) -> Tensor:
    return F.cross_entropy(output, targets)  # type: ignore[arg-type]


def layer_statistics(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor | None = None,
    loss_fn: LossFn | None = None,
    *,
    layers: Iterable[str] | None = None,
    ks: Sequence[int | float] = DEFAULT_KS,
    rtol: float = DEFAULT_RTOL,
    keep_covariances: bool = True,
) -> dict[str, LayerConditioning]:
    r"""Input and output-gradient covariances, spectra and condition numbers of every layer.

    .. math::

        \Sigma_x = \tfrac1N X^\top X, \qquad \Sigma_\delta = N\, G^\top G

    (rows and scaling in the module docstring). Hooks are registered on the chosen layers, one
    forward pass ``model(inputs)`` (``model(*inputs)`` for a tuple) is run, then the loss and its
    gradients with respect to the layer *outputs* (via :func:`torch.autograd.grad`, so no
    parameter's ``.grad`` is touched). All hooks are removed on return, also when anything raises.
    The model's mode is left as is: in train mode BN uses (and updates) batch statistics.

    Loss: ``loss_fn(output, targets)`` when given; else mean cross entropy when ``targets`` is
    given; else no backward pass and every ``grad`` is ``None``. A layer applied several times
    (weight sharing) pools the rows of all its calls.

    Args:
        model: any module containing ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers.
        inputs: the batch (a tuple is unpacked into ``model``).
        targets: passed to the loss. Default ``None``.
        loss_fn: ``(output, targets) -> scalar``. Default: cross entropy (see above).
        layers: names from ``model.named_modules()``; default all supported layers (those not
            called in the forward pass are left out; a named one that is not called raises).
        ks: the κ_k to report (see :func:`condition_numbers`). Default ``(0.5, 0.8)``.
        rtol: relative eigenvalue floor. Default ``1e-10``.
        keep_covariances: keep the ``(d, d)`` matrices in ``SpectrumStats.cov`` (needed by
            :meth:`LayerConditioning.kfac_factors`). Default ``True``.

    Returns:
        ``{layer name: LayerConditioning}`` in ``named_modules`` order.

    Shape:
        ``Σ_x``: ``(d_in, d_in)`` with ``d_in = in_features`` or ``C_in·∏kernel_size``;
        ``Σ_δ``: ``(d_out, d_out)``; spectra ``(d,)``, descending, float64.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> stats = layer_statistics(model, x, y)
        >>> sorted(stats), stats["2"].input.cov.shape, stats["2"].grad.cov.shape
        (['0', '2'], torch.Size([8, 8]), torch.Size([3, 3]))
        >>> torch.allclose(stats["0"].input.cov, x.double().T @ x.double() / 32)
        True
    """
    chosen = _select_layers(model, layers)
    backward = loss_fn is not None or targets is not None
    if loss_fn is None:
        loss_fn = _default_loss
    xx: dict[str, Tensor] = {}
    n_x: dict[str, int] = {}
    x_sum: dict[str, Tensor] = {}
    outputs: dict[str, list[Tensor]] = {name: [] for name in chosen}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            rows = weight_rows(module, args[0].detach()).to(torch.float64)
            xx[name] = xx.get(name, 0) + rows.T @ rows
            x_sum[name] = x_sum.get(name, 0) + rows.sum(0)
            n_x[name] = n_x.get(name, 0) + rows.shape[0]
            if backward and output.requires_grad:
                outputs[name].append(output)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in chosen.items()]
    try:
        with torch.set_grad_enabled(backward):
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            grads: dict[str, list[Tensor]] = {}
            if backward:
                loss = loss_fn(out, targets)
                if loss.dim() != 0:
                    raise ShapeError(f"loss must be a scalar, got shape {tuple(loss.shape)}; "
                                     f"reduce it (e.g. .mean()) in loss_fn")
                flat = [(n, o) for n, outs in outputs.items() for o in outs]
                if flat and loss.requires_grad:
                    gs = torch.autograd.grad(
                        loss, [o for _, o in flat], allow_unused=True, materialize_grads=True
                    )
                    for (n, _), g in zip(flat, gs, strict=True):
                        grads.setdefault(n, []).append(g)
    finally:
        for h in handles:
            h.remove()
        outputs.clear()

    missing = [n for n in chosen if n not in xx]
    if layers is not None and missing:
        raise ConfigError(f"layers {missing} were not called in the forward pass")
    result: dict[str, LayerConditioning] = {}
    for name, module in chosen.items():
        if name not in xx:
            continue
        n = n_x[name]
        grad_stats = None
        if name in grads:
            g_rows = torch.cat([grad_rows(module, g).to(torch.float64) for g in grads[name]])
            n_g = g_rows.shape[0]
            grad_stats = SpectrumStats.from_cov(n_g * (g_rows.T @ g_rows), ks, rtol,
                                                keep_covariances)
        result[name] = LayerConditioning(
            name=name,
            kind=type(module).__name__.lower(),
            n_rows=n,
            input=SpectrumStats.from_cov(xx[name] / n, ks, rtol, keep_covariances),
            grad=grad_stats,
            input_mean=x_sum[name] / n,
        )
    return result


@dataclass
class ConditioningTracker:
    """Training-loop callback: every ``every`` steps, record :func:`layer_statistics` scalars.

    ``history`` is a list of flat dicts ``{"step": s, "<layer>/x/cond": ..., ...}`` of Python
    numbers, so ``json.dumps(tracker.history)`` works (non-finite values are written as
    ``Infinity``/``NaN``, which ``json.loads`` reads back). Covariances are not kept. Call it after
    ``optimizer.step()`` with the batch of that step; in train mode the extra forward pass updates
    BN running statistics once more.

    Args:
        every: record when ``step % every == 0``.
        layers, loss_fn, ks, rtol: as in :func:`layer_statistics`.

    Example:
        >>> import json, torch
        >>> from torch import nn
        >>> tracker = ConditioningTracker(every=2)
        >>> model = nn.Linear(3, 2)
        >>> for step in range(5):
        ...     _ = tracker.maybe_record(step, model, torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> [h["step"] for h in tracker.history], len(json.loads(json.dumps(tracker.history)))
        ([0, 2, 4], 3)
    """

    every: int
    layers: Sequence[str] | None = None
    loss_fn: LossFn | None = None
    ks: Sequence[int | float] = DEFAULT_KS
    rtol: float = DEFAULT_RTOL
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"every must be a positive int, got {self.every!r}")

    def maybe_record(
        self,
        step: int,
        model: nn.Module,
        inputs: Tensor | tuple[Tensor, ...],
        targets: Tensor | None = None,
    ) -> dict[str, float] | None:
        """Record and return the entry of ``step`` if ``step % every == 0``, else ``None``."""
        if step % self.every != 0:
            return None
        stats = layer_statistics(model, inputs, targets, self.loss_fn, layers=self.layers,
                                 ks=self.ks, rtol=self.rtol, keep_covariances=False)
        entry: dict[str, float] = {"step": int(step)}
        for name, lc in stats.items():
            entry.update({f"{name}/{k}": v for k, v in lc.scalars().items()})
        self.history.append(entry)
        return entry
