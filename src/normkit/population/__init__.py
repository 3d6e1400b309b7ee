r"""Layers whitened by population statistics: Natural Neural Networks and GWNN (book ch. 3.1).

A population-whitened layer computes

.. math::
    y = V\,\big(W\,(x - c)\big) + d

where ``c`` (``population_mean``) and ``W`` (``whitening``) are **buffers** estimated from the
layer's input over a few batches at each :func:`refresh`, and ``V`` (``weight``), ``d``
(``bias``) are the learned parameters. Between refreshes ``c`` and ``W`` are constants, so the
layer is an ordinary affine map of ``x`` — equal to ``nn.Linear`` with weight ``VW`` and bias
``d − VWc`` — but gradient descent on ``V`` sees whitened inputs ``z = W(x − c)``: the input
factor ``E[zzᵀ]`` of the layer's Fisher block (K-FAC) is ``I``, so SGD on ``V`` approximates the
natural gradient (Desjardins et al. 2015, "PRONG").

**Re-expression at a refresh.** New statistics give ``c′``, ``W′``; the parameters are rewritten
so the layer computes the same function:

.. math::
    V' = V\,W\,W'^{+}, \qquad d' = d + V\,W\,(c' - c)

Proof (full rank, ``W′⁺ = W′⁻¹``): ``V′W′(x − c′) + d′ = VW(x − c′) + VW(c′ − c) + d
= VW(x − c) + d``. ``W′⁺`` is the pseudo-inverse of the *stored* ``W′``
(``= (Σ′+εI)W′ᵀ``, the coloring matrix for ZCA), computed in float64, so the identity holds for
the matrix the layer actually uses; outputs agree to float rounding. **Low rank** (GWNN's
PCA-compressed variant, ``W′`` of shape ``k × g``): ``W′W′⁺ = I_k`` and ``W′⁺W′ = P′`` projects on
the new top-``k`` principal subspace; the output changes by exactly ``VW(P′ − I)(x − c′)``.
That is zero for every ``x`` iff the row space of the old ``W`` lies in the new subspace (e.g.
unchanged statistics, or the second refresh on inputs supported on a ``k``-dim affine subspace),
and zero for the inputs with ``x − c′`` in the new subspace; otherwise it is the least-squares
re-expression on the refresh batches (the error has mean zero there; ``V′`` minimizes its second
moment for ``ε → 0``). A conv's zero-padded positions (``0 − c′``) are such "other" inputs.

**Grouped** (GWNN): with ``group_size=g`` the ``F`` input features are split into ``F/g``
consecutive groups, each whitened on its own: ``W`` is block-diagonal (stored as ``(G, k, g)``
blocks); ``rank`` then applies per group. ``group_size`` must divide ``F``.

**Conv** (:class:`WhitenedConv2d`): ``W`` acts on the channels at every position (a 1×1
whitening), ``c`` is per channel. The input is zero-padded *first* and then centred and
whitened (a padded position holds ``W(0 − c)``, exactly what a plain ``Conv2d`` with weight
``V·W`` would see), so a change of ``c`` is a constant field over the whole padded input and
folds exactly into the bias: ``d′ = d + Σ_{ij} V_{:,:,i,j}\,W(c′ − c)``.

**Statistics.** :func:`refresh` runs the model in eval mode without gradient and pools, per
layer, the mean and the **unbiased** covariance over every value of every batch (Chan's
count-weighted merge, :class:`normkit.functional.merging.MomentPool`), in float64; ``W′``
comes from :func:`normkit.functional.whiten.whitening_matrix` (``zca``, ``pca`` or
``cholesky``) with ``ε`` added to ``Σ``. Since a full-rank refresh leaves each layer's function
unchanged, the inputs of later layers are unchanged too, so one pass collects the statistics of all
layers at once; after a low-rank layer (which may change its output) the later layers' statistics
are collected again in another pass over the same batches.

Papers: Desjardins, Simonyan, Pascanu, Kavukcuoglu, "Natural Neural Networks", NeurIPS 2015
(https://arxiv.org/abs/1507.00210); Luo, "Learning Deep Architectures via Generalized Whitened
Neural Networks", ICML 2017.
"""

from __future__ import annotations

# the type aliases of the signatures and the base class stay importable from here
from ._layers import OptimizerState as OptimizerState
from ._layers import PopulationMethod as PopulationMethod
from ._layers import WhitenedConv2d, WhitenedLinear
from ._layers import _PopulationWhitened as _PopulationWhitened
from ._refresh import RefreshEvery, population_layers, refresh, whiten_layers

__all__ = ["WhitenedLinear", "WhitenedConv2d", "population_layers", "whiten_layers", "refresh",
           "RefreshEvery"]
