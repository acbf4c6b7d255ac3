"""Configuration dataclasses for ground-truth synthetic models.

Field names, defaults and the JSON layout (`to_dict` / `from_dict`) mirror SAELens 6.54's
`SyntheticModelConfig`, so a `synthetic_model_config.json` written by SAELens loads here
unchanged. saelab adds two correlation kinds SAELens cannot express in a config (an explicit
matrix and the Sparse-but-Wrong random generator); those carry a `"type"` key in JSON.

Every config validates itself on construction and raises `ConfigError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeGuard, cast

import torch

from saelab.dtypes import dtype_from_name
from saelab.errors import ConfigError, require

# =============================================================================
# helpers
# =============================================================================


def _is_number(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_number(prefix: str, name: str, value: Any) -> None:
    require(_is_number(value), f"{prefix}{name}", value, "must be a finite number")


def _check_int(name: str, value: Any, minimum: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
    require(value >= minimum, name, value, f"must be >= {minimum}")


def _kwargs_from(cls: type, d: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keep the dict's keys that are fields of `cls`; unknown keys are an error, not silently dropped."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(prefix or cls.__name__, unknown, f"unknown keys; valid keys are {sorted(names)}")
    return dict(d)


# =============================================================================
# firing probabilities
# =============================================================================


@dataclass
class FiringProbabilityConfig:
    """Base class: per-feature firing probabilities (before hierarchy compensation)."""

    generator_name: ClassVar[str] = ""

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["generator_name"] = self.generator_name
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], prefix: str = "firing_probability") -> FiringProbabilityConfig:
        if not isinstance(d, dict):
            raise ConfigError(prefix, d, "must be a JSON object with a generator_name")
        d = dict(d)
        name = d.pop("generator_name", None)
        cls = FIRING_PROBABILITY_CONFIGS.get(name)  # type: ignore[arg-type]
        if cls is None:
            raise ConfigError(f"{prefix}.generator_name", name, f"must be one of {sorted(FIRING_PROBABILITY_CONFIGS)}")
        return cls(**_kwargs_from(cls, d, prefix))


def _check_prob_range(prefix: str, min_prob: Any, max_prob: Any, strict: bool) -> None:
    _check_number(prefix, "min_prob", min_prob)
    _check_number(prefix, "max_prob", max_prob)
    require(0 < min_prob, f"{prefix}min_prob", min_prob, "must be > 0")
    require(max_prob <= 1, f"{prefix}max_prob", max_prob, "must be <= 1")
    if strict:
        require(min_prob < max_prob, f"{prefix}min_prob", min_prob, f"must be < max_prob ({max_prob})")
    else:
        require(min_prob <= max_prob, f"{prefix}min_prob", min_prob, f"must be <= max_prob ({max_prob})")


@dataclass
class ZipfianFiringProbabilityConfig(FiringProbabilityConfig):
    """p_r ∝ r^-exponent for rank r = 1..F, min-max rescaled onto [min_prob, max_prob] (descending)."""

    exponent: float = 1.0
    max_prob: float = 0.3
    min_prob: float = 0.01
    generator_name: ClassVar[str] = "zipfian"

    def __post_init__(self) -> None:
        p = "firing_probability."
        _check_number(p, "exponent", self.exponent)
        require(self.exponent > 0, p + "exponent", self.exponent, "must be > 0")
        _check_prob_range(p, self.min_prob, self.max_prob, strict=True)

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        if num_features == 1:
            return torch.tensor([self.max_prob], dtype=torch.float32)
        # Same float32 operation order as SAELens, so the values agree bit for bit.
        ranks = torch.arange(1, num_features + 1, dtype=torch.float32)
        q = 1.0 / ranks**self.exponent
        lo, hi = q.min(), q.max()
        return self.min_prob + (self.max_prob - self.min_prob) * (q - lo) / (hi - lo)


@dataclass
class LinearFiringProbabilityConfig(FiringProbabilityConfig):
    """p_i falls linearly from max_prob (feature 0) to min_prob (last feature)."""

    max_prob: float = 0.3
    min_prob: float = 0.01
    generator_name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_prob_range("firing_probability.", self.min_prob, self.max_prob, strict=False)

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        if num_features == 1:
            return torch.tensor([self.max_prob], dtype=torch.float32)
        return torch.linspace(self.max_prob, self.min_prob, num_features, dtype=torch.float32)


@dataclass
class RandomFiringProbabilityConfig(FiringProbabilityConfig):
    """p_i ~ Uniform[min_prob, max_prob], drawn from a CPU generator seeded with the model seed."""

    max_prob: float = 0.5
    min_prob: float = 0.01
    generator_name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        _check_prob_range("firing_probability.", self.min_prob, self.max_prob, strict=True)

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(seed)
        u = torch.rand(num_features, generator=gen, dtype=torch.float32)
        return self.min_prob + (self.max_prob - self.min_prob) * u


@dataclass
class ConstantFiringProbabilityConfig(FiringProbabilityConfig):
    """Every feature fires with the same probability."""

    probability: float = 0.1
    generator_name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _check_number("firing_probability.", "probability", self.probability)
        require(0 <= self.probability <= 1, "firing_probability.probability", self.probability, "must be in [0, 1]")

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        return torch.full((num_features,), self.probability, dtype=torch.float32)


FIRING_PROBABILITY_CONFIGS: dict[str, type[FiringProbabilityConfig]] = {
    c.generator_name: c
    for c in (
        ZipfianFiringProbabilityConfig,
        LinearFiringProbabilityConfig,
        RandomFiringProbabilityConfig,
        ConstantFiringProbabilityConfig,
    )
}

# =============================================================================
# firing magnitudes (per-feature mean and std of the activation when a feature fires)
# =============================================================================


@dataclass
class MagnitudeConfig:
    """Base class: per-feature magnitude values."""

    generator_name: ClassVar[str] = ""

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["generator_name"] = self.generator_name
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], prefix: str) -> MagnitudeConfig:
        d = dict(d)
        name = d.pop("generator_name", None)
        cls = MAGNITUDE_CONFIGS.get(name)  # type: ignore[arg-type]
        if cls is None:
            raise ConfigError(f"{prefix}.generator_name", name, f"must be one of {sorted(MAGNITUDE_CONFIGS)}")
        try:
            return cls(**_kwargs_from(cls, d, prefix))
        except TypeError as err:  # a required field is missing
            raise ConfigError(prefix, d, str(err)) from None
        except ConfigError as err:  # name the config field it sits in, not the generic "magnitude"
            raise ConfigError(err.field.replace("magnitude", prefix, 1), err.value, err.reason) from None


@dataclass
class ConstantMagnitudeConfig(MagnitudeConfig):
    value: float = 1.0
    generator_name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _check_number("magnitude.", "value", self.value)

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        return torch.full((num_features,), self.value, dtype=torch.float32)


@dataclass
class LinearMagnitudeConfig(MagnitudeConfig):
    """value_i = start + (end - start) * i / (F - 1); both ends must be positive (as in SAELens)."""

    start: float
    end: float
    generator_name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            _check_number("magnitude.", name, getattr(self, name))
            require(getattr(self, name) > 0, f"magnitude.{name}", getattr(self, name), "must be > 0")

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        if num_features == 1:
            return torch.tensor([self.start], dtype=torch.float32)
        return torch.linspace(self.start, self.end, num_features, dtype=torch.float32)


@dataclass
class ExponentialMagnitudeConfig(MagnitudeConfig):
    """value_i = start * (end / start) ** (i / (F - 1)); both ends must be positive."""

    start: float
    end: float
    generator_name: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            _check_number("magnitude.", name, getattr(self, name))
            require(getattr(self, name) > 0, f"magnitude.{name}", getattr(self, name), "must be > 0")

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        if num_features == 1:
            return torch.tensor([self.start], dtype=torch.float32)
        t = torch.linspace(0, 1, num_features, dtype=torch.float32)
        return self.start * (self.end / self.start) ** t


@dataclass
class FoldedNormalMagnitudeConfig(MagnitudeConfig):
    """value_i = |N(mean, std²)|, optionally clamped to [min_value, max_value]."""

    mean: float = 0.0
    std: float = 0.1
    min_value: float | None = None
    max_value: float | None = None
    generator_name: ClassVar[str] = "folded_normal"

    def __post_init__(self) -> None:
        _check_number("magnitude.", "mean", self.mean)
        _check_number("magnitude.", "std", self.std)
        require(self.std > 0, "magnitude.std", self.std, "must be > 0")
        if self.min_value is not None:
            _check_number("magnitude.", "min_value", self.min_value)
            require(self.min_value >= 0, "magnitude.min_value", self.min_value, "must be >= 0")
        if self.max_value is not None:
            _check_number("magnitude.", "max_value", self.max_value)
            require(self.max_value > 0, "magnitude.max_value", self.max_value, "must be > 0")
        if self.min_value is not None and self.max_value is not None:
            require(self.min_value <= self.max_value, "magnitude.min_value", self.min_value, "must be <= max_value")

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        gen = torch.Generator()  # always CPU, so values do not depend on the device
        if seed is not None:
            gen.manual_seed(seed)
        values = (self.mean + torch.randn(num_features, generator=gen) * self.std).abs()
        if self.min_value is not None or self.max_value is not None:
            values = values.clamp(min=self.min_value, max=self.max_value)
        return values


MAGNITUDE_CONFIGS: dict[str, type[MagnitudeConfig]] = {
    c.generator_name: c
    for c in (ConstantMagnitudeConfig, LinearMagnitudeConfig, ExponentialMagnitudeConfig, FoldedNormalMagnitudeConfig)
}

MagnitudeSpec = float | MagnitudeConfig


def generate_magnitudes(num_features: int, spec: MagnitudeSpec, seed: int | None = None) -> torch.Tensor:
    """Per-feature magnitudes from a float (constant) or a MagnitudeConfig; float32, shape (F,)."""
    if isinstance(spec, MagnitudeConfig):
        return spec.generate(num_features, seed=seed)
    return torch.full((num_features,), float(spec), dtype=torch.float32)


def _magnitude_from_json(value: Any, name: str) -> MagnitudeSpec:
    if isinstance(value, dict):
        return MagnitudeConfig.from_dict(value, name)
    if not _is_number(value):
        raise ConfigError(name, value, "must be a number or an object with a generator_name")
    return float(value)


# =============================================================================
# correlation between firing events (Gaussian copula)
# =============================================================================


@dataclass
class CorrelationConfig:
    """Base class for the copula's correlation structure."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.kind != "low_rank":  # SAELens writes low-rank configs without a type tag
            d["type"] = self.kind
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CorrelationConfig:
        if not isinstance(d, dict):
            raise ConfigError("correlation", d, "must be a JSON object")
        d = dict(d)
        kind = d.pop("type", "low_rank")
        cls = CORRELATION_CONFIGS.get(kind)
        if cls is None:
            raise ConfigError("correlation.type", kind, f"must be one of {sorted(CORRELATION_CONFIGS)}")
        return cls(**_kwargs_from(cls, d, "correlation"))


@dataclass
class LowRankCorrelationConfig(CorrelationConfig):
    """Σ = F Fᵀ + diag(1 - ‖F_i‖²) with F_ij ~ N(0, correlation_scale²), F of shape (num_features, rank).

    `seed` is kept for file compatibility; like SAELens, the factor is drawn with model seed + 4.
    """

    rank: int = 32
    correlation_scale: float = 0.1
    seed: int | None = None
    kind: ClassVar[str] = "low_rank"

    def __post_init__(self) -> None:
        _check_int("correlation.rank", self.rank, 1)
        _check_number("correlation.", "correlation_scale", self.correlation_scale)
        require(self.correlation_scale >= 0, "correlation.correlation_scale", self.correlation_scale, "must be >= 0")


@dataclass
class FullCorrelationConfig(CorrelationConfig):
    """An explicit num_features × num_features correlation matrix (symmetric, unit diagonal, PSD)."""

    matrix: list[list[float]] = field(default_factory=list)
    kind: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        if isinstance(self.matrix, torch.Tensor):
            self.matrix = self.matrix.tolist()
        require(
            isinstance(self.matrix, list) and len(self.matrix) > 0,
            "correlation.matrix",
            type(self.matrix).__name__,
            "must be a non-empty square matrix (list of rows)",
        )
        from saelab.synthetic.correlation import validate_correlation_matrix

        validate_correlation_matrix(torch.tensor(self.matrix, dtype=torch.float64), field_name="correlation.matrix")


@dataclass
class RandomCorrelationConfig(CorrelationConfig):
    """Random dense correlation matrix as in the Sparse-but-Wrong toy model.

    A `1 - uncorrelated_ratio` share of feature pairs is correlated with |rho| ~ U[min_strength,
    max_strength]; `positive_ratio` of those are positive. The matrix is then made PSD by clipping
    eigenvalues at 1e-6 and renormalised to unit diagonal. `seed=None` means model seed + 4.
    """

    positive_ratio: float = 0.5
    uncorrelated_ratio: float = 0.3
    min_strength: float = 0.3
    max_strength: float = 0.9
    seed: int | None = None
    kind: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        for name in ("positive_ratio", "uncorrelated_ratio", "min_strength", "max_strength"):
            v = getattr(self, name)
            _check_number("correlation.", name, v)
            require(0 <= v <= 1, f"correlation.{name}", v, "must be in [0, 1]")
        require(
            self.min_strength <= self.max_strength,
            "correlation.min_strength",
            self.min_strength,
            f"must be <= max_strength ({self.max_strength})",
        )


CORRELATION_CONFIGS: dict[str, type[CorrelationConfig]] = {
    c.kind: c for c in (LowRankCorrelationConfig, FullCorrelationConfig, RandomCorrelationConfig)
}

# =============================================================================
# hierarchy and orthogonalisation
# =============================================================================


@dataclass
class HierarchyConfig:
    """Forest of feature trees, generated breadth-first exactly as SAELens's `generate_hierarchy`.

    Depth 0 = roots. `branching_factor` is an int or an inclusive (min, max) range.
    """

    total_root_nodes: int = 100
    branching_factor: int | tuple[int, int] = 100
    max_depth: int = 2
    mutually_exclusive_portion: float = 0.0
    mutually_exclusive_min_depth: int = 0
    mutually_exclusive_max_depth: int | None = None
    compensate_probabilities: bool = False
    scale_children_by_parent: bool = False

    def __post_init__(self) -> None:
        p = "hierarchy."
        _check_int(p + "total_root_nodes", self.total_root_nodes, 1)
        bf = self.branching_factor
        if isinstance(bf, list):
            bf = self.branching_factor = cast("tuple[int, int]", tuple(bf))  # JSON has no tuples; checked below
        if isinstance(bf, tuple):
            require(len(bf) == 2, p + "branching_factor", bf, "must be an int or a (min, max) pair")
            _check_int(p + "branching_factor[0]", bf[0], 2)
            _check_int(p + "branching_factor[1]", bf[1], 2)
            require(bf[0] <= bf[1], p + "branching_factor", bf, "min must be <= max")
        else:
            _check_int(p + "branching_factor", bf, 2)
        _check_int(p + "max_depth", self.max_depth, 1)
        _check_number(p, "mutually_exclusive_portion", self.mutually_exclusive_portion)
        require(
            0.0 <= self.mutually_exclusive_portion <= 1.0,
            p + "mutually_exclusive_portion",
            self.mutually_exclusive_portion,
            "must be in [0, 1]",
        )
        _check_int(p + "mutually_exclusive_min_depth", self.mutually_exclusive_min_depth, 0)
        if self.mutually_exclusive_max_depth is not None:
            _check_int(p + "mutually_exclusive_max_depth", self.mutually_exclusive_max_depth, 0)
            require(
                self.mutually_exclusive_max_depth >= self.mutually_exclusive_min_depth,
                p + "mutually_exclusive_max_depth",
                self.mutually_exclusive_max_depth,
                "must be >= mutually_exclusive_min_depth",
            )
        for name in ("compensate_probabilities", "scale_children_by_parent"):
            require(isinstance(getattr(self, name), bool), p + name, getattr(self, name), "must be true or false")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.branching_factor, tuple):
            d["branching_factor"] = list(self.branching_factor)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HierarchyConfig:
        return cls(**_kwargs_from(cls, d, "hierarchy"))


@dataclass
class OrthogonalizationConfig:
    """Adam on Σ_{i≠j}(d_i·d_j)² + F·Σ(‖d_i‖²−1)² for `num_steps` steps, then rows renormalised.

    `chunk_size` only mattered for SAELens's memory use; saelab never forms the F×F Gram, but
    keeps the field so configs round-trip.
    """

    num_steps: int = 200
    lr: float = 0.01
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        _check_int("orthogonalization.num_steps", self.num_steps, 0)
        _check_number("orthogonalization.", "lr", self.lr)
        require(self.lr > 0, "orthogonalization.lr", self.lr, "must be > 0")
        _check_int("orthogonalization.chunk_size", self.chunk_size, 1)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrthogonalizationConfig:
        return cls(**_kwargs_from(cls, d, "orthogonalization"))


# =============================================================================
# the model config
# =============================================================================

MODEL_DTYPES = ("float32", "float64")  # the sampler and orthogonaliser need full precision


@dataclass
class SyntheticModelConfig:
    """Everything that defines a synthetic model (not runtime options such as the device).

    Seed offsets follow SAELens: firing probabilities +0, std magnitudes +1, mean magnitudes +2,
    hierarchy +3, correlation +4; feature vectors and bias use the seed itself.
    """

    num_features: int
    hidden_dim: int
    firing_probability: FiringProbabilityConfig = field(default_factory=ZipfianFiringProbabilityConfig)
    hierarchy: HierarchyConfig | None = None
    orthogonalization: OrthogonalizationConfig | None = None
    correlation: CorrelationConfig | None = None
    std_firing_magnitudes: MagnitudeSpec = 0.0
    mean_firing_magnitudes: MagnitudeSpec = 1.0
    bias: bool | float = 1.0
    dtype: str = "float32"
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("num_features", self.num_features, 1)
        _check_int("hidden_dim", self.hidden_dim, 1)
        require(
            isinstance(self.firing_probability, FiringProbabilityConfig),
            "firing_probability",
            self.firing_probability,
            "must be a FiringProbabilityConfig",
        )
        require(
            self.hierarchy is None or isinstance(self.hierarchy, HierarchyConfig),
            "hierarchy",
            self.hierarchy,
            "must be a HierarchyConfig or None",
        )
        require(
            self.orthogonalization is None or isinstance(self.orthogonalization, OrthogonalizationConfig),
            "orthogonalization",
            self.orthogonalization,
            "must be an OrthogonalizationConfig or None",
        )
        require(
            self.correlation is None or isinstance(self.correlation, CorrelationConfig),
            "correlation",
            self.correlation,
            "must be a CorrelationConfig or None",
        )
        if isinstance(self.correlation, FullCorrelationConfig):
            n = len(self.correlation.matrix)
            require(
                n == self.num_features,
                "correlation.matrix",
                f"{n}x{n}",
                f"must be {self.num_features}x{self.num_features}",
            )
        for name in ("std_firing_magnitudes", "mean_firing_magnitudes"):
            v = getattr(self, name)
            require(
                isinstance(v, MagnitudeConfig) or _is_number(v),
                name,
                v,
                "must be a number or a MagnitudeConfig",
            )
        if _is_number(self.std_firing_magnitudes):
            require(
                self.std_firing_magnitudes >= 0, "std_firing_magnitudes", self.std_firing_magnitudes, "must be >= 0"
            )
        require(
            isinstance(self.bias, bool) or (_is_number(self.bias) and self.bias >= 0),
            "bias",
            self.bias,
            "must be true/false or a non-negative norm",
        )
        dt = self.dtype.removeprefix("torch.") if isinstance(self.dtype, str) else self.dtype
        dtype_from_name(dt, "dtype", allowed=MODEL_DTYPES)
        self.dtype = dt
        if self.seed is not None:
            _check_int("seed", self.seed, 0)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype, "dtype", allowed=MODEL_DTYPES)

    @property
    def saelens_compatible(self) -> bool:
        """SAELens configs can only express low-rank (or no) correlation."""
        return self.correlation is None or isinstance(self.correlation, LowRankCorrelationConfig)

    def to_dict(self) -> dict[str, Any]:
        def mag(v: MagnitudeSpec) -> Any:
            return v.to_dict() if isinstance(v, MagnitudeConfig) else v

        return {
            "num_features": self.num_features,
            "hidden_dim": self.hidden_dim,
            "firing_probability": self.firing_probability.to_dict(),
            "hierarchy": self.hierarchy.to_dict() if self.hierarchy is not None else None,
            "orthogonalization": self.orthogonalization.to_dict() if self.orthogonalization is not None else None,
            "correlation": self.correlation.to_dict() if self.correlation is not None else None,
            "std_firing_magnitudes": mag(self.std_firing_magnitudes),
            "mean_firing_magnitudes": mag(self.mean_firing_magnitudes),
            "bias": self.bias,
            "dtype": self.dtype,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticModelConfig:
        """Parse a dict written by `to_dict` here or by SAELens's `SyntheticModelConfig.to_dict`."""
        if not isinstance(d, dict):
            raise ConfigError("config", type(d).__name__, "must be a JSON object")
        d = _kwargs_from(cls, d, "config")
        for required in ("num_features", "hidden_dim"):
            if required not in d:
                raise ConfigError(required, None, "is required")
        out = dict(d)
        if "firing_probability" in d:
            out["firing_probability"] = FiringProbabilityConfig.from_dict(d["firing_probability"])
        for name, parse in (
            ("hierarchy", HierarchyConfig.from_dict),
            ("orthogonalization", OrthogonalizationConfig.from_dict),
            ("correlation", CorrelationConfig.from_dict),
        ):
            if d.get(name) is not None:
                if not isinstance(d[name], dict):
                    raise ConfigError(name, d[name], "must be a JSON object or null")
                out[name] = parse(d[name])
        for name in ("std_firing_magnitudes", "mean_firing_magnitudes"):
            if name in d:
                out[name] = _magnitude_from_json(d[name], name)
        return cls(**out)
