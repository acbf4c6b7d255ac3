"""How a run scores its SAEs: against the ground truth when the data has one, else on held-out rows
or inside the LM. One evaluator per opened data, used at the end of a run and during it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from saelab.data import OpenedData

Evaluator = Callable[[Any], dict[str, Any]]  # inference SAE -> metrics


def make_evaluator(opened: OpenedData, n_samples: int, seed: int) -> Evaluator:
    """Ground-truth metrics (synthetic), spliced-LM metrics (model + dataset) or row metrics."""
    if opened.ground_truth is not None:
        from saelab.metrics import evaluate_sae_on_synthetic

        model = opened.ground_truth
        return lambda sae: evaluate_sae_on_synthetic(sae, model, n_samples, seed=seed).to_dict()
    if opened.hooked is not None and opened.spec.evaluates_on_lm:
        from saelab.metrics.lm import evaluate_sae_on_lm

        hooked = opened.hooked
        return lambda sae: evaluate_sae_on_lm(sae, hooked, opened.eval_contexts(n_samples))
    if opened.held_out_ND is not None:
        from saelab.metrics.lm import evaluate_sae_on_rows

        rows_ND = opened.held_out_ND
        return lambda sae: evaluate_sae_on_rows(sae, rows_ND)
    return lambda sae: {}
