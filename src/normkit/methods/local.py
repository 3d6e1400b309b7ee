"""Local normalization (book ch. 4.1): statistics over a neighbourhood of channels × positions."""

from __future__ import annotations

from typing_extensions import Unpack

from .. import nap, nop, nrr
from ..normalization import Normalization
from ..registry import register
from ._common import NormKwargs, affine_recovery

__all__ = ["LocalContextNorm", "LocalResponseNorm", "DivisiveNorm"]


@register("lcn", family="local", aliases=("local_context_norm", "localcontextnorm"),
          paper="Ortiz, Robinson, Neff, Mitra & Liu 2020, arXiv:1912.05845")
class LocalContextNorm(Normalization):
    r"""Local context normalization: standardize over a spatial window within a channel group.

    .. math::
        y_{ncp} = \gamma_c \frac{x_{ncp} - \mu_{n,g(c),W(p)}}{\sqrt{\sigma^2_{n,g(c),W(p)} + \epsilon}}
        + \beta_c

    where ``W(p)`` is the ``window``-sized neighbourhood of position ``p`` (clipped at the
    borders: only positions inside the input count) and ``g(c)`` the group of ``C/g`` channels
    holding ``c``. A window covering the whole input is GN. Works for 1-D, 2-D and 3-D inputs.

    Paper: Ortiz et al., *Local Context Normalization: Revisiting Local Normalization*, CVPR 2020.
    arXiv:1912.05845.

    Args:
        num_features: channels ``C``.
        num_groups: channel groups ``g`` (must divide ``C``). Default ``1``.
        window: spatial window, an int for every spatial dimension or one per dimension.
            Default ``7``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (running statistics are not
            supported: they vary with position).

    Shape:
        ``(N, C, *spatial)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 4, 5, 5)
        >>> lcn = nk.LocalContextNorm(4, num_groups=2, window=9)   # window covers the image
        >>> torch.allclose(lcn(x), nk.GroupNorm(4, num_groups=2)(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 1,
        window: int | tuple[int, ...] = 7,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        partition = nap.Local(num_groups=num_groups, window=window)
        super().__init__(num_features, nap=partition, nrr=affine_recovery(affine), **kw)


@register("lrn", family="local", aliases=("local_response_norm", "localresponsenorm"),
          paper="Krizhevsky, Sutskever & Hinton 2012")
class LocalResponseNorm(Normalization):
    r"""Local response normalization across neighbouring channels.

    .. math::
        y_c = \frac{x_c}{\left(k + \frac{\alpha}{n} \sum_{c' \in W_n(c)} x_{c'}^2\right)^{\beta}}

    ``W_n(c)`` is a window of ``size`` channels centred on ``c`` (zero-padded at the ends, as
    ``torch.nn.LocalResponseNorm``, which this equals). No learned parameters, no running stats.

    Paper: Krizhevsky, Sutskever & Hinton, *ImageNet Classification with Deep Convolutional
    Neural Networks*, NeurIPS 2012.

    Args:
        num_features: channels ``C``.
        size: channels in the window ``n``. Default ``5``.
        alpha, beta, k: the constants. Defaults ``1e-4``, ``0.75``, ``1.0`` (torch's).
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps`` unused).

    Shape:
        ``(N, C, *)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(2, 8, 4, 4)
        >>> ref = torch.nn.LocalResponseNorm(3, alpha=0.1)(x)
        >>> torch.allclose(nk.LocalResponseNorm(8, size=3, alpha=0.1)(x), ref, atol=1e-6)
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 1.0,
        **kw: Unpack[NormKwargs],
    ) -> None:
        partition = nap.Local(channel_window=size, window=1, include_pad=True)
        op = nop.Divisive(k=k, alpha=alpha, beta=beta, center=False)
        super().__init__(num_features, nap=partition, nop=op, nrr=nrr.Identity(), **kw)


@register("divisive_norm", family="local", aliases=("divisive_normalization", "dn"),
          paper="Ren, Liao, Urtasun, Sinz & Zemel 2017, arXiv:1611.04520")
class DivisiveNorm(Normalization):
    r"""Divisive normalization: center by a local mean and divide by the local spread.

    .. math::
        y = \gamma \frac{x - \mu_{W}}{\sqrt{\sigma^2 + \operatorname{Var}_{W}(x)}} + \beta

    over a window ``W`` of ``channel_window`` neighbouring channels × ``window`` positions
    (clipped at borders). ``sigma`` is the paper's ``σ``, a smoothing constant that keeps weak
    responses from being amplified.

    Paper: Ren et al., *Normalizing the Normalizers: Comparing and Extending Network
    Normalization Schemes*, ICLR 2017. arXiv:1611.04520.

    Args:
        num_features: channels ``C``.
        window: spatial window (int or one per dimension). Default ``3``.
        channel_window: neighbouring channels in the window. Default ``1``.
        sigma: smoothing constant ``σ`` (> 0). Default ``1.0``.
        affine: per-channel ``γ, β``. Default ``True``.
        **kw: :class:`~normkit.methods._common.NormKwargs` (``eps`` unused).

    Shape:
        ``(N, C, *spatial)`` → same.

    Example:
        >>> import torch, normkit as nk
        >>> x = torch.randn(1, 1, 9)
        >>> y = nk.DivisiveNorm(1, window=3, sigma=1.0, affine=False)(x)
        >>> win = x[0, 0, 3:6]
        >>> bool(torch.isclose(y[0, 0, 4], (x[0, 0, 4] - win.mean()) / (1 + win.var(unbiased=False)).sqrt(), atol=1e-6))
        True
    """

    def __init__(
        self,
        num_features: int,
        *,
        window: int | tuple[int, ...] = 3,
        channel_window: int = 1,
        sigma: float = 1.0,
        affine: bool = True,
        **kw: Unpack[NormKwargs],
    ) -> None:
        partition = nap.Local(channel_window=channel_window, window=window)
        op = nop.Divisive(k=sigma * sigma, alpha=1.0, beta=0.5, center=True)
        super().__init__(num_features, nap=partition, nop=op, nrr=affine_recovery(affine), **kw)
