"""Analysis of normalization (book ch. 9): tools that run on any torch model.

==============================  ==============================================================
tool                            what it measures
==============================  ==============================================================
``scale_invariance``            output / loss change when a layer's weight is rescaled
``gradient_weight_inner_product``  cos(∇_W L, W): ≈ 0 for a scale-invariant layer
``ScaleTracker``                ‖W‖, effective learning rate η/‖W‖², angular update per step
``layer_statistics``            per layer: spectra and condition numbers of the input second
                                moment and of the output-gradient covariance (K-FAC factors)
``ConditioningTracker``         the same every K steps of training
``snd``                         stochastic normalization disturbance of a batch-dependent method
``whitening_error``             ‖Cov(x̂) − I‖ of a (batch) whitening method
``effective_rank``, ...         representation: effective rank, correlations, collapse
``input_conditioning``          ch. 2: Hessian condition number and GD steps of a linear model
                                with raw / centred / standardized / whitened inputs
``kfac_factors``                per layer: K-FAC factors A = E[a aᵀ], G = E[δ δᵀ]
==============================  ==============================================================

``normkit analyze snd`` runs the SND study on the SBW paper's Gaussian setting;
``normkit analyze inputs`` prints the chapter-2 table and plots loss vs GD steps.
"""

from .conditioning import ConditioningTracker as ConditioningTracker
from .conditioning import LayerConditioning as LayerConditioning
from .conditioning import condition_numbers as condition_numbers
from .conditioning import layer_statistics as layer_statistics
from .inputs import InputConditioning as InputConditioning
from .inputs import input_conditioning as input_conditioning
from .inputs import kfac_factors as kfac_factors
from .inputs import linear_hessian as linear_hessian
from .representation import collapse_indicator as collapse_indicator
from .representation import correlation_matrix as correlation_matrix
from .representation import effective_rank as effective_rank
from .representation import feature_hook as feature_hook
from .representation import mean_abs_correlation as mean_abs_correlation
from .scale import ScaleTracker as ScaleTracker
from .scale import gradient_weight_inner_product as gradient_weight_inner_product
from .scale import scale_invariance as scale_invariance
from .stochasticity import gaussian_data as gaussian_data
from .stochasticity import snd as snd
from .stochasticity import (
    stochastic_normalization_disturbance as stochastic_normalization_disturbance,
)
from .stochasticity import whitening_error as whitening_error

__all__ = [
    "ConditioningTracker", "LayerConditioning", "condition_numbers", "layer_statistics",
    "collapse_indicator", "correlation_matrix", "effective_rank", "feature_hook",
    "mean_abs_correlation", "ScaleTracker", "gradient_weight_inner_product", "scale_invariance",
    "gaussian_data", "snd", "stochastic_normalization_disturbance", "whitening_error",
    "InputConditioning", "input_conditioning", "kfac_factors", "linear_hessian",
]
