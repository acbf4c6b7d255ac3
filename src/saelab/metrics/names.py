"""Every metric saelab records, once: its key, how it is labelled and printed, and which way is better.

Tables, figures, the results store and the CLI take names and formats from `METRICS` rather than
keeping their own lists, so a metric is spelled, labelled and rounded the same way everywhere.
Order is the order of `GroundTruthResult.to_dict()` (the ground-truth evaluation's JSON), then the
metrics a run on a language model adds, then the transcoder metrics (`metrics.transcoder`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from saelab.errors import ConfigError
from saelab.formatting import format_mean_sd

GROUND_TRUTH = "ground_truth"  # needs the true features: synthetic data only
RECONSTRUCTION = "reconstruction"  # any SAE on any activations
LANGUAGE_MODEL = "language_model"  # the SAE spliced into the model it was trained on
TRANSCODER = "transcoder"  # any transcoder on any (input, target) pairs
TRANSCODER_GROUND_TRUTH = "transcoder_ground_truth"  # a transcoder on a transcoder world (known map)


@dataclass(frozen=True)
class MetricSpec:
    key: str  # the name in result dicts, run.json, the results store and --json output
    label: str  # short table header ("EV")
    name: str  # words for titles and axes ("explained variance")
    unit: str | None  # what the value is measured in, for axis labels; None when the name says it
    digits: int  # decimals for one value
    higher_is_better: bool | None  # None: neither direction is better (L0: the right value is the true one)
    group: str  # GROUND_TRUTH, RECONSTRUCTION or LANGUAGE_MODEL
    description: str

    @property
    def needs_ground_truth(self) -> bool:
        return self.group in (GROUND_TRUTH, TRANSCODER_GROUND_TRUTH)

    @property
    def mean_digits(self) -> int:
        """Decimals for a mean over seeds: a mean of counts is fractional, so counts get one."""
        return max(self.digits, 1)

    @property
    def axis_label(self) -> str:
        """'explained variance (0–1)': the name with its unit."""
        return self.name if self.unit is None else f"{self.name} ({self.unit})"

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"

    def format_mean_sd(self, mean: float, sd: float | None) -> str:
        return format_mean_sd(mean, sd, self.mean_digits)


_SPECS = (
    MetricSpec(
        "f1",
        "F1",
        "F1",
        "0–1",
        4,
        True,
        GROUND_TRUTH,
        "mean over all latents of the F1 score of the latent detecting its best-matching true feature "
        "(dead latents count 0)",
    ),
    MetricSpec(
        "precision",
        "precision",
        "precision",
        "0–1",
        4,
        True,
        GROUND_TRUTH,
        "mean over latents: of the inputs where the latent fires, the share where its matched feature is active",
    ),
    MetricSpec(
        "recall",
        "recall",
        "recall",
        "0–1",
        4,
        True,
        GROUND_TRUTH,
        "mean over latents: of the inputs where its matched feature is active, the share where the latent fires",
    ),
    MetricSpec(
        "accuracy",
        "accuracy",
        "accuracy",
        "0–1",
        4,
        True,
        GROUND_TRUTH,
        "mean over latents: share of inputs where the latent's firing agrees with its matched feature's",
    ),
    MetricSpec(
        "mcc",
        "MCC",
        "MCC",
        "0–1",
        4,
        True,
        GROUND_TRUTH,
        "mean |cos| over the one-to-one (Hungarian) matching of decoder rows to true features",
    ),
    MetricSpec(
        "uniqueness",
        "uniqueness",
        "uniqueness",
        "0–1",
        4,
        True,
        GROUND_TRUTH,
        "distinct best-matching true features / number of latents",
    ),
    MetricSpec(
        "explained_variance",
        "EV",
        "explained variance",
        "0–1",
        4,
        True,
        RECONSTRUCTION,
        "1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)",
    ),
    MetricSpec(
        "shrinkage",
        "shrinkage",
        "shrinkage",
        "‖x̂‖/‖x‖",
        4,
        None,
        RECONSTRUCTION,
        "mean ‖x̂‖/‖x‖ over inputs with ‖x‖ > 1e-6 (1 = no shrinkage)",
    ),
    MetricSpec(
        "l0", "L0", "L0", "active latents per input", 2, None, RECONSTRUCTION, "mean number of active latents per input"
    ),
    MetricSpec(
        "true_l0",
        "true L0",
        "true L0",
        "active features per input",
        2,
        None,
        GROUND_TRUTH,
        "mean number of active true features per input",
    ),
    MetricSpec(
        "dead_latents",
        "dead",
        "dead latents",
        "count",
        0,
        False,
        RECONSTRUCTION,
        "latents that never fired on the evaluation samples",
    ),
    MetricSpec(
        "mse",
        "MSE",
        "MSE",
        "squared input units",
        4,
        False,
        RECONSTRUCTION,
        "mean over inputs of ‖x − x̂‖² (summed over dimensions)",
    ),
    MetricSpec(
        "ce_loss_recovered",
        "CE recovered",
        "CE loss recovered",
        None,
        4,
        True,
        LANGUAGE_MODEL,
        "(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 = the splice costs nothing, 0 = as bad as zeroing "
        "the layer's output",
    ),
    MetricSpec(
        "kl_div",
        "KL",
        "KL div",
        "nats/token",
        4,
        False,
        LANGUAGE_MODEL,
        "KL(p_clean ‖ p_spliced) per predicted token, averaged",
    ),
    # Transcoders (saelab.metrics.transcoder): not part of GroundTruthResult.
    MetricSpec(
        "fvu",
        "FVU",
        "fraction of variance unexplained",
        "0–1",
        4,
        False,
        TRANSCODER,
        "E‖y − ŷ‖² / (E‖y‖² − ‖E y‖²) of the transcoder's prediction of its target y",
    ),
    MetricSpec(
        "skip_rel_error",
        "skip err",
        "skip relative error",
        None,
        4,
        False,
        TRANSCODER_GROUND_TRUTH,
        "‖Ŝ − S‖_F / ‖S‖_F of the learned skip matrix against the true one (none without a skip or when S = 0)",
    ),
    MetricSpec(
        "skip_norm",
        "‖Ŝ‖",
        "skip norm",
        None,
        4,
        None,
        TRANSCODER,
        "Frobenius norm of the learned skip matrix (none without a skip)",
    ),
    MetricSpec(
        "computing_features_recovered",
        "computing",
        "computing features recovered",
        "0–1",
        4,
        True,
        TRANSCODER_GROUND_TRUTH,
        "share of AND, suppression and fanout output features with a latent at |cos| ≥ 0.9 to their "
        "direction whose firing F1 against them is ≥ 0.5",
    ),
)

METRICS: dict[str, MetricSpec] = {spec.key: spec for spec in _SPECS}


def metric(key: str) -> MetricSpec:
    """The spec of `key`; an unknown key raises ConfigError listing the known ones."""
    try:
        return METRICS[key]
    except KeyError:
        raise ConfigError("metric", key, f"must be one of {', '.join(METRICS)}") from None


def metric_keys(*groups: str) -> tuple[str, ...]:
    """Keys of the metrics in `groups` (all when none given), in registry order."""
    return tuple(s.key for s in _SPECS if not groups or s.group in groups)


def ground_truth_keys() -> tuple[str, ...]:
    """The metrics only synthetic data (known true features) can give."""
    return metric_keys(GROUND_TRUTH)


def table_columns(keys: Iterable[str]) -> list[tuple[str, str, str]]:
    """(key, label, `str.format` string) per metric, the column triples the CLI's tables take."""
    columns = []
    for key in keys:
        spec = metric(key)
        columns.append((key, spec.label, "{}" if spec.digits == 0 else f"{{:.{spec.digits}f}}"))
    return columns


# The columns that name a stored run, and the metric sets tables and JSON lines show, in one place.
RUN_IDENTITY = ("run_id", "protocol", "arch", "l0_target", "seed")
RUN_METRICS = ("f1", "precision", "recall", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")
SUMMARY_METRICS = ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")
SHORT_METRICS = ("f1", "mcc", "explained_variance", "l0", "dead_latents")
# What a transcoder run reports besides RUN_METRICS (its explained_variance is the target's, 1 − fvu).
TRANSCODER_RUN_METRICS = ("fvu", "skip_rel_error", "skip_norm", "computing_features_recovered")
