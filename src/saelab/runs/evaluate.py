"""How a run scores its SAEs: against the ground truth when the data has one, else on held-out rows
or inside the LM. One evaluator per opened data, used at the end of a run and during it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from saelab.data import OpenedData, is_paired
from saelab.errors import require

Evaluator = Callable[[Any], dict[str, Any]]  # inference SAE -> metrics


def make_evaluator(opened: OpenedData, n_samples: int, seed: int) -> Evaluator:
    """Ground-truth metrics (synthetic), spliced-LM metrics (model + dataset) or row metrics."""
    if opened.ground_truth is not None:
        model = opened.ground_truth
        return lambda sae: score_on_ground_truth(sae, model, n_samples, seed=seed)
    if opened.hooked is not None and opened.spec.evaluates_on_lm:
        from saelab.metrics.lm import evaluate_sae_on_lm

        hooked = opened.hooked
        return lambda sae: evaluate_sae_on_lm(sae, hooked, opened.eval_contexts(n_samples))
    if opened.held_out_ND is not None:
        from saelab.metrics.lm import evaluate_sae_on_rows

        rows_ND, targets_NE = opened.held_out_ND, opened.held_out_target_NE  # targets: a paired cache's
        return lambda sae: evaluate_sae_on_rows(sae, rows_ND, targets_NE=targets_NE)
    return lambda sae: {}


def score_on_ground_truth(sae: Any, model: Any, n_samples: int, seed: int) -> dict[str, Any]:
    """An inference SAE's ground-truth metrics on a synthetic model or a transcoder world.

    On a world (paired) a transcoder (d_out set) gets `metrics.transcoder` (with explained_variance
    = 1 − fvu, the target's, so tables of SAEs read it alike) and an SAE is scored on the inputs'
    model (`world.input_model`)."""
    from saelab.metrics import evaluate_sae_on_synthetic

    if not is_paired(model):
        require(
            getattr(sae.cfg, "d_out", None) is None,
            "data",
            type(model).__name__,
            f"has no targets to score a transcoder (d_out={getattr(sae.cfg, 'd_out', None)}) on; use a transcoder world",
        )
        return evaluate_sae_on_synthetic(sae, model, n_samples, seed=seed).to_dict()
    if getattr(sae.cfg, "d_out", None) is None:
        return evaluate_sae_on_synthetic(sae, model.input_model, n_samples, seed=seed).to_dict()
    from saelab.metrics.transcoder import evaluate_transcoder

    require(
        sae.cfg.d_out == model.d_out, "d_out", sae.cfg.d_out, f"does not match the world's target width {model.d_out}"
    )
    result = evaluate_transcoder(sae, model, n_samples, seed=seed).to_dict()
    result["explained_variance"] = 1.0 - result["fvu"]
    return result
