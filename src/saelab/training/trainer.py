"""The trainer: N SAEs from one data stream, Adam, schedules, dead-latent tracking, checkpoints.

Every batch is drawn once and shown to every SAE (an L0 sweep or an architecture comparison pays
for data once). Checkpoints are one file written atomically, holding everything needed to
continue exactly: weights, optimiser and scheduler states, counters, autotuners and the data
stream's position. A NaN or inf loss stops training with a clear error before anything bad is
saved.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from saelab.errors import ConfigError, FileFormatError, TrainingDivergedError, require
from saelab.io import atomic_path
from saelab.saes.base import SAE, StepContext, get_sae_class
from saelab.training import distributed as dist_utils
from saelab.training.sources import ActivationSource

LRSchedule = Literal["constant", "cosine"]


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings shared by every SAE trained together."""

    samples: int = 5_000_000
    batch_size: int = 1024
    lr: float = 3e-4
    lr_schedule: LRSchedule = "constant"
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0  # linear decay to 0 over this final fraction of steps
    lr_end_factor: float = 0.1  # cosine schedule ends at lr * lr_end_factor
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float | None = 1.0
    dead_feature_window: int = 1000  # steps without firing before a latent counts as dead
    n_batches_for_norm_estimate: int = 100
    autocast_bf16: bool = False
    device: str = "cpu"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # steps; 0 = only at the end when a checkpoint path is given
    autotune_integral_gain: float | None = None  # None: SynthSAEBench's 3e-4 scaled to the run length

    def __post_init__(self) -> None:
        require(isinstance(self.samples, int) and self.samples > 0, "samples", self.samples, "must be a positive integer")
        require(isinstance(self.batch_size, int) and self.batch_size > 0, "batch_size", self.batch_size, "must be a positive integer")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be a positive number")
        require(self.lr_schedule in ("constant", "cosine"), "lr_schedule", self.lr_schedule, "must be 'constant' or 'cosine'")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "must be ≥ 0")
        require(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction", self.lr_decay_fraction, "must be in [0, 1]")
        require(0 <= self.lr_end_factor <= 1, "lr_end_factor", self.lr_end_factor, "must be in [0, 1]")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be positive or None")
        require(self.dead_feature_window > 0, "dead_feature_window", self.dead_feature_window, "must be positive")
        require(self.log_every > 0, "log_every", self.log_every, "must be positive")
        require(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be ≥ 0")

    @property
    def total_steps(self) -> int:
        return max(1, self.samples // self.batch_size)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Warm-up (linear from 1/warmup), then constant or cosine, then linear decay to 0 at the end."""
    total = cfg.total_steps
    decay_steps = int(round(cfg.lr_decay_fraction * total))
    decay_start = total - decay_steps
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, decay_start - cfg.lr_warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.lr_warmup_steps) / span))
        base = cfg.lr_end_factor + (1 - cfg.lr_end_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        end_value = cfg.lr_end_factor
    else:
        base = end_value = 1.0
    if decay_steps and step >= decay_start:
        return end_value * max(0.0, (total - step) / decay_steps)
    return base


def warmed_up(value: float, warm_up_steps: int, step: int) -> float:
    """Sparsity coefficients ramp linearly from 0 over their warm-up (SAELens CoefficientScheduler)."""
    if warm_up_steps <= 0:
        return value
    return value * min(1.0, step / warm_up_steps)


@dataclass
class SAEState:
    """One SAE under training and everything that evolves with it."""

    name: str
    sae: SAE
    optimizer: torch.optim.Optimizer
    steps_since_fired_L: torch.Tensor
    fire_count_L: torch.Tensor
    autotuner: Any = None
    autotuned: str | None = None
    last: dict[str, float] = field(default_factory=dict)
    train_cfg: TrainConfig | None = None  # the run's config with this SAE's own schedule overrides


@dataclass
class TrainResult:
    saes: dict[str, SAE]
    steps: int
    samples: int
    wall_seconds: float
    samples_per_second: float
    final_stats: dict[str, dict[str, float]]


def _make_autotuner(sae: SAE, cfg: TrainConfig):
    """The SynthSAEBench L0 autotuner for SAEs that declare `target_l0` and an autotuned coefficient."""
    target = getattr(sae.cfg, "target_l0", None)
    name = sae.autotuned_coefficient
    if target is None or name is None:
        return None, None
    from saelab.training.l0_autotuner import L0Autotuner

    start = int(getattr(sae.cfg, "autotune_start_fraction", 0.0) * cfg.total_steps)
    # SynthSAEBench's gain (3e-4) is tuned for its 195,312 steps; a shorter run gets a gain scaled
    # up so the multiplier can travel as far (at most ~0.05 per step, far from unstable).
    gain = cfg.autotune_integral_gain
    if gain is None:
        gain = min(0.05, 3e-4 * max(1.0, REFERENCE_STEPS / cfg.total_steps))
    return L0Autotuner(target_l0=float(target), start_step=start, integral_gain=gain), name


def _with_sae_overrides(cfg: TrainConfig, name: str, sae: SAE) -> TrainConfig:
    from saelab.saes.base import TRAIN_OVERRIDE_KEYS

    overrides = sae.train_overrides()
    for key, value in overrides.items():
        require(key in TRAIN_OVERRIDE_KEYS, f"{name}.train_overrides", key,
                f"an SAE may only override {', '.join(TRAIN_OVERRIDE_KEYS)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


REFERENCE_STEPS = 195_312  # 200M samples / batch 1024, the SynthSAEBench protocol


class Trainer:
    """Trains one or more SAEs on the same batches from `source`."""

    def __init__(
        self,
        saes: dict[str, SAE],
        source: ActivationSource,
        cfg: TrainConfig,
        checkpoint_path: str | Path | None = None,
        eval_fn: Callable[[dict[str, SAE]], dict[str, dict[str, float]]] | None = None,
        eval_every: int = 0,
        progress: bool = True,
    ):
        require(len(saes) > 0, "saes", saes, "need at least one SAE to train")
        for name, sae in saes.items():
            if sae.cfg.d_in != source.d_in:
                raise ConfigError(f"{name}.d_in", sae.cfg.d_in, f"does not match the data's width d_in={source.d_in}")
        self.cfg = cfg
        self.source = source
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.progress = progress
        self.device = torch.device(cfg.device)
        self.step = 0
        self.norms_estimated = False
        self.history: list[dict[str, Any]] = []
        self.states: dict[str, SAEState] = {}
        # Under torchrun each rank draws its share of every global batch (see training/distributed.py).
        self.distributed = dist_utils.is_distributed()
        self.local_batch_size = dist_utils.split_batch(cfg.batch_size)
        for name, sae in saes.items():
            sae.to(self.device)
            if self.distributed:
                dist_utils.broadcast_parameters(sae)
            fused = self.device.type in ("cpu", "cuda")
            optimizer = torch.optim.Adam(
                sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused
            )
            tuner, tuned = _make_autotuner(sae, cfg)
            L = sae.cfg.d_sae
            self.states[name] = SAEState(
                name=name,
                sae=sae,
                optimizer=optimizer,
                steps_since_fired_L=torch.zeros(L, dtype=torch.long, device=self.device),
                fire_count_L=torch.zeros(L, dtype=torch.long, device=self.device),
                autotuner=tuner,
                autotuned=tuned,
                train_cfg=_with_sae_overrides(cfg, name, sae),
            )

    # ----- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.total_steps
        if not self.norms_estimated:
            self._estimate_input_norms()
        start_step, start_time = self.step, time.perf_counter()
        bar = _ProgressBar(total, enabled=self.progress and dist_utils.is_main())
        bar.start(self.step)
        try:
            while self.step < total:
                x_BD = self.source.next_batch(self.local_batch_size).to(self.device, non_blocking=True)
                for state in self.states.values():
                    self._train_step(state, x_BD)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == total:
                    self._check_finite()
                    elapsed = time.perf_counter() - start_time
                    rate = (self.step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
                    self.history.append({"step": self.step, "samples_per_second": rate,
                                         **{f"{n}/{k}": v for n, s in self.states.items() for k, v in s.last.items()}})
                    bar.update(self.step, rate, self.states)
                if self.eval_fn and self.eval_every and self.step % self.eval_every == 0 and self.step < total:
                    self.history.append({"step": self.step, "eval": self.eval_fn(self.saes)})
                if self.checkpoint_path and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._check_finite()
                    self.save_checkpoint(self.checkpoint_path)
        finally:
            bar.stop()
        self._check_finite()
        if self.checkpoint_path:
            self.save_checkpoint(self.checkpoint_path)
        wall = time.perf_counter() - start_time
        done = (self.step - start_step) * cfg.batch_size
        return TrainResult(
            saes=self.saes,
            steps=self.step,
            samples=self.step * cfg.batch_size,
            wall_seconds=wall,
            samples_per_second=done / max(wall, 1e-9),
            final_stats={n: dict(s.last) for n, s in self.states.items()},
        )

    @property
    def saes(self) -> dict[str, SAE]:
        return {n: s.sae for n, s in self.states.items()}

    def _train_step(self, state: SAEState, x_BD: torch.Tensor) -> None:
        cfg, sae, step = self.cfg, state.sae, self.step
        lr = cfg.lr * lr_multiplier(step, state.train_cfg or cfg)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        coefficients = {}
        for name, (value, warm_up) in sae.coefficient_names().items():
            coefficients[name] = warmed_up(value, warm_up, step)
        if state.autotuner is not None and state.autotuned in coefficients:
            coefficients[state.autotuned] *= state.autotuner.multiplier
        ctx = StepContext(
            step=step,
            total_steps=cfg.total_steps,
            coefficients=coefficients,
            dead_mask_L=state.steps_since_fired_L > cfg.dead_feature_window,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            out = sae.train_forward(x_BD, ctx)
        # On CPU checking every step is free; on GPU it would sync, so parameters are checked at
        # log and checkpoint steps instead (nothing non-finite is ever saved either way).
        if self.device.type == "cpu" and not torch.isfinite(out.loss.detach()):
            raise TrainingDivergedError(
                f"loss of SAE '{state.name}' became {float(out.loss.detach())} at step {step} "
                f"(parts: { {k: float(v.detach()) for k, v in out.losses.items()} }); training stopped. "
                + (f"The last good checkpoint is {self.checkpoint_path}."
                   if self.checkpoint_path and self.checkpoint_path.exists() else "No checkpoint was written.")
            )
        state.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.distributed:
            dist_utils.average_gradients(sae.parameters())
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        state.optimizer.step()
        sae.after_step()
        with torch.no_grad():
            fired = dist_utils.any_rank(out.fired_L) if self.distributed else out.fired_L
            state.steps_since_fired_L += 1
            state.steps_since_fired_L[fired] = 0
            state.fire_count_L += fired.long()
        if state.autotuner is not None:
            l0 = float(out.l0)
            state.autotuner.update(step, dist_utils.mean_over_ranks(l0, self.device) if self.distributed else l0)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps:
            with torch.no_grad():
                x_s = sae.scale_input(x_BD)
                resid = (x_s - out.x_hat_BD.float()).pow(2).sum()
                var = (x_s - x_s.mean(0)).pow(2).sum()
            state.last = {
                "loss": float(out.loss.detach()),
                "l0": float(out.l0),
                "explained_variance": float(1 - resid / var.clamp_min(1e-12)),
                "dead_latents": int((state.steps_since_fired_L > cfg.dead_feature_window).sum()),
                "lr": lr,
                **{f"loss/{k}": float(v.detach()) for k, v in out.losses.items()},
                **{f"coef/{k}": v for k, v in coefficients.items()},
                **out.metrics,
            }
    def _check_finite(self) -> None:
        for state in self.states.values():
            for pname, p in state.sae.named_parameters():
                if not torch.isfinite(p).all():
                    raise TrainingDivergedError(
                        f"parameter {pname} of SAE '{state.name}' is not finite at step {self.step}; training stopped."
                    )

    @torch.no_grad()
    def _estimate_input_norms(self) -> None:
        """expected_average_only_in: scale inputs by √d_in / E‖x‖ (estimated here, folded at save)."""
        wanting = [s.sae for s in self.states.values() if s.sae.cfg.normalize_activations == "expected_average_only_in"]
        self.norms_estimated = True
        if not wanting:
            return
        norms = []
        for _ in range(self.cfg.n_batches_for_norm_estimate):
            norms.append(self.source.next_batch(self.local_batch_size).float().norm(dim=1).mean())
        mean_norm = float(torch.stack(norms).mean())
        if self.distributed:
            mean_norm = dist_utils.mean_over_ranks(mean_norm, self.device)
        scale = math.sqrt(self.source.d_in) / mean_norm
        for sae in wanting:
            sae.input_scale.fill_(scale)

    # ----- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": "saelab-checkpoint-v1",
            "step": self.step,
            "train_config": dataclasses.asdict(self.cfg),
            "norms_estimated": self.norms_estimated,
            "source": self.source.state_dict(),
            # Every rank's stream position (each reads its own share of the data).
            "sources": dist_utils.gather_objects(self.source.state_dict()) if self.distributed else None,
            "torch_rng": torch.get_rng_state(),
            "saes": {
                name: {
                    "architecture": s.sae.architecture,
                    "config": s.sae.cfg.to_dict(),
                    "state_dict": s.sae.state_dict(),
                    "optimizer": s.optimizer.state_dict(),
                    "steps_since_fired_L": s.steps_since_fired_L,
                    "fire_count_L": s.fire_count_L,
                    "autotuner": s.autotuner.state_dict() if s.autotuner is not None else None,
                }
                for name, s in self.states.items()
            },
        }

    def save_checkpoint(self, path: str | Path) -> None:
        state = self.checkpoint_state()  # collective under torchrun: every rank calls it
        if not dist_utils.is_main():
            return
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue exactly where the checkpoint left off. The SAEs' configs must match it."""
        path = Path(path)
        if not path.exists():
            raise FileFormatError(f"checkpoint {path} does not exist")
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a truncated or foreign file
            raise FileFormatError(f"checkpoint {path} cannot be read: {err}") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != "saelab-checkpoint-v1":
            raise FileFormatError(f"{path} is not a saelab checkpoint")
        saved_cfg = ckpt["train_config"]
        for key in ("batch_size", "samples", "lr", "lr_schedule", "lr_warmup_steps", "lr_decay_fraction", "seed"):
            if saved_cfg.get(key) != getattr(self.cfg, key):
                raise ConfigError(key, getattr(self.cfg, key), f"differs from the checkpoint's {saved_cfg.get(key)!r}; resume with the same config")
        if set(ckpt["saes"]) != set(self.states):
            raise ConfigError("saes", sorted(self.states), f"differ from the checkpoint's {sorted(ckpt['saes'])}")
        for name, saved in ckpt["saes"].items():
            state = self.states[name]
            if saved["architecture"] != state.sae.architecture:
                raise ConfigError(f"{name}.architecture", state.sae.architecture, f"checkpoint has {saved['architecture']!r}")
            mine = state.sae.cfg.to_dict()
            for key, value in saved["config"].items():
                if mine.get(key) != value:
                    raise ConfigError(f"{name}.{key}", mine.get(key), f"checkpoint was trained with {value!r}")
            state.sae.load_state_dict(saved["state_dict"])
            state.optimizer.load_state_dict(saved["optimizer"])
            state.steps_since_fired_L.copy_(saved["steps_since_fired_L"])
            state.fire_count_L.copy_(saved["fire_count_L"])
            if state.autotuner is not None and saved["autotuner"] is not None:
                state.autotuner.load_state_dict(saved["autotuner"])
        sources = ckpt.get("sources")
        if self.distributed or sources:
            if not sources or len(sources) != dist_utils.world_size():
                raise ConfigError("world_size", dist_utils.world_size(), f"differs from the checkpoint's "
                                  f"{len(sources) if sources else 1} processes; resume with the same number")
            self.source.load_state_dict(sources[dist_utils.rank()])
        else:
            self.source.load_state_dict(ckpt["source"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.norms_estimated = ckpt["norms_estimated"]
        self.step = int(ckpt["step"])


def build_sae(arch: str, **config: Any) -> SAE:
    """Construct a registered architecture from keyword config values."""
    cls = get_sae_class(arch)
    return cls(cls.config_class(**config))


class _ProgressBar:
    """A rich progress bar with samples/s, loss, L0, explained variance and dead latents."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self._progress = None

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.total, completed=step, info="")

    def update(self, step: int, rate: float, states: dict[str, SAEState]) -> None:
        if self._progress is None:
            return
        parts = [f"{rate:,.0f} samples/s"]
        for name, s in list(states.items())[:3]:
            if s.last:
                parts.append(
                    f"{name}: loss {s.last['loss']:.3g} L0 {s.last['l0']:.1f} "
                    f"EV {s.last['explained_variance']:.3f} dead {s.last['dead_latents']}"
                )
        if len(states) > 3:
            parts.append(f"(+{len(states) - 3} more)")
        self._progress.update(self._task, completed=step, info=" | ".join(parts))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
