"""`research try` and `research rerun`: run a compare in a workspace and log one entry per variant.

Before anything trains, each file variant is copied into its experiment folder and the copy is what trains
(spawned seed workers import it again later, so an edit to the original during a long run cannot leak in).
The code hash is the sha256 of that file's bytes (plus the override text, for `file.py:Class:key=value`); for a
built-in name or an override of one, it is the sha256 of the spec text. `rerun` builds the same compare from
the log entry alone: the saved copies, the recorded protocol, budget, seeds, L0 and the other variants of the
same try (each SAE's initial weights depend on its position in the run, so the whole group trains again).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.bench.protocols import Protocol
from saelab.bench.variants import parse_variant_spec
from saelab.errors import ConfigError, FileFormatError
from saelab.io import write_json_atomic
from saelab.research.workspace import Workspace

# Keys of a comparison row that the entry keeps under their own names (the rest is context it records itself).
_RESULT_SKIP = {"kind", "variant", "base", "arch", "base_arch", "protocol", "samples", "tier", "l0_target"}


@dataclass
class CodeSnapshot:
    kind: str  # "file" (a copy was saved) or "spec" (a built-in name or an override of one)
    text: str  # what the user typed
    code_hash: str
    run_spec: str  # what trains: the copy's absolute path + ":Class" (+ ":overrides"), or the text
    source: str | None = None  # the original file (absolute), for kind file
    copy: str | None = None  # the saved copy, relative to the workspace
    class_name: str | None = None
    overrides: str | None = None  # the override text after the class, for file.py:Class:key=value

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text": self.text,
            "hash": self.code_hash,
            "source": self.source,
            "copy": self.copy,
            "class": self.class_name,
            "overrides": self.overrides,
        }


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _split_user_class(text: str, root: Path | None = None) -> tuple[str, str, str | None] | None:
    """(file path, class, override text) when `text` names a user class by file or module; None otherwise.
    A relative file path is taken from the current folder, else from the workspace `root`."""
    spec = parse_variant_spec(text)
    target_text, overrides = (text, None) if spec is None else (spec.base, text[len(spec.base) + 1 :])
    module, sep, cls = target_text.rpartition(":")
    if not sep or not module or not cls:
        return None
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file() and root is not None and not path.is_absolute() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise ConfigError("variant", text, f"file {module} does not exist")
        return str(path.resolve()), cls, overrides
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise ConfigError("variant", text, f"cannot find module {module}: {err}") from None
    if found is None or not found.origin or not str(found.origin).endswith(".py"):
        raise ConfigError("variant", text, f"module {module} is not a Python source file that can be copied")
    return str(Path(found.origin).resolve()), cls, overrides


def snapshot_code(text: str, folder: Path, workspace: Workspace, *, name: str | None = None) -> CodeSnapshot:
    """Copy the code `text` names into `folder` (a user class's file) and hash it; see the module docstring."""
    user = _split_user_class(text, workspace.root)
    if user is None:
        return CodeSnapshot(kind="spec", text=text, code_hash=sha256(text.encode()), run_spec=text)
    source, cls, overrides = user
    data = Path(source).read_bytes()
    copy = folder / (name or Path(source).name)
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(data)
    digest = sha256(data if overrides is None else data + b"\0" + overrides.encode())
    run_spec = f"{copy.resolve()}:{cls}" + (f":{overrides}" if overrides else "")
    return CodeSnapshot(
        kind="file",
        text=text,
        code_hash=digest,
        run_spec=run_spec,
        source=source,
        copy=str(copy.relative_to(workspace.root)),
        class_name=cls,
        overrides=overrides,
    )


def snapshot_from_entry(code: dict[str, Any], workspace: Workspace, folder: Path, field_name: str) -> CodeSnapshot:
    """The snapshot a log entry recorded, copied again into `folder` after checking its hash still holds."""
    if code.get("kind") == "spec":
        return CodeSnapshot(kind="spec", text=code["text"], code_hash=code["hash"], run_spec=code["text"])
    saved = workspace.root / str(code.get("copy"))
    if not saved.is_file():
        raise FileFormatError(f"{field_name}: the saved code {saved} is missing; the entry cannot be rerun")
    data = saved.read_bytes()
    overrides = code.get("overrides")
    digest = sha256(data if not overrides else data + b"\0" + overrides.encode())
    if digest != code.get("hash"):
        raise FileFormatError(
            f"{field_name}: the saved code {saved} no longer matches its logged hash "
            f"({code.get('hash')}); it was changed after the run"
        )
    copy = folder / saved.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(saved, copy)
    run_spec = f"{copy.resolve()}:{code['class']}" + (f":{overrides}" if overrides else "")
    return CodeSnapshot(
        kind="file",
        text=code["text"],
        code_hash=digest,
        run_spec=run_spec,
        source=code.get("source"),
        copy=str(copy.relative_to(workspace.root)),
        class_name=code.get("class"),
        overrides=overrides,
    )


@dataclass
class TrySettings:
    """Everything a try runs with (what the log records as its config)."""

    protocol: Protocol
    base: str
    samples: int | None
    tier: str | None
    seeds: list[int]
    l0: float
    eval_samples: int | None = None
    jobs: int = 1
    max_minutes: float | None = None
    metrics: tuple[str, ...] = ("f1", "mcc")
    device: str = "cpu"


def _entry(
    eid: str,
    snap: CodeSnapshot,
    base_snap: CodeSnapshot,
    row: dict[str, Any],
    settings: TrySettings,
    config_extra: dict[str, Any],
    note: str | None,
    rerun_of: str | None,
    wall: float,
) -> dict[str, Any]:
    from saelab import __version__
    from saelab.provenance import git_commit

    entry = {
        "kind": "experiment",
        "id": eid,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "variant": snap.text,
        "arch": row.get("arch"),
        "base": base_snap.text,
        "code_hash": snap.code_hash,
        "code": snap.to_dict(),
        "base_code": base_snap.to_dict(),
        "config": {
            "protocol": settings.protocol.name,
            "protocol_def": settings.protocol.to_dict(),
            "tier": row.get("tier"),
            "samples": row.get("samples"),
            "seeds": list(settings.seeds),
            "l0": settings.l0,
            "base": base_snap.text,
            "eval_samples": settings.eval_samples,
            "jobs": settings.jobs,
            "max_minutes": settings.max_minutes,
            "metrics": list(settings.metrics),
            **config_extra,
        },
        "note": note,
        "rerun_of": rerun_of,
        "wall_seconds": wall,
        "saelab_version": __version__,
        "commit": git_commit(),
    }
    entry.update({k: v for k, v in row.items() if k not in _RESULT_SKIP})
    return entry


def run_experiments(
    workspace: Workspace,
    snaps: Sequence[CodeSnapshot],
    base_snap: CodeSnapshot,
    ids: list[str],
    settings: TrySettings,
    *,
    note: str | None,
    rerun_of: str | None = None,
    log_ids: Sequence[str] | None = None,
    estimate: bool = True,
    on_estimate: Callable[[Any], None] | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], Any]:
    """Compare the snapshots against the base in one run; append an entry for each id in `log_ids` (default all)
    and return those entries and the compare outcome."""
    from saelab.bench.compare import CompareRequest, run_compare
    from saelab.bench.store import ResultsStore

    request = CompareRequest(
        protocol=settings.protocol,
        base=base_snap.run_spec,
        variants=[s.run_spec for s in snaps],
        seeds=list(settings.seeds),
        l0=settings.l0,
        samples=settings.samples,
        tier=settings.tier,
        eval_samples=settings.eval_samples,
        metrics=list(settings.metrics),
        device=settings.device,
        out_dir=workspace.runs_dir,
        jobs=settings.jobs,
        max_minutes=settings.max_minutes,
    )
    outcome = run_compare(
        request, store=ResultsStore(workspace.store_path), estimate=estimate, on_estimate=on_estimate, progress=progress
    )
    settings.samples, settings.tier = request.samples, request.tier
    wanted = set(ids if log_ids is None else log_ids)
    entries = []
    group = {"group": list(ids), "variants": [s.text for s in snaps]}
    for position, (eid, snap, row) in enumerate(zip(ids, snaps, outcome.rows)):
        if eid not in wanted:
            continue
        entry = _entry(
            eid, snap, base_snap, row, settings, {**group, "position": position}, note, rerun_of, outcome.wall_seconds
        )
        write_json_atomic(workspace.experiments_dir / eid / "entry.json", entry)
        workspace.log.append(entry)
        entries.append(entry)
    return entries, outcome


def try_ideas(
    workspace: Workspace, variants: Sequence[str], settings: TrySettings, *, note: str | None = None, **kw: Any
) -> tuple[list[dict[str, Any]], Any]:
    """`research try`: snapshot each variant (and a file base) into a new experiment folder, run, log."""
    if not variants:
        raise ConfigError("variant", [], "name at least one idea to try")
    if len(set(variants)) != len(variants):
        raise ConfigError("variant", list(variants), "names a variant twice")
    ids = workspace.reserve_ids(len(variants))
    try:
        snaps = [snapshot_code(v, workspace.experiments_dir / eid, workspace) for v, eid in zip(variants, ids)]
        base_snap = snapshot_code(settings.base, workspace.experiments_dir / ids[0] / "base", workspace)
        return run_experiments(workspace, snaps, base_snap, ids, settings, note=note, **kw)
    except BaseException:
        # Nothing was logged under these ids: give them back (a kill leaves the folders, never a log line).
        for eid in ids:
            shutil.rmtree(workspace.experiments_dir / eid, ignore_errors=True)
        raise


def settings_from_entry(
    entry: dict[str, Any], *, jobs: int | None = None, max_minutes: float | None = None, device: str = "cpu"
) -> TrySettings:
    cfg = entry.get("config") or {}
    try:
        protocol = Protocol.from_dict(cfg["protocol_def"])
        return TrySettings(
            protocol=protocol,
            base=cfg["base"],
            samples=int(cfg["samples"]),
            tier=None,
            seeds=[int(s) for s in cfg["seeds"]],
            l0=float(cfg["l0"]),
            eval_samples=cfg.get("eval_samples"),
            jobs=jobs or int(cfg.get("jobs") or 1),
            max_minutes=max_minutes,
            metrics=tuple(cfg.get("metrics") or ("f1", "mcc")),
            device=device,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FileFormatError(f"log entry {entry.get('id')} lacks what a rerun needs ({err})") from None


def rerun(
    workspace: Workspace,
    entry_id: str,
    *,
    note: str | None = None,
    jobs: int | None = None,
    max_minutes: float | None = None,
    device: str = "cpu",
    **kw: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reproduce a logged experiment from the log alone; returns (logged entry, new entry). The new entry is
    appended with `rerun_of` set."""
    log = workspace.log
    entry = log.find(entry_id)
    settings = settings_from_entry(entry, jobs=jobs, max_minutes=max_minutes, device=device)
    cfg = entry["config"]
    group = list(cfg.get("group") or [entry_id])
    by_id = {e.get("id"): e for e in log.entries()}
    members = []
    for gid in group:  # the other variants of the same try, from their own entries
        member = entry if gid == entry_id else by_id.get(gid)
        if member is None:
            raise FileFormatError(
                f"entry {entry_id} was tried with {gid}, which is not in the log; it cannot be rerun as it ran"
            )
        members.append(member)
    ids = workspace.reserve_ids(len(members))
    try:
        snaps = [
            snapshot_from_entry(m["code"], workspace, workspace.experiments_dir / new_id, f"entry {m['id']}")
            for m, new_id in zip(members, ids)
        ]
        base_snap = snapshot_from_entry(
            entry["base_code"], workspace, workspace.experiments_dir / ids[0] / "base", f"entry {entry_id} (base)"
        )
        new_id = ids[group.index(entry_id)]
        new_note = note if note is not None else f"rerun of {entry_id}"
        entries, _ = run_experiments(
            workspace, snaps, base_snap, ids, settings, note=new_note, rerun_of=entry_id, log_ids=[new_id], **kw
        )
    except BaseException:
        for eid in ids:
            shutil.rmtree(workspace.experiments_dir / eid, ignore_errors=True)
        raise
    for eid in ids:  # the group's other members trained only to keep positions; nothing is logged for them
        if eid != new_id:
            shutil.rmtree(workspace.experiments_dir / eid, ignore_errors=True)
    return entry, entries[0]


def confirmed(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results by TASK.md's rule: code with a `better` F1 verdict at the quick tier and at the full tier."""
    found: dict[str, dict[str, list[str]]] = {}
    for e in entries:
        tier = (e.get("config") or {}).get("tier")
        if e.get("verdict") == "better" and tier in ("quick", "full") and not e.get("partial"):
            found.setdefault(str(e.get("code_hash")), {}).setdefault(tier, []).append(str(e.get("id")))
    return [
        {"code_hash": h, "quick": t["quick"], "full": t["full"]}
        for h, t in found.items()
        if "quick" in t and "full" in t
    ]
