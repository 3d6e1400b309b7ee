"""NRR — normalized representation recovery: how is representational power given back?

A recovery is an immutable description; the parameters it needs are registered on the owning
:class:`normkit.Normalization` under torch's names (``weight``, ``bias`` of shape ``(C,)``), so a
normkit BN's state_dict is a torch BN's.

=====================  ====================================  =====================
recovery               y                                     parameters
=====================  ====================================  =====================
``None`` / ``Identity()``  x̂                                 —
``Affine()``           γ ⊙ x̂ + β  (per channel)              weight (C,), bias (C,)
``Scalar(init)``       g · x̂   (one learned scalar)          weight (1,)
``Coloring(d)``        Γ_k x̂_k + β  (a d×d matrix per        weight (C/d, d, d),
                       group of d channels)                  bias (C,)
=====================  ====================================  =====================

Conditional and input-dependent recoveries compute ``γ, β`` per sample (the module is called as
``module(x, condition)`` where a condition is needed):

==========================  ===============================================================
recovery                    γ, β
==========================  ===============================================================
``ConditionalAffine(K|E)``  rows of per-class tables, or linear in an embedding (cBN, cIN)
``DynamicAffine()``         linear in the input's mean over positions (dynamic LN)
``AdaptiveInstance()``      the std and mean of a style input (AdaIN)
``SPADE(L)``                per position, a small conv net of a segmentation map
``InstanceGate()``          γ gated by sigmoid of the input's pooled response (IEBN)
``AttentiveAffine(K)``      attention-weighted mixture of K affines (attentive normalization)
``ExternalAffine()``        given by the caller as the condition ``(γ, β)`` (AdaLIN)
``MetaAffine(r)``           corrections from an encoder-decoder on the pooled input (ILM)
==========================  ===============================================================

Example:
    >>> import normkit as nk
    >>> nk.nrr.Affine(bias=False)
    Affine(weight=True, bias=False, zero_init=False)
"""

from ._base import Affine as Affine
from ._base import Coloring as Coloring
from ._base import Identity as Identity
from ._base import Recovery as Recovery
from ._base import Scalar as Scalar
from ._conditional import SPADE as SPADE
from ._conditional import AdaptiveInstance as AdaptiveInstance
from ._conditional import AttentiveAffine as AttentiveAffine
from ._conditional import ConditionalAffine as ConditionalAffine
from ._conditional import DynamicAffine as DynamicAffine
from ._conditional import ExternalAffine as ExternalAffine
from ._conditional import InstanceGate as InstanceGate
from ._conditional import MetaAffine as MetaAffine

__all__ = ["Recovery", "Identity", "Affine", "Scalar", "Coloring", "ConditionalAffine",
           "DynamicAffine", "AdaptiveInstance", "SPADE", "InstanceGate", "AttentiveAffine",
           "ExternalAffine", "MetaAffine"]
