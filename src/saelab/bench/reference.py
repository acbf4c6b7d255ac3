"""Published SynthSAEBench-16k baselines, kept as data so the leaderboard can show them beside saelab's runs.

Source: SAELens docs `docs/synth_sae_bench.md` (the SynthSAEBench paper's baselines), mean ± sd over seeds, width
4096, 200M samples (see shared/spec/seed-posts.md §1.2 and §1.4). The number of seeds behind each figure and the
realised L0 / dead-latent counts are not published with the tables, so those fields are None.
"""

from __future__ import annotations

from typing import Any

REFERENCE_PROTOCOL = "16k"
REFERENCE_CITATION = "SynthSAEBench paper / SAELens docs"
REFERENCE_METRICS = ("f1", "mcc", "uniqueness", "explained_variance")

# l0_target -> arch (saelab registry name) -> metric -> (mean, sd); columns F1, MCC, uniqueness, EV.
PUBLISHED_16K: dict[float, dict[str, dict[str, tuple[float, float]]]] = {
    25.0: {
        "batchtopk": {
            "f1": (0.7316, 0.0010),
            "mcc": (0.7574, 0.0003),
            "uniqueness": (0.9837, 0.0015),
            "explained_variance": (0.7923, 0.0003),
        },
        "matryoshka": {
            "f1": (0.8793, 0.0021),
            "mcc": (0.7927, 0.0006),
            "uniqueness": (0.9987, 0.0005),
            "explained_variance": (0.7792, 0.0004),
        },
        "matching_pursuit": {
            "f1": (0.4464, 0.0044),
            "mcc": (0.6930, 0.0030),
            "uniqueness": (0.8281, 0.0069),
            "explained_variance": (0.8351, 0.0003),
        },
        "standard": {
            "f1": (0.5562, 0.0020),
            "mcc": (0.6039, 0.0012),
            "uniqueness": (0.8976, 0.0021),
            "explained_variance": (0.7654, 0.0001),
        },
        "jumprelu": {
            "f1": (0.7317, 0.0034),
            "mcc": (0.7527, 0.0009),
            "uniqueness": (0.9885, 0.0010),
            "explained_variance": (0.7951, 0.0004),
        },
    },
    20.0: {
        "batchtopk": {
            "f1": (0.8183, 0.0011),
            "mcc": (0.7526, 0.0007),
            "uniqueness": (0.9760, 0.0028),
            "explained_variance": (0.7889, 0.0002),
        },
        "matryoshka": {
            "f1": (0.8601, 0.0016),
            "mcc": (0.7455, 0.0021),
            "uniqueness": (0.9874, 0.0020),
            "explained_variance": (0.7699, 0.0002),
        },
        "matching_pursuit": {
            "f1": (0.4439, 0.0024),
            "mcc": (0.6748, 0.0028),
            "uniqueness": (0.7552, 0.0026),
            "explained_variance": (0.8267, 0.0003),
        },
        "standard": {
            "f1": (0.5777, 0.0012),
            "mcc": (0.5834, 0.0015),
            "uniqueness": (0.8528, 0.0055),
            "explained_variance": (0.7501, 0.0009),
        },
        "jumprelu": {
            "f1": (0.8241, 0.0041),
            "mcc": (0.7434, 0.0015),
            "uniqueness": (0.9781, 0.0029),
            "explained_variance": (0.7906, 0.0005),
        },
    },
}

# The docs' JumpReLU rows are the April-2026 DeepMind-style (step loss) rerun, not the paper's original tanh version.
_NOTES = {"jumprelu": "DeepMind-style JumpReLU (Apr-2026 rerun)"}


def reference_rows(protocol: str | None = None) -> list[dict[str, Any]]:
    """The published baselines as leaderboard rows (source="published"); empty unless protocol is None or "16k"."""
    if protocol is not None and protocol != REFERENCE_PROTOCOL:
        return []
    rows = []
    for l0_target, table in PUBLISHED_16K.items():
        for arch, metrics in table.items():
            row: dict[str, Any] = {
                "source": "published",
                "protocol": REFERENCE_PROTOCOL,
                "arch": arch,
                "l0_target": l0_target,
                "n_seeds": None,
            }
            for name in ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents"):
                mean, sd = metrics.get(name, (None, None))
                row[f"{name}_mean"], row[f"{name}_sd"] = mean, sd
            row["f1_best"] = None
            row["citation"] = REFERENCE_CITATION
            row["note"] = _NOTES.get(arch)
            rows.append(row)
    return rows
