"""Scoring a trained model: mean loss and accuracy on a test set, in its current mode.

Used by the training run (:mod:`normkit.experiments.runner`) and the covariate-shift evaluation
(:mod:`normkit.experiments.shift`), which both import it from here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["evaluate"]

_EVAL_CHUNK = 1024


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             batch_size: int = _EVAL_CHUNK) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in its current mode.

    Runs under ``torch.no_grad`` in chunks of ``batch_size``; a last chunk smaller than that is
    dropped when the model is in training mode (batch statistics of a tiny chunk are meaningless).

    Returns:
        ``(loss, accuracy)`` with accuracy in ``[0, 1]``.
    """
    n = len(x) - len(x) % batch_size if model.training and len(x) >= batch_size else len(x)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            logits = model(x[start:start + batch_size])
            target = y[start:start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    return loss_sum / n, correct / n
