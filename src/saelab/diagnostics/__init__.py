"""Diagnostics a researcher runs on any SAE: the correct L0, absorption and hedging, superposition.

projection          s_n^dec (n-th decoder projection) and mean pairwise decoder |cos| (no ground truth)
l0_select           the L0 recommendation rule on a scored sweep (docs/l0_selection.md: how it was validated)
l0_sweep            L0 sweeps: train one SAE per L0, score each without ground truth, recommend
l0_plot             the sweep's figure
l0_mechanism        the ground-truth-init drift experiment ("Sparse but Wrong" mechanism)
absorption          absorption per parent, hedging per latent, recall vs frequency (hierarchical ground truth)
absorption_theory   the 2-feature parent/child toy: closed-form losses and a tiny trained SAE
superposition       expected mean-max |cos| of N random vectors in d dims: closed form, simulation, inverse
report              `saelab diagnose`: all of the above for each SAE of a run
"""

from saelab.diagnostics.absorption import HierarchyDiagnostics, hedging_stats, hierarchy_diagnostics, matched_latents
from saelab.diagnostics.absorption_theory import (
    AbsorptionTheory,
    absorption_losses,
    evaluate_toy_solution,
    train_parent_child_toy,
)
from saelab.diagnostics.l0_mechanism import feature_mixing, ground_truth_init_drift
from saelab.diagnostics.l0_plot import l0_sweep_figure, plot_l0_sweep
from saelab.diagnostics.l0_select import L0Point, L0Recommendation, default_ns, recommend_l0, validate_l0_values
from saelab.diagnostics.l0_sweep import L0SweepResult, load_sweep, run_l0_sweep, score_sae, score_sweep
from saelab.diagnostics.projection import (
    decoder_pairwise_abs_cos,
    decoder_projections,
    nth_decoder_projection,
    nth_decoder_projection_scores,
)
from saelab.diagnostics.superposition import (
    approximation,
    cap_bound,
    expected_mean_max_abs_cos,
    simulate_mean_max_abs_cos,
    superposition_report,
    vectors_for_interference,
)

__all__ = [
    "AbsorptionTheory",
    "HierarchyDiagnostics",
    "L0Point",
    "L0Recommendation",
    "L0SweepResult",
    "absorption_losses",
    "approximation",
    "cap_bound",
    "decoder_pairwise_abs_cos",
    "decoder_projections",
    "default_ns",
    "evaluate_toy_solution",
    "expected_mean_max_abs_cos",
    "feature_mixing",
    "ground_truth_init_drift",
    "hedging_stats",
    "hierarchy_diagnostics",
    "l0_sweep_figure",
    "load_sweep",
    "matched_latents",
    "nth_decoder_projection",
    "nth_decoder_projection_scores",
    "plot_l0_sweep",
    "recommend_l0",
    "run_l0_sweep",
    "score_sae",
    "score_sweep",
    "simulate_mean_max_abs_cos",
    "superposition_report",
    "train_parent_child_toy",
    "validate_l0_values",
    "vectors_for_interference",
]
