r"""Covariate shifts of a test set, and the evaluation behind ``normkit compare --shift``.

Each shift is a deterministic function of the test inputs (and a seed, for the noise), applied to
the standardized tensors of :func:`normkit.experiments.data.load_dataset`. Inputs ``(N, L)`` or
``(N, C, L)`` are 1-D signals, ``(N, C, H, W)`` images:

============  =========================  ==========================================================
name          severity (default)         effect
============  =========================  ==========================================================
``contrast``  factor ``c`` (0.3)         ``x' = m + c·(x − m)``, ``m`` the example's mean: the
                                         example's spread shrinks by ``c`` (``c = 1``: no change)
``noise``     std ``σ`` (0.5)            ``x' = x + σ·ε``, ``ε ~ N(0, 1)`` from the seed; ``σ`` in
                                         units of the training data's std
``blur``      std ``s`` (1.0 sample)     Gaussian blur with std ``s`` (kernel radius ``⌈3s⌉``,
                                         reflected borders): along the signal for 1-D data,
                                         along both image axes for 2-D data
``rotation``  angle ``θ`` (30°)          images: rotated by ``θ`` about the centre (bilinear,
                                         border values repeated); 1-D signals: treated as
                                         periodic and rotated by ``θ/360`` of their length, i.e.
                                         a circular shift of ``round(θ·L/360)`` samples to the right
============  =========================  ==========================================================

A shift is named ``NAME`` (default severity) or ``NAME:SEVERITY`` (``noise:0.8``). Example::

    >>> import torch
    >>> x = torch.randn(4, 40)
    >>> y = shift_inputs(x, "contrast")
    >>> torch.allclose(y.std(1), 0.3 * x.std(1), atol=1e-5)
    True
    >>> torch.equal(shift_inputs(x, "noise"), shift_inputs(x, "noise"))
    True
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..apply.adapt import adabn, prediction_time_bn, tent_adapt, tent_parameters
from ..apply.stats import statistics_modules
from ..errors import ConfigError, ShapeError
from .scoring import evaluate

__all__ = ["SHIFTS", "ADAPTATIONS", "ADAPT_BATCH_SIZE", "TENT_LR", "parse_shifts",
           "shift_inputs", "evaluate_shifts"]

SHIFTS: dict[str, float] = {"contrast": 0.3, "noise": 0.5, "blur": 1.0, "rotation": 30.0}
"""Shift name -> default severity (see the module's table)."""
ADAPTATIONS = ("as_is", "adabn", "ptbn", "tent")
"""How each model is evaluated on a shifted test set."""
ADAPT_BATCH_SIZE = 100
"""Test batch size of prediction-time BN and TENT (and of AdaBN's statistics passes)."""
TENT_LR = 0.01
"""Learning rate of TENT in ``compare --shift``: SGD, momentum 0.9, one step per test batch."""


def parse_shifts(text: str) -> list[tuple[str, float]]:
    """``"noise,contrast:0.5"`` -> ``[("noise", 0.5), ("contrast", 0.5)]``.

    Raises:
        ConfigError: for an unknown name, a bad or out-of-range severity, or a duplicate.
    """
    out: list[tuple[str, float]] = []
    for piece in (p.strip() for p in str(text).split(",")):
        if not piece:
            continue
        name, _, value = piece.partition(":")
        name = name.strip().lower()
        if name not in SHIFTS:
            raise ConfigError(f"unknown shift {name!r}; choose among {', '.join(SHIFTS)} "
                              f"(optionally NAME:SEVERITY, e.g. noise:0.5)")
        try:
            severity = float(value) if value.strip() else SHIFTS[name]
        except ValueError:
            raise ConfigError(f"shift {piece!r}: the severity after ':' must be a number, "
                              f"got {value!r}") from None
        _check_severity(name, severity)
        if any(n == name and s == severity for n, s in out):
            raise ConfigError(f"shift {piece!r} is given twice in {text!r}")
        out.append((name, severity))
    if not out:
        raise ConfigError(f"no shift in {text!r}; e.g. --shift noise,contrast")
    return out


def _check_severity(name: str, severity: float) -> None:
    ok = {"contrast": 0 <= severity <= 1, "noise": severity >= 0, "blur": severity > 0,
          "rotation": True}[name] and math.isfinite(severity)
    if not ok:
        allowed = {"contrast": "in [0, 1]", "noise": "≥ 0", "blur": "> 0",
                   "rotation": "finite"}[name]
        raise ConfigError(f"the severity of shift {name!r} must be {allowed}, got {severity}")


def shift_label(name: str, severity: float) -> str:
    """``"noise"`` at the default severity, else ``"noise:0.5"``."""
    return name if severity == SHIFTS[name] else f"{name}:{severity:g}"


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _blur_axis(x: Tensor, kernel: Tensor, axis: int) -> Tensor:
    """Blur ``x`` along ``axis`` with reflected borders (the kernel shrunk to fit short axes)."""
    size = x.shape[axis]
    radius = min(len(kernel) // 2, size - 1)
    if radius == 0:
        return x
    k = kernel[len(kernel) // 2 - radius: len(kernel) // 2 + radius + 1]
    k = k / k.sum()
    moved = x.movedim(axis, -1)
    flat = moved.reshape(-1, 1, size)
    out = F.conv1d(F.pad(flat, (radius, radius), mode="reflect"), k.view(1, 1, -1))
    return out.reshape(moved.shape).movedim(-1, axis)


def _rotate(x: Tensor, degrees: float) -> Tensor:
    if x.dim() == 4:
        theta = math.radians(degrees)
        c, s = math.cos(theta), math.sin(theta)
        mat = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype, device=x.device)
        mat = mat.expand(len(x), 2, 3)
        grid = F.affine_grid(mat, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)
    return torch.roll(x, round(degrees * x.shape[-1] / 360), dims=-1)


def shift_inputs(x: Tensor, name: str, *, severity: float | None = None, seed: int = 0
                 ) -> Tensor:
    """The test inputs ``x`` under the shift ``name`` (see the module's table).

    Args:
        x: ``(N, L)`` or ``(N, C, L)`` signals, or ``(N, C, H, W)`` images.
        name: ``contrast``, ``noise``, ``blur`` or ``rotation``.
        severity: its strength (default: :data:`SHIFTS`).
        seed: seed of the noise (the other shifts are deterministic).

    Returns:
        A new tensor of ``x``'s shape and dtype.

    Raises:
        ConfigError: for an unknown name or a bad severity.
        ShapeError: for inputs of another rank.
    """
    if name not in SHIFTS:
        raise ConfigError(f"unknown shift {name!r}; choose among {', '.join(SHIFTS)}")
    severity = SHIFTS[name] if severity is None else float(severity)
    _check_severity(name, severity)
    if x.dim() not in (2, 3, 4):
        raise ShapeError(f"shift_inputs needs (N, L), (N, C, L) or (N, C, H, W) inputs, got "
                         f"shape {tuple(x.shape)}")
    if name == "contrast":
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        return mean + severity * (x - mean)
    if name == "noise":
        gen = torch.Generator().manual_seed(seed)
        # drawn on the CPU: the same noise on every device
        return x + severity * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    if name == "blur":
        kernel = _gaussian_kernel(severity, x.dtype).to(x.device)
        out = _blur_axis(x, kernel, -1)
        return _blur_axis(out, kernel, -2) if x.dim() == 4 else out
    return _rotate(x, severity)


def evaluate_shifts(model: nn.Module, x: Tensor, y: Tensor, shifts: list[tuple[str, float]], *,
                    batch_size: int = ADAPT_BATCH_SIZE, tent_lr: float = TENT_LR, seed: int = 0
                    ) -> dict[str, dict[str, float | None]]:
    """Accuracy of a trained ``model`` on each shifted test set, four ways (:data:`ADAPTATIONS`):

    * ``as_is``: evaluation mode, training statistics;
    * ``adabn``: a copy recalibrated on the shifted test inputs (unlabeled), then evaluated;
    * ``ptbn``: prediction-time BN, each test batch normalized with its own statistics;
    * ``tent``: a copy adapted online by TENT, one SGD step (``tent_lr``, momentum 0.9) per test
      batch, in the test set's order; its accuracy is that of its online predictions.

    Test batches are ⌈N / batch_size⌉ near-equal slices. ``adabn``/``ptbn`` are ``None`` for a
    model without batch-statistics layers, ``tent`` for one without normalization ``γ, β``.
    ``model`` itself is left unchanged.

    Returns:
        ``{shift label: {adaptation: accuracy in [0, 1] or None}}``.
    """
    model.eval()
    has_stats, has_affine = bool(statistics_modules(model)), bool(tent_parameters(model))
    out: dict[str, dict[str, float | None]] = {}
    for name, severity in shifts:
        xs = shift_inputs(x, name, severity=severity, seed=seed)
        batches = torch.tensor_split(xs, max(1, -(-len(xs) // batch_size)))
        row: dict[str, float | None] = {"as_is": evaluate(model, xs, y)[1]}
        row["adabn"] = evaluate(adabn(copy.deepcopy(model), batches).eval(), xs, y)[1] \
            if has_stats else None
        row["ptbn"] = _accuracy(prediction_time_bn(model, xs, batch_size=batch_size), y) \
            if has_stats else None
        row["tent"] = _accuracy(tent_adapt(copy.deepcopy(model), batches, lr=tent_lr), y) \
            if has_affine else None
        out[shift_label(name, severity)] = row
    return out


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return int((logits.argmax(1) == y).sum()) / len(y)

