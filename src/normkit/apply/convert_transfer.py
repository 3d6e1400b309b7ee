"""State transfer of :func:`normkit.apply.convert.convert`: the old layer's parameters and buffers
carried into the new one wherever they mean the same thing (the table in ``convert``'s docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional.normalize import default_eps
from ..nop import Whiten
from ..normalization import Normalization

__all__ = ["transfer_state"]


def _blocks_of(var: Tensor, like: Tensor) -> Tensor:
    """``diag(var)`` laid out as whitening blocks shaped like ``like`` ``(G, d, d)`` (a smaller
    last group keeps the identity in its padding, like the buffers' initial value)."""
    g, d = like.shape[0], like.shape[-1]
    out = torch.eye(d, dtype=torch.float64, device=like.device).repeat(g, 1, 1)
    idx = torch.arange(var.numel(), device=like.device)
    out[idx // d, idx % d, idx % d] = var.to(torch.float64)
    return out


def _diag_of(blocks: Tensor, c: int) -> Tensor:
    return torch.diagonal(blocks, dim1=-2, dim2=-1).reshape(-1)[:c]


@torch.no_grad()
def transfer_state(old: nn.Module, new: nn.Module, c: int, offset: float = 0.0
              ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Carry ``old``'s parameters and buffers into ``new`` where they map; ``(kept, dropped,
    fresh)``. Parameters of equal shape, dtype and device are the same ``nn.Parameter`` objects
    afterwards (an optimizer holding them keeps working, as torch's ``convert_sync_batchnorm``);
    a ``(offset + weight)`` gain (Gemma) becomes ``weight ← offset + weight``."""
    new_t = dict(new.named_parameters(recurse=False))
    new_b = {k: b for k, b in new.named_buffers(recurse=False) if b is not None}
    filled: set[str] = set()
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    kind = type(new).__name__
    whiten = isinstance(new, Normalization) and isinstance(new.nop, Whiten)
    for name, p in old.named_parameters(recurse=False):
        q = new_t.get(name)
        if q is None:
            dropped.append((name, f"{kind} has no parameter {name}"))
        elif q.shape != p.shape:
            dropped.append((name, f"shape {tuple(p.shape)} vs {kind}'s {tuple(q.shape)}"))
        elif name == "weight" and offset:
            q.copy_(p + offset)
            kept.append(f"weight←{offset:g}+weight")
            filled.add(name)
        else:
            if q.dtype == p.dtype and q.device == p.device:
                setattr(new, name, p)
            else:
                q.copy_(p)
            kept.append(name)
            filled.add(name)
    for name, b in old.named_buffers(recurse=False):
        if b is None:
            continue
        q = new_b.get(name)
        if q is not None and q.shape == b.shape:
            q.copy_(b)
            kept.append(name)
            filled.add(name)
        elif q is None and name in new_t and new_t[name].shape == b.shape:  # buffer → parameter
            new_t[name].copy_(b)
            kept.append(name)
            filled.add(name)
        elif name == "running_var" and "running_cov" in new_b and b.numel() == c:
            new_b["running_cov"].copy_(_blocks_of(b, new_b["running_cov"]))
            kept.append("running_cov←diag(running_var)")
            filled.add("running_cov")
        elif name == "running_var" and "running_matrix" in new_b and whiten and b.numel() == c:
            eps = new.eps if new.eps is not None else default_eps(b.dtype)
            cov = _blocks_of(b, new_b["running_matrix"])
            new_b["running_matrix"].copy_(new.nop.whitening({"cov": cov[None]}, eps)[0])
            kept.append("running_matrix←W(diag(running_var))")
            filled.add("running_matrix")
        elif name == "running_cov" and "running_var" in new_b and new_b["running_var"].numel() == c:
            new_b["running_var"].copy_(_diag_of(b, c))
            kept.append("running_var←diag(running_cov)")
            filled.add("running_var")
        elif name == "running_matrix" and "running_var" in new_b:
            dropped.append((name, "a whitening matrix does not give the variances; re-estimate "
                                  "them with normkit.apply.recalibrate"))
        elif not new_b and (name.startswith("running_") or name == "num_batches_tracked"):
            dropped.append((name, f"{kind} keeps no running statistics"))
        elif q is None:
            dropped.append((name, f"{kind} has no buffer {name}"))
        else:
            dropped.append((name, f"shape {tuple(b.shape)} vs {kind}'s {tuple(q.shape)}"))
    fresh = tuple(n for n in (*new_t, *new_b) if n not in filled)
    return tuple(kept), tuple(dropped), fresh
