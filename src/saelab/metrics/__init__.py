"""Metrics as streaming calculators: ground truth (F1/P/R, MCC, uniqueness) and reconstruction.

Definitions follow SynthSAEBench (`sae_lens/synthetic/evals.py`) exactly; each calculator's
docstring gives its formula. Transcoders on transcoder worlds: `transcoder`. Shapes: B batch, D d_in, L SAE latents, F true features. `names`
holds every metric's key, label, format and direction (`METRICS`).
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
from saelab.metrics.names import METRICS, MetricSpec, ground_truth_keys, metric, metric_keys, table_columns
from saelab.metrics.reconstruction import (
    DeadLatentsCalculator,
    ExplainedVarianceCalculator,
    L0Calculator,
    MSECalculator,
    ReconstructionCalculator,
    ShrinkageCalculator,
    evaluate_reconstruction,
)
from saelab.metrics.transcoder import TranscoderResult, evaluate_transcoder

__all__ = [
    "ClassificationCalculator",
    "DeadLatentsCalculator",
    "DecoderMatch",
    "ExplainedVarianceCalculator",
    "GroundTruthResult",
    "L0Calculator",
    "METRICS",
    "MSECalculator",
    "MetricSpec",
    "ReconstructionCalculator",
    "ShrinkageCalculator",
    "TranscoderResult",
    "TrueFiringCalculator",
    "evaluate_reconstruction",
    "evaluate_sae_on_synthetic",
    "evaluate_transcoder",
    "feature_uniqueness",
    "ground_truth_keys",
    "iter_abs_cos",
    "match_decoder_to_features",
    "mean_correlation_coefficient",
    "metric",
    "metric_keys",
    "per_true_feature_recall",
    "table_columns",
]
