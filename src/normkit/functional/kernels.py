"""torch's own normalization kernels, called by name on the canonical layouts normkit uses.

An operation declares the kernel that computes it (:meth:`normkit.nop.Operation.native_kernel`);
:class:`normkit.Normalization` runs it here when the call qualifies (:func:`kernel_accepts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_batch_group import batch_group_standardize
from .whiten_chunks import chunked_matmuls

__all__ = ["KERNELS", "block_affine", "kernel_accepts", "run_kernel"]

KERNELS = ("batch_norm", "batch_group_norm", "instance_norm", "group_norm", "layer_norm",
           "rms_norm", "local_response_norm")


def kernel_accepts(kind: str, x: Tensor, weight: Tensor | None, *, use_batch: bool) -> bool:
    """Whether torch's ``kind`` kernel computes this call exactly as the generic composition.

    ``use_batch``: the call normalizes with batch statistics (``False``: running estimates).

    Example:
        >>> x = torch.randn(4, 3, 5)
        >>> kernel_accepts("batch_norm", x, torch.ones(3), use_batch=True)
        True
        >>> kernel_accepts("batch_norm", x.half(), torch.ones(3).half(), use_batch=True)
        False
    """
    if kind == "rms_norm" and x.device.type == "cpu":
        return False  # composite on CPU: the generic path is faster (normkit bench)
    if kind == "batch_group_norm" and not use_batch:
        return False  # eval: the generic path folds running stats and affine into one FMA
    if kind == "local_response_norm":
        # torch's kernel needs rank >= 3, views its input (contiguous only), no upcast
        return (x.dim() >= 3 and x.is_contiguous()
                and x.dtype not in (torch.float16, torch.bfloat16))
    if x.dtype in (torch.float16, torch.bfloat16):
        # torch's CPU kernels reduce in the input precision unless a float32 parameter makes
        # them take the mixed-precision path; the generic path always reduces in float32.
        # torch's rms_norm has no mixed-precision kernel and warns, and batch-group calls the
        # BN kernel without the parameters: generic path for both.
        return (weight is not None and weight.dtype == torch.float32
                and kind not in ("rms_norm", "batch_group_norm"))
    return weight is None or weight.dtype == x.dtype


def run_kernel(
    kind: str,
    x: Tensor,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    running: tuple[Tensor, Tensor] | None,
    use_batch: bool,
    factor: float | Tensor,
    eps: float,
    groups: tuple[int, int],
    channel_axis: int,
    lrn: tuple[int, float, float, float] | None = None,
) -> Tensor:
    """``y`` of torch's ``kind`` kernel for ``x`` ``(N, C, *)`` (``channel_axis=1``) or
    ``(N, *, C)`` (``-1``).

    Args:
        running: ``(running_mean, running_var)`` to read (``use_batch=False``) or update in place
            (``use_batch=True`` with ``factor`` the weight of the new batch); ``None``: neither.
        factor: the weight of the new batch in the running estimates (torch's ``momentum``).
        groups: ``(A, B)`` of the canonical view (group count and size).
        lrn: ``(size, alpha, beta, k)`` of ``local_response_norm``.

    Shape:
        ``y`` has the shape and layout of ``x``.

    Example:
        >>> x = torch.randn(4, 6, 5)
        >>> y = run_kernel("group_norm", x, weight=None, bias=None, running=None, use_batch=True,
        ...                factor=0.0, eps=1e-5, groups=(2, 3), channel_axis=1)
        >>> torch.allclose(y, torch.nn.functional.group_norm(x, 2))
        True
    """
    rm, rv = (None, None) if running is None else running
    num_features = groups[0] * groups[1]
    if kind == "batch_norm":
        xc = x if channel_axis == 1 else x.movedim(-1, 1)
        y = F.batch_norm(xc, rm, rv, weight, bias, use_batch, factor, eps)
        return y if channel_axis == 1 else y.movedim(1, -1)
    if kind == "batch_group_norm":
        g, per = groups
        if use_batch and x.numel() > g:
            # one standardization Function (fused_batch_group), compiled as well: inductor
            # runs its backward in two passes over the activations (BN's kernel and the affine
            # decompose into four)
            return batch_group_standardize(x, groups, weight, bias, eps, running, factor)
        y = F.batch_norm(x.reshape(x.shape[0], g, -1), rm, rv, None, None, use_batch, factor, eps)
        if weight is not None and bias is not None:
            shape = (1, g, per, 1)
            y = torch.addcmul(bias.reshape(shape), y.reshape(x.shape[0], g, per, -1),
                              weight.reshape(shape))
        return y.reshape(x.shape)
    if kind == "instance_norm":
        return F.instance_norm(x, rm, rv, weight, bias, use_batch, factor, eps)
    if kind == "group_norm":
        return F.group_norm(x, groups[0], weight, bias, eps)
    if kind == "layer_norm":
        if channel_axis == 1:
            return F.layer_norm(x.movedim(1, -1), (num_features,), weight, bias, eps).movedim(-1, 1)
        return F.layer_norm(x, (num_features,), weight, bias, eps)
    if kind == "local_response_norm":
        if lrn is None:
            raise ValueError("local_response_norm needs lrn=(size, alpha, beta, k)")
        return F.local_response_norm(x, *lrn)
    if kind == "rms_norm":
        return F.rms_norm(x, (num_features,), weight, eps)
    raise ValueError(f"unknown kernel {kind!r}; one of {KERNELS}")


def block_affine(x: Tensor, mat: Tensor, shift: Tensor) -> Tensor:
    """``y = M x + b`` per group of ``d`` channels of ``x`` ``(N, C, *S)``: ``mat`` ``(C/d, d, d)``,
    ``shift`` ``(C,)`` (the output of :meth:`normkit.Normalization.folded` for whitening): the
    evaluation of batch whitening as one block-diagonal matmul.

    Example:
        >>> x, mat, shift = torch.randn(2, 4, 3), torch.randn(2, 2, 2), torch.randn(4)
        >>> ref = torch.einsum("gij,ngjs->ngis", mat, x.view(2, 2, 2, 3)).reshape(2, 4, 3)
        >>> torch.allclose(block_affine(x, mat, shift), ref + shift[:, None], atol=1e-6)
        True
    """
    g, d, n = mat.shape[0], mat.shape[-1], x.shape[0]
    v = x.reshape(n, g, d, -1)
    if v.shape[-1] > d:  # many positions: N·G products (d × d)(d × S) into the shift, no copy,
        # a cache-sized chunk of samples at a time (d = 16: 2.1 → 1.8× one (G, d, N·S) product)
        return chunked_matmuls([(mat.unsqueeze(0), v)], shift.view(1, g, d, 1)).reshape(x.shape)
    # few positions ((N, C) input: S = 1): N·G tiny products would be ~100× slower than G
    # products (d × d)(d × N·S) on a (G, d, N·S) copy
    y = torch.baddbmm(shift.view(g, d, 1), mat, v.permute(1, 2, 0, 3).reshape(g, d, -1))
    return y.view(g, d, n, -1).permute(2, 0, 1, 3).reshape(x.shape)
