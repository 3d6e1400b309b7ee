"""Weight normalization (book ch. 7): parametrizations, projection and orthogonality regularizers.

Every method is a :mod:`torch.nn.utils.parametrize` parametrization, installed on a layer with
:func:`apply` (or on every layer of a model with :func:`apply_to_model`) and removed with
:func:`remove`, which keeps the current weight. The weight is viewed per output unit: dimension 0
for Linear / ConvNd, 1 for ConvTranspose.

==========================  ==================================================  ================
method (alias)              W from the stored V                                 options
==========================  ==================================================  ================
``weight_norm`` (``wn``)    g · V/‖V‖ per unit                                  —
``centered_weight_norm``    g · (V − μ)/‖V − μ‖ per unit                        —
``weight_standardization``  (V − μ)/√(σ² + ε) per unit                          ``eps``
(``ws``)
``spectral_norm`` (``sn``)  V/σ_max(V), power iteration                         ``n_power_iterations``, ``eps``
``own``                     (ZZᵀ + εI)^{-1/2} Z, Z the centred rows             ``group_size``, ``eps``, ``scale``
``oni``                     Newton–Schulz (T steps) of the same                 ``iterations``, ``group_size``, ``scale``
``cosine_norm`` (``cos``)   output = (V/‖V‖)·x / ‖x‖ per input patch            —
==========================  ==================================================  ================

Also :mod:`normkit.weight.projection` (renormalize after each optimizer step) and
:mod:`normkit.weight.regularizers` (soft orthogonality, SRIP, Parseval retraction).

Example:
    >>> import torch, normkit as nk
    >>> lin = nk.weight.apply(torch.nn.Linear(16, 4), "oni", iterations=30)
    >>> torch.allclose(lin.weight @ lin.weight.T, torch.eye(4), atol=1e-4)
    True
"""

from ._install import (
    LAYER_TYPES,
    METHODS,
    apply,
    apply_to_model,
    is_normalized,
    parametrization,
    remove,
    remove_from_model,
)
from ._parametrizations import (
    CenteredWeightNorm,
    OrthogonalNewton,
    OrthogonalWeightNorm,
    SpectralNorm,
    UnitNorm,
    WeightNorm,
    WeightStandardization,
)

__all__ = [
    "METHODS", "LAYER_TYPES", "apply", "apply_to_model", "remove", "remove_from_model",
    "parametrization", "is_normalized", "WeightNorm", "CenteredWeightNorm", "WeightStandardization",
    "SpectralNorm", "OrthogonalWeightNorm", "OrthogonalNewton", "UnitNorm",
]
