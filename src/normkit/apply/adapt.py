r"""Domain shift (ch. 10.1): adapt the normalization of a trained model to a new domain.

==============================  ============================================================
what                            how
==============================  ============================================================
``adabn(model, batches)``       AdaBN: every batch statistic re-estimated on unlabeled target
                                data (:func:`~normkit.apply.stats.recalibrate`)
``DomainSpecificNorm``          DSBN: one copy (statistics and ``γ, β``) of any normalization
                                per domain, the rest of the network shared
``domain_specific(model, K)``   every statistics module of a model made domain-specific
``use_domain(model, k)``        context: every domain-specific module of a model uses domain k
``TransNorm``                   per-domain statistics, shared ``γ, β``, transferability
                                attention ``1 + α`` per channel
``prediction_time_bn(m, x)``    prediction-time BN: predict with the test batch's statistics
``Tent`` / ``tent_adapt``       TENT: ``γ, β`` of the normalization layers adapted online by
                                minimising the prediction entropy
==============================  ============================================================

References: Li et al. 2016 (AdaBN, arXiv:1603.04779); Chang et al. 2019 (DSBN, CVPR);
Wang et al. 2019 (TransNorm, NeurIPS); Nado et al. 2020 (prediction-time BN,
arXiv:2006.10963); Wang et al. 2021 (TENT, ICLR).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._domain import DomainSpecificNorm, TransNorm, domain_specific, use_domain
from .convert import is_normalization
from .stats import batch_statistics, recalibrate, statistics_modules

__all__ = ["adabn", "DomainSpecificNorm", "TransNorm", "domain_specific", "use_domain",
           "prediction_time_bn", "softmax_entropy", "tent_parameters", "Tent", "tent_adapt"]


# ---------------------------------------------------------------------------------------- AdaBN
def adabn(model: nn.Module, target_batches: Iterable[Any], *, num_batches: int | None = None
          ) -> nn.Module:
    r"""AdaBN (Li et al. 2016): re-estimate every batch statistic of ``model`` on unlabeled
    target-domain inputs, so that evaluation normalizes with the target's statistics

    .. math::
        \hat x = \frac{x - \mu_T}{\sqrt{\sigma^2_T + \epsilon}}, \qquad
        \mu_T, \sigma^2_T = \text{mean, unbiased variance over all target batches}

    (the weights, ``γ, β`` included, stay as trained). A thin wrapper over
    :func:`~normkit.apply.stats.recalibrate`, which documents the exact pooling.

    Args:
        model: any module with batch-statistics layers (torch BN, normkit BN, whitening, ...).
        target_batches: target-domain inputs: tensors, ``(x, ...)`` tuples or keyword mappings
            (labels, if any, are ignored).
        num_batches: use at most this many batches (default: all).

    Returns:
        ``model``, its running statistics now the target's; modes are restored.

    Raises:
        ConfigError: for a model without statistics modules (nothing to re-estimate), or what
            :func:`~normkit.apply.stats.recalibrate` refuses.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> target = [torch.randn(16, 3) * 2 + 5 for _ in range(4)]
        >>> _ = adabn(bn, target)
        >>> torch.allclose(bn.running_mean, torch.cat(target).mean(0), atol=1e-5)
        True
    """
    mods = statistics_modules(model)
    if not mods:
        raise ConfigError(
            f"adabn: {type(model).__name__} has no batch-statistics layer (BatchNorm, batch "
            f"whitening, ...) whose statistics could be re-estimated; AdaBN does not apply to "
            f"per-sample normalizations (LN, GN, IN) or unnormalized models")
    recalibrate(model, target_batches, num_batches=num_batches)  # unreached layers keep theirs
    return model


# --------------------------------------------------------------------------- prediction-time BN
def _chunks(x: Tensor, batch_size: int | None) -> tuple[Tensor, ...]:
    """``x`` split into ⌈N / batch_size⌉ near-equal batches (none of size 1 unless N is)."""
    if batch_size is None:
        return (x,)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return torch.tensor_split(x, max(1, -(-len(x) // batch_size)))


@torch.no_grad()
def prediction_time_bn(model: nn.Module, inputs: Tensor, *, batch_size: int | None = None
                       ) -> Tensor:
    r"""Prediction-time BN (Nado et al. 2020): predict with the statistics of the test batch,

    .. math::
        \hat x = \frac{x - \mu_B}{\sqrt{\sigma^2_B + \epsilon}}, \qquad B = \text{the test batch},

    in every statistics module, the rest of the model in evaluation mode (dropout off); running
    statistics and modes are left untouched (:func:`~normkit.apply.stats.batch_statistics`).

    Args:
        model: any module with batch-statistics layers.
        inputs: the test inputs ``(N, ...)``.
        batch_size: predict in ⌈N / batch_size⌉ near-equal batches, each normalized with its
            own statistics (default: all of ``inputs`` as one batch).

    Returns:
        The outputs ``(N, ...)``.

    Raises:
        ConfigError: for a model without statistics modules or a bad ``batch_size``.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> x = torch.randn(10, 3) * 4 + 1
        >>> y = prediction_time_bn(bn, x)
        >>> torch.allclose(y.mean(0), torch.zeros(3), atol=1e-5), int(bn.num_batches_tracked)
        (True, 0)
    """
    if not statistics_modules(model):
        raise ConfigError(f"prediction_time_bn: {type(model).__name__} has no batch-statistics "
                          f"layer (BatchNorm, batch whitening, ...); its predictions would not "
                          f"change")
    chunks = _chunks(inputs, batch_size)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with batch_statistics(model):
            return torch.cat([model(c) for c in chunks])
    finally:
        for m, training in modes.items():
            m.training = training


# ------------------------------------------------------------------------------------------ TENT
def softmax_entropy(logits: Tensor) -> Tensor:
    r"""Entropy of the softmax of each row, :math:`H = -\sum_c p_c \log p_c`, shape ``(N,)``.

    Example:
        >>> import torch, math
        >>> round(float(softmax_entropy(torch.zeros(1, 4))), 6) == round(math.log(4), 6)
        True
    """
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def tent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``γ, β`` (``weight`` and ``bias`` parameters) of every normalization layer of
    ``model``: torch's BN/IN/GN/LN/RMSNorm and subclasses, normkit's
    :class:`~normkit.Normalization`, and the shared ones of :class:`TransNorm`."""
    out: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if is_normalization(m) or isinstance(m, TransNorm):
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    out.setdefault(id(p), p)
    return list(out.values())


class Tent(nn.Module):
    r"""TENT (Wang et al. 2021): test-time adaptation by entropy minimisation. Each call

    1. predicts the batch with batch statistics in every statistics module (the rest of the model
       in evaluation mode; running statistics untouched),
    2. takes ``steps`` optimizer steps on the mean prediction entropy
       :math:`\frac1N\sum_i H(\mathrm{softmax}(f(x_i)))` over the ``γ, β`` of the normalization
       layers only (:func:`tent_parameters`; every other parameter fixed),
    3. returns the outputs of the last step's forward (computed before that step's update, as in
       the paper's online setting: batch ``t`` is predicted with what batches ``< t`` taught).

    Adaptation carries over from call to call (online) unless ``episodic``, which calls
    :meth:`reset` before each batch. :meth:`reset` restores ``γ, β`` and the optimizer to their
    state at construction. Works on any torch model; without batch-statistics layers (GN, LN)
    only ``γ, β`` adapt.

    Args:
        model: the trained model (adapted in place).
        optimizer_factory: ``f(params) -> Optimizer``; default SGD with ``lr=1e-3`` and momentum
            0.9.
        steps: optimizer steps per batch (≥ 1).
        episodic: reset before every batch.

    Raises:
        ConfigError: for a model without normalization ``γ, β``, or ``steps`` < 1.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.Linear(8, 3)).eval()
        >>> tent = Tent(net)
        >>> before = net[0].weight.clone()
        >>> tent(torch.randn(16, 4)).shape, torch.equal(net[0].weight, before)
        (torch.Size([16, 3]), True)
    """

    def __init__(self, model: nn.Module, *,
                 optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
                 | None = None, steps: int = 1, episodic: bool = False) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be an int ≥ 1, got {steps!r}")
        params = tent_parameters(model)
        if not params:
            raise ConfigError(f"Tent: {type(model).__name__} has no normalization layer with "
                              f"γ, β (weight/bias parameters) to adapt")
        self.model = model
        self.params = params
        self.steps = steps
        self.episodic = episodic
        factory = optimizer_factory or (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9))
        self.optimizer = factory(params)
        self._saved = ([p.detach().clone() for p in params],
                       copy.deepcopy(self.optimizer.state_dict()))

    def reset(self) -> None:
        """Restore ``γ, β`` and the optimizer state to their values at construction."""
        with torch.no_grad():
            for p, saved in zip(self.params, self._saved[0], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(self._saved[1]))

    def forward(self, x: Any) -> Tensor:
        """Adapt on the batch ``x`` and return its (detached) outputs."""
        if self.episodic:
            self.reset()
        chosen = {id(p) for p in self.params}
        flags = {p: p.requires_grad for p in self.model.parameters()}
        modes = {m: m.training for m in self.model.modules()}
        try:
            for p in flags:  # gradients for γ, β only
                p.requires_grad_(id(p) in chosen)
            self.model.eval()
            with torch.enable_grad(), batch_statistics(self.model):
                for _ in range(self.steps):
                    out = self.model(x)
                    loss = softmax_entropy(out).mean()
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                    for p, g in zip(self.params, grads, strict=True):
                        p.grad = g
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            for m, training in modes.items():
                m.training = training
        return out.detach()


def tent_adapt(model: nn.Module, batches: Iterable[Tensor] | Sequence[Tensor], *,
               lr: float = 1e-3, steps: int = 1, momentum: float = 0.9,
               episodic: bool = False) -> Tensor:
    """TENT over a stream of test batches with SGD (``lr``, ``momentum``): ``model`` is adapted
    in place, batch after batch (see :class:`Tent`).

    Returns:
        The outputs of all batches, concatenated in order.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
        >>> tent_adapt(net, [torch.randn(8, 4) for _ in range(3)], lr=0.01).shape
        torch.Size([24, 3])
    """
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    tent = Tent(model, steps=steps, episodic=episodic, optimizer_factory=lambda p: torch.optim.SGD(
        p, lr=lr, momentum=momentum))
    outs = [tent(x) for x in batches]
    if not outs:
        raise ConfigError("tent_adapt got no batches: pass a non-empty iterable of inputs")
    return torch.cat(outs)
