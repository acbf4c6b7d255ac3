"""End-of-run warnings: the one rule for "this SAE did not become what was asked", with its likely cause and fix.

A run is flagged when, measured by the final evaluation (the inference SAE on fresh samples),
- its L0 is off its target by more than `L0_TOLERANCE` (relative), or
- more than `DEAD_FRACTION_LIMIT` of its latents never fired (`dead_latents / width`).

Healthy runs sit far inside both limits: on the `mini` protocol (6M samples) every architecture ends within
5% of its target L0 (the recipe's leave-one-out pruning, the furthest, 11.4 for 12 and 13.7 for 16, is 14%
off) and with at most 4 of 1,024 latents dead. A short budget breaks both: 200k samples of `saelab train
--data synth-mini --l0 12` leave ~900 of 1,024 latents dead, because its 195 steps never reach AuxK's
1,000-step dead window, so no silent latent is ever revived.

`saelab train`, `saelab bench` and the report call `run_warnings` on each result record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

L0_TOLERANCE = 0.25  # |measured L0 − target| / target above this: the L0 control had not settled
DEAD_FRACTION_LIMIT = 0.10  # dead latents / width above this: most of the dictionary is wasted


@dataclass(frozen=True)
class RunBudget:
    """What the cause and the fix of a warning depend on: the run's budget and schedule, and its protocol's."""

    width: int
    samples: int | None = None
    batch_size: int | None = None
    dead_feature_window: int | None = None
    protocol: str | None = None  # the protocol benched under (None: a plain `saelab train`)
    protocol_samples: int | None = None

    @property
    def steps(self) -> int | None:
        if self.samples is None or not self.batch_size:
            return None
        return max(1, self.samples // self.batch_size)


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _count(n: int) -> str:
    """6,000,000 → '6M', 200,000 → '200k' (as --samples takes them)."""
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return f"{n:,}"


def run_warnings(record: Mapping[str, Any], budget: RunBudget) -> list[str]:
    """One line per problem of this result record (keys l0, l0_target, dead_latents, n_samples, name):
    what was measured, against which limit, the likely cause and the fix. Empty for a healthy run."""
    name = record.get("name") or record.get("arch") or "SAE"
    problems = []
    l0, target = _number(record.get("l0")), _number(record.get("l0_target"))
    if l0 is not None and target:
        off = (l0 - target) / target
        if abs(off) > L0_TOLERANCE:
            problems.append(
                f"measured L0 {l0:.1f} is {abs(off):.0%} {'above' if off > 0 else 'below'} its target {target:g} "
                f"(warned beyond ±{L0_TOLERANCE:.0%})"
            )
    dead = _number(record.get("dead_latents"))
    if dead is not None and budget.width > 0 and dead / budget.width > DEAD_FRACTION_LIMIT:
        n_eval = _number(record.get("n_samples"))
        on = f" on the {int(n_eval):,} evaluation samples" if n_eval else ""
        problems.append(
            f"{int(dead):,} of {budget.width:,} latents ({dead / budget.width:.0%}) never fired{on} "
            f"(warned above {DEAD_FRACTION_LIMIT:.0%})"
        )
    if not problems:
        return []
    return [f"{name}: {p}. {_cause_and_fix(budget, dead_problem='never fired' in p)}" for p in problems]


def _cause_and_fix(b: RunBudget, dead_problem: bool) -> str:
    steps = b.steps
    short_of_protocol = b.protocol_samples is not None and b.samples is not None and b.samples < b.protocol_samples
    if dead_problem and steps is not None and b.dead_feature_window is not None and steps <= b.dead_feature_window:
        cause = (
            f"Likely cause: the budget is too short: {steps:,} steps, no more than AuxK's dead-feature window of "
            f"{b.dead_feature_window:,} steps, so no silent latent was ever revived"
        )
    elif short_of_protocol:
        assert b.samples is not None and b.protocol_samples is not None
        cause = (
            f"Likely cause: the budget is too short: {_count(b.samples)} samples, under the {b.protocol} "
            f"protocol's {_count(b.protocol_samples)}"
        )
    elif b.samples is not None:
        cause = f"Likely cause: the budget ({_count(b.samples)} samples) is too short for this SAE to settle"
    else:
        cause = "Likely cause: the training budget is too short for this SAE to settle"
    if b.protocol is not None:
        fix = (
            f"Fix: train the protocol's budget (drop --samples/--tier: {_count(b.protocol_samples)} samples)"
            if short_of_protocol and b.protocol_samples is not None
            else "Fix: a larger --samples"
        )
    else:
        fix = "Fix: more --samples (the mini protocol trains 6M on synth-mini)"
        if dead_problem and steps is not None and b.dead_feature_window is not None and steps <= b.dead_feature_window:
            fix += f", or a --dead-feature-window well under the run's {steps:,} steps (the mini protocol uses 100)"
        fix += "; `saelab bench --protocol mini` trains with a protocol's settings"
    return f"{cause}. {fix}."


def budget_of_run(cfg: Any, protocol: Any = None) -> RunBudget:
    """The RunBudget of a RunConfig (`protocol`: the bench Protocol it ran under, if any)."""
    return RunBudget(
        width=int(cfg.width),
        samples=int(cfg.samples),
        batch_size=int(cfg.batch_size),
        dead_feature_window=int(cfg.dead_feature_window),
        protocol=getattr(protocol, "name", None),
        protocol_samples=getattr(protocol, "samples", None),
    )
