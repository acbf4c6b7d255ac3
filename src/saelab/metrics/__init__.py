"""Metrics as streaming calculators: ground truth (F1/P/R, MCC, uniqueness) and reconstruction.

Definitions follow SynthSAEBench (`sae_lens/synthetic/evals.py`) exactly; each calculator's
docstring gives its formula. Shapes: B batch, D d_in, L SAE latents, F true features.
"""

from saelab.metrics.classification import ClassificationCalculator, TrueFiringCalculator, per_true_feature_recall
from saelab.metrics.ground_truth import GroundTruthResult, evaluate_sae_on_synthetic
from saelab.metrics.matching import (
    DecoderMatch,
    feature_uniqueness,
    iter_abs_cos,
    match_decoder_to_features,
    mean_correlation_coefficient,
)
from saelab.metrics.reconstruction import (
    DeadLatentsCalculator,
    ExplainedVarianceCalculator,
    L0Calculator,
    MSECalculator,
    ReconstructionCalculator,
    ShrinkageCalculator,
    evaluate_reconstruction,
)

__all__ = [
    "ClassificationCalculator",
    "DeadLatentsCalculator",
    "DecoderMatch",
    "ExplainedVarianceCalculator",
    "GroundTruthResult",
    "L0Calculator",
    "MSECalculator",
    "ReconstructionCalculator",
    "ShrinkageCalculator",
    "TrueFiringCalculator",
    "evaluate_reconstruction",
    "evaluate_sae_on_synthetic",
    "feature_uniqueness",
    "iter_abs_cos",
    "match_decoder_to_features",
    "mean_correlation_coefficient",
    "per_true_feature_recall",
]
