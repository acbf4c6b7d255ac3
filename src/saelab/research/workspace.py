"""A research workspace: a folder with the task, idea files, a results store and the experiment log.

DIR/TASK.md            the protocol, budget tiers, the score and what counts as a result
DIR/workspace.json     the settings every `research try` starts from (protocol, base, seeds, L0)
DIR/ideas/template.py  an architecture that runs as is, to copy and edit
DIR/results.sqlite     every run's scores (a saelab results store)
DIR/log.jsonl          one line per experiment (research/log.py)
DIR/experiments/<id>/  what each experiment ran: a copy of its code and its log entry
DIR/runs/              the run folders (saved SAEs)
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.bench.protocols import Protocol, get_protocol
from saelab.errors import ConfigError, FileFormatError
from saelab.io import write_json_atomic, write_text_atomic
from saelab.research.log import ExperimentLog

WORKSPACE_FILE = "workspace.json"
WORKSPACE_KIND = "saelab-research-workspace"
WORKSPACE_VERSION = 1
TASK_FILE = "TASK.md"
LOG_FILE = "log.jsonl"
STORE_FILE = "results.sqlite"
IDEAS_DIR = "ideas"
EXPERIMENTS_DIR = "experiments"
RUNS_DIR = "runs"
TEMPLATE_FILE = "template.py"
TEMPLATE_CLASS = "Idea"
ID_PREFIX = "e"


@dataclass
class Workspace:
    root: Path
    settings: dict[str, Any]

    @property
    def log(self) -> ExperimentLog:
        return ExperimentLog(self.root / LOG_FILE)

    @property
    def store_path(self) -> Path:
        return self.root / STORE_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def experiments_dir(self) -> Path:
        return self.root / EXPERIMENTS_DIR

    def protocol(self) -> Protocol:
        return get_protocol(self.settings["protocol"])

    def reserve_ids(self, n: int) -> list[str]:
        """`n` new experiment ids, each with its (empty) folder made exclusively: two `research try` processes
        never get the same id. Ids count up (e0001, e0002, ...) from the highest folder there is."""
        folder = self.experiments_dir
        folder.mkdir(parents=True, exist_ok=True)
        ids: list[str] = []
        while len(ids) < n:
            taken = [
                int(p.name[len(ID_PREFIX) :])
                for p in folder.iterdir()
                if p.name.startswith(ID_PREFIX) and p.name[len(ID_PREFIX) :].isdigit()
            ]
            candidate = f"{ID_PREFIX}{max(taken, default=0) + 1:04d}"
            try:
                (folder / candidate).mkdir()
            except FileExistsError:
                continue  # another process took it between the listing and the mkdir
            ids.append(candidate)
        return ids


def task_text(protocol: Protocol, base: str, seeds: int, l0: float) -> str:
    tiers = protocol.budget_tiers()
    quick = tiers.get("quick", protocol.samples)
    tier_lines = "\n".join(f"| `{name}` | {n:,} |" for name, n in tiers.items())
    return f"""# Research task: find an SAE that beats `{base}`

## Protocol `{protocol.name}`

{protocol.description or protocol.name}

Data `{protocol.data}`, width {protocol.width:,}, target L0 {l0:g}, batch {protocol.batch_size:,}, learning rate
{protocol.lr:g}, evaluation on {protocol.eval_samples:,} fresh samples against the ground truth.

Budget tiers (training samples per SAE):

| tier | samples |
|---|---|
{tier_lines}

## Score

F1 (mean over latents, against the best-matching true feature) is the score; MCC is reported beside it.
Every experiment trains the base `{base}` and your idea together on each seed's data stream ({seeds} seeds), so
they see the same samples, and compares them **paired by seed**: the mean difference ΔF1, its standard error,
the 95% t-interval and a verdict:

- `better`: the whole 95% interval of ΔF1 lies above 0;
- `worse`: the whole interval lies below 0;
- `unresolved`: it contains 0. `resolvable_f1` (the interval's half-width) says how large a difference these
  seeds could have detected; more seeds make it smaller.

## What counts as a result

A `better` verdict against the base at the `quick` tier ({quick:,} samples), **confirmed** by a `better`
verdict of the same code (same `code_hash`) at the `full` tier ({protocol.samples:,} samples). Ideas that only
make an SAE learn faster win at `quick` and vanish at `full`: the full tier is the result. Anything else
(`unresolved`, a partial run, a single seed) is not a result.

## How to add an idea

1. Copy the template: `cp ideas/{TEMPLATE_FILE} ideas/my_idea.py`, then edit it (the knob, or the code).
2. Run it: `saelab research try ideas/my_idea.py:{TEMPLATE_CLASS} --note "what I changed and why"`
   (default tier `quick`; add `--tier full` to confirm, `--max-minutes M` to cap the wall time).
   An option of a built-in needs no file: `saelab research try recipe:ista_steps=0 --note "..."`.
3. Read the log: `saelab research log` (or `--json`, one line per experiment).
4. Reproduce an entry from the log alone: `saelab research rerun ID` (it runs the saved copy of the code in
   `experiments/ID/`, not the file as it is now).

Every try is logged with its id, time, code hash, a copy of the code it ran, its config, the paired deltas,
the verdict and your note. The log is append-only; never edit it by hand.
"""


RECIPE_TEMPLATE = '''"""An idea to try: the recipe with one knob. Copy this file, change the knob (or the code), and run

    saelab research try ideas/<your_file>.py:Idea --note "what you changed and why"

As it is, the knob holds the recipe's own value, so this runs the recipe against itself: expect
`unresolved` (the seed-to-seed noise), never `better`. That is a useful first run: it shows the
smallest difference this budget and these seeds can resolve.
"""

from saelab.saes.recipe import RecipeSAE


class Idea(RecipeSAE):
    """The recipe, with k starting at K_START_RATIO × the target L0 and decreasing to it during training."""

    K_START_RATIO = 2.4  # the knob: the recipe's own value; try 1.5 or 3.5

    @classmethod
    def config_for_l0(cls, d_in, d_sae, l0, total_steps, **overrides):
        overrides.setdefault("k_initial", min(cls.K_START_RATIO * l0, float(d_sae)))
        return super().config_for_l0(d_in, d_sae, l0, total_steps, **overrides)
'''

BATCHTOPK_TEMPLATE = '''"""An idea to try: BatchTopK with one knob. Copy this file, change the knob (or the code), and run

    saelab research try ideas/<your_file>.py:Idea --note "what you changed and why"

As it is, the knob holds BatchTopK's own value, so against a BatchTopK base this runs BatchTopK against
itself: expect `unresolved` (the seed-to-seed noise), never `better`.
"""

from saelab.saes.batchtopk import BatchTopKSAE


class Idea(BatchTopKSAE):
    """BatchTopK, with the inference threshold's running average updated at rate THRESHOLD_LR."""

    THRESHOLD_LR = 0.01  # the knob: BatchTopK's own value; try 0.001 or 0.1

    @classmethod
    def config_for_l0(cls, d_in, d_sae, l0, total_steps, **overrides):
        overrides.setdefault("topk_threshold_lr", cls.THRESHOLD_LR)
        return super().config_for_l0(d_in, d_sae, l0, total_steps, **overrides)
'''


def template_text(base: str) -> str:
    """The recipe template for a recipe base, else the BatchTopK one (both subclass a built-in)."""
    return RECIPE_TEMPLATE if base.split(":")[0].split("[")[0] == "recipe" else BATCHTOPK_TEMPLATE


def init_workspace(
    root: str | os.PathLike[str],
    *,
    protocol: str = "mini",
    base: str = "recipe",
    seeds: int = 3,
    l0: float | None = None,
    tier: str = "quick",
) -> tuple[Workspace, list[Path]]:
    """Write a new workspace in `root` (which may exist, but must not be a workspace yet); returns it and the
    files written."""
    from saelab.bench.paths import check_writable_dir
    from saelab.bench.store import ResultsStore
    from saelab.bench.variants import resolve_arch

    root = check_writable_dir(root, "dir")
    proto = get_protocol(protocol)
    proto.tier_samples(tier)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError("seeds", seeds, "must be a positive integer")
    l0 = float(proto.natural_l0 if l0 is None else l0)
    if not 0 < l0 <= proto.width:
        raise ConfigError("l0", l0, f"must be in (0, {proto.width}]")
    resolve_arch(base)  # an unknown base fails now
    if (root / WORKSPACE_FILE).exists():
        raise ConfigError("dir", str(root), "is already a research workspace; pick another folder")
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "kind": WORKSPACE_KIND,
        "version": WORKSPACE_VERSION,
        "protocol": proto.name,
        "base": base,
        "seeds": seeds,
        "l0": l0,
        "tier": tier,
    }
    written = []
    template = root / IDEAS_DIR / TEMPLATE_FILE
    if not template.exists():  # never overwrite an idea the user already wrote there
        write_text_atomic(template, template_text(base))
        written.append(template)
    write_text_atomic(root / TASK_FILE, task_text(proto, base, seeds, l0))
    written.append(root / TASK_FILE)
    ResultsStore(root / STORE_FILE)
    written.append(root / STORE_FILE)
    (root / EXPERIMENTS_DIR).mkdir(exist_ok=True)
    (root / LOG_FILE).touch()
    written.append(root / LOG_FILE)
    # workspace.json last, exclusively: it is what makes the folder a workspace, so a second init loses.
    tmp = root / f".{WORKSPACE_FILE}.{secrets.token_hex(4)}.tmp"
    write_json_atomic(tmp, settings)
    try:
        os.link(tmp, root / WORKSPACE_FILE)
    except FileExistsError:
        raise ConfigError("dir", str(root), "is already a research workspace; pick another folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    written.insert(0, root / WORKSPACE_FILE)
    return Workspace(root, settings), written


def load_workspace(root: str | os.PathLike[str]) -> Workspace:
    root = Path(root).expanduser()
    path = root / WORKSPACE_FILE
    if not path.exists():
        raise ConfigError(
            "dir",
            str(root),
            "is not a research workspace (no workspace.json): run `saelab research init DIR` first, or pass --dir",
        )
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{path} is unreadable: {err}") from None
    if not isinstance(settings, dict) or settings.get("kind") != WORKSPACE_KIND:
        raise FileFormatError(f"{path} is not a saelab research workspace file")
    if int(settings.get("version", 0)) > WORKSPACE_VERSION:
        raise FileFormatError(f"{path} has version {settings.get('version')}, newer than this saelab reads")
    return Workspace(root, settings)
