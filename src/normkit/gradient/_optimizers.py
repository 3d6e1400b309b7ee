r"""Layer-wise adaptive optimizers: LARS (You et al. 2017) and LAMB (You et al. 2020).

Both scale each parameter tensor's update by a *trust ratio* ``‖w‖ / ‖update‖``, so the step
length of a layer is proportional to its weight norm and independent of the gradient's scale.

Exclusion rule (both optimizers, per param group, stored in the group so it survives
``state_dict()``): with ``exclude_1d=True`` (the default) every parameter with ``ndim <= 1``
(biases, normalization gains and shifts) gets **no trust ratio and no weight decay**, i.e. a plain
momentum-SGD (LARS) or plain Adam (LAMB) step, as the papers' large-batch recipes do.
``adapt=False`` turns the trust ratio off for a whole group; its ``weight_decay`` still applies to
its ``ndim > 1`` parameters, and to all of them with ``exclude_1d=False`` (so a group that wants
decayed biases says ``{"params": biases, "weight_decay": 0.01, "exclude_1d": False}``).
:func:`exclude_bias_and_norm` builds the same split as explicit param groups for any optimizer.

Guards: the trust ratio is defined as 1 when ``‖w‖ = 0`` or the norm it divides by is 0, so a
zero-initialized weight or a zero gradient gives a finite step (TESTING.md). Norms are reduced in
at least float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..errors import ConfigError

__all__ = ["LARS", "LAMB", "exclude_bias_and_norm"]


def exclude_bias_and_norm(params: nn.Module | Iterable[Tensor]) -> list[dict[str, Any]]:
    r"""Split parameters into ``[{ndim > 1}, {ndim <= 1: no weight decay, no adaptation}]``.

    The second group carries ``weight_decay=0.0`` and ``adapt=False``: biases and normalization
    parameters are neither decayed nor trust-ratio scaled. :class:`LARS` and :class:`LAMB` already
    apply this rule by default (``exclude_1d=True``); use the helper to make it explicit, or with
    another optimizer (``torch.optim.SGD``/``AdamW`` keep the extra ``adapt`` key and ignore it).
    Only parameters with ``requires_grad`` are kept; empty groups are dropped.

    Example:
        >>> import torch, normkit.gradient as G
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        >>> groups = G.exclude_bias_and_norm(net)
        >>> [len(g["params"]) for g in groups], groups[1]["weight_decay"]
        ([1, 3], 0.0)
        >>> opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    """
    ps = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    ps = [p for p in ps if p.requires_grad]
    decay = [p for p in ps if p.dim() > 1]
    plain = [p for p in ps if p.dim() <= 1]
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "adapt": False})
    return groups


def _number(name: str, v: Any, lo: float, *, open_lo: bool = False, hi: float | None = None,
            fix: str = "") -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if open_lo else v >= lo) and (hi is None or v < hi)
    if not ok:
        rng = f"{'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'})"
        hint = f"; {fix}" if fix else ""
        raise ConfigError(f"{name} must be a finite number in {rng}, got {v!r}{hint}")


def _flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be True or False, got {v!r}")


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.float() if t.element_size() < 4 else t)


def _ratio(w_norm: Tensor, d_norm: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where both norms are > 0, else 1 (never NaN)."""
    ok = (w_norm > 0) & (d_norm > 0)
    safe = torch.where(ok, denominator, torch.ones_like(denominator))
    return torch.where(ok, numerator / safe, torch.ones_like(numerator))


class _LayerwiseOptimizer(Optimizer, ABC):
    """Validation of every param group (constructor defaults and later ``add_param_group``)."""

    @abstractmethod
    def _validate(self, group: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` for a bad option of ``group``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("adapt", True)
            group.setdefault("exclude_1d", True)

    @staticmethod
    def _roles(group: dict[str, Any], p: Tensor) -> tuple[bool, float]:
        """(apply the trust ratio?, weight decay) for ``p`` under the group's exclusion rule."""
        excluded = group["exclude_1d"] and p.dim() <= 1
        return group["adapt"] and not excluded, 0.0 if excluded else group["weight_decay"]

    @staticmethod
    def _grad(p: Tensor, name: str) -> Tensor:
        if p.grad.is_sparse:
            raise ConfigError(f"{name} does not support sparse gradients")
        return p.grad


class LARS(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Rate Scaling (You et al. 2017, https://arxiv.org/abs/1708.03888).

    For each parameter tensor ``w`` with gradient ``g`` (one layer block), learning rate
    :math:`\gamma`, trust coefficient :math:`\eta`, weight decay :math:`\beta`, momentum :math:`m`:

    .. math::
        \lambda = \frac{\eta\,\lVert w\rVert}{\lVert g\rVert + \beta\lVert w\rVert + \epsilon}
        \quad(\lambda = 1 \text{ if } \lVert w\rVert = 0 \text{ or } \lVert g\rVert = 0),\qquad
        d = \lambda\,(g + \beta w),\qquad b \leftarrow m\,b + d,\qquad w \leftarrow w - \gamma\,b

    The momentum buffer ``b`` follows :class:`torch.optim.SGD` (``b = d`` on the first step,
    ``γ`` outside the buffer; the paper puts ``γ`` inside, which is the same for a constant
    ``γ``). Parameters excluded from adaptation (see the module docstring: ``ndim <= 1`` by
    default, or a group with ``adapt=False``) take exactly ``torch.optim.SGD``'s momentum step.
    With ``β = 0`` the update does not depend on the gradient's scale (up to ``ε``).

    Args:
        params: parameters or param groups (groups may override every option below).
        lr: global learning rate :math:`\gamma \ge 0` (required).
        momentum: :math:`m \in [0, 1)`. Default ``0.9``.
        weight_decay: :math:`\beta \ge 0`. Default ``0``.
        trust_coefficient: :math:`\eta > 0`. Default ``0.001`` (the paper's value).
        eps: :math:`\epsilon \ge 0` in the denominator. Default ``1e-8``. ``0`` is safe: a zero
            denominator only occurs with a zero norm, where the ratio is 1.
        adapt: apply the trust ratio (``False`` = plain momentum SGD). Default ``True``.
        exclude_1d: parameters with ``ndim <= 1`` get no trust ratio and no weight decay.
            Default ``True``.

    State per parameter: ``momentum_buffer`` (shape of the parameter).

    Example:
        >>> import torch, normkit.gradient as G
        >>> w = torch.nn.Parameter(torch.randn(4, 5))
        >>> opt = G.LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.01, eps=0.0)
        >>> before = w.detach().clone()
        >>> w.grad = 1e6 * torch.randn(4, 5)            # the gradient's scale does not matter
        >>> opt.step()
        >>> step, w_norm = (w - before).norm(), before.norm()
        >>> torch.allclose(step, 0.01 * w_norm)         # ‖Δw‖ = γ·η·‖w‖
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        *,
        adapt: bool = True,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, adapt=adapt,
                        exclude_1d=exclude_1d)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        _number("lr", group["lr"], 0.0, fix="use a learning rate >= 0")
        _number("momentum", group["momentum"], 0.0, hi=1.0, fix="0.9 is the usual value")
        _number("weight_decay", group["weight_decay"], 0.0)
        _number("trust_coefficient", group["trust_coefficient"], 0.0, open_lo=True,
                fix="the paper uses 0.001")
        _number("eps", group["eps"], 0.0, fix="use eps >= 0 such as 1e-8")
        _flag("adapt", group["adapt"])
        _flag("exclude_1d", group["exclude_1d"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore
        """Take one LARS step; ``closure`` (optional) re-evaluates the loss and returns it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "LARS")
                adapt, wd = self._roles(group, p)
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if adapt:
                    w_norm, g_norm = _norm(p), _norm(g)
                    ratio = _ratio(w_norm, g_norm, group["trust_coefficient"] * w_norm,
                                   g_norm + wd * w_norm + group["eps"])
                    d.mul_(ratio.to(d.dtype))
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss


class LAMB(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (You et al. 2020,
    https://arxiv.org/abs/1904.00962).

    At step ``t`` for each parameter tensor ``w`` with gradient ``g``:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \hat m = \frac{m}{1-\beta_1^t},\quad \hat v = \frac{v}{1-\beta_2^t}

        r = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w,\qquad
        w \leftarrow w - \gamma\,\frac{\phi(\lVert w\rVert)}{\lVert r\rVert}\, r

    with :math:`\phi(z) = \min(\max(z, \ell), u)` for ``weight_norm_bounds=(ℓ, u)`` and
    :math:`\phi(z) = z` by default; the ratio is 1 when ``‖w‖ = 0`` or ``‖r‖ = 0`` (a zero
    gradient without decay). A zero gradient *with* decay has ``r = λw`` and a well-defined ratio
    (and after step 1 the moments keep ``r`` nonzero anyway), so it is not special-cased. Excluded
    parameters (``ndim <= 1`` by default, or groups with ``adapt=False``) take the plain step
    ``w ← w − γ r``: Adam, or AdamW's decoupled decay when the group keeps ``weight_decay``.
    The update is invariant to the gradient's scale (up to ``ε``), weight decay included.

    Args:
        params: parameters or param groups (groups may override every option below).
        lr: :math:`\gamma \ge 0`. Default ``1e-3``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``. Default ``(0.9, 0.999)``.
        eps: :math:`\epsilon > 0` (a zero second moment is reachable). Default ``1e-6``.
        weight_decay: :math:`\lambda \ge 0` (decoupled, inside ``r``). Default ``0``.
        weight_norm_bounds: ``(ℓ, u)`` with ``0 <= ℓ <= u`` to clamp ``φ``, or ``None``.
        adapt: apply the trust ratio. Default ``True``.
        exclude_1d: parameters with ``ndim <= 1`` get no trust ratio and no weight decay.
            Default ``True``.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (shape of the parameter).

    Example:
        >>> import torch, normkit.gradient as G
        >>> w = torch.nn.Parameter(torch.randn(4, 5))
        >>> opt = G.LAMB([w], lr=0.01)
        >>> before = w.detach().clone()
        >>> w.grad = torch.randn(4, 5)
        >>> opt.step()
        >>> torch.allclose((w - before).norm(), 0.01 * before.norm())   # ‖Δw‖ = γ·‖w‖
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        weight_norm_bounds: tuple[float, float] | None = None,
        adapt: bool = True,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, weight_norm_bounds=weight_norm_bounds,
                        adapt=adapt, exclude_1d=exclude_1d)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        _number("lr", group["lr"], 0.0, fix="use a learning rate >= 0")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            _number(f"betas[{i}]", b, 0.0, hi=1.0, fix="the usual values are (0.9, 0.999)")
        _number("eps", group["eps"], 0.0, open_lo=True,
                fix="a zero second moment is reachable; use eps such as 1e-6")
        _number("weight_decay", group["weight_decay"], 0.0)
        bounds = group["weight_norm_bounds"]
        if bounds is not None:
            valid = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            if not valid or not 0 <= bounds[0] <= bounds[1] or math.isnan(bounds[1]):
                raise ConfigError(
                    f"weight_norm_bounds must be None or (low, high) with 0 <= low <= high, "
                    f"got {bounds!r}; e.g. (0.0, 10.0)")
        _flag("adapt", group["adapt"])
        _flag("exclude_1d", group["exclude_1d"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_norm_bounds", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore
        """Take one LAMB step; ``closure`` (optional) re-evaluates the loss and returns it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            bounds = group["weight_norm_bounds"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "LAMB")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))
                adapt, wd = self._roles(group, p)
                if wd != 0:
                    r.add_(p, alpha=wd)
                if adapt:
                    w_norm, r_norm = _norm(p), _norm(r)
                    phi = w_norm if bounds is None else w_norm.clamp(bounds[0], bounds[1])
                    r.mul_(_ratio(w_norm, r_norm, phi, r_norm).to(r.dtype))
                p.add_(r, alpha=-group["lr"])
        return loss
