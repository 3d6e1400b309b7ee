r"""Gradient transforms (Ch. 8) as pure functions and as step pre-hooks for any optimizer.

Each transform exists twice:

* a pure function on one gradient tensor (``centralize``, ``block_normalize``, ``adaptive_clip``),
  which returns a new tensor and never touches an optimizer;
* an installer (``centralize_gradients``, ``normalize_gradients``, ``clip_gradients_adaptive``)
  that registers a ``torch.optim.Optimizer.register_step_pre_hook`` on *any* optimizer. Before
  every ``optimizer.step()`` the hook overwrites ``p.grad`` in place with the transformed gradient
  for every parameter of every param group that has a gradient and is not excluded. It returns
  the :class:`~torch.utils.hooks.RemovableHandle`; ``handle.remove()`` restores plain behaviour.

Numerics: norms and means are reduced in at least float32 and the result is cast back to the
gradient's dtype. Every division is guarded so that a zero gradient or a zero weight gives a
finite result (see each function).

A ``step(closure)`` call is refused with :class:`~normkit.errors.ConfigError`: the closure would
recompute the gradients *inside* ``step()``, after the hook ran, and silently undo the transform.
Call the closure yourself (``loss = closure()``) and then ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError

__all__ = [
    "centralize",
    "block_normalize",
    "unitwise_norm",
    "adaptive_clip",
    "centralize_gradients",
    "normalize_gradients",
    "clip_gradients_adaptive",
]

Exclude = Callable[[Tensor], bool] | Iterable[Tensor] | None


def _acc(t: Tensor) -> Tensor:
    """``t`` in at least float32 (the dtype reductions run in)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _check_positive(name: str, value: float, *, allow_zero: bool, fix: str) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}; {fix}")


def centralize(grad: Tensor) -> Tensor:
    r"""Gradient centralization (Yong et al. 2020, https://arxiv.org/abs/2004.01461).

    .. math::
        \Phi(G)_{i,\cdot} = G_{i,\cdot} - \frac{1}{M}\sum_{j} G_{i,j}

    where row ``i`` is an output unit (dim 0) and the mean runs over all other dims (the fan-in,
    ``M = numel / size(0)``). Tensors with ``ndim <= 1`` (biases, normalization gains) are returned
    unchanged (the same object).

    Shape:
        ``grad``: any; output has the shape and dtype of ``grad``.

    Example:
        >>> import torch, normkit.gradient as G
        >>> g = torch.randn(8, 3, 3, 3)
        >>> G.centralize(g).mean(dim=(1, 2, 3)).abs().max() < 1e-6
        tensor(True)
        >>> b = torch.randn(8)
        >>> G.centralize(b) is b
        True
    """
    if grad.dim() <= 1:
        return grad
    g = _acc(grad)
    return (g - g.mean(dim=tuple(range(1, grad.dim())), keepdim=True)).to(grad.dtype)


def block_normalize(grad: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Block-normalized gradient (Yu et al. 2017, https://arxiv.org/abs/1707.04822).

    .. math::
        \tilde g = \frac{g}{\max(\lVert g \rVert_2,\ \epsilon)}

    over the whole tensor (one block). The ``max`` guard (as in
    :func:`torch.nn.functional.normalize`) keeps the result *exactly* unit-norm whenever
    ``‖g‖ ≥ eps``, and maps a zero gradient to zero (finite).

    Args:
        grad: the gradient of one parameter (one layer block).
        eps: lower bound on the norm, ``> 0``. Default ``1e-12``.

    Shape:
        ``grad``: any; output has the shape and dtype of ``grad``.

    Example:
        >>> import torch, normkit.gradient as G
        >>> g = 100 * torch.randn(4, 5)
        >>> round(torch.linalg.vector_norm(G.block_normalize(g)).item(), 5)
        1.0
        >>> G.block_normalize(torch.zeros(3)).tolist()
        [0.0, 0.0, 0.0]
    """
    _check_positive("eps", eps, allow_zero=False, fix="use a small eps such as 1e-12")
    g = _acc(grad)
    return (g / torch.linalg.vector_norm(g).clamp_min(eps)).to(grad.dtype)


def unitwise_norm(t: Tensor) -> Tensor:
    r"""Unit-wise L2 norm (Brock et al. 2021): one norm per output unit, broadcastable to ``t``.

    For ``ndim > 1``: :math:`\lVert t_{i,\cdot} \rVert_2` over all dims but 0, shape
    ``(C, 1, ..., 1)``. For ``ndim <= 1`` (biases, gains, scalars): the norm of the whole tensor,
    shape ``(1,)`` (``()`` for a 0-d tensor), as in the NFNet reference. Reduced in at least
    float32; the result keeps that accumulation dtype.

    Example:
        >>> import torch, normkit.gradient as G
        >>> G.unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])).flatten().tolist()
        [5.0, 1.0]
        >>> G.unitwise_norm(torch.tensor([3.0, 4.0])).tolist()
        [5.0]
    """
    dims = tuple(range(1, t.dim())) if t.dim() > 1 else None
    return torch.linalg.vector_norm(_acc(t), dim=dims, keepdim=True)


def adaptive_clip(grad: Tensor, param: Tensor, clipping: float = 0.01, eps: float = 1e-3) -> Tensor:
    r"""Adaptive gradient clipping, unit-wise (Brock et al. 2021, https://arxiv.org/abs/2102.06171).

    For every unit ``i`` (see :func:`unitwise_norm`), with
    :math:`W^\star_i = \max(\lVert W_i\rVert, \epsilon)`:

    .. math::
        G_i \leftarrow \begin{cases}
            \lambda \dfrac{W^\star_i}{\lVert G_i \rVert} G_i
                & \text{if } \lVert G_i\rVert / W^\star_i > \lambda \\
            G_i & \text{otherwise.} \end{cases}

    ``eps > 0`` lets zero-initialized weights (``‖W_i‖ = 0``) still move. A zero gradient unit is
    never clipped (the threshold ``λ·eps`` is positive), so the result is always finite.

    Args:
        grad: gradient of ``param``; same shape.
        param: the parameter ``W``.
        clipping: :math:`\lambda > 0`. Default ``0.01`` (the paper's value for large batches).
        eps: :math:`\epsilon > 0`, lower bound on ``‖W_i‖``. Default ``1e-3``.

    Shape:
        ``grad``, ``param``: same shape; output has the shape and dtype of ``grad``.

    Example:
        >>> import torch, normkit.gradient as G
        >>> w = torch.ones(2, 4)                          # ‖W_i‖ = 2
        >>> g = torch.tensor([[1.0, 0, 0, 0], [0.001, 0, 0, 0]])
        >>> G.adaptive_clip(g, w, clipping=0.01)[:, 0].tolist()   # unit 0 clipped to 0.02
        [0.019999999552965164, 0.0010000000474974513]
    """
    _check_positive("clipping", clipping, allow_zero=False, fix="the paper uses 0.01 to 0.16")
    _check_positive("eps", eps, allow_zero=False,
                    fix="use eps such as 1e-3 so that zero-initialized weights can still move")
    if grad.shape != param.shape:
        raise ConfigError(f"grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")
    max_norm = clipping * unitwise_norm(param.detach()).clamp_min(eps)
    g = _acc(grad)
    g_norm = unitwise_norm(g)
    scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(torch.finfo(g.dtype).tiny),
                        torch.ones_like(g_norm))
    return (g * scale).to(grad.dtype)


def _excluder(exclude: Exclude) -> Callable[[Tensor], bool]:
    """A predicate from ``None`` (nothing excluded), a callable, or an iterable of parameters."""
    if exclude is None:
        return lambda p: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, Tensor):
        exclude = [exclude]
    kept = list(exclude)  # keep the tensors alive so their ids stay unique
    if not all(isinstance(p, Tensor) for p in kept):
        bad = next(type(p).__name__ for p in kept if not isinstance(p, Tensor))
        raise ConfigError(f"exclude must be a callable or an iterable of parameters, got an element of type {bad}")
    ids = frozenset(id(p) for p in kept)
    return lambda p, _alive=kept: id(p) in ids  # the default argument holds the tensors


def _install(
    optimizer: Optimizer, transform: Callable[[Tensor, Tensor], Tensor],
    skip: Callable[[Tensor], bool], name: str,
) -> RemovableHandle:
    if not isinstance(optimizer, Optimizer):
        raise ConfigError(f"{name} needs a torch.optim.Optimizer, got {type(optimizer).__name__}")

    def hook(opt: Optimizer, args: tuple, kwargs: dict) -> None:
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is opt itself
        if closure is not None:
            raise ConfigError(
                f"{name} cannot be used with step(closure): the closure recomputes gradients "
                f"inside step(), after the hook; call loss = closure() and then step()"
            )
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is None or skip(p):
                        continue
                    if p.grad.is_sparse:
                        raise ConfigError(f"{name} does not support sparse gradients")
                    p.grad.copy_(transform(p.grad, p))

    return optimizer.register_step_pre_hook(hook)


def centralize_gradients(
    optimizer: Optimizer, *, min_ndim: int = 2, exclude: Exclude = None
) -> RemovableHandle:
    r"""Centralize every gradient with :func:`centralize` before each ``optimizer.step()``.

    Works with any :class:`torch.optim.Optimizer` (Yong et al. 2020 use SGD and Adam).

    Args:
        optimizer: the optimizer to hook.
        min_ndim: only parameters with ``p.ndim >= min_ndim`` are centralized (``>= 2``). Default
            ``2``: linear and conv weights; biases and gains are left alone. ``min_ndim=3`` limits
            it to conv weights (the paper's "GC-conv" variant).
        exclude: a predicate ``p -> bool`` or an iterable of parameters to leave unchanged.

    Returns:
        the hook's :class:`~torch.utils.hooks.RemovableHandle`.

    Example:
        >>> import torch, normkit.gradient as G
        >>> lin = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> handle = G.centralize_gradients(opt)
        >>> lin(torch.randn(5, 4)).square().sum().backward()
        >>> opt.step()
        >>> bool(lin.weight.grad.mean(dim=1).abs().max() < 1e-6)
        True
        >>> handle.remove()
    """
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 2:
        raise ConfigError(
            f"min_ndim must be an int >= 2 (centralization averages over all dims but the "
            f"first), got {min_ndim!r}"
        )
    excluded = _excluder(exclude)
    return _install(optimizer, lambda g, p: centralize(g),
                    lambda p: p.dim() < min_ndim or excluded(p), "centralize_gradients")


def normalize_gradients(
    optimizer: Optimizer, *, eps: float = 1e-12, exclude: Exclude = None
) -> RemovableHandle:
    r"""Block-normalize every gradient with :func:`block_normalize` before each ``step()``.

    One block is one parameter tensor, so a layer's weight and bias are normalized separately
    (Yu et al. 2017 treat each variable as a block). All parameters are normalized unless
    ``exclude``\ d. The optimizer's learning rate then sets the step length per block directly.

    Args:
        optimizer: any :class:`torch.optim.Optimizer`.
        eps: lower bound on ``‖g‖`` (``> 0``). Default ``1e-12``. Zero gradients stay zero.
        exclude: a predicate ``p -> bool`` or an iterable of parameters to leave unchanged.

    Example:
        >>> import torch, normkit.gradient as G
        >>> lin = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> handle = G.normalize_gradients(opt)
        >>> (1000 * lin(torch.randn(5, 4)).sum()).backward()
        >>> opt.step()
        >>> round(torch.linalg.vector_norm(lin.weight.grad).item(), 5)
        1.0
    """
    _check_positive("eps", eps, allow_zero=False, fix="use a small eps such as 1e-12")
    excluded = _excluder(exclude)
    return _install(optimizer, lambda g, p: block_normalize(g, eps), excluded,
                    "normalize_gradients")


def clip_gradients_adaptive(
    optimizer: Optimizer, *, clipping: float = 0.01, eps: float = 1e-3, exclude: Exclude = None
) -> RemovableHandle:
    r"""Adaptive gradient clipping (:func:`adaptive_clip`) before each ``optimizer.step()``.

    By default *every* parameter is clipped, biases and gains included (their unit is the whole
    tensor), as in NFNets. Brock et al. 2021 do **not** clip the final classifier layer: pass
    ``exclude=model.fc.parameters()`` (or a predicate) for it; the hook cannot know which layer
    is last.

    Args:
        optimizer: any :class:`torch.optim.Optimizer`.
        clipping: :math:`\lambda > 0`. Default ``0.01``.
        eps: lower bound on ``‖W_i‖`` (``> 0``). Default ``1e-3``.
        exclude: a predicate ``p -> bool`` or an iterable of parameters to leave unclipped.

    Example:
        >>> import torch, normkit.gradient as G
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> handle = G.clip_gradients_adaptive(opt, clipping=0.01, exclude=net[-1].parameters())
        >>> (1e4 * net(torch.randn(5, 4)).sum()).backward()
        >>> bound = 0.01 * G.unitwise_norm(net[0].weight).clamp_min(1e-3)  # before the step
        >>> opt.step()
        >>> bool((G.unitwise_norm(net[0].weight.grad) <= bound * (1 + 1e-6)).all())
        True
    """
    _check_positive("clipping", clipping, allow_zero=False, fix="the paper uses 0.01 to 0.16")
    _check_positive("eps", eps, allow_zero=False,
                    fix="use eps such as 1e-3 so that zero-initialized weights can still move")
    excluded = _excluder(exclude)
    return _install(optimizer, lambda g, p: adaptive_clip(g, p, clipping, eps), excluded,
                    "clip_gradients_adaptive")
