"""Scale invariance of a weight feeding a normalization, and the training dynamics it implies.

A linear/conv layer :math:`W` followed by a standardizing normalization ``N`` is invariant to the
scale of its weight (Ba et al. 2016; van Laarhoven 2017; Arora et al. 2019):

.. math::

    N((\\alpha W) x) = N(W x) \\quad (\\alpha > 0),

up to :math:`O(\\epsilon/\\sigma^2)` from the ``eps`` inside the square root. The loss is then a
0-homogeneous function of :math:`W`, and Euler's theorem gives

.. math::

    \\langle \\nabla_W L, W \\rangle = \\frac{d}{d\\alpha} L(\\alpha W)\\Big|_{\\alpha=1} = 0,
    \\qquad \\nabla_W L(\\alpha W) = \\tfrac{1}{\\alpha} \\nabla_W L(W),

so a gradient step of size :math:`\\eta` moves the *direction* :math:`W/\\lVert W\\rVert` like a
step of size :math:`\\eta / \\lVert W \\rVert^2` (the effective learning rate), and the norm only
grows: :math:`\\lVert W - \\eta g \\rVert^2 = \\lVert W \\rVert^2 + \\eta^2 \\lVert g \\rVert^2`.

Which normalizations make which weight invariant: BN in training mode cancels a per-channel bias,
so ``Linear → BN`` is invariant with or without bias; LN and GN standardize across channels, so
the preceding layer must have no bias (or its bias must be scaled too). BN in *eval* mode uses
fixed running statistics and is not invariant unless they are rescaled with the weight.

Every function here leaves the model as it found it: parameters, buffers (running statistics),
train/eval flags and the global RNG state are restored, also when the forward raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["scale_invariance", "gradient_weight_inner_product", "ScaleTracker", "angle"]

LossFn = Callable[..., Tensor]


def submodule(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """The sub-module ``layer`` of ``model``: a module reached from ``model.modules()`` or its
    dotted name from ``model.named_modules()``.

    Raises:
        ConfigError: when ``model`` has no such sub-module.
    """
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError as err:
            names = [n for n, _ in model.named_modules() if n]
            raise ConfigError(
                f"model has no sub-module {layer!r}; its modules are {names}"
            ) from err
    if not any(m is layer for m in model.modules()):
        raise ConfigError(
            f"layer {type(layer).__name__} is not a sub-module of the model; pass a module "
            "reached from model.modules() or its name from model.named_modules()"
        )
    return layer


def _resolve(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """The sub-module ``layer`` (a module of ``model`` or its dotted name), checked to own a weight."""
    module = submodule(model, layer)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ConfigError(
            f"{type(module).__name__}.weight is {type(weight).__name__}, not an nn.Parameter; "
            "pass a Linear/Conv layer with a plain weight (parametrized weights are not scaled)"
        )
    return module


@contextmanager
def _preserved(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Run a block with ``model`` in train (``train=True``) or eval mode, then restore bit-exactly
    every parameter and buffer object and value, every module's mode and the RNG state."""
    saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    for module in model.modules():
        for name, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            saved.append((module, name, t, t.detach().clone()))
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for _, _, t, _ in saved if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            model.train(train)
            yield
    finally:
        with torch.no_grad():
            for module, name, t, copy in saved:
                setattr(module, name, t)
                t.copy_(copy)
        for module, mode in modes:
            module.training = mode


def _loss(loss_fn: LossFn, out: Tensor, targets: Tensor | None) -> Tensor:
    loss = loss_fn(out) if targets is None else loss_fn(out, targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
            f"with shape {tuple(getattr(loss, 'shape', ()))}"
        )
    return loss.reshape(())


def _forward(model: nn.Module, inputs: Any, seed: int) -> Tensor:
    torch.manual_seed(seed)  # the same dropout masks for every run (inside _preserved's fork_rng)
    out = model(inputs)
    if not isinstance(out, Tensor):
        raise ConfigError(f"model must return a tensor, got {type(out).__name__}")
    return out


def _rel(a: Tensor, ref: Tensor) -> float:
    a, ref = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def scale_invariance(
    model: nn.Module,
    layer: nn.Module | str,
    inputs: Any,
    *,
    scales: Sequence[float] = (0.5, 2.0, 10.0),
    loss_fn: LossFn | None = None,
    targets: Tensor | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """Relative change of the model output (or loss) when ``layer.weight`` is scaled by ``α``.

    .. math::

        r(\\alpha) = \\frac{\\lVert f(\\alpha W) - f(W) \\rVert_F}{\\lVert f(W) \\rVert_F},
        \\qquad\\text{or}\\quad \\frac{|L(\\alpha W) - L(W)|}{|L(W)|} \\text{ with } ``loss_fn``.

    The model runs in training mode by default (``train=True``): BN then normalizes with the batch
    statistics and is scale-invariant per batch; with ``train=False`` it uses the running
    statistics and is not. Only the weight is scaled (not the bias). Every forward uses the same
    RNG seed, so dropout masks agree. The model is restored exactly afterwards, also on error.

    Args:
        model: the model, called as ``model(inputs)``; must return a tensor.
        layer: the module (or its dotted name) whose ``weight`` is scaled.
        inputs: the model input.
        scales: positive factors ``α`` (default ``(0.5, 2.0, 10.0)``).
        loss_fn: ``loss_fn(output)`` or ``loss_fn(output, targets)`` → scalar; default ``None``
            compares outputs.
        targets: second argument of ``loss_fn`` (default ``None``: not passed).
        train: run in training mode (default ``True``) or eval mode.

    Returns:
        ``{"quantity": "output" | "loss", "mode": "train" | "eval", "scales": [...],
        "relative_change": [...], "max_relative_change": float}`` (JSON-able).

    Shape:
        Any ``inputs`` the model accepts; the output is compared over all its elements.

    Example:
        >>> import torch, normkit as nk
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(4, 3, bias=False, dtype=torch.float64)
        >>> model = torch.nn.Sequential(lin, nk.create("ln", 3, eps=1e-20, dtype=torch.float64))
        >>> x = torch.randn(8, 4, dtype=torch.float64)
        >>> scale_invariance(model, lin, x)["max_relative_change"] < 1e-10
        True
        >>> scale_invariance(torch.nn.Sequential(lin), lin, x)["max_relative_change"] > 0.4
        True
    """
    module = _resolve(model, layer)
    scales = [float(s) for s in scales]
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ConfigError(
            f"scales must be a non-empty list of positive finite numbers, got {scales}"
        )
    changes: list[float] = []
    with _preserved(model, train=train), torch.no_grad():
        w0 = module.weight.detach().clone()

        def run() -> Tensor:
            out = _forward(model, inputs, 0)
            return out if loss_fn is None else _loss(loss_fn, out, targets)

        ref = run()
        for s in scales:
            module.weight.copy_(w0 * s)
            changes.append(_rel(run(), ref))
    return {
        "quantity": "output" if loss_fn is None else "loss",
        "mode": "train" if train else "eval",
        "scales": scales,
        "relative_change": changes,
        "max_relative_change": max(changes),
    }


def gradient_weight_inner_product(
    model: nn.Module,
    layer: nn.Module | str,
    inputs: Any,
    loss_fn: LossFn,
    *,
    targets: Tensor | None = None,
    train: bool = True,
) -> float:
    """Cosine between the loss gradient and the weight of ``layer``.

    .. math::

        \\cos(\\nabla_W L, W) =
        \\frac{\\langle \\nabla_W L, W \\rangle}{\\lVert \\nabla_W L \\rVert\\,\\lVert W \\rVert}

    It is 0 for a scale-invariant weight (Euler's theorem for 0-homogeneous functions:
    :math:`\\langle \\nabla_W L, W\\rangle = \\tfrac{d}{d\\alpha} L(\\alpha W)|_{\\alpha=1} = 0`).
    Returns ``0.0`` when the gradient is exactly zero (the inner product is 0 then). Computed with
    :func:`torch.autograd.grad` in float64: no ``.grad`` is written; the model (running statistics,
    modes, RNG) is restored afterwards, also on error.

    Args:
        model: the model, called as ``model(inputs)``.
        layer: the module (or its dotted name) whose ``weight`` is examined.
        inputs: the model input.
        loss_fn: ``loss_fn(output)`` or ``loss_fn(output, targets)`` → scalar.
        targets: second argument of ``loss_fn`` (default ``None``: not passed).
        train: run in training mode (default ``True``) or eval mode.

    Shape:
        ``weight`` of any shape; both are flattened.

    Example:
        >>> import torch, normkit as nk
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(4, 3, dtype=torch.float64)
        >>> model = torch.nn.Sequential(lin, nk.create("bn", 3, eps=1e-20, dtype=torch.float64))
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
        >>> mse = torch.nn.functional.mse_loss
        >>> abs(gradient_weight_inner_product(model, lin, x, mse, targets=y)) < 1e-10
        True
    """
    module = _resolve(model, layer)
    weight = module.weight
    needs = weight.requires_grad
    try:
        weight.requires_grad_(True)
        with _preserved(model, train=train), torch.enable_grad():
            loss = _loss(loss_fn, _forward(model, inputs, 0), targets)
            (grad,) = torch.autograd.grad(loss, weight)
    finally:
        weight.requires_grad_(needs)
    g = grad.detach().to(torch.float64).flatten()
    w = weight.detach().to(torch.float64).flatten()
    wn, gn = w.norm().item(), g.norm().item()
    if wn == 0:
        raise ConfigError(
            f"{type(module).__name__}.weight is all zeros; its direction is undefined"
        )
    return 0.0 if gn == 0 else float(torch.dot(g, w).item() / (gn * wn))


def angle(a: Tensor, b: Tensor) -> float:
    """Angle between two tensors (flattened), ``2 atan2(‖â − b̂‖, ‖â + b̂‖)`` (accurate near 0)."""
    a = a.detach().to(torch.float64).flatten()
    b = b.detach().to(torch.float64).flatten()
    a, b = a / a.norm(), b / b.norm()
    return 2.0 * math.atan2((a - b).norm().item(), (a + b).norm().item())


class ScaleTracker:
    """Records weight norm, effective learning rate and angular update of layers during training.

    After each optimizer step, :meth:`update` appends for every tracked layer

    .. math::

        \\lVert W_t \\rVert, \\qquad \\eta_{\\text{eff}} = \\frac{\\eta}{\\lVert W_t \\rVert^2},
        \\qquad \\theta_t = \\angle(W_{t-1}, W_t),

    where :math:`\\eta` is the ``lr`` of the optimizer param group holding ``W``, :math:`W_t` the
    weight after the step and :math:`W_{t-1}` the weight at the previous :meth:`update` (or at
    construction). For a scale-invariant weight, :math:`\\eta_{\\text{eff}}` is the learning rate
    its direction sees, and :math:`\\theta_t` the distance travelled on the sphere (radians).

    Args:
        model: the model being trained.
        layers: dotted names of the modules to track (default ``None``: every ``nn.Linear`` and
            convolution of ``model``).

    Attributes:
        history: ``{name: {"weight_norm": [...], "lr": [...], "effective_lr": [...],
            "angular_update": [...]}}`` of Python floats (JSON-able).

    Example:
        >>> import math, torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> tracker = ScaleTracker(lin, layers=[""])
        >>> lin.weight.grad = torch.tensor([[0.0, 10.0]])   # W ← [3, 4] − 0.1·[0, 10] = [3, 3]
        >>> opt.step()
        >>> tracker.update(lin, opt)
        >>> h = tracker.history[""]
        >>> math.isclose(h["angular_update"][0], math.atan(4 / 3) - math.pi / 4, rel_tol=1e-6)
        True
        >>> math.isclose(h["effective_lr"][0], 0.1 / 18, rel_tol=1e-6)
        True
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None) -> None:
        if layers is None:
            conv = (nn.Linear, nn.modules.conv._ConvNd)
            names = [n for n, m in model.named_modules() if isinstance(m, conv)]
        else:
            names = list(layers)
        if not names:
            raise ConfigError(
                "no layer to track: pass layers=[...] names from model.named_modules()"
            )
        self.layers = names
        self.history: dict[str, dict[str, list[float]]] = {
            n: {"weight_norm": [], "lr": [], "effective_lr": [], "angular_update": []}
            for n in names
        }
        self._prev = {n: _resolve(model, n).weight.detach().clone() for n in names}

    def update(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Record the current weights of the tracked layers; call once after each ``step()``."""
        for name in self.layers:
            weight = _resolve(model, name).weight
            lr = next(
                (g["lr"] for g in optimizer.param_groups if any(p is weight for p in g["params"])),
                None,
            )
            if lr is None:
                raise ConfigError(
                    f"the weight of layer {name!r} is not in any optimizer param group"
                )
            lr = float(lr)
            norm = weight.detach().to(torch.float64).norm().item()
            rec = self.history[name]
            rec["weight_norm"].append(norm)
            rec["lr"].append(lr)
            rec["effective_lr"].append(lr / norm**2 if norm > 0 else math.inf)
            rec["angular_update"].append(angle(self._prev[name], weight))
            self._prev[name] = weight.detach().clone()
