"""Normalizing gradients (Ch. 8): transforms for any ``torch.optim`` optimizer, LARS and LAMB.

* pure functions on one gradient: :func:`centralize`, :func:`block_normalize`,
  :func:`unitwise_norm`, :func:`adaptive_clip`;
* step pre-hooks for any optimizer, returning a removable handle: :func:`centralize_gradients`,
  :func:`normalize_gradients`, :func:`clip_gradients_adaptive`;
* layer-wise adaptive optimizers :class:`LARS` and :class:`LAMB`, and
  :func:`exclude_bias_and_norm` to build "no decay for biases and norms" param groups.

Example:
    >>> import torch, normkit.gradient as G
    >>> net = torch.nn.Linear(4, 3)
    >>> opt = G.LAMB(net.parameters(), lr=1e-3, weight_decay=0.01)
    >>> handle = G.centralize_gradients(opt)
    >>> net(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step()
    >>> handle.remove()
"""

from ._hooks import adaptive_clip as adaptive_clip
from ._hooks import block_normalize as block_normalize
from ._hooks import centralize as centralize
from ._hooks import centralize_gradients as centralize_gradients
from ._hooks import clip_gradients_adaptive as clip_gradients_adaptive
from ._hooks import normalize_gradients as normalize_gradients
from ._hooks import unitwise_norm as unitwise_norm
from ._lamb import LAMB as LAMB
from ._optimizers import LARS as LARS
from ._optimizers import exclude_bias_and_norm as exclude_bias_and_norm

__all__ = [
    "centralize",
    "block_normalize",
    "unitwise_norm",
    "adaptive_clip",
    "centralize_gradients",
    "normalize_gradients",
    "clip_gradients_adaptive",
    "LARS",
    "LAMB",
    "exclude_bias_and_norm",
]
