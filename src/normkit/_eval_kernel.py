"""Evaluation fast paths of :class:`~normkit.Normalization`: one ``torch.batch_norm`` call on the
running estimates (:func:`evaluate`) and, for whitening, one block-diagonal matmul of the cached
fold (:func:`block_fold`).

Where an operation's evaluation with the running estimates is a per-channel affine map that BN's
evaluation kernel computes (:meth:`~normkit.nop.Operation.eval_moments` gives its
``(μ, σ², ε')``) and the recovery is a per-channel ``γ, β``, :class:`~normkit.Normalization`
evaluates in that one kernel call instead of the pipeline's steps (canonical view, statistics,
transform, restored layout): ``y = γ (x − μ)/√(σ² + ε') + β``, computed as torch's BN does.

What decides it once at construction (:func:`applies`): ``native``, running estimates, the
operation declares
``eval_moments``, a per-channel (or no) recovery, whole groups, no parameters of the operation's
own, and the preset's hooks (:meth:`~normkit.Normalization._statistics`, ``_transform``) are the
base's or declared plain in evaluation (``_plain_eval_hooks = True`` on the class that overrides
them). Per call (:func:`evaluate`): the moments derived from the running estimates (L1's
``(s + ε)²``, a group's statistics repeated per channel) are cached while the buffers and
``num_batches_tracked`` keep their identity and version (``load_state_dict``, in-place edits,
``.to()``, training steps are seen; BN's are the buffers themselves, read at each call), and the
dtypes must be ones BN's kernel takes as the generic path computes them (else ``None``: the
generic path runs).
Gradients reach ``x``, ``γ`` and ``β`` through the kernel's backward; ``torch.compile`` and
``torch.export`` trace the same call.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .functional.kernels import kernel_accepts, run_kernel
from .functional.normalize import default_eps
from .nop import Operation
from .nrr import Affine, Identity, Recovery

Normalization = Any  # normkit.Normalization (not imported: it imports this module)

__all__ = ["applies", "block_fold", "evaluate"]

# Evaluation folds of whitening modules, ``module -> (key, (M, b), weakrefs to its tensors)``:
# kept outside the modules so that pickling, deepcopy and state_dict never see them; an entry
# dies with its module.
_FOLDS: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()

# Derived evaluation moments by module, ``module -> (ε, [(buffer, version)], (μ, σ², ε'))``:
# kept outside the modules (pickling, deepcopy and state_dict never see them); an entry dies
# with its module.
_MOMENTS: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()

_HOOKS = ("_statistics", "_transform")


def _plain_hooks(cls: type) -> bool:
    """Whether ``cls``'s hooks are the base's (those of the root-most class defining them,
    :class:`~normkit.Normalization`), or every class overriding one declares them plain in
    evaluation (``_plain_eval_hooks = True`` in its own body)."""
    for hook in _HOOKS:
        owners = [c for c in cls.__mro__ if hook in c.__dict__]
        for owner in owners[:-1]:
            if not owner.__dict__.get("_plain_eval_hooks", False):
                return False
    return True


def _per_channel(nrr: Recovery) -> bool:
    """Whether ``nrr`` is no recovery or per-channel ``γ`` and/or ``β`` (``weight``, ``bias``)."""
    return type(nrr) is Identity or (type(nrr) is Affine and nrr.shape is None)


def applies(module: Normalization) -> str | None:
    """How ``module``'s evaluation with running estimates runs BN's kernel — ``"direct"`` (on the
    running buffers themselves: BN's, read at each call), ``"derived"`` (on moments derived from
    them, cached: :func:`_moments`) — or ``None`` (the pipeline). Decided once, at construction:
    nothing it reads changes afterwards."""
    if not (module.native and module._num_padded == 0
            and type(module.nop).eval_moments is not Operation.eval_moments
            and not module._nop_param_names
            and _per_channel(module.nrr)
            and _plain_hooks(type(module))):
        return None
    running = module._running()
    if running is None:  # no estimates: evaluation normalizes with the batch's statistics
        return None
    with torch.no_grad():
        moments = module.nop.eval_moments(running, 1e-5)
    if moments is None:
        return None
    values = list(running.values())
    direct = (moments[0].numel() == module.num_features
              and any(moments[0] is t for t in values) and any(moments[1] is t for t in values))
    return "direct" if direct else "derived"


def _derive(module: Normalization, running: dict[str, Tensor], eps: float
            ) -> tuple[Tensor, Tensor, float] | None:
    """The operation's ``(μ, σ², ε')`` per channel (statistics per group repeated over its
    channels)."""
    moments = module.nop.eval_moments(running, eps)
    if moments is None:
        return None
    mean, var, eps = moments
    num_features = module.num_features
    if mean.numel() != num_features:  # one statistic per group: per channel
        shape, full = module.nap.stat_view_shape(num_features), (1, *module.groups, 1)
        mean = mean.reshape(shape).expand(full).reshape(-1)
        var = var.reshape(shape).expand(full).reshape(-1)
    return mean, var, eps


def _moments(module: Normalization, running: dict[str, Tensor], eps: float
             ) -> tuple[Tensor, Tensor, float] | None:
    """:func:`_derive`, cached while the running buffers and ``num_batches_tracked`` are the same
    tensors at the same version (``_version``: in-place updates, ``load_state_dict``, ``.to()``
    and training steps — which count — are seen; an edit through ``.data``, or by torch's BN
    kernel from outside the module, bypasses version counters and is not). Where the moments
    are the buffers themselves (BN's) the cache holds them, read as they are at each call. Not
    cached inside ``torch.compile`` / ``torch.export`` nor for inference tensors (no version
    counter)."""
    if torch.compiler.is_compiling():
        return _derive(module, running, eps)
    bufs = [*running.values()]
    counter = module._buffers.get("num_batches_tracked")
    if counter is not None:  # counted by every updating call: BN's kernel updates the
        bufs.append(counter)  # estimates without a version bump
    cached = _MOMENTS.get(module)
    if cached is not None and cached[0] == eps and len(cached[1]) == len(bufs):
        for (t, version), b in zip(cached[1], bufs, strict=True):  # identity first: a cached
            if t is not b or t._version != version:  # tensor is no inference tensor
                break
        else:
            return cached[2]  # type: ignore[no-any-return]
    for t in bufs:
        if t.is_inference():  # no version counter to key on
            return _derive(module, running, eps)
    with torch.no_grad():
        moments = _derive(module, running, eps)
    _MOMENTS[module] = (eps, [(t, t._version) for t in bufs], moments)
    return moments


def evaluate(module: Normalization, x: Tensor, running: dict[str, Tensor]) -> Tensor | None:
    """``module``'s evaluation of ``x`` (a batch axis, non-empty) with the ``running`` estimates
    in one BN kernel call, or ``None`` where it does not apply (:func:`applies`, dtypes, a
    running estimate that requires a gradient)."""
    kind = getattr(module, "_eval_kernel", None)  # None too for a module pickled before it
    if kind is None:
        return None
    for t in running.values():
        if t.requires_grad and torch.is_grad_enabled():
            return None  # the generic path: BN's kernel has no gradient for the statistics
    eps = module.eps if module.eps is not None else default_eps(x.dtype)
    if kind == "direct":  # the buffers themselves: nothing to cache
        moments = module.nop.eval_moments(running, eps)
    else:
        moments = _moments(module, running, eps)
    if moments is None:
        return None
    mean, var, eps = moments
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not kernel_accepts("batch_norm", x, weight, use_batch=False):
        return None
    ref = x.dtype if weight is None else weight.dtype
    for t in (mean, var, bias):  # a loop, not a generator: traced by dynamo
        if t is not None and (t.dtype != ref or t.device != x.device):
            return None
    return run_kernel("batch_norm", x, weight=weight, bias=bias, running=(mean, var),
                      use_batch=False, factor=0.0, eps=eps, groups=module.groups,
                      channel_axis=module.channel_axis)


def block_fold(module: Normalization, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``module.folded()`` of a whitening module in evaluation, cached until one of its parameters
    or buffers changes (a new tensor object or an in-place update: ``_version``); ``None``
    where the one-matmul path does not apply. It applies to operations with
    ``block_eval_fold`` when nothing needs a gradient and not inside ``torch.compile`` /
    ``torch.export`` (which trace the generic path) nor under autocast (which would run the
    fold's matmul in half precision), to whole groups along ``channel_axis=1``: the
    evaluation of batch whitening is then one block-diagonal matmul and one add, with no
    per-call fold of γ, μ into ``W`` (normkit bench: eval / block matmul).
    """
    if (not module.native or not module.nop.block_eval_fold or module.nrr.conditional
            or module.channel_axis != 1
            or module._num_padded or x.dim() < 2 or x.numel() == 0
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
        return None  # autocast: the generic path keeps float32 products, the input's dtype
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values())
               if t is not None]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
        return None
    if any(t.is_inference() for t in tensors):  # no version counter to key on
        return None
    key = (module.eps, *((id(t), t._version) for t in tensors))
    cached = _FOLDS.get(module)
    if cached is None or cached[0] != key or any(
            r() is not t for r, t in zip(cached[2], tensors, strict=True)):
        with torch.inference_mode(False), torch.no_grad():
            fold = module.folded()
        cached = (key, fold, [weakref.ref(t) for t in tensors])
        _FOLDS[module] = cached
    mat, shift = cached[1]
    return (mat, shift) if mat.dtype == x.dtype and mat.device == x.device else None
