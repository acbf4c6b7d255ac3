"""`SyntheticModel`: ground-truth features, how they fire, and the hidden activations they make.

hidden_BD = feature_acts_BF @ feature_vectors_FD + bias_D, with feature_acts drawn as described
in `saelab.synthetic.sampling`. Construction is deterministic in `cfg.seed` (SAELens's seed
offsets; everything is built on CPU, then moved), and sampling uses the model's own
`torch.Generator`, so the same seed gives the same stream.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from saelab.errors import ConfigError
from saelab.seeding import forked_generator
from saelab.synthetic.config import (
    FullCorrelationConfig,
    LowRankCorrelationConfig,
    RandomCorrelationConfig,
    SyntheticModelConfig,
    generate_magnitudes,
)
from saelab.synthetic.correlation import (
    LowRankCorrelation,
    generate_low_rank_correlation,
    generate_random_correlation_matrix,
    validate_correlation_matrix,
    validate_low_rank,
)
from saelab.synthetic.hierarchy import Hierarchy, generate_hierarchy
from saelab.synthetic.hierarchy_sampling import HierarchySampler
from saelab.synthetic.orthogonalize import orthogonalize
from saelab.synthetic.sampling import (
    FiringPlan,
    SparseFeatureActs,
    decode_sparse,
    draw_firing,
    draw_magnitudes,
    make_firing_plan,
    take,
    thresholds_from_probs,
)
from saelab.synthetic.threads import torch_threads

# Seed offsets from the base seed, as in SAELens; sampling gets its own, unused there.
SEED_OFFSET_STD, SEED_OFFSET_MEAN, SEED_OFFSET_HIERARCHY, SEED_OFFSET_CORRELATION = 1, 2, 3, 4
SEED_OFFSET_SAMPLING = 5

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _sampling_threads(method: _Fn) -> _Fn:
    """Run a sampling method with `self.sample_threads` torch threads when on CPU."""

    @functools.wraps(method)
    def wrapper(self: SyntheticModel, *args: Any, **kwargs: Any) -> Any:
        with torch_threads(self.sample_threads if self.device.type == "cpu" else None):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class SyntheticModel:
    """A seeded generator of synthetic activations with known ground-truth features.

    Attributes (tensors on `device`): feature_vectors_FD (unit rows), bias_D,
    firing_probabilities_F (after hierarchy compensation), mean_magnitudes_F, std_magnitudes_F;
    `hierarchy` (Hierarchy | None); `low_rank` (LowRankCorrelation | None) or
    `correlation_matrix_FF` (None unless a full/random matrix is configured).

    `sample_threads` (default 1) is the torch intra-op thread count used while sampling on CPU;
    None leaves torch's global setting alone. One thread is as fast or faster here: see
    `saelab.synthetic.threads`.
    """

    sample_threads: int | None = 1

    def __init__(
        self,
        cfg: SyntheticModelConfig,
        device: str | torch.device = "cpu",
        sample_seed: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        t0 = time.perf_counter()
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**62)
        seed = self.seed
        F, D = cfg.num_features, cfg.hidden_dim

        hierarchy = generate_hierarchy(F, cfg.hierarchy, seed=seed + SEED_OFFSET_HIERARCHY) if cfg.hierarchy else None
        low_rank, corr_FF = self._build_correlation(cfg, seed)

        # Feature vectors then bias from one generator seeded with the base seed (SAELens order).
        gen = torch.Generator().manual_seed(seed)
        vectors_FD = torch.randn(F, D, generator=gen, dtype=cfg.torch_dtype)
        vectors_FD = vectors_FD / vectors_FD.norm(dim=1, keepdim=True).clamp(min=1e-8)
        if cfg.bias:
            norm = 1.0 if cfg.bias is True else float(cfg.bias)
            bias_D = torch.randn(D, generator=gen, dtype=cfg.torch_dtype)
            bias_D = bias_D / bias_D.norm().clamp(min=1e-8) * norm
        else:
            bias_D = torch.zeros(D, dtype=cfg.torch_dtype)
        if cfg.orthogonalization is not None:
            vectors_FD = orthogonalize(vectors_FD, cfg.orthogonalization.num_steps, cfg.orthogonalization.lr, progress)

        base_probs_F = cfg.firing_probability.generate(F, seed=seed)
        probs_F = base_probs_F
        if hierarchy is not None and cfg.hierarchy is not None and cfg.hierarchy.compensate_probabilities:
            probs_F = (base_probs_F * hierarchy.probability_correction_factors(base_probs_F)).clamp(max=1.0)

        self._init_tensors(
            vectors_FD=vectors_FD,
            bias_D=bias_D,
            probs_F=probs_F,
            hierarchy=hierarchy,
            low_rank=low_rank,
            corr_FF=corr_FF,
            device=device,
            sample_seed=sample_seed,
        )
        self.base_firing_probabilities_F = base_probs_F.to(self.device)
        self.build_seconds = time.perf_counter() - t0

    @staticmethod
    def _build_correlation(
        cfg: SyntheticModelConfig, seed: int
    ) -> tuple[LowRankCorrelation | None, torch.Tensor | None]:
        c = cfg.correlation
        if isinstance(c, LowRankCorrelationConfig):
            # Like SAELens, the low-rank factor ignores c.seed and uses base seed + 4.
            return generate_low_rank_correlation(
                cfg.num_features, c.rank, c.correlation_scale, seed + SEED_OFFSET_CORRELATION
            ), None
        if isinstance(c, RandomCorrelationConfig):
            rseed = c.seed if c.seed is not None else seed + SEED_OFFSET_CORRELATION
            m = generate_random_correlation_matrix(
                cfg.num_features, c.positive_ratio, c.uncorrelated_ratio, c.min_strength, c.max_strength, rseed
            )
            return None, m
        if isinstance(c, FullCorrelationConfig):
            return None, torch.tensor(c.matrix, dtype=torch.float32)
        return None, None

    # ------------------------------------------------------------------ construction from parts
    @classmethod
    def from_parts(
        cls,
        cfg: SyntheticModelConfig,
        *,
        feature_vectors_FD: torch.Tensor,
        bias_D: torch.Tensor,
        firing_probabilities_F: torch.Tensor,
        hierarchy: Hierarchy | None = None,
        low_rank: LowRankCorrelation | None = None,
        correlation_matrix_FF: torch.Tensor | None = None,
        mean_magnitudes_F: torch.Tensor | None = None,
        std_magnitudes_F: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        sample_seed: int | None = None,
        seed: int | None = None,
    ) -> SyntheticModel:
        """Assemble a model from stored tensors (loading).

        Magnitudes not given are generated from the config with the SAELens seed offsets.
        `seed` overrides the base seed used for that and for the default sampling seed.
        """
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        self.cfg = cfg
        if seed is None:
            seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**62)
        self.seed = seed
        self._init_tensors(
            vectors_FD=feature_vectors_FD,
            bias_D=bias_D,
            probs_F=firing_probabilities_F,
            hierarchy=hierarchy,
            low_rank=low_rank,
            corr_FF=correlation_matrix_FF,
            device=device,
            sample_seed=sample_seed,
            mean_F=mean_magnitudes_F,
            std_F=std_magnitudes_F,
        )
        self.base_firing_probabilities_F = self.firing_probabilities_F.clone()
        self.build_seconds = time.perf_counter() - t0
        return self

    def _init_tensors(
        self,
        *,
        vectors_FD: torch.Tensor,
        bias_D: torch.Tensor,
        probs_F: torch.Tensor,
        hierarchy: Hierarchy | None,
        low_rank: LowRankCorrelation | None,
        corr_FF: torch.Tensor | None,
        device: str | torch.device,
        sample_seed: int | None,
        mean_F: torch.Tensor | None = None,
        std_F: torch.Tensor | None = None,
    ) -> None:
        cfg = self.cfg
        F, D = cfg.num_features, cfg.hidden_dim
        if tuple(vectors_FD.shape) != (F, D):
            raise ConfigError("feature_vectors", tuple(vectors_FD.shape), f"must have shape ({F}, {D})")
        if tuple(bias_D.shape) != (D,):
            raise ConfigError("bias", tuple(bias_D.shape), f"must have shape ({D},)")
        if tuple(probs_F.shape) != (F,):
            raise ConfigError("firing_probabilities", tuple(probs_F.shape), f"must have shape ({F},)")
        if not torch.isfinite(probs_F).all() or (probs_F < 0).any() or (probs_F > 1).any():
            raise ConfigError("firing_probabilities", "out of range", "must all lie in [0, 1]")
        if low_rank is not None:
            validate_low_rank(low_rank.factor_FR, low_rank.diag_F, F, where="")
        if corr_FF is not None:
            validate_correlation_matrix(corr_FF, "correlation_matrix")
        if hierarchy is not None and hierarchy.num_features != F:
            raise ConfigError(
                "hierarchy", hierarchy.num_features, f"was compiled for a different num_features than {F}"
            )
        if mean_F is None:
            mean_F = generate_magnitudes(F, cfg.mean_firing_magnitudes, seed=self.seed + SEED_OFFSET_MEAN)
        if std_F is None:
            std_F = generate_magnitudes(F, cfg.std_firing_magnitudes, seed=self.seed + SEED_OFFSET_STD)
        if hierarchy is not None and hierarchy.compiled.has_rescale:
            rescale_parents = hierarchy.compiled.parent_F[hierarchy.compiled.rescale_F]
            if rescale_parents.numel() and not (mean_F[rescale_parents] > 0).all():
                raise ConfigError(
                    "mean_firing_magnitudes", "<= 0 for a parent", "must be > 0 for parents that scale their children"
                )
        dtype = cfg.torch_dtype
        self.device = torch.device(device)
        self.feature_vectors_FD = vectors_FD.to(self.device, dtype).contiguous()
        self.bias_D = bias_D.to(self.device, dtype)
        self.firing_probabilities_F = probs_F.to(self.device, torch.float32)
        self.mean_magnitudes_F = mean_F.to(self.device, torch.float32)
        self.std_magnitudes_F = std_F.to(self.device, torch.float32)
        self.hierarchy = hierarchy
        self.low_rank = (
            LowRankCorrelation(low_rank.factor_FR.to(self.device), low_rank.diag_F.to(self.device))
            if low_rank
            else None
        )
        self.correlation_matrix_FF = corr_FF.to(self.device) if corr_FF is not None else None
        self.sample_seed = sample_seed if sample_seed is not None else self.seed + SEED_OFFSET_SAMPLING
        self._prepare_sampling()

    def _prepare_sampling(self) -> None:
        probs_F = self.firing_probabilities_F.cpu()
        factor = self.low_rank.factor_FR.cpu() if self.low_rank is not None else None
        diag = self.low_rank.diag_F.cpu() if self.low_rank is not None else None
        corr = self.correlation_matrix_FF.cpu() if self.correlation_matrix_FF is not None else None
        self._hsampler: HierarchySampler | None = None
        plan_probs_F = probs_F
        if self.hierarchy is not None:
            hs = HierarchySampler(
                self.hierarchy.compiled,
                lazy=corr is None,  # lazy children need the shared low-rank ε (or independence)
                thresholds_F=thresholds_from_probs(probs_F),
                scale_F=diag.sqrt() if diag is not None else torch.ones_like(probs_F),
                factor_FR=factor,
                mean_F=self.mean_magnitudes_F.cpu(),
                std_F=self.std_magnitudes_F.cpu(),
            )
            # Lazily drawn children are left out of the up-front firing draw.
            plan_probs_F = torch.where(hs.lazy_F, torch.zeros_like(probs_F), probs_F)
            self._hsampler = hs.to(self.device)
        self._plan: FiringPlan = make_firing_plan(plan_probs_F, factor_FR=factor, diag_F=diag, corr_FF=corr).to(
            self.device
        )
        self.generator = torch.Generator(device=self.device).manual_seed(self.sample_seed)

    # ------------------------------------------------------------------ basic properties
    @property
    def num_features(self) -> int:
        return self.cfg.num_features

    @property
    def hidden_dim(self) -> int:
        return self.cfg.hidden_dim

    def manual_seed(self, seed: int) -> SyntheticModel:
        """Restart the sampling stream from `seed`."""
        self.sample_seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        return self

    @contextlib.contextmanager
    def forked_stream(self, seed: int) -> Iterator[SyntheticModel]:
        """Inside the block the model samples the stream `seed` gives; afterwards its own stream
        continues exactly where it was (statistics and evaluations do not disturb training)."""
        with forked_generator(self.generator, seed):
            yield self

    def to(self, device: str | torch.device) -> SyntheticModel:
        """Move every tensor to `device`. The sampling stream restarts from `sample_seed` there."""
        device = torch.device(device)
        self.feature_vectors_FD = self.feature_vectors_FD.to(device)
        self.bias_D = self.bias_D.to(device)
        self.firing_probabilities_F = self.firing_probabilities_F.to(device)
        self.base_firing_probabilities_F = self.base_firing_probabilities_F.to(device)
        self.mean_magnitudes_F = self.mean_magnitudes_F.to(device)
        self.std_magnitudes_F = self.std_magnitudes_F.to(device)
        if self.low_rank is not None:
            self.low_rank = LowRankCorrelation(self.low_rank.factor_FR.to(device), self.low_rank.diag_F.to(device))
        if self.correlation_matrix_FF is not None:
            self.correlation_matrix_FF = self.correlation_matrix_FF.to(device)
        self.device = device
        self._plan = self._plan.to(device)
        self._hsampler = self._hsampler.to(device) if self._hsampler is not None else None
        self.generator = torch.Generator(device=device).manual_seed(self.sample_seed)
        return self

    # ------------------------------------------------------------------ sampling
    def _free_entries(
        self, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Firing + magnitudes of the features drawn up front, ε, and the batch key for children."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be a positive integer")
        b, f, eps_BR = draw_firing(self._plan, batch_size, self.generator)
        v = draw_magnitudes(f, self.mean_magnitudes_F, self.std_magnitudes_F, self.generator)
        batch_key = 0
        if self._hsampler is not None:
            batch_key = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.device).item())
        return b, f, v, eps_BR, batch_key

    @torch.no_grad()
    @_sampling_threads
    def sample_features_sparse(self, batch_size: int) -> SparseFeatureActs:
        """Ground-truth feature activations only, sparse (no decoding)."""
        b, f, v, eps_BR, batch_key = self._free_entries(batch_size)
        keep = (v > 0).nonzero().squeeze(1)  # a ReLU'd magnitude of 0 means "off", as in the dense path
        b, f, v = take(b, keep), take(f, keep), take(v, keep)
        if self._hsampler is not None:
            b, f, v = self._hsampler.apply_sparse(b, f, v, eps_BR, batch_key)
        return SparseFeatureActs(b, f, v, batch_size, self.num_features)

    @torch.no_grad()
    @_sampling_threads
    def sample_sparse(self, batch_size: int) -> tuple[torch.Tensor, SparseFeatureActs]:
        """(hidden_BD, sparse feature acts). Never forms dense B×F magnitudes or a B×F×D product."""
        acts = self.sample_features_sparse(batch_size)
        return decode_sparse(acts, self.feature_vectors_FD, self.bias_D), acts

    @torch.no_grad()
    def sample(self, batch_size: int) -> torch.Tensor:
        """hidden_BD for a fresh batch (fast sparse path)."""
        return self.sample_sparse(batch_size)[0]

    @torch.no_grad()
    @_sampling_threads
    def sample_with_features(self, batch_size: int, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_BD, dense feature_acts_BF).

        By default the fast sparse draw, densified (what evaluations want: same samples as
        `sample_sparse`). `reference=True` runs SAELens's dense algorithm instead: dense B×F
        magnitudes, the dense level-by-level hierarchy modifier and a dense B×F @ F×D decode.
        Both consume the same random numbers, so for the same generator state the feature
        activations are identical and hidden agrees up to float summation order.
        """
        if not reference:
            hidden_BD, acts = self.sample_sparse(batch_size)
            return hidden_BD, acts.to_dense()
        b, f, v, eps_BR, batch_key = self._free_entries(batch_size)
        acts_BF = torch.zeros(batch_size, self.num_features, device=self.device, dtype=torch.float32)
        acts_BF[b, f] = v
        if self._hsampler is not None:
            acts_BF = self._hsampler.apply_dense(acts_BF, eps_BR, batch_key)
        hidden_BD = acts_BF.to(self.feature_vectors_FD.dtype) @ self.feature_vectors_FD + self.bias_D
        return hidden_BD, acts_BF

    def __call__(self, batch_size: int) -> torch.Tensor:
        return self.sample(batch_size)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        from saelab.synthetic.persist import save_synthetic_model

        save_synthetic_model(self, path)

    def __repr__(self) -> str:
        return (
            f"SyntheticModel(num_features={self.num_features}, hidden_dim={self.hidden_dim}, "
            f"hierarchy={'yes' if self.hierarchy else 'no'}, device={self.device})"
        )
