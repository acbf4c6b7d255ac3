"""The SAE protocol every architecture implements (the registry that names them is `saelab.saes.registry`).

An architecture is one file: a config dataclass (subclass of `SAEConfig`), an `SAE` subclass that
implements `encode` / `train_forward` (and optionally `aux_losses`, `after_step`,
`to_inference`), and a `@register_sae("name")` line. Nothing else needs editing to add one.

Shapes: B batch, D d_in, L d_sae (latents). Weights follow SAELens's layout on disk
(`W_enc` [D, L], `W_dec` [L, D]) so saved SAEs load in SAELens unchanged.

Transcoders (`d_out` set, SAELens's convention): the decoder writes the target's width E = d_out
(W_dec [L, E], b_dec [E] the output bias; the input is not centred, apply_b_dec_to_input False) and,
with `skip`, ŷ = decode(f) + x W_skipᵀ with W_skip [E, D]. The trainer hands the target batch over
in `StepContext.target_BE`; an architecture that sets `supports_transcoder` compares its
reconstructions with `loss_target(x, ctx)` (s·x for an autoencoder) instead of the scaled input.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from saelab.dtypes import dtype_from_name
from saelab.errors import ConfigError, require
from saelab.saes.kernels import SPARSE_MAX_DENSITY, SparseActs, gather_pre_acts, per_sample_sum  # noqa: F401 (re-exported)

NormalizeMode = Literal["none", "expected_average_only_in"]

_SAET = TypeVar("_SAET", bound="SAE")


@dataclass(kw_only=True)
class SAEConfig:
    """Fields shared by every architecture. Subclasses add their own (k, l1_coefficient, ...)."""

    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = 0.1
    normalize_activations: NormalizeMode = "none"
    dtype: str = "float32"
    device: str = "cpu"
    # Transcoder (SAELens's `d_out`): the decoder writes a target of this width, not the input; None = autoencoder.
    d_out: int | None = None
    # With d_out: a linear skip ŷ = decode(f) + x W_skipᵀ (SAELens's skip_transcoder), W_skip [d_out, d_in].
    skip: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(isinstance(self.d_in, int) and self.d_in > 0, "d_in", self.d_in, "must be a positive integer")
        require(isinstance(self.d_sae, int) and self.d_sae > 0, "d_sae", self.d_sae, "must be a positive integer")
        require(
            self.decoder_init_norm is None or self.decoder_init_norm > 0,
            "decoder_init_norm",
            self.decoder_init_norm,
            "must be positive or None",
        )
        require(
            self.normalize_activations in ("none", "expected_average_only_in"),
            "normalize_activations",
            self.normalize_activations,
            "must be 'none' or 'expected_average_only_in'",
        )
        dtype_from_name(self.dtype, "dtype")
        require(
            self.d_out is None or (isinstance(self.d_out, int) and not isinstance(self.d_out, bool) and self.d_out > 0),
            "d_out",
            self.d_out,
            "must be a positive integer (a transcoder's output width) or None (an autoencoder)",
        )
        require(isinstance(self.skip, bool), "skip", self.skip, "must be true or false")
        require(not self.skip or self.d_out is not None, "skip", self.skip, "needs d_out: only a transcoder has a skip")
        require(
            self.d_out is None or not self.apply_b_dec_to_input,
            "apply_b_dec_to_input",
            self.apply_b_dec_to_input,
            "must be False for a transcoder (d_out set): b_dec is the output's bias (as in SAELens)",
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.d_out is None and not self.skip:  # an autoencoder's dict stays what it always was
            del data["d_out"], data["skip"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring keys this config does not know (e.g. SAELens metadata)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def torch_dtype(name: str) -> torch.dtype:
    return dtype_from_name(name, "dtype")


def transcoder_fields(d_out: int, skip: bool) -> dict[str, Any]:
    """Config overrides that make a transcoder-capable architecture a transcoder writing `d_out` (with a skip)."""
    return {"d_out": d_out, "skip": skip, "apply_b_dec_to_input": False}


@dataclass(frozen=True)
class AutotuneTarget:
    """The trainer's L0 autotuner scales coefficient `coefficient` so the mean L0 reaches `target_l0`,
    from `start_fraction` of the run onwards."""

    coefficient: str
    target_l0: float
    start_fraction: float = 0.0

    def __post_init__(self) -> None:
        require(
            isinstance(self.coefficient, str) and bool(self.coefficient),
            "coefficient",
            self.coefficient,
            "must name one of the SAE's coefficients",
        )
        require(
            math.isfinite(self.target_l0) and self.target_l0 > 0,
            "target_l0",
            self.target_l0,
            "must be a finite number > 0",
        )
        require(0.0 <= self.start_fraction < 1.0, "autotune_start_fraction", self.start_fraction, "must be in [0, 1)")


@dataclass
class StepContext:
    """What the trainer tells an SAE about the current step."""

    step: int
    total_steps: int
    coefficients: dict[str, float] = field(default_factory=dict)
    dead_mask_L: torch.Tensor | None = None
    # A transcoder's target batch [B, d_out] in data units (None when training autoencoders).
    target_BE: torch.Tensor | None = None
    # Set by `SAE.loss_target`: this step's skip output (s·x) W_skipᵀ, detached (the trainer's checks add it to x̂).
    skip_BE: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What an SAE's training forward returns. `loss` is the sum of `losses`."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    x_hat_BD: torch.Tensor
    l0: torch.Tensor
    fired_L: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dense_acts(
        cls, losses: dict[str, torch.Tensor], x_hat_BD: torch.Tensor, acts_BL: torch.Tensor
    ) -> StepOutput:
        """The step of an SAE with dense codes: loss = Σ losses, L0 and firing read off acts_BL."""
        with torch.no_grad():
            active_BL = acts_BL != 0
            l0 = active_BL.sum(dim=-1).float().mean()
            fired_L = active_BL.any(dim=0)
        loss = sum(losses.values())
        assert isinstance(loss, torch.Tensor)
        return cls(loss=loss, losses=losses, x_hat_BD=x_hat_BD, l0=l0, fired_L=fired_L)


class SAE(nn.Module):
    """Base class: parameters, decoding, inference encoding and the SAELens-compatible layout.

    Subclasses must implement `encode` (inference) and `train_forward` (training). The default
    `train_forward` helpers cover the common "MSE + named sparsity losses" pattern.
    """

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # Component name -> config overrides that remove it; `register_ablations` turns each into a
    # variant "<arch>-no_<component>" (what `saelab bench --ablate ARCH` trains).
    ablations: ClassVar[dict[str, dict[str, Any]]] = {}
    # Whether the class trains as a transcoder (cfg.d_out set): its losses compare reconstructions
    # with `loss_target` rather than with the input. Off for code that reconstructs the input itself.
    supports_transcoder: ClassVar[bool] = False

    # Registered buffer (nn.Module types buffer attributes as `Tensor | Module`).
    input_scale: torch.Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        if cfg.d_out is not None and not type(self).supports_transcoder:
            raise ConfigError(
                "d_out",
                cfg.d_out,
                f"{type(self).__name__} does not train as a transcoder (its losses reconstruct the input)",
            )
        self.cfg = cfg
        dtype, device = torch_dtype(cfg.dtype), torch.device(cfg.device)
        D, L = cfg.d_in, cfg.d_sae
        E = cfg.d_out if cfg.d_out is not None else D  # what the decoder writes: the target's width, or D
        self.W_enc_DL = nn.Parameter(torch.empty(D, L, dtype=dtype, device=device))
        self.b_enc_L = nn.Parameter(torch.zeros(L, dtype=dtype, device=device))
        # Named for the autoencoder; a transcoder's are [L, d_out] and [d_out] (also as `W_dec_LE`).
        self.W_dec_LD = nn.Parameter(torch.empty(L, E, dtype=dtype, device=device))
        self.b_dec_D = nn.Parameter(torch.zeros(E, dtype=dtype, device=device))
        if cfg.skip:
            self.W_skip_ED = nn.Parameter(torch.zeros(E, D, dtype=dtype, device=device))  # SAELens: zeros at init
        # Inputs are multiplied by this before encoding (expected_average_only_in); folded at save.
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.reset_parameters()

    # ----- construction -------------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """SAELens init: W_dec kaiming-uniform rows rescaled to `decoder_init_norm`, W_enc = W_decᵀ.

        A transcoder's encoder reads another space than its decoder writes, so tying means nothing
        there: W_enc gets its own draw from the same distribution (after W_dec's), W_skip zeros."""
        with torch.no_grad():
            L, E = self.W_dec_LD.shape
            self.W_dec_LD.copy_(self._init_rows(L, E, generator))
            if self.cfg.d_out is None:
                self.W_enc_DL.copy_(self.W_dec_LD.t())
            else:
                self.W_enc_DL.copy_(self._init_rows(self.cfg.d_sae, self.cfg.d_in, generator).t())
            self.b_enc_L.zero_()
            self.b_dec_D.zero_()
            if self.cfg.skip:
                self.W_skip_ED.zero_()

    def _init_rows(self, L: int, D: int, generator: torch.Generator | None) -> torch.Tensor:
        """[L, D] kaiming-uniform rows (fan_in = D, gain √2), each rescaled to `decoder_init_norm`."""
        bound = math.sqrt(6.0 / D)
        W_LD = torch.empty(L, D, dtype=self.W_dec_LD.dtype, device=self.W_dec_LD.device)
        W_LD.uniform_(-bound, bound, generator=generator)
        if self.cfg.decoder_init_norm is not None:
            W_LD.mul_(self.cfg.decoder_init_norm / W_LD.norm(dim=1, keepdim=True))
        return W_LD

    @classmethod
    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides: Any) -> SAEConfig:
        """This architecture's benchmark configuration for a target L0 (SynthSAEBench settings).

        TopK-style SAEs set k = L0; penalty-based ones autotune their coefficient toward it.
        `overrides` replace any field."""
        raise ConfigError("arch", cls.architecture, "does not define config_for_l0(); pass its config explicitly")

    @classmethod
    def from_config(cls, cfg: SAEConfig | dict[str, Any]) -> SAE:
        if isinstance(cfg, dict):
            cfg = cls.config_class.from_dict(cfg)
        return cls(cfg)

    # ----- forward pieces ----------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of what the decoder writes: the target's for a transcoder, d_in for an autoencoder."""
        return self.cfg.d_out if self.cfg.d_out is not None else self.cfg.d_in

    @property
    def W_dec_LE(self) -> torch.Tensor:
        """The decoder [L, d_out] (= W_dec_LD; the name transcoder metrics read)."""
        return self.W_dec_LD

    def scale_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """s·x in the SAE's dtype; s is the input normalisation factor (1 unless normalising).

        Training losses are computed in these scaled units (as SAELens does)."""
        x_BD = x_BD.to(self.W_enc_DL.dtype)
        if self.cfg.normalize_activations != "none":
            x_BD = x_BD * self.input_scale.to(x_BD.dtype)
        return x_BD

    def scaled_target(self, x_BD: torch.Tensor, ctx: StepContext | None) -> torch.Tensor:
        """What the SAE predicts, in scaled units: s·x, or for a transcoder s·y with y = ctx.target_BE.

        The target shares the input's scale s, so W_skip means the same in scaled and data units."""
        if self.cfg.d_out is None:
            return self.scale_input(x_BD)
        y_BE = ctx.target_BE if ctx is not None else None
        if y_BE is None:
            raise ConfigError(
                "target",
                None,
                f"{type(self).__name__} is a transcoder (d_out={self.cfg.d_out}): train it on paired data",
            )
        return self.scale_input(y_BE)

    def skip_out(self, x_BD: torch.Tensor) -> torch.Tensor | None:
        """The skip's output (s·x) W_skipᵀ in scaled units (None without a skip)."""
        if not self.cfg.skip:
            return None
        return self.scale_input(x_BD) @ self.W_skip_ED.t()

    def loss_target(
        self, x_BD: torch.Tensor, ctx: StepContext | None, x_s_BD: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the decoder output x̂ is trained to match, in scaled units.

        Autoencoder: s·x (`x_s_BD` when the caller has it). Transcoder: s·y, minus the skip output when
        there is one. ‖x̂ + skip − s·y‖ = ‖x̂ − (s·y − skip)‖, so every reconstruction an architecture
        compares with this (full width, Matryoshka prefixes, AuxK residuals) is compared with what the
        latents must add, and W_skip learns through the subtraction."""
        if self.cfg.d_out is None:
            return x_s_BD if x_s_BD is not None else self.scale_input(x_BD)
        y_s_BE = self.scaled_target(x_BD, ctx)
        skip_BE = self.skip_out(x_BD)
        if skip_BE is None:
            return y_s_BE
        if ctx is not None:
            ctx.skip_BE = skip_BE.detach()
        return y_s_BE - skip_BE

    @torch.no_grad()
    def step_prediction(
        self, x_BD: torch.Tensor, ctx: StepContext, x_hat_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, prediction) of a training step in scaled units, for the trainer's checks and logs:
        (s·x, x̂) for an autoencoder, (s·y, x̂ + skip) for a transcoder."""
        target = self.scaled_target(x_BD, ctx)
        if not self.cfg.skip:
            return target, x_hat_BD
        skip_BE = ctx.skip_BE if ctx.skip_BE is not None else self.skip_out(x_BD)
        assert skip_BE is not None  # cfg.skip
        return target, x_hat_BD + skip_BE.to(x_hat_BD.dtype)

    def process_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Scale and centre the input: x̃ = s·x − b_dec (b_dec only if apply_b_dec_to_input)."""
        x_BD = self.scale_input(x_BD)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec_D
        return x_BD

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """hidden_pre = x̃ W_enc + b_enc."""
        return self.process_input(x_BD) @ self.W_enc_DL + self.b_enc_L

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Inference encoding: dense latent activations [B, L]."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode()")

    def decode(self, acts_BL: torch.Tensor) -> torch.Tensor:
        """x̂ = f W_dec + b_dec, mapped back to input units when inputs were scaled."""
        return self.unscale_output(self.reconstruct(acts_BL))

    def reconstruct(self, acts_BL: torch.Tensor) -> torch.Tensor:
        """x̂ in scaled units (the training target's units): f W_dec + b_dec."""
        return acts_BL.to(self.W_dec_LD.dtype) @ self.W_dec_LD + self.b_dec_D

    def reconstruct_sparse(self, acts: SparseActs, W_dec_LD: torch.Tensor | None = None) -> torch.Tensor:
        """Like `reconstruct`, touching only the active rows of W_dec (B·k·D work, not B·L·D)."""
        W_dec_LD = self.W_dec_LD if W_dec_LD is None else W_dec_LD
        return acts.decode_rows(W_dec_LD) + self.b_dec_D

    def decode_sparse(self, acts: SparseActs) -> torch.Tensor:
        return self.unscale_output(self.reconstruct_sparse(acts))

    def unscale_output(self, x_hat_BD: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize_activations != "none":
            return x_hat_BD / self.input_scale.to(x_hat_BD.dtype)
        return x_hat_BD

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x̂ = decode(encode(x)); a skip-transcoder adds x W_skipᵀ (SAELens: forward has the skip, decode not)."""
        out_BE = self.decode(self.encode(x_BD))
        skip_BE = self.skip_out(x_BD)
        if skip_BE is not None:
            out_BE = out_BE + self.unscale_output(skip_BE).to(out_BE.dtype)
        return out_BE

    # ----- training --------------------------------------------------------------------------
    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement train_forward()")

    def autotune_target(self) -> AutotuneTarget | None:
        """What the trainer's L0 autotuner steers for this SAE (None: no autotuning).

        Penalty-based SAEs with a target L0 return the coefficient to scale and when to start."""
        if type(self).autotuned_coefficient is SAE.autotuned_coefficient:
            return None
        # Classes written before this hook override `autotuned_coefficient` and keep `target_l0` in their config.
        name, target = self.autotuned_coefficient, getattr(self.cfg, "target_l0", None)
        if name is None or target is None:
            return None
        return AutotuneTarget(name, float(target), float(getattr(self.cfg, "autotune_start_fraction", 0.0)))

    @property
    def autotuned_coefficient(self) -> str | None:
        """Name of the coefficient the L0 autotuner scales (None: none); see `autotune_target`."""
        target = self.autotune_target()
        return None if target is None else target.coefficient

    def coefficient_names(self) -> dict[str, tuple[float, int]]:
        """Named sparsity coefficients as {name: (final value, warm-up steps)}; the trainer ramps them."""
        return {}

    def after_step(self) -> None:
        """Called after each optimiser step (projections such as clamping a threshold)."""

    def train_overrides(self) -> dict[str, Any]:
        """Trainer schedule settings this SAE brings with it (e.g. the recipe's own LR decay).

        Only keys of `TRAIN_OVERRIDE_KEYS`; the trainer applies them to this SAE alone."""
        return {}

    def to_inference(self) -> SAE:
        """An SAE for inference: the input scale and decoder norms folded into the weights.

        Architectures whose training form differs (BatchTopK → JumpReLU) override this.
        """
        sae = self.clone()
        sae.fold_input_scale()
        return sae

    # ----- shared weight surgery ------------------------------------------------------------------
    def clone(self: _SAET) -> _SAET:
        other = type(self)(dataclasses.replace(self.cfg))
        other.load_state_dict(self.state_dict())
        return other

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold the input scale s into the weights so raw inputs give the same codes and outputs.

        With x̃ = s·x − b_dec: W_enc keeps acting on s·x, so W_enc ← s·W_enc and b_dec ← b_dec/s
        with W_dec ← W_dec/s (codes unchanged, outputs already in input units).
        """
        if self.cfg.normalize_activations == "none":
            return
        s = float(self.input_scale)
        self.W_enc_DL.mul_(s)
        self.W_dec_LD.div_(s)
        self.b_dec_D.div_(s)
        self._fold_input_scale_extra(s)
        self.input_scale.fill_(1.0)
        self.cfg = dataclasses.replace(self.cfg, normalize_activations="none")

    def _fold_input_scale_extra(self, scale: float) -> None:
        """Hook for architectures with extra parameters in input units (none by default)."""

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Make decoder rows unit-norm, scaling encoder columns so x̂ is unchanged."""
        norms_L = self.W_dec_LD.norm(dim=1).clamp_min(1e-12)
        self.W_dec_LD.div_(norms_L.unsqueeze(1))
        self.W_enc_DL.mul_(norms_L.unsqueeze(0))
        self.b_enc_L.mul_(norms_L)
        self._fold_W_dec_norm_extra(norms_L)

    def _fold_W_dec_norm_extra(self, norms_L: torch.Tensor) -> None:
        """Hook for per-latent parameters in activation units (e.g. JumpReLU thresholds)."""

    # ----- SAELens on-disk layout --------------------------------------------------------------
    # Parameter names on disk (SAELens) ↔ here. Architectures with extra tensors extend this.
    saelens_names: ClassVar[dict[str, str]] = {
        "W_enc": "W_enc_DL",
        "b_enc": "b_enc_L",
        "W_dec": "W_dec_LD",
        "b_dec": "b_dec_D",
        "W_skip": "W_skip_ED",  # skip-transcoders only ([d_out, d_in], as SAELens)
    }

    def saelens_architecture(self) -> str:
        """The architecture name SAELens knows this (inference) SAE by."""
        return self.architecture

    def saelens_config(self) -> dict[str, Any]:
        """Architecture-specific keys of SAELens's cfg.json (besides d_in, d_sae, ...)."""
        return {}


TRAIN_OVERRIDE_KEYS = ("lr_decay_fraction", "lr_schedule", "lr_warmup_steps")


def mse_per_sample(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, per sample (SAELens's MSE is its batch mean)."""
    return (x_hat_BD - x_BD).pow(2).sum(dim=-1)
