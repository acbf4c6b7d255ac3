"""The trainer: N SAEs from one data stream, Adam, schedules, dead-latent tracking, checkpoints.

Every batch is drawn once and shown to every SAE (an L0 sweep or an architecture comparison pays
for data once). Checkpoints are one file written atomically, holding everything needed to
continue exactly: weights, optimiser and scheduler states, counters, autotuners, the data
stream's position, the training curve and the time spent (see training/checkpoint.py: safetensors
+ JSON, never a pickle). A NaN or inf loss, or a reconstruction that explodes, stops training
with a clear error before anything bad is saved. SIGINT/SIGTERM finish the step, save a
checkpoint and raise TrainingInterrupted.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from saelab import parallel as dist_utils
from saelab.data.protocol import ActivationSource, PairedSource, is_paired
from saelab.devices import PRECISIONS, bf16_emulation, emulated_bf16_warning, precision_autocast, resolve_precision
from saelab.errors import ConfigError, FileFormatError, TrainingDivergedError, TrainingInterrupted, require
from saelab.saes.base import SAE, StepContext
from saelab.saes.registry import get_sae_class
from saelab.training import checkpoint as ckpt_io
from saelab.training.progress import TrainingProgress

LRSchedule = Literal["constant", "cosine"]
# Seeds are 0 ≤ seed < 2³² (as the CLI's): runs add offsets and multipliers to them before torch's 64-bit seeds.
SEED_MAX = 2**32 - 1
# Divergence that stays finite: a training batch's squared reconstruction error above this many
# times the batch's total squared norm Σ‖x‖². An SAE that outputs zeros scores 1 and every
# architecture starts at ≤ 1 (measured: 0.70–0.99 at init on synth-mini, falling as it trains),
# so 1e4 (‖x̂‖ ≈ 100‖x‖) is never reached by a healthy run; lr 1e3 passes 1e6 within 5 steps.
EXPLODED_ERROR_RATIO = 1e4
# Settings --resume may change: they cannot change the trained weights.
RESUME_MAY_CHANGE = ("device", "checkpoint_every", "checkpoint_minutes", "log_every")
# `silent_latents` (logged beside the AuxK `dead_latents`) counts latents that fired on none of the last this
# many training samples (or of the last half of the steps so far, when fewer): the training-time estimate of the
# final evaluation's "dead" (never fires on the eval samples, 100k by default). AuxK's window (dead_feature_window
# steps) is often longer than a short run, so its count stays 0 however many latents are silent.
SILENT_WINDOW_SAMPLES = 100_000


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
    # auto: bf16 autocast where the device multiplies bf16 natively (saelab.devices), else fp32.
    # Parameters, optimiser state and metrics stay fp32 either way.
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # steps; 0 = only at the end when a checkpoint path is given
    checkpoint_minutes: float = 10.0  # also every this much wall time (0 = off) when a checkpoint path is given
    autotune_integral_gain: float | None = None  # None: SynthSAEBench's 3e-4 scaled to the run length

    def __post_init__(self) -> None:
        require(
            isinstance(self.samples, int) and self.samples > 0, "samples", self.samples, "must be a positive integer"
        )
        require(
            isinstance(self.batch_size, int) and self.batch_size > 0,
            "batch_size",
            self.batch_size,
            "must be a positive integer",
        )
        require(
            self.samples >= self.batch_size,
            "samples",
            self.samples,
            f"must be at least one batch (batch_size={self.batch_size})",
        )
        require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= SEED_MAX,
            "seed",
            self.seed,
            f"must be an integer from 0 to {SEED_MAX}",
        )
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be a positive number")
        require(
            self.lr_schedule in ("constant", "cosine"),
            "lr_schedule",
            self.lr_schedule,
            "must be 'constant' or 'cosine'",
        )
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "must be ≥ 0")
        require(self.precision in PRECISIONS, "precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        require(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction", self.lr_decay_fraction, "must be in [0, 1]")
        require(0 <= self.lr_end_factor <= 1, "lr_end_factor", self.lr_end_factor, "must be in [0, 1]")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be positive or None")
        require(self.dead_feature_window > 0, "dead_feature_window", self.dead_feature_window, "must be positive")
        require(self.log_every > 0, "log_every", self.log_every, "must be positive")
        require(
            isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
            "checkpoint_every",
            self.checkpoint_every,
            "must be an integer ≥ 0 (0 = none by step count)",
        )
        require(
            isinstance(self.checkpoint_minutes, (int, float))
            and math.isfinite(self.checkpoint_minutes)
            and self.checkpoint_minutes >= 0,
            "checkpoint_minutes",
            self.checkpoint_minutes,
            "must be a number ≥ 0 (0 = none by time)",
        )

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
    # Worst reconstruction-error ratio since the last divergence check (a tensor: no GPU sync per step).
    error_ratio: torch.Tensor | None = None
    error_ratio_step: int = 0


@dataclass
class TrainResult:
    saes: dict[str, SAE]
    steps: int
    samples: int
    wall_seconds: float  # training time over every session of the run (resumes included)
    samples_per_second: float  # this session's
    final_stats: dict[str, dict[str, float]]
    precision: str = "fp32"  # what the steps ran in (`auto` resolved)


def _make_autotuner(sae: SAE, cfg: TrainConfig):
    """The SynthSAEBench L0 autotuner for SAEs whose `autotune_target()` names a coefficient and target L0."""
    target = sae.autotune_target()
    if target is None:
        return None, None
    from saelab.training.l0_autotuner import L0Autotuner

    start = int(target.start_fraction * cfg.total_steps)
    # SynthSAEBench's gain (3e-4) is tuned for its 195,312 steps; a shorter run gets a gain scaled
    # up so the multiplier can travel as far (at most ~0.05 per step, far from unstable).
    gain = cfg.autotune_integral_gain
    if gain is None:
        gain = min(0.05, 3e-4 * max(1.0, REFERENCE_STEPS / cfg.total_steps))
    return L0Autotuner(target_l0=target.target_l0, start_step=start, integral_gain=gain), target.coefficient


def _with_sae_overrides(cfg: TrainConfig, name: str, sae: SAE) -> TrainConfig:
    from saelab.saes.base import TRAIN_OVERRIDE_KEYS

    overrides = sae.train_overrides()
    for key in overrides:
        require(
            key in TRAIN_OVERRIDE_KEYS,
            f"{name}.train_overrides",
            key,
            f"an SAE may only override {', '.join(TRAIN_OVERRIDE_KEYS)}",
        )
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
        run_config: dict[str, Any] | None = None,
        on_log: Callable[[int, dict[str, Any]], None] | None = None,
    ):
        """`run_config`: the caller's full configuration, stored in checkpoints (run.py compares it on resume).
        `on_log(step, entry)`: called with each new history entry (an experiment tracker, training/tracking.py)."""
        require(len(saes) > 0, "saes", saes, "need at least one SAE to train")
        require(isinstance(eval_every, int) and eval_every >= 0, "eval_every", eval_every, "must be an integer ≥ 0")
        for name, sae in saes.items():
            if sae.cfg.d_in != source.d_in:
                raise ConfigError(f"{name}.d_in", sae.cfg.d_in, f"does not match the data's width d_in={source.d_in}")
            if sae.cfg.d_out is not None:
                if not is_paired(source):
                    raise ConfigError(
                        f"{name}.d_out",
                        sae.cfg.d_out,
                        f"makes it a transcoder, but the data ({type(source).__name__}) has no targets; "
                        "train it on paired data such as a transcoder world (tc-mini)",
                    )
                d_out = cast(PairedSource, source).d_out
                if sae.cfg.d_out != d_out:
                    raise ConfigError(
                        f"{name}.d_out", sae.cfg.d_out, f"does not match the targets' width d_out={d_out}"
                    )
        # Transcoders train on (input, target) pairs; autoencoders trained beside them use the inputs.
        self.paired = any(sae.cfg.d_out is not None for sae in saes.values())
        self.cfg = cfg
        self.source = source
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.progress = progress
        self.run_config = run_config
        self.on_log = on_log
        self.device = torch.device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        warning = emulated_bf16_warning(self.precision, self.device)
        if warning and dist_utils.is_main():
            warnings.warn(warning, stacklevel=2)
        self.step = 0
        self.norms_estimated = False
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0  # training seconds of the sessions before a resume
        self._clock_start = time.perf_counter()
        self._stop_signal: int | None = None
        self._pending: tuple[Any, dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._last_save = time.monotonic()
        self.saved_step: int | None = None  # step of the checkpoint on disk, if this trainer wrote or read one
        self.states: dict[str, SAEState] = {}
        # Under torchrun each rank draws its share of every global batch (see saelab/parallel.py).
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
    def train(self, final_checkpoint: bool = True) -> TrainResult:
        """Train to the last step. `final_checkpoint=False` leaves saving the result to the caller
        (run.py saves the SAEs instead, so a full disk cannot cost the run its output)."""
        cfg = self.cfg
        total = cfg.total_steps
        self._stop_signal = None
        restore_handlers = self._install_signal_handlers()
        bar = TrainingProgress(total, enabled=self.progress and dist_utils.is_main())
        try:
            if not self.norms_estimated:
                self._estimate_input_norms()
            start_step, start_time = self.step, time.perf_counter()
            self._last_save = time.monotonic()
            bar.start(self.step)
            while self.step < total:
                if self._stop_signal is not None:
                    self._stop()
                y_BE = None
                if self.paired:
                    x_BD, y_BE = cast(PairedSource, self.source).next_pair(self.local_batch_size)
                    y_BE = y_BE.to(self.device, non_blocking=True)
                else:
                    x_BD = self.source.next_batch(self.local_batch_size)
                x_BD = x_BD.to(self.device, non_blocking=True)
                for state in self.states.values():
                    if y_BE is None:  # _train_step(state, x_BD) stays what it was for SAEs
                        self._train_step(state, x_BD)
                    else:
                        self._train_step(state, x_BD, y_BE)
                self.step += 1
                if self._pending is not None:
                    # This step's forward pass checked the parameters the pending snapshot holds.
                    self._check_exploded()
                    self._write(self._pending)
                if self.step % cfg.log_every == 0 or self.step == total:
                    self._check_finite()
                    self._check_exploded()
                    elapsed = time.perf_counter() - start_time
                    rate = (self.step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
                    self.history.append(
                        {
                            "step": self.step,
                            "samples_per_second": rate,
                            **{f"{n}/{k}": v for n, s in self.states.items() for k, v in s.last.items()},
                        }
                    )
                    if self.on_log is not None:
                        self.on_log(self.step, self.history[-1])
                    bar.update(self.step, rate, self.states)
                if self.eval_fn and self.eval_every and self.step % self.eval_every == 0 and self.step < total:
                    self.history.append({"step": self.step, "eval": self.eval_fn(self.saes)})
                    if self.on_log is not None:
                        self.on_log(self.step, self.history[-1])
                if self.checkpoint_path and self.step < total and self._checkpoint_due():
                    self._check_finite()
                    # Written after the next step's forward pass has checked these parameters, so a
                    # checkpoint never holds a reconstruction that already exploded.
                    self._pending = self._snapshot()
                    self._last_save = time.monotonic()
            self._pending = None
            if self._stop_signal is not None:
                self._stop()
            self._check_finite()
            self._check_exploded()
        finally:
            self._pending = None
            restore_handlers()
            bar.stop()
        if self.checkpoint_path and final_checkpoint:
            self.save_checkpoint(self.checkpoint_path)
        wall = time.perf_counter() - start_time
        done = (self.step - start_step) * cfg.batch_size
        return TrainResult(
            saes=self.saes,
            steps=self.step,
            samples=self.step * cfg.batch_size,
            wall_seconds=self.elapsed(),
            samples_per_second=done / max(wall, 1e-9),
            final_stats={n: dict(s.last) for n, s in self.states.items()},
            precision=self.precision,
        )

    def elapsed(self) -> float:
        """Training seconds over every session of this run (a resume carries the earlier ones over)."""
        return self.elapsed_before + (time.perf_counter() - self._clock_start)

    def _checkpoint_due(self) -> bool:
        cfg = self.cfg
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            return True
        if not cfg.checkpoint_minutes:
            return False
        due = time.monotonic() - self._last_save >= cfg.checkpoint_minutes * 60
        if self.distributed:
            # Saving is collective, so every rank must decide alike: at log steps, on rank agreement.
            if self.step % cfg.log_every:
                return False
            return dist_utils.mean_over_ranks(float(due), self.device) > 0
        return due

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT/SIGTERM only set a flag: the loop finishes the step, saves a checkpoint and raises
        TrainingInterrupted. A second signal stops at once. Only the main thread may install
        handlers; under torchrun one rank stopping alone would hang the others in their next
        collective, so there the defaults stay. Returns the function that puts the old ones back."""
        if self.distributed or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def restore() -> None:
            for sig, old in previous.items():
                try:
                    signal.signal(sig, old if old is not None else signal.SIG_DFL)
                except (ValueError, OSError):
                    pass
            previous.clear()

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                restore()
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self._stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # told to ignore it (a bench worker: its parent handles Ctrl-C and stops it)
                previous[sig] = signal.signal(sig, on_signal)
            except (ValueError, OSError):
                pass
        return restore

    def _stop(self) -> None:
        signum = self._stop_signal or signal.SIGINT
        name = signal.Signals(signum).name
        self._pending = None
        if self.checkpoint_path:
            self._check_finite()
            self.save_checkpoint(self.checkpoint_path)
            saved = f"checkpoint saved to {self.checkpoint_path} (step {self.step})"
        else:
            saved = "no checkpoint path was given, so the progress is lost"
        raise TrainingInterrupted(
            f"training interrupted by {name} at step {self.step}/{self.cfg.total_steps}; {saved}",
            exit_code=128 + signum,
        )

    @property
    def saes(self) -> dict[str, SAE]:
        return {n: s.sae for n, s in self.states.items()}

    def _train_step(self, state: SAEState, x_BD: torch.Tensor, y_BE: torch.Tensor | None = None) -> None:
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
            target_BE=y_BE if sae.cfg.d_out is not None else None,
        )
        with precision_autocast(self.precision, self.device):
            out = sae.train_forward(x_BD, ctx)
        # On CPU checking every step is free; on GPU it would sync, so parameters are checked at
        # log and checkpoint steps instead (nothing non-finite is ever saved either way).
        if self.device.type == "cpu" and not torch.isfinite(out.loss.detach()):
            raise TrainingDivergedError(
                f"loss of SAE '{state.name}' became {float(out.loss.detach())} at step {step} "
                f"(parts: { {k: float(v.detach()) for k, v in out.losses.items()} }); training stopped. "
                + _non_finite_data(x_BD, ctx.target_BE)
                + self._last_good()
            )
        # What the SAE predicts and its prediction, scaled: (s·x, x̂), or a transcoder's (s·y, x̂ + skip).
        target_s, pred = sae.step_prediction(x_BD, ctx, out.x_hat_BD)
        with torch.no_grad():
            # Finite divergence (see EXPLODED_ERROR_RATIO). The ε·numel term (mean square 1e-6) keeps an
            # all-zero batch from dividing by zero; it can only lower the ratio, never fire the check.
            x_s = target_s.float()
            ratio = (x_s - pred.float()).pow(2).sum() / (x_s.pow(2).sum() + 1e-6 * x_s.numel())
        state.error_ratio = ratio if state.error_ratio is None else torch.maximum(state.error_ratio, ratio)
        state.error_ratio_step = step
        if self.device.type == "cpu":  # free on CPU; on GPU checked at log and checkpoint steps (no sync)
            self._check_exploded()
        state.optimizer.zero_grad(set_to_none=True)
        with bf16_emulation(self.precision, self.device):  # the backward's products of saved bf16 tensors
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
                x_s = target_s
                resid = (x_s - pred.float()).pow(2).sum()
                var = (x_s - x_s.mean(0)).pow(2).sum()
            state.last = {
                "loss": float(out.loss.detach()),
                "l0": float(out.l0),
                "explained_variance": float(1 - resid / var.clamp_min(1e-12)),
                "dead_latents": int((state.steps_since_fired_L > cfg.dead_feature_window).sum()),
                # over the last half of the run so far when that is shorter: its start shows the initial SAE
                "silent_latents": int(
                    (
                        state.steps_since_fired_L
                        >= min(-(-SILENT_WINDOW_SAMPLES // cfg.batch_size), max(1, (step + 1) // 2))
                    ).sum()
                ),
                "lr": lr,
                **{f"loss/{k}": float(v.detach()) for k, v in out.losses.items()},
                **{f"coef/{k}": v for k, v in coefficients.items()},
                **out.metrics,
            }

    def _check_exploded(self) -> None:
        for state in self.states.values():
            if state.error_ratio is None:
                continue
            ratio = float(state.error_ratio)
            state.error_ratio = None
            if not ratio <= EXPLODED_ERROR_RATIO:
                lr = (state.last or {}).get("lr", self.cfg.lr)
                raise TrainingDivergedError(
                    f"SAE '{state.name}' diverged by step {state.error_ratio_step}: its squared reconstruction "
                    f"error reached {ratio:.3g} × the inputs' (a transcoder's targets') squared norm "
                    "(an SAE that outputs zeros scores 1; "
                    f"the limit is {EXPLODED_ERROR_RATIO:g}); training stopped; try a lower learning rate "
                    f"(lr={lr:g}). " + self._last_good()
                )

    def _last_good(self) -> str:
        if self.checkpoint_path and self.saved_step is not None:
            return f"The last good checkpoint is {self.checkpoint_path} (step {self.saved_step})."
        return "No checkpoint was written."

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
            sae.get_buffer("input_scale").fill_(scale)

    # ----- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "train_config": dataclasses.asdict(self.cfg),
            "precision": self.precision,  # `auto` resolved: what the steps so far ran in
            "norms_estimated": self.norms_estimated,
            "source": self.source.state_dict(),
            # Every rank's stream position (each reads its own share of the data).
            "sources": dist_utils.gather_objects(self.source.state_dict()) if self.distributed else None,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,  # the whole curve: run.json after a resume still shows all of it
            "elapsed_seconds": self.elapsed(),
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

    def _snapshot(self) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint as JSON + CPU tensor copies (None on ranks other than 0, which write nothing)."""
        state = self.checkpoint_state()  # collective under torchrun: every rank calls it
        if not dist_utils.is_main():
            return None
        tensors: dict[str, torch.Tensor] = {}
        encoded = ckpt_io.encode(state, tensors)
        header = {"step": self.step, "run_config": ckpt_io.encode(self.run_config, {})}
        return encoded, tensors, header

    def _write(
        self, snapshot: tuple[Any, dict[str, torch.Tensor], dict[str, Any]] | None, path: str | Path | None = None
    ) -> None:
        self._pending = None
        if snapshot is None:
            return
        target = Path(path) if path is not None else self.checkpoint_path
        assert target is not None
        ckpt_io.write(target, *snapshot)
        self.saved_step = snapshot[2]["step"]
        self._last_save = time.monotonic()

    def save_checkpoint(self, path: str | Path | None = None) -> None:
        """Write a checkpoint folder now (atomically: see training/checkpoint.py)."""
        self._write(self._snapshot(), path if path is not None else self.checkpoint_path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue exactly where the checkpoint left off. Every setting must match it, except the
        ones in RESUME_MAY_CHANGE, which cannot change the result."""
        path = Path(path)
        ckpt = ckpt_io.read(path)
        ckpt_io.require_keys(
            ckpt,
            (
                "step",
                "train_config",
                "norms_estimated",
                "source",
                "sources",
                "torch_rng",
                "history",
                "elapsed_seconds",
                "saes",
            ),
            "",
            path,
        )
        saved_cfg = ckpt["train_config"]
        ckpt_io.require_keys(saved_cfg, (), "train_config", path)
        # Precision is compared as run (`auto` resolved); checkpoints older than `precision` had autocast_bf16.
        used = ckpt.get("precision", "bf16" if saved_cfg.get("autocast_bf16") else "fp32")
        if used != self.precision:
            raise ConfigError(
                "precision",
                self.cfg.precision,
                f"runs in {self.precision} here but the checkpoint's steps ran in {used}; resume with --precision {used}",
            )
        for f in dataclasses.fields(TrainConfig):
            if f.name in RESUME_MAY_CHANGE or f.name == "precision":
                continue
            mine = getattr(self.cfg, f.name)
            if f.name not in saved_cfg:
                raise FileFormatError(f"checkpoint {path} is missing the key train_config.{f.name}")
            if saved_cfg[f.name] != mine:
                raise ConfigError(
                    f.name, mine, f"differs from the checkpoint's {saved_cfg[f.name]!r}; resume with the same config"
                )
        ckpt_io.require_keys(ckpt["saes"], (), "saes", path)
        if set(ckpt["saes"]) != set(self.states):
            raise ConfigError("saes", sorted(self.states), f"differ from the checkpoint's {sorted(ckpt['saes'])}")
        # Check everything before changing anything.
        for name, saved in ckpt["saes"].items():
            state = self.states[name]
            where = f"saes.{name}"
            ckpt_io.require_keys(
                saved,
                (
                    "architecture",
                    "config",
                    "state_dict",
                    "optimizer",
                    "steps_since_fired_L",
                    "fire_count_L",
                    "autotuner",
                ),
                where,
                path,
            )
            if saved["architecture"] != state.sae.architecture:
                raise ConfigError(
                    f"{name}.architecture", state.sae.architecture, f"checkpoint has {saved['architecture']!r}"
                )
            mine = state.sae.cfg.to_dict()
            ckpt_io.require_keys(saved["config"], (), f"{where}.config", path)
            for key, value in saved["config"].items():
                if key != "device" and mine.get(key) != value:
                    raise ConfigError(f"{name}.{key}", mine.get(key), f"checkpoint was trained with {value!r}")
            weights = saved["state_dict"]
            expected = state.sae.state_dict()
            ckpt_io.require_keys(weights, tuple(expected), f"{where}.state_dict", path)
            for key, value in expected.items():
                got = weights[key]
                if not isinstance(got, torch.Tensor) or got.shape != value.shape:
                    raise FileFormatError(
                        f"checkpoint {path}: {where}.state_dict.{key} has shape "
                        f"{tuple(getattr(got, 'shape', ()))}, the SAE's is {tuple(value.shape)}"
                    )
            ckpt_io.require_keys(saved["optimizer"], ("state", "param_groups"), f"{where}.optimizer", path)
            for key in ("steps_since_fired_L", "fire_count_L"):
                if not isinstance(saved[key], torch.Tensor) or saved[key].shape != (state.sae.cfg.d_sae,):
                    raise FileFormatError(f"checkpoint {path}: {where}.{key} is not a [{state.sae.cfg.d_sae}] tensor")
        for name, saved in ckpt["saes"].items():
            state = self.states[name]
            for part, target in (("state_dict", state.sae), ("optimizer", state.optimizer)):
                try:
                    target.load_state_dict(saved[part])
                except (KeyError, ValueError, TypeError, RuntimeError) as err:
                    raise FileFormatError(
                        f"checkpoint {path}: saes.{name}.{part} cannot be loaded: {_first_line(err)}"
                    ) from None
            state.steps_since_fired_L.copy_(saved["steps_since_fired_L"])
            state.fire_count_L.copy_(saved["fire_count_L"])
            if state.autotuner is not None and saved["autotuner"] is not None:
                state.autotuner.load_state_dict(saved["autotuner"])
        sources = ckpt.get("sources")
        try:
            if self.distributed or sources:
                if not sources or len(sources) != dist_utils.world_size():
                    raise ConfigError(
                        "world_size",
                        dist_utils.world_size(),
                        f"differs from the checkpoint's "
                        f"{len(sources) if sources else 1} processes; resume with the same number",
                    )
                self.source.load_state_dict(sources[dist_utils.rank()])
            else:
                self.source.load_state_dict(ckpt["source"])
            torch.set_rng_state(ckpt["torch_rng"])
        except (ConfigError, FileFormatError):
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as err:
            raise FileFormatError(
                f"checkpoint {path}: the data stream or RNG state cannot be restored: {_first_line(err)}"
            ) from None
        self.norms_estimated = bool(ckpt["norms_estimated"])
        self.history = list(ckpt["history"])
        self.elapsed_before = float(ckpt["elapsed_seconds"])
        self.step = int(ckpt["step"])
        self.saved_step = self.step


def _non_finite_data(x_BD: torch.Tensor, y_BE: torch.Tensor | None) -> str:
    """'The batch's targets hold 3 NaN or infinite values. ' when the data itself is bad, else ''."""
    parts = []
    for what, t in (("inputs", x_BD), ("targets", y_BE)):
        bad = 0 if t is None else int((~torch.isfinite(t)).sum())
        if bad:
            parts.append(f"The batch's {what} hold {bad} NaN or infinite value(s). ")
    return "".join(parts)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's full state (tensors on the CPU), e.g. to inspect it; loading never runs code."""
    return ckpt_io.read(path)


def build_sae(arch: str, **config: Any) -> SAE:
    """Construct a registered architecture from keyword config values."""
    cls = get_sae_class(arch)
    return cls(cls.config_class(**config))
