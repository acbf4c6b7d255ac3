"""A training run: data source + SAEs + trainer + final evaluation, written to a run folder.

The data comes through `saelab.data.open_data`, the scores through `runs/evaluate.py`. A run folder holds `run.json` (the result envelope: config, version, commit, hardware, time,
metrics), one SAELens-format folder per SAE under `saes/`, and a `checkpoint/` folder while training
(see training/checkpoint.py). `status` in run.json is running, complete, diverged or interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from saelab import parallel
from saelab.data import ActivationSource, OpenedData, PairedSource, is_paired, open_data, synthetic_stream
from saelab.data.open import SYNTHETIC_STREAM_RANK_STRIDE
from saelab.errors import ConfigError, FileFormatError, TrainingDivergedError, TrainingInterrupted, require
from saelab.io import write_json_atomic
from saelab.provenance import envelope
from saelab.runs.config import RunConfig
from saelab.runs.evaluate import make_evaluator
from saelab.runs.pretrained import load_pretrained_sae
from saelab.saes.base import SAE, transcoder_fields
from saelab.saes.registry import get_sae_class
from saelab.saes.saelens_format import save_sae
from saelab.training.tracking import check_available as check_trackers_available
from saelab.training.tracking import open_trackers
from saelab.training.trainer import Trainer


def build_run_saes(
    cfg: RunConfig, d_in: int, pretrained: SAE | None = None, d_out: int | None = None
) -> dict[str, SAE]:
    """One SAE per (arch, L0), each seeded from the run seed so runs are reproducible. With
    `cfg.init_from` each starts from that pretrained SAE (`pretrained`, if already loaded; see runs/pretrained.py).
    With `cfg.transcoder` plain or skip each is a transcoder writing `d_out` (the targets' width)."""
    total_steps = cfg.train_config().total_steps
    from saelab.memory import check_training_memory
    from saelab.runs.pretrained import init_config_overrides, init_training_sae, prepare_init

    # Before any allocation: a width or batch that cannot fit is one clear error, not an allocator traceback.
    check_training_memory(d_in, cfg.width, cfg.batch_size, len(cfg.sae_names()), cfg.device)
    init = None
    if cfg.init_from is not None:
        init = prepare_init(cfg.init_from, cfg.arch, d_in, cfg.width, pretrained, data=cfg.describe())
    transcoder: dict[str, Any] = {}
    if cfg.transcoder != "none":
        require(d_out is not None, "transcoder", cfg.transcoder, "needs the targets' width d_out (paired data)")
        assert d_out is not None
        transcoder = transcoder_fields(d_out, skip=cfg.transcoder == "skip")
    saes = {}
    for i, (name, arch, l0) in enumerate(cfg.sae_names()):
        cls = get_sae_class(arch)
        options = dict(cfg.arch_options.get(arch, {}))
        # A variant's or --option's own setting (e.g. `batchtopk:skip=false`: a plain transcoder) wins.
        frozen = getattr(cls, "variant_overrides", {})
        options.update({k: v for k, v in transcoder.items() if k not in options and k not in frozen})
        if init is not None:
            options.update(init_config_overrides(cls, init))
        sae_cfg = cls.config_for_l0(d_in, cfg.width, l0, total_steps, device=cfg.device, **options)
        torch.manual_seed(cfg.seed * 1000 + i)
        saes[name] = cls(sae_cfg)
        if init is not None and cfg.init_from is not None:
            init_training_sae(saes[name], init, cfg.init_from)
    return saes


@dataclass
class RunResult:
    run_dir: Path
    results: list[dict[str, Any]]
    wall_seconds: float
    samples_per_second: float


# RunConfig fields --resume may change: they cannot change the trained SAEs (evaluation and
# checkpoint settings, and the device). Every other difference is refused, naming the field.
RESUME_MAY_CHANGE = ("eval_samples", "eval_every", "device", "checkpoint_every", "checkpoint_minutes", "log_to")
CHECKPOINT_DIR = "checkpoint"


def check_resume_config(saved: dict[str, Any] | None, cfg: RunConfig, where: Path) -> None:
    """ConfigError naming the first field that differs from the checkpoint's run (RESUME_MAY_CHANGE aside)."""
    if not isinstance(saved, dict):
        raise FileFormatError(
            f"checkpoint {where} does not record its run's config; it was not written by "
            "`saelab train`, so a run cannot resume from it"
        )
    mine = _plain(dataclasses.asdict(cfg))
    old = _plain(saved)
    defaults = _field_defaults(type(cfg))
    for key in sorted(set(mine) | set(old)):
        if key in RESUME_MAY_CHANGE:
            continue
        if key not in mine and RETIRED_FIELDS.get(key, _MISSING) == old[key]:
            continue  # a field this version dropped, at the value that means what today's default means
        if key not in old and key in defaults and mine[key] == defaults[key]:
            continue  # a field added since the checkpoint, at its default: the old run behaved the same
        if key not in old:
            raise ConfigError(
                key,
                mine[key],
                "is not in the checkpoint's config (written by another saelab "
                "version); --resume continues the same run: start a new run instead",
            )
        if mine.get(key) != old[key]:
            raise ConfigError(
                key,
                mine.get(key),
                f"differs from the checkpoint's {old[key]!r}: --resume continues "
                "the same run; use the same value, or start a new run in another --out folder",
            )


# Fields older versions wrote that this one no longer has, with the value that matches today's behaviour
# at the replacing field's default (autocast_bf16=False: fp32, what `precision auto` gives on a CPU without
# bf16 units; a checkpoint from a bf16 run cannot continue silently in another precision).
RETIRED_FIELDS: dict[str, Any] = {"autocast_bf16": False}
_MISSING = object()


def _field_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
    return out


def _plain(obj: Any) -> Any:
    """As JSON would give it back (tuples become lists), so saved and current configs compare alike."""
    return json.loads(json.dumps(obj, default=str))


def _clean_run_folder(run_dir: Path) -> None:
    """Temp files of writes a kill interrupted (older than this process) and unused checkpoint tensors."""
    from saelab.io import remove_stale_temp_files
    from saelab.training import checkpoint as ckpt_io

    remove_stale_temp_files(run_dir)
    ckpt_io.clean(run_dir / CHECKPOINT_DIR)
    saes_dir = run_dir / "saes"
    if saes_dir.is_dir():
        remove_stale_temp_files(saes_dir)
        for sub in saes_dir.iterdir():
            if sub.is_dir() and not sub.is_symlink():
                remove_stale_temp_files(sub)


def _open_run_data(cfg: RunConfig, model: Any, source: ActivationSource | None) -> OpenedData:
    """The run's data; `model` (a ground-truth model already loaded) or `source` (a ready stream,
    e.g. in tests) stand in for opening `cfg`'s data."""
    if source is not None:
        return OpenedData(
            spec=cfg.data_spec(),
            d_in=source.d_in,
            source=source,
            identity={"source": type(source).__name__},
            ground_truth=model,
        )
    if model is not None:
        # Under torchrun every rank samples its own stream (rank 0's is the single-process one).
        stream = synthetic_stream(model, seed=cfg.seed + SYNTHETIC_STREAM_RANK_STRIDE * parallel.rank())
        return OpenedData(
            spec=cfg.data_spec(), d_in=stream.d_in, source=stream, identity={"data": cfg.data}, ground_truth=model
        )
    return open_data(
        cfg.data_spec(), device=cfg.device, seed=cfg.seed, eval_rows=cfg.eval_samples, batch_size=cfg.batch_size
    )


def _run_d_out(cfg: RunConfig, opened: OpenedData) -> int | None:
    """The targets' width a transcoder run writes (None for SAEs); ConfigError when the data has no targets."""
    if cfg.transcoder == "none":
        return None
    if not is_paired(opened.source):
        raise ConfigError(
            "transcoder",
            cfg.transcoder,
            f"needs paired (input, target) data such as a transcoder world (tc-mini, tc-16k); "
            f"{cfg.data_spec().describe()} gives inputs only",
        )
    return int(cast(PairedSource, opened.source).d_out)


def run_training(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    model: Any = None,
    source: ActivationSource | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train every SAE of `cfg` on one stream, evaluate against the ground truth, save everything."""
    from saelab.io import ensure_writable_folder
    from saelab.training import checkpoint as ckpt_io

    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_DIR
    if resume:
        if not (ckpt / ckpt_io.JSON_NAME).exists():
            legacy = run_dir / ckpt_io.LEGACY_NAME
            if legacy.exists():
                raise FileFormatError(ckpt_io.legacy_message(legacy))
            raise ConfigError(
                "resume", str(run_dir), f"has no checkpoint ({CHECKPOINT_DIR}/{ckpt_io.JSON_NAME}) to resume from"
            )
        check_resume_config(ckpt_io.decode(ckpt_io.read_header(ckpt).get("run_config"), {}, str(ckpt)), cfg, ckpt)
    started = time.perf_counter()
    user_config = dataclasses.asdict(cfg)  # before the device is resolved: the checkpoint compares this
    cfg = dataclasses.replace(cfg, device=parallel.init_from_env(cfg.device))  # a no-op outside torchrun
    main_rank = parallel.is_main()
    created = not run_dir.exists()
    if main_rank:
        # Before any work: a read-only or missing output fails now, not after training.
        ensure_writable_folder(run_dir)
        _clean_run_folder(run_dir)
    try:
        # Before the data opens: a missing tracking package or a bad --init-from folder is one line now.
        check_trackers_available(cfg.log_to)
        pretrained = load_pretrained_sae(cfg.init_from) if cfg.init_from is not None else None
        opened = _open_run_data(cfg, model, source)
        saes = build_run_saes(cfg, opened.d_in, pretrained, d_out=_run_d_out(cfg, opened))
    except BaseException:
        if created and main_rank and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # bad data or settings: leave no empty run folder behind
        raise
    config_dict = dataclasses.asdict(cfg)
    if main_rank:  # under torchrun only rank 0 writes the run folder
        write_json_atomic(run_dir / "run.json", {**envelope(config_dict, cfg.device), "status": "running"})

    eval_fn: Callable[[dict[str, SAE]], dict[str, dict[str, float]]] | None = None
    if opened.ground_truth is not None and cfg.eval_every:
        during = make_evaluator(opened, min(cfg.eval_samples, 50_000), seed=cfg.seed)

        def evaluate(current: dict[str, SAE]) -> dict[str, dict[str, float]]:
            return {n: during(s.to_inference()) for n, s in current.items()}

        eval_fn = evaluate

    tracker = open_trackers(cfg.log_to, run_dir, config_dict) if main_rank and cfg.log_to else None
    trainer = Trainer(
        saes,
        opened.source,
        cfg.train_config(),
        checkpoint_path=ckpt,
        eval_fn=eval_fn,
        eval_every=cfg.eval_every,
        progress=progress,
        run_config=user_config,
        on_log=tracker.log if tracker is not None else None,
    )

    def stopped(status: str, err: Exception, **extra: Any) -> None:
        if tracker is not None:
            tracker.close()
        if main_rank:
            write_json_atomic(
                run_dir / "run.json",
                {
                    **envelope(config_dict, cfg.device),
                    "status": status,
                    "error": str(err),
                    **extra,
                    "steps": trainer.step,
                    "wall_seconds": trainer.elapsed_before + (time.perf_counter() - started),
                    "history": trainer.history,
                },
            )

    try:
        if resume:
            trainer.load_checkpoint(ckpt)
        # No final checkpoint: the SAEs are saved next, and with a full disk they must go first.
        train_result = trainer.train(final_checkpoint=False)
    except TrainingDivergedError as err:
        stopped("diverged", err, checkpoint=str(ckpt) if trainer.saved_step is not None else None)
        raise
    except TrainingInterrupted as err:
        hint = f"continue with `saelab train` and the same options plus --resume --out {run_dir}"
        stopped("interrupted", err, hint=hint)
        raise TrainingInterrupted(f"{err}; {hint}", exit_code=err.exit_code) from None
    finally:
        opened.close()  # the LM prefetch thread
    if not main_rank:
        return RunResult(
            run_dir=run_dir,
            results=[],
            wall_seconds=time.perf_counter() - started,
            samples_per_second=train_result.samples_per_second,
        )

    final = make_evaluator(opened, cfg.eval_samples, seed=cfg.seed + 12345)
    data_identity = cfg.data if opened.ground_truth is not None else opened.identity
    results = []
    for name, arch, l0 in cfg.sae_names():
        sae = trainer.saes[name]
        record: dict[str, Any] = {"name": name, "arch": arch, "l0_target": l0, "seed": cfg.seed}
        record.update(final(sae.to_inference()))
        record["train_stats"] = train_result.final_stats[name]
        record["samples_per_second"] = train_result.samples_per_second
        record["compute_precision"] = train_result.precision
        metadata = {"l0_target": l0, "data": data_identity, "l0": record.get("l0")}
        if cfg.init_from is not None:
            metadata["init_from"] = cfg.init_from
        save_sae(sae, run_dir / "saes" / name, metadata=metadata)
        results.append(record)
        if on_result:
            on_result(record)

    wall = trainer.elapsed_before + (time.perf_counter() - started)  # every session of the run
    write_json_atomic(
        run_dir / "run.json",
        {
            **envelope(config_dict, cfg.device),
            "status": "complete",
            "wall_seconds": wall,
            "train_samples_per_second": train_result.samples_per_second,
            "compute_precision": train_result.precision,
            "results": results,
            "history": trainer.history,
        },
    )
    ckpt_io.remove(ckpt)  # the run is complete; the saved SAEs are the result
    if tracker is not None:
        tracker.summary({r["name"]: r for r in results})
        tracker.close()
    return RunResult(
        run_dir=run_dir, results=results, wall_seconds=wall, samples_per_second=train_result.samples_per_second
    )
