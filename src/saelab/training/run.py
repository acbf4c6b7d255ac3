"""A training run: data source + SAEs + trainer + final evaluation, written to a run folder.

`RunConfig` is both the Python API and the `saelab train` command line (one typed dataclass).
A run folder holds `run.json` (the result envelope: config, version, commit, hardware, time,
metrics), one SAELens-format folder per SAE under `saes/`, and `checkpoint.pt` while training.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.errors import ConfigError, require
from saelab.io import write_json_atomic
from saelab.provenance import envelope
from saelab.saes.base import SAE, get_sae_class
from saelab.saes.saelens_format import save_sae
from saelab.training.sources import ActivationSource, SyntheticSource
from saelab.training.trainer import TrainConfig, Trainer


@dataclass(kw_only=True)
class RunConfig:
    """Everything that defines a run. Each (arch, l0) pair is one SAE trained on the shared stream."""

    data: str = "synth-mini"
    arch: list[str] = field(default_factory=lambda: ["batchtopk"])
    l0: list[float] = field(default_factory=lambda: [12.0])
    width: int = 1024
    samples: int = 5_000_000
    batch_size: int = 1024
    lr: float = 3e-4
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0
    seed: int = 0
    eval_samples: int = 100_000
    eval_every: int = 0
    device: str = "cpu"
    autocast_bf16: bool = False
    checkpoint_every: int = 0
    dead_feature_window: int = 1000
    arch_options: dict[str, Any] = field(default_factory=dict)
    # Real activations (saelab.activations); when any of model/cache/activations is set, `data` is ignored.
    model: str | None = None  # local Hugging Face causal-LM folder
    layer: int | None = None  # hook the output of this transformer block
    hook_module: str | None = None  # ... or of this named module
    dataset: str | None = None  # text file, folder, `datasets` save_to_disk folder or token file
    text_column: str = "text"
    context_size: int = 128
    model_batch_size: int = 8  # contexts per LM forward pass
    buffer_size: int = 16384  # rows in the shuffling buffer
    model_dtype: str = "float32"
    prefetch: bool = True  # LM forward passes in a background thread, overlapping the SAE step
    cache: str | None = None  # train from an activation cache written by `saelab cache`
    activations: list[str] = field(default_factory=list)  # or from .npy / .safetensors [N, d_in] files

    def __post_init__(self) -> None:
        self.activations = [str(a) for a in self.activations]
        if self.model:
            require(self.layer is not None or self.hook_module is not None, "layer", self.layer,
                    "--model needs --layer N or --hook-module NAME")
        require(isinstance(self.context_size, int) and self.context_size >= 2, "context_size", self.context_size,
                "must be an integer ≥ 2")
        self.arch = list(self.arch)
        self.l0 = [float(v) for v in self.l0]
        require(len(self.arch) > 0, "arch", self.arch, "name at least one architecture")
        require(len(self.l0) > 0, "l0", self.l0, "give at least one target L0")
        for v in self.l0:
            require(v > 0, "l0", v, "target L0 values must be positive")
            require(v <= self.width, "l0", v, f"must not exceed the width {self.width}")
        require(isinstance(self.width, int) and self.width > 0, "width", self.width, "must be a positive integer")
        require(self.eval_samples > 0, "eval_samples", self.eval_samples, "must be positive")
        for name in self.arch:
            get_sae_class(name)  # unknown names fail here, listing the known ones

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            samples=self.samples,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,  # type: ignore[arg-type]
            lr_warmup_steps=self.lr_warmup_steps,
            lr_decay_fraction=self.lr_decay_fraction,
            device=self.device,
            seed=self.seed,
            autocast_bf16=self.autocast_bf16,
            checkpoint_every=self.checkpoint_every,
            dead_feature_window=self.dead_feature_window,
        )

    def sae_names(self) -> list[tuple[str, str, float]]:
        return [(f"{arch}-l0_{l0:g}", arch, l0) for arch in self.arch for l0 in self.l0]


def build_run_saes(cfg: RunConfig, d_in: int) -> dict[str, SAE]:
    """One SAE per (arch, L0), each seeded from the run seed so runs are reproducible."""
    total_steps = cfg.train_config().total_steps
    saes = {}
    for i, (name, arch, l0) in enumerate(cfg.sae_names()):
        cls = get_sae_class(arch)
        options = dict(cfg.arch_options.get(arch, {}))
        sae_cfg = cls.config_for_l0(d_in, cfg.width, l0, total_steps, device=cfg.device, **options)
        torch.manual_seed(cfg.seed * 1000 + i)
        saes[name] = cls(sae_cfg)
    return saes


def load_data(spec: str, device: str = "cpu") -> Any:
    """A synthetic model from a preset name or a saved folder (saelab's or SAELens's)."""
    from saelab.synthetic import load_source

    return load_source(spec, device=device)


@dataclass
class RunResult:
    run_dir: Path
    results: list[dict[str, Any]]
    wall_seconds: float
    samples_per_second: float


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
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if resume and not ckpt.exists():
        raise ConfigError("resume", str(run_dir), "has no checkpoint.pt to resume from")
    started = time.perf_counter()
    from saelab.training import distributed as dist_utils

    cfg = dataclasses.replace(cfg, device=dist_utils.init_from_env(cfg.device))  # a no-op outside torchrun
    main_rank = dist_utils.is_main()
    real = None
    if source is None and model is None:
        from saelab.activations import build_real_data, uses_real_data

        if uses_real_data(cfg):
            real = build_real_data(cfg)
            source = real.source
    if model is None and source is None:
        model = load_data(cfg.data, device=cfg.device)
    if source is None:
        # Under torchrun every rank samples its own stream (rank 0's is the single-process one).
        source = SyntheticSource(model, seed=cfg.seed + 1_000_003 * dist_utils.rank(), device=cfg.device)
    saes = build_run_saes(cfg, source.d_in)
    config_dict = dataclasses.asdict(cfg)
    if main_rank:  # under torchrun only rank 0 writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run.json", {**envelope(config_dict, cfg.device), "status": "running"})

    eval_fn = None
    if model is not None and cfg.eval_every:
        from saelab.metrics import evaluate_sae_on_synthetic

        def eval_fn(current: dict[str, SAE]) -> dict[str, dict[str, float]]:
            return {n: evaluate_sae_on_synthetic(s.to_inference(), model, min(cfg.eval_samples, 50_000), seed=cfg.seed).to_dict()
                    for n, s in current.items()}

    trainer = Trainer(saes, source, cfg.train_config(), checkpoint_path=ckpt, eval_fn=eval_fn,
                      eval_every=cfg.eval_every, progress=progress)
    if resume:
        trainer.load_checkpoint(ckpt)
    train_result = trainer.train()
    if real is not None and hasattr(real.source, "close"):
        real.source.close()  # the prefetch thread
    if not main_rank:
        return RunResult(run_dir=run_dir, results=[], wall_seconds=time.perf_counter() - started,
                         samples_per_second=train_result.samples_per_second)

    results = []
    for name, arch, l0 in cfg.sae_names():
        sae = trainer.saes[name]
        inference = sae.to_inference()
        record: dict[str, Any] = {"name": name, "arch": arch, "l0_target": l0, "seed": cfg.seed}
        if model is not None:
            from saelab.metrics import evaluate_sae_on_synthetic

            gt = evaluate_sae_on_synthetic(inference, model, cfg.eval_samples, seed=cfg.seed + 12345)
            record.update(gt.to_dict())
        elif real is not None:
            record.update(real.evaluate(inference))
        record["train_stats"] = train_result.final_stats[name]
        record["samples_per_second"] = train_result.samples_per_second
        save_sae(sae, run_dir / "saes" / name, metadata={"l0_target": l0, "data": cfg.data if real is None else real.identity,
                                                          "l0": record.get("l0")})
        results.append(record)
        if on_result:
            on_result(record)

    wall = time.perf_counter() - started
    write_json_atomic(run_dir / "run.json", {
        **envelope(config_dict, cfg.device),
        "status": "complete",
        "wall_seconds": wall,
        "train_samples_per_second": train_result.samples_per_second,
        "results": results,
        "history": trainer.history,
    })
    ckpt.unlink(missing_ok=True)  # the run is complete; the saved SAEs are the result
    return RunResult(run_dir=run_dir, results=results, wall_seconds=wall,
                     samples_per_second=train_result.samples_per_second)
