r"""LAMB (You et al. 2020): Adam moments with a layer-wise trust ratio. The exclusion rule, the
guards and the timm option table are in :mod:`._optimizers`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._optimizers import _flag, _LayerwiseOptimizer, _norm, _number, _ratio

__all__ = ["LAMB"]


class LAMB(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (You et al. 2020,
    https://arxiv.org/abs/1904.00962).

    At step ``t`` for each parameter tensor ``w`` with gradient ``g`` (divided first by
    :math:`\max(1, \lVert G\rVert / c)`, ``G`` all gradients of the optimizer, when
    ``max_grad_norm=c``):

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
    Without ``max_grad_norm`` the update is invariant to the gradient's scale (up to ``ε``),
    weight decay included.

    Variants (timm's names and meanings): ``bias_correction=False`` uses ``m, v`` for
    :math:`\hat m, \hat v`; ``grad_averaging=False`` accumulates ``m ← β₁m + g``;
    ``decoupled_decay=True`` takes the decay out of ``r`` and the ratio, as AdamW:
    ``w ← (1 − γλ) w`` first, then the step with ``r = m̂/(√v̂ + ε)`` (its ratio uses the decayed
    ``w``); ``trust_clip=True`` (LAMBC) caps the ratio at 1.

    Args:
        params: parameters or param groups (groups may override every option below except
            ``max_grad_norm``).
        lr: :math:`\gamma \ge 0`. Default ``1e-3``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``. Default ``(0.9, 0.999)``.
        eps: :math:`\epsilon > 0` (a zero second moment is reachable). Default ``1e-6``.
        weight_decay: :math:`\lambda \ge 0` (inside ``r``, the paper's). Default ``0``.
        weight_norm_bounds: ``(ℓ, u)`` with ``0 <= ℓ <= u`` to clamp ``φ``, or ``None``.
        bias_correction: Adam's bias correction of the moments. Default ``True`` (the paper).
        grad_averaging: weight ``1 − β₁`` on the gradient in ``m``. Default ``True`` (the paper).
        max_grad_norm: clip the global gradient norm (over every parameter of every group) to
            this value before the moments, or ``None``. Default ``None`` (the paper; timm: 1.0).
        trust_clip: cap the trust ratio at 1 (LAMBC). Default ``False``.
        decoupled_decay: AdamW-style decay outside the ratio (see above). Default ``False``.
        always_adapt: adapt parameters without weight decay too (``False``: timm's rule, only
            decayed ones). Default ``True`` (the paper).
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

    _NEW_OPTIONS = {**_LayerwiseOptimizer._NEW_OPTIONS, "weight_norm_bounds": None,
                    "bias_correction": True, "grad_averaging": True, "max_grad_norm": None,
                    "decoupled_decay": False}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        weight_norm_bounds: tuple[float, float] | None = None,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = None,
        trust_clip: bool = False,
        decoupled_decay: bool = False,
        always_adapt: bool = True,
        adapt: bool = True,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, weight_norm_bounds=weight_norm_bounds,
                        bias_correction=bias_correction, grad_averaging=grad_averaging,
                        max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        decoupled_decay=decoupled_decay, always_adapt=always_adapt,
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
        if group["max_grad_norm"] is not None:
            _number("max_grad_norm", group["max_grad_norm"], 0.0, open_lo=True,
                    fix="pass None for no clipping, or a positive norm such as 1.0")
        if hasattr(self, "defaults") and group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ConfigError(
                f"max_grad_norm clips the norm of all gradients together, so it is one value for "
                f"the optimizer ({self.defaults['max_grad_norm']!r}); a param group got "
                f"{group['max_grad_norm']!r}. Pass it to LAMB(...) only")
        for name in ("bias_correction", "grad_averaging", "trust_clip", "decoupled_decay",
                     "always_adapt", "adapt", "exclude_1d"):
            _flag(name, group[name])

    def _clip_factor(self) -> Tensor | None:
        """``max(1, ‖G‖ / max_grad_norm)`` over all gradients (float32 or wider), or ``None``."""
        limit = self.defaults["max_grad_norm"]
        grads = [self._grad(p, "LAMB") for g in self.param_groups for p in g["params"]
                 if p.grad is not None]
        if limit is None or not grads:
            return None
        total = _norm(torch.stack([_norm(g).to(grads[0].device) for g in grads]))
        return (total / limit).clamp(min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore
        """Take one LAMB step; ``closure`` (optional) re-evaluates the loss and returns it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._clip_factor()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            bounds, lr = group["weight_norm_bounds"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "LAMB")
                if clip is not None:
                    g = g / clip.to(g.dtype)  # p.grad itself is left as it is
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1 if group["grad_averaging"] else 1.0)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                c1, c2 = (1 - beta1**t, 1 - beta2**t) if group["bias_correction"] else (1.0, 1.0)
                r = (m / c1) / ((v / c2).sqrt_().add_(group["eps"]))
                adapt, wd = self._roles(group, p)
                if wd != 0 and group["decoupled_decay"]:
                    p.mul_(1 - lr * wd)
                elif wd != 0:
                    r.add_(p, alpha=wd)
                if adapt:
                    w_norm, r_norm = _norm(p), _norm(r)
                    phi = w_norm if bounds is None else w_norm.clamp(bounds[0], bounds[1])
                    ratio = _ratio(w_norm, r_norm, phi, r_norm)
                    if group["trust_clip"]:
                        ratio = ratio.clamp(max=1.0)
                    r.mul_(ratio.to(r.dtype))
                p.add_(r, alpha=-lr)
        return loss
