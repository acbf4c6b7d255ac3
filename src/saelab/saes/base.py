"""The SAE protocol every architecture implements, and the registry that names them.

An architecture is one file: a config dataclass (subclass of `SAEConfig`), an `SAE` subclass that
implements `encode` / `train_forward` (and optionally `aux_losses`, `after_step`,
`to_inference`), and a `@register_sae("name")` line. Nothing else needs editing to add one.

Shapes: B batch, D d_in, L d_sae (latents). Weights follow SAELens's layout on disk
(`W_enc` [D, L], `W_dec` [L, D]) so saved SAEs load in SAELens unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from saelab.errors import ConfigError, require

NormalizeMode = Literal["none", "expected_average_only_in"]


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
        require(self.dtype in _DTYPES, "dtype", self.dtype, f"must be one of {sorted(_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring keys this config does not know (e.g. SAELens metadata)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass
class SparseActs:
    """Active latents of a batch as flat entries: sample `batch_idx`, latent `latent_idx`, `values`.

    Entries are ordered by sample (each sample's entries are contiguous), which lets the decoder
    run as one fused gather-scale-sum (`embedding_bag`) over only the active rows of W_dec.
    """

    batch_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor
    batch_size: int
    d_sae: int

    def offsets(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start of each sample's entries (optionally among the entries selected by `mask`)."""
        batch_idx = self.batch_idx if mask is None else self.batch_idx[mask]
        counts_B = torch.bincount(batch_idx, minlength=self.batch_size)
        return torch.cumsum(counts_B, 0) - counts_B

    def decode_rows(self, W_LD: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_entries value · W[latent] per sample, [B, D] (no bias)."""
        latent_idx, values = self.latent_idx, self.values
        if mask is not None:
            latent_idx, values = latent_idx[mask], values[mask]
        if latent_idx.numel() * 8 > self.batch_size * self.d_sae:
            # Dense enough (e.g. AuxK's d_in/2 latents per sample) that a matmul beats the gather.
            batch_idx = self.batch_idx if mask is None else self.batch_idx[mask]
            acts_BL = torch.zeros(self.batch_size, self.d_sae, dtype=W_LD.dtype, device=W_LD.device)
            acts_BL = acts_BL.index_put((batch_idx, latent_idx), values.to(W_LD.dtype))
            return acts_BL @ W_LD
        return F.embedding_bag(
            latent_idx, W_LD, self.offsets(mask), mode="sum", per_sample_weights=values.to(W_LD.dtype)
        )

    def masked(self, keep_N: torch.Tensor) -> SparseActs:
        """The entries where `keep_N` is True (order, and so the sample-major layout, preserved)."""
        return SparseActs(self.batch_idx[keep_N], self.latent_idx[keep_N], self.values[keep_N],
                          self.batch_size, self.d_sae)

    def to_dense(self) -> torch.Tensor:
        acts_BL = torch.zeros(self.batch_size, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        acts_BL[self.batch_idx, self.latent_idx] = self.values
        return acts_BL

    def l0(self) -> float:
        return float((self.values != 0).sum().item()) / max(self.batch_size, 1)

    def fired_L(self) -> torch.Tensor:
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        fired[self.latent_idx[self.values != 0]] = True
        return fired


class _GatherPreActs(torch.autograd.Function):
    """Values of h = (x_s − b_dec) W_enc + b_enc at chosen entries; backward visits only those.

    The input itself needs no gradient, so b_dec's gradient is −W_enc · Σ_N g (a D×L mat-vec)."""

    @staticmethod
    def forward(ctx, x_tilde_BD, b_dec_D, W_enc_DL, b_enc_L, hidden_pre_BL, batch_idx_N, latent_idx_N):
        ctx.save_for_backward(x_tilde_BD, W_enc_DL, batch_idx_N, latent_idx_N)
        ctx.d_sae = hidden_pre_BL.shape[1]
        ctx.has_b_dec = b_dec_D is not None
        return hidden_pre_BL[batch_idx_N, latent_idx_N]

    @staticmethod
    def backward(ctx, grad_N):
        x_tilde_BD, W_enc_DL, batch_idx_N, latent_idx_N = ctx.saved_tensors
        grad_N = grad_N.to(x_tilde_BD.dtype)
        grad_W = grad_b_dec = None
        grad_b_L = torch.zeros(ctx.d_sae, dtype=grad_N.dtype, device=grad_N.device).index_add_(0, latent_idx_N, grad_N)
        if ctx.needs_input_grad[2]:
            # ∂W_enc[:, l] = Σ_{entries of latent l} g · x̃[b]: a fused gather-scale-sum grouped by latent.
            order = torch.argsort(latent_idx_N)
            counts_L = torch.bincount(latent_idx_N, minlength=ctx.d_sae)
            grad_W_LD = F.embedding_bag(
                batch_idx_N[order], x_tilde_BD, torch.cumsum(counts_L, 0) - counts_L,
                mode="sum", per_sample_weights=grad_N[order],
            )
            grad_W = grad_W_LD.t()
        if ctx.has_b_dec and ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc_DL @ grad_b_L)
        grad_b = grad_b_L if ctx.needs_input_grad[3] else None
        return None, grad_b_dec, grad_W, grad_b, None, None, None


def gather_pre_acts(
    sae: SAE,
    x_tilde_BD: torch.Tensor,
    hidden_pre_BL: torch.Tensor,
    batch_idx_N: torch.Tensor,
    latent_idx_N: torch.Tensor,
) -> torch.Tensor:
    """h[batch_idx, latent_idx] with gradients to W_enc, b_enc and b_dec.

    `x_tilde_BD` (s·x − b_dec) and `hidden_pre_BL` (x̃ W_enc + b_enc) were computed without grad."""
    b_dec_D = sae.b_dec_D if sae.cfg.apply_b_dec_to_input else None
    return _GatherPreActs.apply(
        x_tilde_BD, b_dec_D, sae.W_enc_DL, sae.b_enc_L, hidden_pre_BL, batch_idx_N, latent_idx_N
    )


# Above this fraction of B·L entries, a sparse training path loses to dense matmuls.
SPARSE_MAX_DENSITY = 1 / 8


def per_sample_sum(values_N: torch.Tensor, batch_idx_N: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Σ of flat per-entry values within each sample, [B] (the sparse form of `.sum(dim=-1)`)."""
    return values_N.new_zeros(batch_size).index_add(0, batch_idx_N, values_N)


@dataclass
class StepContext:
    """What the trainer tells an SAE about the current step."""

    step: int
    total_steps: int
    coefficients: dict[str, float] = field(default_factory=dict)
    dead_mask_L: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What an SAE's training forward returns. `loss` is the sum of `losses`."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    x_hat_BD: torch.Tensor
    l0: torch.Tensor
    fired_L: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


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

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dtype, device = torch_dtype(cfg.dtype), torch.device(cfg.device)
        D, L = cfg.d_in, cfg.d_sae
        self.W_enc_DL = nn.Parameter(torch.empty(D, L, dtype=dtype, device=device))
        self.b_enc_L = nn.Parameter(torch.zeros(L, dtype=dtype, device=device))
        self.W_dec_LD = nn.Parameter(torch.empty(L, D, dtype=dtype, device=device))
        self.b_dec_D = nn.Parameter(torch.zeros(D, dtype=dtype, device=device))
        # Inputs are multiplied by this before encoding (expected_average_only_in); folded at save.
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.reset_parameters()

    # ----- construction -------------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """SAELens init: W_dec kaiming-uniform rows rescaled to `decoder_init_norm`, W_enc = W_decᵀ."""
        with torch.no_grad():
            L, D = self.W_dec_LD.shape
            bound = math.sqrt(6.0 / D)  # kaiming_uniform_ on a [L, D] tensor: fan_in = D, gain √2
            self.W_dec_LD.uniform_(-bound, bound, generator=generator)
            if self.cfg.decoder_init_norm is not None:
                self.W_dec_LD.mul_(self.cfg.decoder_init_norm / self.W_dec_LD.norm(dim=1, keepdim=True))
            self.W_enc_DL.copy_(self.W_dec_LD.t())
            self.b_enc_L.zero_()
            self.b_dec_D.zero_()

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

    def scale_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """s·x in the SAE's dtype; s is the input normalisation factor (1 unless normalising).

        Training losses are computed in these scaled units (as SAELens does)."""
        x_BD = x_BD.to(self.W_enc_DL.dtype)
        if self.cfg.normalize_activations != "none":
            x_BD = x_BD * self.input_scale.to(x_BD.dtype)
        return x_BD

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
        return self.decode(self.encode(x_BD))

    # ----- training --------------------------------------------------------------------------
    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement train_forward()")

    @property
    def autotuned_coefficient(self) -> str | None:
        """Name of the coefficient the trainer's L0 autotuner scales toward `cfg.target_l0` (None: none)."""
        return None

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
    def clone(self) -> SAE:
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
    }

    def saelens_architecture(self) -> str:
        """The architecture name SAELens knows this (inference) SAE by."""
        return self.architecture

    def saelens_config(self) -> dict[str, Any]:
        """Architecture-specific keys of SAELens's cfg.json (besides d_in, d_sae, ...)."""
        return {}


SAE_REGISTRY: dict[str, type[SAE]] = {}


def register_sae(name: str):
    """Class decorator: `@register_sae("topk")` makes the class available by name everywhere."""

    def wrap(cls: type[SAE]) -> type[SAE]:
        if not (isinstance(cls, type) and issubclass(cls, SAE)):
            raise ConfigError("architecture", name, "registered class must subclass saelab.saes.SAE")
        cls.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return wrap


TRAIN_OVERRIDE_KEYS = ("lr_decay_fraction", "lr_schedule", "lr_warmup_steps")


def register_variant(name: str, base: type[SAE], overrides: dict[str, Any]) -> type[SAE]:
    """Register `name` as `base` with config `overrides` applied on top of `base.config_for_l0`.

    A variant is a real registered architecture: it trains, saves and loads under its own name, so
    an ablation's results never mix with the full model's."""
    frozen = dict(overrides)

    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **more: Any) -> SAEConfig:
        return super(variant, cls).config_for_l0(d_in, d_sae, l0, total_steps, **{**frozen, **more})

    variant = type(f"{base.__name__}__{name.replace('-', '_')}", (base,), {
        "config_for_l0": classmethod(config_for_l0),
        "variant_overrides": frozen,
        "ablations": {},
        "__doc__": f"{base.architecture} with {frozen}.",
        "__module__": base.__module__,
    })
    return register_sae(name)(variant)


def register_ablations(base: type[SAE]) -> list[str]:
    """Register "<arch>-no_<component>" for each entry of `base.ablations`; returns the names."""
    names = []
    for component, overrides in base.ablations.items():
        name = f"{base.architecture}-no_{component}"
        register_variant(name, base, overrides)
        names.append(name)
    return names


def ablation_names(arch: str) -> list[str]:
    """The registered ablation variants of `arch` (ConfigError if it declares none)."""
    cls = get_sae_class(arch)
    if not cls.ablations:
        with_ablations = sorted(n for n, c in SAE_REGISTRY.items() if c.ablations)
        raise ConfigError("ablate", arch, f"declares no ablations; architectures with ablations: {', '.join(with_ablations) or 'none'}")
    return [f"{cls.architecture}-no_{component}" for component in cls.ablations]


def get_sae_class(name: str) -> type[SAE]:
    from saelab.saes import load_builtin_architectures

    load_builtin_architectures()
    if name in SAE_REGISTRY:
        return SAE_REGISTRY[name]
    if ":" in name:  # "my_module:MySAE" — a user's class, registered on import
        import importlib

        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError("arch", name, f"cannot import user architecture: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, SAE)):
            raise ConfigError("arch", name, "is not a subclass of saelab.saes.SAE")
        missing = [m for m in ("encode", "train_forward") if getattr(cls, m) is getattr(SAE, m)]
        if missing:
            raise ConfigError("arch", name, f"does not implement the SAE protocol: missing {', '.join(missing)}()")
        if not cls.architecture:
            cls.architecture = name
        SAE_REGISTRY.setdefault(name, cls)
        return cls
    raise ConfigError("arch", name, f"unknown architecture; known: {', '.join(sorted(SAE_REGISTRY))}")


def mse_per_sample(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, per sample (SAELens's MSE is its batch mean)."""
    return (x_hat_BD - x_BD).pow(2).sum(dim=-1)
