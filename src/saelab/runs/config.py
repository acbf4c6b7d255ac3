"""`RunConfig`: everything that defines a training run, as one typed dataclass.

It is the Python API and, through `saelab.cli.options`, the `saelab train` command line: each
field's default and help are stated here once. The data fields come from `DataSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from saelab.data.spec import DataSpec
from saelab.errors import require
from saelab.saes.registry import get_sae_class
from saelab.training.trainer import TrainConfig

# --transcoder: none trains SAEs; plain and skip train every architecture as that kind of transcoder.
TRANSCODER_KINDS = ("none", "plain", "skip")


def _opt(help: str, **cli: Any) -> dict[str, Any]:
    """Field metadata read by saelab.cli.options: the help text and how the command line spells it."""
    return {"help": help, **cli}


@dataclass(kw_only=True)
class RunConfig(DataSpec):
    """A run: each (arch, l0) pair is one SAE, all trained on the one shared stream."""

    arch: list[str] = field(
        default_factory=lambda: ["batchtopk"],
        metadata=_opt(
            "Architecture(s), trained together on one stream: a registered name, module:Class or path/file.py:Class."
        ),
    )
    l0: list[float] = field(
        default_factory=lambda: [12.0],
        metadata=_opt(
            "Target L0(s), e.g. --l0 10 12 14 or --l0 5..25.", cli_type=list[str], cli_default=["12"], parse="l0"
        ),
    )
    width: int = field(default=1024, metadata=_opt("SAE width (number of latents)."))
    samples: int = field(
        default=5_000_000,
        metadata=_opt("Training samples, e.g. 5M or 200k.", cli_type=str, cli_default="5M", parse="count"),
    )
    batch_size: int = field(default=1024, metadata=_opt("Samples per training step."))
    lr: float = field(default=3e-4, metadata=_opt("Adam learning rate (the mini protocol uses 2e-3)."))
    lr_schedule: str = field(default="constant", metadata=_opt("constant or cosine."))
    lr_warmup_steps: int = field(default=0, metadata=_opt("Linear learning-rate warm-up steps."))
    lr_decay_fraction: float = field(
        default=0.0,
        metadata=_opt("Linear decay to 0 over this final fraction of training (the mini protocol uses 1/3)."),
    )
    seed: int = field(default=0, metadata=_opt("Seed of the SAE initialisation and the data stream."))
    eval_samples: int = field(
        default=100_000,
        metadata=_opt("Samples for the final evaluation.", cli_type=str, cli_default="100k", parse="count"),
    )
    eval_every: int = field(default=0, metadata=_opt("Steps between evaluations during training (0 = off)."))
    device: str = field(default="cpu", metadata=_opt("cpu, cuda or cuda:N."))
    precision: str = field(
        default="auto",
        metadata=_opt(
            "auto, fp32 or bf16. auto: bf16 autocast where the device multiplies bf16 natively (CPUs with "
            "AMX/AVX512-BF16, bf16-capable GPUs), fp32 elsewhere; weights, Adam state and metrics stay fp32."
        ),
    )
    checkpoint_every: int = field(default=0, metadata=_opt("Steps between checkpoints (0 = none by step count)."))
    checkpoint_minutes: float = field(
        default=10.0, metadata=_opt("Minutes of wall time between checkpoints (0 = none by time).")
    )
    dead_feature_window: int = field(
        default=1000,
        metadata=_opt("Steps without firing before a latent counts as dead (AuxK; the mini protocol uses 100)."),
    )
    init_from: str | None = field(
        default=None,
        metadata=_opt(
            "Fine-tune: start from this pretrained SAE folder (any supported format); its architecture, "
            "width and L0 are what --arch, --width and --l0 default to.",
            metavar="DIR",
        ),
    )
    log_to: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "Mirror the training metrics (one namespace per SAE) and final scores to wandb and/or tensorboard "
            "(repeat or comma-list; offline, in the run folder; needs saelab[wandb] / saelab[tensorboard]).",
            metavar="SINK",
        ),
    )
    transcoder: str = field(
        default="none",
        metadata=_opt(
            "none, plain or skip. plain: train transcoders on paired data (a transcoder world such as tc-mini), "
            "the decoder predicting the target y from x; skip: plus a linear skip x W_skipᵀ (SAELens's "
            "skip_transcoder); none: SAEs on the inputs."
        ),
    )
    # On the command line: --option NAME=VALUE (every arch) or ARCH.NAME=VALUE, checked against the arch's config.
    arch_options: dict[str, Any] = field(default_factory=dict, metadata={"no_cli": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.arch = list(self.arch)
        self.l0 = [float(v) for v in self.l0]
        require(len(self.arch) > 0, "arch", self.arch, "name at least one architecture")
        require(len(self.l0) > 0, "l0", self.l0, "give at least one target L0")
        # width first: the L0 check below compares against it
        require(
            isinstance(self.width, int) and not isinstance(self.width, bool) and self.width > 0,
            "width",
            self.width,
            "must be a positive integer",
        )
        for v in self.l0:
            require(v > 0, "l0", v, "target L0 values must be positive")
            require(v <= self.width, "l0", v, f"must not exceed the width {self.width}")
        require(self.eval_samples > 0, "eval_samples", self.eval_samples, "must be positive")
        require(
            isinstance(self.eval_every, int) and self.eval_every >= 0,
            "eval_every",
            self.eval_every,
            "must be an integer ≥ 0 (0 = no evaluations during training)",
        )
        self.train_config()  # the optimisation fields (samples, batch, seed, lr, checkpoints) validate there
        require(
            self.transcoder in TRANSCODER_KINDS,
            "transcoder",
            self.transcoder,
            f"must be one of {', '.join(TRANSCODER_KINDS)}",
        )
        if self.init_from is not None:
            require(str(self.init_from).strip() != "", "init_from", self.init_from, "must name an SAE folder")
            self.init_from = str(self.init_from)
        from saelab.training.tracking import parse_sinks

        self.log_to = parse_sinks(self.log_to)
        for name in self.arch:
            get_sae_class(name)  # unknown names fail here, listing the known ones

    def data_spec(self) -> DataSpec:
        return DataSpec.from_options(self)

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
            precision=self.precision,
            checkpoint_every=self.checkpoint_every,
            checkpoint_minutes=self.checkpoint_minutes,
            dead_feature_window=self.dead_feature_window,
        )

    def sae_names(self) -> list[tuple[str, str, float]]:
        from saelab.saes.registry import arch_label

        return [(f"{arch_label(arch)}-l0_{l0:g}", arch, l0) for arch in self.arch for l0 in self.l0]
