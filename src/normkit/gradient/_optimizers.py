r"""Layer-wise adaptive optimizers: LARS (You et al. 2017) here, LAMB (You et al. 2020) in
:mod:`._lamb`, and their shared rules.

Both scale each parameter tensor's update by a *trust ratio* ``‖w‖ / ‖update‖``, so the step
length of a layer is proportional to its weight norm and independent of the gradient's scale.

Exclusion rule (both optimizers, per param group, stored in the group so it survives
``state_dict()``): with ``exclude_1d=True`` (the default) every parameter with ``ndim <= 1``
(biases, normalization gains and shifts) gets **no trust ratio and no weight decay**, i.e. a plain
momentum-SGD (LARS) or plain Adam (LAMB) step, as the papers' large-batch recipes do.
``adapt=False`` turns the trust ratio off for a whole group; its ``weight_decay`` still applies to
its ``ndim > 1`` parameters, and to all of them with ``exclude_1d=False`` (so a group that wants
decayed biases says ``{"params": biases, "weight_decay": 0.01, "exclude_1d": False}``).
``always_adapt=False`` (timm's rule) further restricts the trust ratio to parameters with a
nonzero weight decay; the default ``True`` adapts every non-excluded parameter, as the papers do.
:func:`exclude_bias_and_norm` builds the same split as explicit param groups for any optimizer.

Guards: the trust ratio is defined as 1 when ``‖w‖ = 0`` or the norm it divides by is 0, so a
zero-initialized weight or a zero gradient gives a finite step (TESTING.md). Norms are reduced in
at least float32.

**timm.** The options of timm 1.0's ``Lars`` (``trust_clip``, ``nesterov``, ``dampening``,
``always_adapt``) and ``Lamb`` (``bias_correction``, ``grad_averaging``, ``max_grad_norm``,
``trust_clip``, ``decoupled_decay``, ``always_adapt``) have timm's names and meanings: with the
same settings (and ``exclude_1d=False``, a rule timm does not have) the parameter trajectories are
timm's (tests/test_gradient_timm.py). The defaults follow the papers, so they differ from timm's
where timm departs from them:

======================  ========  ========  ===============================================
option                  normkit   timm      why
======================  ========  ========  ===============================================
LARS ``lr``             required  ``1.0``   no learning rate fits every model
LARS ``momentum``       ``0.9``   ``0``     You et al. 2017 train with momentum 0.9
``always_adapt``        ``True``  ``False`` both papers adapt every layer; timm skips
                                            parameters without weight decay (here
                                            ``exclude_1d`` excludes biases and norms)
``exclude_1d``          ``True``  (none)    the papers' recipes: no ratio, no decay for 1-D
LAMB ``weight_decay``   ``0``     ``0.01``  the paper sets λ per task (0.01 for BERT); like
                                            ``torch.optim.Adam``, no decay unless asked
LAMB ``max_grad_norm``  ``None``  ``1.0``   LAMB (You et al. 2020) has no global clipping;
                                            it comes from NVIDIA's BERT recipe
======================  ========  ========  ===============================================

timm's LARS calls the coefficient ``trust_coeff``; normkit keeps ``trust_coefficient``. timm's
LAMB extras ``caution`` and ``corrected_weight_decay`` are not in the papers and not provided.
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

__all__ = ["LARS", "exclude_bias_and_norm"]


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

    # options added after the first release: their defaults for state_dicts saved before them
    _NEW_OPTIONS: dict[str, Any] = {"adapt": True, "exclude_1d": True, "always_adapt": True,
                                    "trust_clip": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self._NEW_OPTIONS.items():
                group.setdefault(k, v)

    @staticmethod
    def _roles(group: dict[str, Any], p: Tensor) -> tuple[bool, float]:
        """(apply the trust ratio?, weight decay) for ``p`` under the group's exclusion rule and
        ``always_adapt`` (``False``: only decayed parameters are adapted, timm's rule)."""
        excluded = group["exclude_1d"] and p.dim() <= 1
        wd = 0.0 if excluded else group["weight_decay"]
        return group["adapt"] and not excluded and (group["always_adapt"] or wd != 0), wd

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
        d = \lambda\,(g + \beta w),\qquad b \leftarrow m\,b + (1 - \delta)\,d,\qquad
        w \leftarrow w - \gamma\,b \ \ (\text{Nesterov: } w \leftarrow w - \gamma\,(d + m\,b))

    The momentum buffer ``b`` follows :class:`torch.optim.SGD` (``b = d`` on the first step,
    dampening :math:`\delta`, ``γ`` outside the buffer; the paper puts ``γ`` inside, which is the
    same for a constant ``γ``). LARC (``trust_clip=True``; NVIDIA apex's ``LARC(clip=True)``,
    timm's ``trust_clip``) replaces :math:`\lambda` by :math:`\min(\lambda/\gamma, 1)`: the
    layer's step size :math:`\gamma\lambda` becomes :math:`\min(\lambda, \gamma)`, i.e. the
    trust ratio is read as a local learning rate that never exceeds the global one. Parameters
    excluded from adaptation (see the module docstring: ``ndim <= 1`` by default, or a group
    with ``adapt=False``) take exactly ``torch.optim.SGD``'s momentum step.
    With ``β = 0`` the update does not depend on the gradient's scale (up to ``ε``).

    Args:
        params: parameters or param groups (groups may override every option below).
        lr: global learning rate :math:`\gamma \ge 0` (required).
        momentum: :math:`m \in [0, 1)`. Default ``0.9``.
        weight_decay: :math:`\beta \ge 0`. Default ``0``.
        trust_coefficient: :math:`\eta > 0`. Default ``0.001`` (the paper's value).
        eps: :math:`\epsilon \ge 0` in the denominator. Default ``1e-8``. ``0`` is safe: a zero
            denominator only occurs with a zero norm, where the ratio is 1.
        dampening: :math:`\delta \in [0, 1]`, as :class:`torch.optim.SGD`. Default ``0``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``). Default
            ``False``.
        trust_clip: LARC clipping (see above). Default ``False`` (the paper's LARS).
        always_adapt: adapt parameters without weight decay too (``False``: timm's rule, only
            decayed ones). Default ``True`` (the paper).
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

    _NEW_OPTIONS = {**_LayerwiseOptimizer._NEW_OPTIONS, "dampening": 0.0, "nesterov": False}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        *,
        dampening: float = 0.0,
        nesterov: bool = False,
        trust_clip: bool = False,
        always_adapt: bool = True,
        adapt: bool = True,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, dampening=dampening,
                        nesterov=nesterov, trust_clip=trust_clip, always_adapt=always_adapt,
                        adapt=adapt, exclude_1d=exclude_1d)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        _number("lr", group["lr"], 0.0, fix="use a learning rate >= 0")
        _number("momentum", group["momentum"], 0.0, hi=1.0, fix="0.9 is the usual value")
        _number("weight_decay", group["weight_decay"], 0.0)
        _number("trust_coefficient", group["trust_coefficient"], 0.0, open_lo=True,
                fix="the paper uses 0.001")
        _number("eps", group["eps"], 0.0, fix="use eps >= 0 such as 1e-8")
        damp = group["dampening"]
        if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 <= damp <= 1):
            raise ConfigError(f"dampening must be a number in [0, 1], got {damp!r}; 0 is "
                              f"torch.optim.SGD's default")
        for name in ("nesterov", "trust_clip", "always_adapt", "adapt", "exclude_1d"):
            _flag(name, group[name])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ConfigError(
                f"nesterov=True needs momentum > 0 and dampening = 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}")

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
                    if group["trust_clip"]:  # LARC: local lr min(λ, γ); γ = 0 steps 0 anyway
                        ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
                    d.mul_(ratio.to(d.dtype))
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d.clone()
                    else:
                        buf.mul_(momentum).add_(d, alpha=1.0 - group["dampening"])
                    d = d.add_(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss
