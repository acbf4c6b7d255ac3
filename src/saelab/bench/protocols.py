"""Benchmark protocols: the fixed data, width, budget and schedule that make scores comparable.

`16k` is the published SynthSAEBench protocol (seed-posts §1.2). `mini` is the same recipe scaled
for a 2-core CPU; its budget was chosen so that F1 has converged (see README, "mini protocol").

Budget tiers name training budgets of a protocol: `full` is always the protocol's own budget, `quick` a
quarter of it (on `mini`, 1.5M samples: enough to rank ideas that change how fast an SAE learns, not
where it converges; README, recipe ablation). A result found at `quick` is confirmed at `full`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from saelab.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    data: str
    width: int
    samples: int
    batch_size: int
    lr: float
    l0_sweep: tuple[float, ...]
    natural_l0: float
    seeds: int
    eval_samples: int
    lr_decay_fraction: float = 0.0
    lr_warmup_steps: int = 0
    # auto: bf16 autocast where the device has native bf16 matmuls (SynthSAEBench trains in bf16), else fp32.
    precision: str = "auto"
    dead_feature_window: int = 1000  # steps without firing before AuxK treats a latent as dead
    description: str = ""
    arch_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # none: SAEs. skip / plain: every arch trains as that transcoder kind (RunConfig.transcoder) on the
    # protocol's paired data; a variant setting skip itself (`batchtopk:skip=false`) keeps its own.
    transcoder: str = "none"
    tiers: dict[str, int] = field(default_factory=dict)  # named budgets besides `full` (= samples)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        """Inverse of to_dict (a protocol recorded in a log or a store); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)} | {"autocast_bf16"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError("protocol", data.get("name"), f"records unknown fields {', '.join(unknown)}")
        values = dict(data)
        if "autocast_bf16" in values:  # recorded before `precision` replaced it
            values.setdefault("precision", "auto" if values.pop("autocast_bf16") else "fp32")
        if "l0_sweep" in values:
            values["l0_sweep"] = tuple(values["l0_sweep"])
        return cls(**values)

    def budget_tiers(self) -> dict[str, int]:
        """Tier name → training samples; `full` is the protocol's budget."""
        return {**self.tiers, "full": self.samples}

    def tier_samples(self, tier: str) -> int:
        tiers = self.budget_tiers()
        if tier not in tiers:
            raise ConfigError(
                "tier",
                tier,
                f"unknown budget tier of protocol {self.name}; known: "
                + ", ".join(f"{k} ({v:,} samples)" for k, v in tiers.items()),
            )
        return tiers[tier]


PROTOCOLS: dict[str, Protocol] = {
    "16k": Protocol(
        name="16k",
        data="synth-16k",
        width=4096,
        samples=200_000_000,
        batch_size=1024,
        lr=3e-4,
        l0_sweep=(15, 20, 25, 30, 35, 40, 45),
        natural_l0=25,
        seeds=5,
        eval_samples=1_000_000,
        tiers={"quick": 50_000_000},
        description="Published SynthSAEBench-16k protocol (GPU): width 4096, 200M samples, batch 1024, lr 3e-4.",
    ),
    "16k-cpu": Protocol(
        name="16k-cpu",
        data="synth-16k",
        width=4096,
        samples=20_000_000,
        batch_size=1024,
        lr=1e-3,
        lr_decay_fraction=1 / 3,
        l0_sweep=(15, 20, 25, 30, 35),
        natural_l0=25,
        seeds=3,
        eval_samples=200_000,
        dead_feature_window=100,
        tiers={"quick": 5_000_000},
        description="synth-16k, width 4096, 20M samples, batch 1024, lr 1e-3 with linear decay over the final "
        "third, AuxK dead window 100 steps: the published 16k data and width on a CPU budget.",
    ),
    "mini": Protocol(
        name="mini",
        data="synth-mini",
        width=1024,
        samples=6_000_000,
        batch_size=1024,
        lr=2e-3,
        lr_decay_fraction=1 / 3,
        l0_sweep=(8, 10, 12, 14, 16),
        natural_l0=12,
        seeds=3,
        eval_samples=200_000,
        dead_feature_window=100,
        tiers={"quick": 1_500_000},
        description="synth-mini, width 1024, 6M samples, batch 1024, lr 2e-3 with linear decay over the final third, AuxK dead window 100 steps (2-core CPU).",
    ),
    "tc-mini": Protocol(
        name="tc-mini",
        data="tc-mini",
        width=1024,
        samples=3_000_000,
        batch_size=1024,
        lr=2e-3,
        lr_decay_fraction=1 / 3,
        l0_sweep=(8, 12, 16),
        natural_l0=12,
        seeds=3,
        eval_samples=100_000,
        dead_feature_window=100,
        transcoder="skip",
        tiers={"quick": 750_000},
        description="tc-mini transcoder world, skip-transcoders (a variant `ARCH:skip=false` is the plain "
        "transcoder), width 1024, 3M samples, batch 1024, lr 2e-3 with linear decay over the final third, "
        "AuxK dead window 100 steps (2-core CPU).",
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError("protocol", name, f"unknown protocol; known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


def tier_of(protocol: Protocol, samples: int) -> str | None:
    """The name of the tier whose budget is `samples`, if any."""
    return next((name for name, n in protocol.budget_tiers().items() if n == samples), None)
