"""Transcoder worlds: synthetic (input, target) pairs with a known map between true features.

A transcoder reads an input x (an MLP's input, say) and predicts a different target y (the MLP's
output). A `TranscoderWorld` makes such pairs with the answer known:

    x_BD = Σ_i a_i d_i + b_in + ξ                     the input side: a SynthSAEBench `SyntheticModel`
                                                      (Zipf firing, copula correlation, hierarchy,
                                                      superposition), reused unchanged, plus dense
                                                      ξ ~ N(0, input_noise_std² I)
    y_BE = Σ_j c_j(a) u_j + S x + b_out + ε           ε ~ N(0, noise_std² I)

Why ξ: without it S is not identifiable. A relay output is linear in a, and a is (nearly) linear in
x, so a skip-transcoder can move any error of its skip into its decoder rows, and its skip drifts
to the least-squares map from x to y (relative error 1.8 against S on tc-mini without ξ). S acts on
ξ too, and no sparse latent can reproduce ΔW ξ, so with ξ the only skip that fits is S itself.

with unit output directions u_j ∈ R^{d_out} (`u_out_FE`), a dense linear skip S [d_out, d_in]
(`skip_ED`), an output bias b_out (`bias_out_E`) and output codes c_j ≥ 0 computed from the input
activations a (a_i > 0 exactly when input feature i fires). Output feature j fires when c_j ≠ 0.

The map a → c (every gain g_j > 0; kinds in `KIND_NAMES`):

    relay        c_j = g_j · a_i                               most outputs
    fanout       c_j = g_j · a_i,  c_j' = g_j' · a_i           one input feeds two outputs,
                                                               g_j' = fanout_gain_ratio · g_j
    and          c_j = g_j · min(a_i, a_k)                     nonzero iff i and k both fire
    suppression  c_j = g_j · a_i · 1[a_k = 0]                  i passes through unless k fires

Output feature layout (F_in input features, F_out = F_in + num_fanout + num_and outputs):
  j < F_in                      input j's own output: relay, the first output of a fanout, or a
                                suppression (input j's relay replaced by its suppressed version);
  F_in ≤ j < F_in + num_fanout   second outputs of the fanouts, in order of their source input;
  the rest                      AND outputs, one per chosen pair.

Which inputs compute (construction, deterministic in `cfg.seed`): a pilot sample of the input
model (its own forked stream) estimates firing rates and pairwise co-firing rates. A pair (i, k)
is *usable* when neither is an ancestor of the other in the hierarchy (a child fires only with its
parent, so such an AND would copy the child) and P(i ∧ k) ≥ min_cofire_rate. Each computing
output has its own *owner* input i (owners are distinct across all computing outputs):
  - AND: owner i with a usable partner k (drawn uniformly among i's partners; pairs distinct);
  - suppression: owner (target) i with a usable suppressor k that also leaves
    P(i ∧ ¬k) ≥ min_cofire_rate, so the output both fires and gets suppressed often enough;
  - fanout: owner i with P(i) ≥ min_cofire_rate.
Partners and suppressors may repeat (a frequent feature can gate many outputs).

A fan-out is not identifiable from (x, y) as two features: its two outputs always fire together
with a fixed ratio, so y only sees a_i (g_j u_j + g_j' u_j'). A sparse transcoder that spends one
latent on it (decoder ∝ g_j u_j + g_j' u_j') is optimal and matches neither u_j nor u_j'
(`fanout_merged_direction`; `saelab.metrics.transcoder` scores both readings).

Interface for trainers and evaluators (`PairedSource`-compatible, see `saelab.data.protocol`):
    world.sample(B)                -> (x_BD, y_BE)
    world.next_pair(B)             -> (x_BD, y_BE)            same stream as `sample`
    world.next_batch(B)            -> x_BD                    inputs only (draws and drops the target)
    world.sample_sparse(B)         -> (x_BD, y_BE, acts, codes)   `SparseFeatureActs` of inputs / outputs
    world.sample_with_features(B)  -> (x_BD, y_BE, acts_BF, codes_BF)   dense
    world.generator                the one torch.Generator behind every draw (the input model's)
    world.manual_seed(s), world.forked_stream(s), world.state_dict(), world.load_state_dict(...)
    world.d_in (= hidden_dim), world.d_out, world.num_features (input), world.num_output_features
    world.u_out_FE, world.skip_ED, world.bias_out_E, world.output_kinds()  the ground truth
Each batch draws the input side first, then ξ, then ε from the same generator (none when a std is 0),
so one generator state is the whole stream position. Saved as a folder
(`saelab.synthetic.transcoder_persist`); `saelab.synthetic.load_source("tc-mini")` builds or loads one.

For trainers: the world itself is the paired source (d_in, d_out, next_pair, next_batch,
state_dict); `saelab.data.SyntheticSource` is not, since its next_batch returns `sample(B)`, which
here is a pair. For evaluators: `saelab.metrics.transcoder.evaluate_transcoder(tc, world, n, seed=s)`
scores any object with encode(x) -> acts, decode(acts) -> acts W_dec + b_dec (no skip, as in
SAELens), W_dec_LE [L, d_out] and W_skip_ED [d_out, d_in] or None. An SAE on the input side alone is
scored against `world.input_model` (a plain SyntheticModel) with `evaluate_sae_on_synthetic`.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from saelab.errors import ConfigError, require
from saelab.synthetic.config import OrthogonalizationConfig, SyntheticModelConfig
from saelab.synthetic.model import SyntheticModel
from saelab.synthetic.orthogonalize import orthogonalize
from saelab.synthetic.sampling import SparseFeatureActs, decode_sparse

KIND_RELAY, KIND_FANOUT, KIND_AND, KIND_SUPPRESSION = 0, 1, 2, 3
KIND_NAMES = ("relay", "fanout", "and", "suppression")
COMPUTING_KINDS = ("and", "suppression", "fanout")

# Seed offsets from the world's seed (the input model keeps its own seed and offsets).
SEED_OFFSET_DIRECTIONS, SEED_OFFSET_SKIP, SEED_OFFSET_BIAS = 0, 1, 2
SEED_OFFSET_GAINS, SEED_OFFSET_SELECT, SEED_OFFSET_PILOT = 3, 4, 5
# Pilot samples per chunk when counting co-firing pairs (bounds the pair-key memory).
_PILOT_CHUNK = 4096


# =============================================================================
# config
# =============================================================================


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
    require(value >= minimum, name, value, f"must be >= {minimum}")


@dataclass
class TranscoderWorldConfig:
    """Everything that defines a transcoder world (formulas: module docstring).

    input: the input side's SyntheticModelConfig (its own seed). d_out: output dimension.
    num_fanout / num_and / num_suppression: how many inputs get each computing kind.
    gain_min, gain_max: every gain g_j ~ U[gain_min, gain_max]; a fanout's second gain is
    fanout_gain_ratio × the first (default 1.5: the merged direction ∝ g u + 1.5 g u' then has
    |cos| < 0.9 with both u and u' whenever |u·u'| ≤ 0.3, so at the metrics' 0.9 threshold a
    merged latent never counts as either output; at ratio 3 it would count as u'). skip_scale: S = skip_scale · G / √d_out with G_ij ~ N(0, 1), so
    E_G ‖S x‖² = skip_scale² ‖x‖² (0 = no skip). bias_out: ‖b_out‖ (random direction).
    noise_std: per-dimension std of the output noise ε. input_noise_std: per-dimension std of the
    dense input part ξ (it makes S identifiable; see the module docstring). min_cofire_rate: the rate every AND output, every
    suppression output (and how often it is suppressed) and every fanout source must reach on the
    pilot sample of `pilot_samples` inputs. orthogonalization: applied to the u_j as to the input
    features (None: plain random unit vectors). seed: None draws one.
    """

    input: SyntheticModelConfig
    d_out: int
    num_fanout: int = 0
    num_and: int = 0
    num_suppression: int = 0
    gain_min: float = 0.5
    gain_max: float = 2.0
    fanout_gain_ratio: float = 1.5
    skip_scale: float = 0.0
    bias_out: float = 0.5
    noise_std: float = 0.0
    input_noise_std: float = 0.0
    min_cofire_rate: float = 1e-3
    pilot_samples: int = 65_536
    orthogonalization: OrthogonalizationConfig | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        require(
            isinstance(self.input, SyntheticModelConfig),
            "input",
            type(self.input).__name__,
            "must be a SyntheticModelConfig",
        )
        _int_at_least("d_out", self.d_out, 1)
        for name in ("num_fanout", "num_and", "num_suppression"):
            _int_at_least(name, getattr(self, name), 0)
        owners = self.num_fanout + self.num_and + self.num_suppression
        require(
            owners <= self.input.num_features,
            "num_fanout+num_and+num_suppression",
            owners,
            f"each computing output needs its own input feature; there are {self.input.num_features}",
        )
        for name in (
            "gain_min",
            "gain_max",
            "fanout_gain_ratio",
            "skip_scale",
            "bias_out",
            "noise_std",
            "input_noise_std",
            "min_cofire_rate",
        ):
            require(_finite(getattr(self, name)), name, getattr(self, name), "must be a finite number")
        require(self.gain_min > 0, "gain_min", self.gain_min, "must be > 0")
        require(self.gain_max >= self.gain_min, "gain_max", self.gain_max, f"must be >= gain_min ({self.gain_min})")
        require(
            self.fanout_gain_ratio > 0 and self.fanout_gain_ratio != 1,
            "fanout_gain_ratio",
            self.fanout_gain_ratio,
            "must be > 0 and differ from 1 (a fanout's two gains differ)",
        )
        for name in ("skip_scale", "bias_out", "noise_std", "input_noise_std"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(0 < self.min_cofire_rate <= 1, "min_cofire_rate", self.min_cofire_rate, "must be in (0, 1]")
        _int_at_least("pilot_samples", self.pilot_samples, 1)
        require(
            self.orthogonalization is None or isinstance(self.orthogonalization, OrthogonalizationConfig),
            "orthogonalization",
            self.orthogonalization,
            "must be an OrthogonalizationConfig or None",
        )
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)

    @property
    def num_output_features(self) -> int:
        return self.input.num_features + self.num_fanout + self.num_and

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input"] = self.input.to_dict()
        d["orthogonalization"] = self.orthogonalization.to_dict() if self.orthogonalization is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TranscoderWorldConfig:
        if not isinstance(d, dict):
            raise ConfigError("config", type(d).__name__, "must be a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError("config", unknown, f"unknown keys; valid keys are {sorted(names)}")
        for required in ("input", "d_out"):
            if required not in d:
                raise ConfigError(required, None, "is required")
        out = dict(d)
        out["input"] = SyntheticModelConfig.from_dict(d["input"])
        if d.get("orthogonalization") is not None:
            if not isinstance(d["orthogonalization"], dict):
                raise ConfigError("orthogonalization", d["orthogonalization"], "must be a JSON object or null")
            out["orthogonalization"] = OrthogonalizationConfig.from_dict(d["orthogonalization"])
        return cls(**out)


# =============================================================================
# choosing which inputs compute (pilot statistics)
# =============================================================================


@dataclass
class PilotStats:
    """Firing and co-firing rates of the input features on a pilot sample.

    rate_F[i] = #(a_i > 0)/n; pairs (pair_i_P < pair_k_P) with their co-firing rate pair_rate_P
    = #(a_i > 0 ∧ a_k > 0)/n, listed only for pairs of features that both have rate ≥ min_rate
    (a pair can never co-fire more often than its rarer member)."""

    n_samples: int
    rate_F: torch.Tensor
    pair_i_P: torch.Tensor
    pair_k_P: torch.Tensor
    pair_rate_P: torch.Tensor


@torch.no_grad()
def pilot_stats(model: SyntheticModel, n_samples: int, seed: int, min_rate: float) -> PilotStats:
    """Rates and co-firing rates from `n_samples` of `model`'s forked stream `seed` (its own
    stream is left where it was). Pairs are counted within each sample from the sorted sparse
    entries, never through a dense F×F matrix."""
    F = model.num_features
    counts_F = torch.zeros(F, dtype=torch.int64)
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (b, f) of each pilot chunk, on CPU
    with model.forked_stream(seed):
        done = 0
        while done < n_samples:
            bs = min(_PILOT_CHUNK, n_samples - done)
            acts = model.sample_features_sparse(bs)
            b, f = acts.batch_idx.cpu(), acts.feature_idx.cpu()
            counts_F += torch.bincount(f, minlength=F)
            chunks.append((b, f))
            done += bs
    rate_F = counts_F.double() / n_samples
    eligible_F = rate_F >= min_rate
    keys: list[torch.Tensor] = []
    for b, f in chunks:
        keep = eligible_F[f]
        b, f = b[keep], f[keep]
        order = torch.argsort(b * F + f)
        b, f = b[order], f[order]
        # Entry e pairs with entry e+s of the same sample, for every shift s (samples are contiguous).
        for s in range(1, int(f.numel())):
            same = b[s:] == b[:-s]
            if not bool(same.any()):
                break
            keys.append(f[:-s][same] * F + f[s:][same])
    if keys:
        unique_P, count_P = torch.unique(torch.cat(keys), return_counts=True)
    else:
        unique_P, count_P = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return PilotStats(n_samples, rate_F, unique_P // F, unique_P % F, count_P.double() / n_samples)


def _related_P(model: SyntheticModel, i_P: torch.Tensor, k_P: torch.Tensor) -> torch.Tensor:
    """True where one feature of the pair is a hierarchy ancestor of the other."""
    related = torch.zeros(i_P.shape, dtype=torch.bool)
    if model.hierarchy is None:
        return related
    parent_F = model.hierarchy.compiled.parent_F.cpu()
    for a, b in ((i_P, k_P), (k_P, i_P)):
        anc = a.clone()
        for _ in range(model.hierarchy.compiled.max_level + 1):
            has = anc >= 0
            anc = torch.where(has, parent_F[anc.clamp(min=0)], anc)
            related |= (anc == b) & (anc >= 0)
    return related


@dataclass
class ComputingChoice:
    """Owners and partners of the computing outputs (input feature indices, CPU long tensors)."""

    fanout_src: torch.Tensor
    and_src: torch.Tensor
    and_partner: torch.Tensor
    supp_target: torch.Tensor
    supp_suppressor: torch.Tensor


def choose_computing(
    cfg: TranscoderWorldConfig, model: SyntheticModel, stats: PilotStats, gen: torch.Generator
) -> ComputingChoice:
    """Draw the computing outputs' owners and partners (rules: module docstring).

    Order: AND owners, then suppression targets, then fanout sources, each uniformly among the
    inputs still free that qualify; raises ConfigError naming the count when too few qualify."""
    F = model.num_features
    m = cfg.min_cofire_rate
    usable = (stats.pair_rate_P >= m) & ~_related_P(model, stats.pair_i_P, stats.pair_k_P)
    pi, pk, pr = stats.pair_i_P[usable], stats.pair_k_P[usable], stats.pair_rate_P[usable]
    # Both orientations: owner first.
    own_P, oth_P, co_P = torch.cat([pi, pk]), torch.cat([pk, pi]), torch.cat([pr, pr])
    free_F = torch.ones(F, dtype=torch.bool)

    def draw(kind: str, count: int, pair_ok_P: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if count == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        if pair_ok_P is None:
            qualifies_F = (stats.rate_F >= m) & free_F
        else:
            qualifies_F = torch.zeros(F, dtype=torch.bool)
            qualifies_F[own_P[pair_ok_P]] = True
            qualifies_F &= free_F
        pool = qualifies_F.nonzero().squeeze(1)
        field = {"and": "num_and", "suppression": "num_suppression", "fanout": "num_fanout"}[kind]
        short = (
            f"only {{}} free input features qualify as {kind} owners at min_cofire_rate={m} "
            f"on {stats.n_samples} pilot samples; lower the count or the rate"
        )
        require(pool.numel() >= count, field, count, short.format(pool.numel()))
        order = pool[torch.randperm(pool.numel(), generator=gen)]
        if pair_ok_P is None:
            owners = order[:count].sort().values
            free_F[owners] = False
            return owners, torch.full_like(owners, -1)
        # Owners in random order; an owner whose only partners already paired with it is passed over.
        chosen: dict[int, int] = {}
        for i in order.tolist():
            cand = oth_P[pair_ok_P & (own_P == i)].sort().values
            if kind == "and":  # owner k with partner i already made the pair {i, k}
                taken = torch.tensor([k for k, p in chosen.items() if p == i], dtype=torch.long)
                cand = cand[~torch.isin(cand, taken)]
            if cand.numel() == 0:
                continue
            chosen[i] = int(cand[int(torch.randint(cand.numel(), (1,), generator=gen))])
            if len(chosen) == count:
                break
        require(len(chosen) == count, field, count, short.format(len(chosen)))
        owners = torch.tensor(sorted(chosen), dtype=torch.long)
        free_F[owners] = False
        return owners, torch.tensor([chosen[i] for i in owners.tolist()], dtype=torch.long)

    and_src, and_partner = draw("and", cfg.num_and, torch.ones_like(own_P, dtype=torch.bool))
    supp_ok = stats.rate_F[own_P] - co_P >= m  # P(i ∧ ¬k) = P(i) − P(i ∧ k)
    supp_target, supp_suppressor = draw("suppression", cfg.num_suppression, supp_ok)
    fanout_src, _ = draw("fanout", cfg.num_fanout, None)
    return ComputingChoice(fanout_src, and_src, and_partner, supp_target, supp_suppressor)


# =============================================================================
# the world
# =============================================================================


class TranscoderWorld:
    """Seeded (x, y) pairs with known output features, computing map and skip (module docstring).

    Ground truth (on `device`): u_out_FE [F_out, d_out] unit rows, skip_ED [d_out, d_in],
    bias_out_E, and per output feature kind_out_F (index into KIND_NAMES), src_out_F (owner
    input), other_out_F (AND partner / suppressor, −1 otherwise), gain_out_F. `input_model` is
    the input side's SyntheticModel.
    """

    def __init__(
        self,
        cfg: TranscoderWorldConfig,
        device: str | torch.device = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ):
        t0 = time.perf_counter()
        require(isinstance(cfg, TranscoderWorldConfig), "cfg", type(cfg).__name__, "must be a TranscoderWorldConfig")
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**62)
        s = self.seed
        # Built on CPU, then moved: the choice of computing inputs does not depend on the device.
        model = SyntheticModel(cfg.input, device="cpu", progress=progress)
        F, D, E = cfg.input.num_features, cfg.input.hidden_dim, cfg.d_out
        F_out = cfg.num_output_features
        dtype = cfg.input.torch_dtype

        if cfg.num_and + cfg.num_suppression + cfg.num_fanout > 0:
            stats = pilot_stats(model, cfg.pilot_samples, s + SEED_OFFSET_PILOT, cfg.min_cofire_rate)
            choice = choose_computing(cfg, model, stats, torch.Generator().manual_seed(s + SEED_OFFSET_SELECT))
        else:
            empty = torch.zeros(0, dtype=torch.long)
            choice = ComputingChoice(empty, empty, empty, empty, empty)

        kind_F = torch.full((F_out,), KIND_RELAY, dtype=torch.long)
        src_F = torch.cat([torch.arange(F), choice.fanout_src, choice.and_src])
        other_F = torch.full((F_out,), -1, dtype=torch.long)
        kind_F[choice.fanout_src] = KIND_FANOUT
        kind_F[F : F + cfg.num_fanout] = KIND_FANOUT
        kind_F[choice.supp_target] = KIND_SUPPRESSION
        other_F[choice.supp_target] = choice.supp_suppressor
        kind_F[F + cfg.num_fanout :] = KIND_AND
        other_F[F + cfg.num_fanout :] = choice.and_partner

        g = torch.Generator().manual_seed(s + SEED_OFFSET_GAINS)
        gain_F = cfg.gain_min + (cfg.gain_max - cfg.gain_min) * torch.rand(F_out, generator=g, dtype=torch.float32)
        gain_F[F : F + cfg.num_fanout] = gain_F[choice.fanout_src] * cfg.fanout_gain_ratio

        g = torch.Generator().manual_seed(s + SEED_OFFSET_DIRECTIONS)
        u_FE = torch.randn(F_out, E, generator=g, dtype=dtype)
        u_FE = u_FE / u_FE.norm(dim=1, keepdim=True).clamp(min=1e-8)
        if cfg.orthogonalization is not None:
            u_FE = orthogonalize(u_FE, cfg.orthogonalization.num_steps, cfg.orthogonalization.lr, progress)
        g = torch.Generator().manual_seed(s + SEED_OFFSET_SKIP)
        skip_ED = torch.randn(E, D, generator=g, dtype=dtype) * (cfg.skip_scale / math.sqrt(E))
        g = torch.Generator().manual_seed(s + SEED_OFFSET_BIAS)
        bias_E = torch.randn(E, generator=g, dtype=dtype)
        bias_E = bias_E / bias_E.norm().clamp(min=1e-8) * cfg.bias_out

        self._init_tensors(model, u_FE, skip_ED, bias_E, kind_F, src_F, other_F, gain_F)
        self.to(device)
        self.build_seconds = time.perf_counter() - t0

    @classmethod
    def from_parts(
        cls,
        cfg: TranscoderWorldConfig,
        input_model: SyntheticModel,
        *,
        u_out_FE: torch.Tensor,
        skip_ED: torch.Tensor,
        bias_out_E: torch.Tensor,
        kind_out_F: torch.Tensor,
        src_out_F: torch.Tensor,
        other_out_F: torch.Tensor,
        gain_out_F: torch.Tensor,
        seed: int | None = None,
    ) -> TranscoderWorld:
        """Assemble a world from stored parts (loading); on `input_model`'s device. Raises
        ConfigError naming the part that is inconsistent."""
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        self.cfg = cfg
        self.seed = seed if seed is not None else (cfg.seed if cfg.seed is not None else 0)
        require(input_model.cfg == cfg.input, "input_model", "config", "differs from the world config's input")
        self._init_tensors(input_model, u_out_FE, skip_ED, bias_out_E, kind_out_F, src_out_F, other_out_F, gain_out_F)
        self.to(input_model.device)
        self.build_seconds = time.perf_counter() - t0
        return self

    def _init_tensors(
        self,
        model: SyntheticModel,
        u_FE: torch.Tensor,
        skip_ED: torch.Tensor,
        bias_E: torch.Tensor,
        kind_F: torch.Tensor,
        src_F: torch.Tensor,
        other_F: torch.Tensor,
        gain_F: torch.Tensor,
    ) -> None:
        cfg = self.cfg
        D, E, F_out = cfg.input.hidden_dim, cfg.d_out, cfg.num_output_features
        for name, t, shape in (
            ("u_out_FE", u_FE, (F_out, E)),
            ("skip_ED", skip_ED, (E, D)),
            ("bias_out_E", bias_E, (E,)),
            ("kind_out_F", kind_F, (F_out,)),
            ("src_out_F", src_F, (F_out,)),
            ("other_out_F", other_F, (F_out,)),
            ("gain_out_F", gain_F, (F_out,)),
        ):
            require(tuple(t.shape) == shape, name, tuple(t.shape), f"must have shape {shape}")
        for name, t in (("u_out_FE", u_FE), ("skip_ED", skip_ED), ("bias_out_E", bias_E), ("gain_out_F", gain_F)):
            require(t.is_floating_point() and bool(torch.isfinite(t).all()), name, "values", "must be finite floats")
        kind_F, src_F, other_F = kind_F.long().cpu(), src_F.long().cpu(), other_F.long().cpu()
        _check_structure(cfg, kind_F, src_F, other_F, gain_F.cpu())
        dtype = cfg.input.torch_dtype
        self.input_model = model
        self.u_out_FE = u_FE.to(dtype).contiguous()
        self.skip_ED = skip_ED.to(dtype).contiguous()
        self.bias_out_E = bias_E.to(dtype)
        self.kind_out_F, self.src_out_F, self.other_out_F = kind_F, src_F, other_F
        self.gain_out_F = gain_F.float()
        self._has_skip = bool((self.skip_ED != 0).any())
        self._build_tables()

    def _build_tables(self) -> None:
        """Per-input lookup tables for the sparse map a → c (CPU; moved by `to`)."""
        F, nf = self.num_features, self.cfg.num_fanout
        kind, src, other, gain = self.kind_out_F, self.src_out_F, self.other_out_F, self.gain_out_F
        supp_I = torch.full((F,), -1, dtype=torch.long)
        is_supp = kind[:F] == KIND_SUPPRESSION
        supp_I[is_supp] = other[:F][is_supp]
        fan2_I = torch.full((F,), -1, dtype=torch.long)
        fan2_I[src[F : F + nf]] = torch.arange(F, F + nf)
        and_j = torch.arange(F + nf, self.num_output_features)
        order = torch.argsort(src[and_j], stable=True)  # CSR by owner input
        and_j = and_j[order]
        and_ptr_I = torch.zeros(F + 1, dtype=torch.long)
        and_ptr_I[1:] = torch.cumsum(torch.bincount(src[and_j], minlength=F), 0)
        self._tables = {
            "prim_gain_I": gain[:F].clone(),
            "supp_I": supp_I,
            "fan2_I": fan2_I,
            "fan2_gain_I": torch.where(fan2_I >= 0, gain[fan2_I.clamp(min=0)], torch.zeros(())),
            "and_ptr_I": and_ptr_I,
            "and_out_A": and_j,
            "and_partner_A": other[and_j],
            "and_gain_A": gain[and_j],
        }

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.input_model.device

    @property
    def num_features(self) -> int:
        """Input features (the input model's)."""
        return self.cfg.input.num_features

    @property
    def num_output_features(self) -> int:
        return self.cfg.num_output_features

    @property
    def hidden_dim(self) -> int:
        return self.cfg.input.hidden_dim

    @property
    def d_in(self) -> int:
        return self.cfg.input.hidden_dim

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def generator(self) -> torch.Generator:
        return self.input_model.generator

    @property
    def sample_seed(self) -> int:
        return self.input_model.sample_seed

    def output_kinds(self) -> dict[str, torch.Tensor]:
        """Output feature indices of each kind (KIND_NAMES order), CPU long tensors."""
        return {name: (self.kind_out_F == k).nonzero().squeeze(1) for k, name in enumerate(KIND_NAMES)}

    def computing_features(self) -> torch.Tensor:
        """Output features that compute (every kind but relay), sorted."""
        return (self.kind_out_F != KIND_RELAY).nonzero().squeeze(1)

    def fanout_pairs(self) -> torch.Tensor:
        """[num_fanout, 2]: (first, second) output index of each fanout, in order of source input."""
        F, nf = self.num_features, self.cfg.num_fanout
        second = torch.arange(F, F + nf)
        return torch.stack([self.src_out_F[second], second], dim=1)

    def fanout_merged_direction(self) -> torch.Tensor:
        """[num_fanout, d_out] unit vectors ∝ g_j u_j + g_j' u_j': what y sees of each fanout."""
        pairs = self.fanout_pairs().to(self.u_out_FE.device)
        g = self.gain_out_F.to(self.u_out_FE.device, self.u_out_FE.dtype)
        w = g[pairs[:, 0], None] * self.u_out_FE[pairs[:, 0]] + g[pairs[:, 1], None] * self.u_out_FE[pairs[:, 1]]
        return w / w.norm(dim=1, keepdim=True).clamp(min=1e-8)

    # ------------------------------------------------------------------ streams
    def manual_seed(self, seed: int) -> TranscoderWorld:
        """Restart the sampling stream (inputs and noise) from `seed`."""
        self.input_model.manual_seed(seed)
        return self

    @contextlib.contextmanager
    def forked_stream(self, seed: int) -> Iterator[TranscoderWorld]:
        """Inside the block the world samples the stream `seed` gives; afterwards its own stream
        continues exactly where it was."""
        with self.input_model.forked_stream(seed):
            yield self

    forked = forked_stream  # the name `saelab.data` uses

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def to(self, device: str | torch.device) -> TranscoderWorld:
        """Move every tensor to `device`; the sampling stream restarts from `sample_seed` there."""
        device = torch.device(device)
        self.input_model.to(device)
        self.u_out_FE = self.u_out_FE.to(device)
        self.skip_ED = self.skip_ED.to(device)
        self.bias_out_E = self.bias_out_E.to(device)
        self._dev_tables = {k: v.to(device) for k, v in self._tables.items()}
        return self

    # ------------------------------------------------------------------ the map a → c
    @torch.no_grad()
    def output_codes(self, acts_BF: torch.Tensor) -> torch.Tensor:
        """Dense reference of the map: codes_BF [B, F_out] from input activations acts_BF [B, F_in]."""
        require(
            acts_BF.ndim == 2 and acts_BF.shape[1] == self.num_features,
            "acts_BF",
            tuple(acts_BF.shape),
            f"must have shape [B, {self.num_features}]",
        )
        F, nf = self.num_features, self.cfg.num_fanout
        dev = acts_BF.device
        kind, src, other = self.kind_out_F.to(dev), self.src_out_F.to(dev), self.other_out_F.to(dev)
        gain = self.gain_out_F.to(dev, acts_BF.dtype)
        a_BJ = acts_BF[:, src]  # owner input of every output
        codes_BF = gain * a_BJ
        supp = (kind == KIND_SUPPRESSION).nonzero().squeeze(1)
        codes_BF[:, supp] *= (acts_BF[:, other[supp]] == 0).to(acts_BF.dtype)
        ands = torch.arange(F + nf, self.num_output_features, device=dev)
        codes_BF[:, ands] = gain[ands] * torch.minimum(a_BJ[:, ands], acts_BF[:, other[ands]])
        return codes_BF

    @torch.no_grad()
    def output_codes_sparse(self, acts: SparseFeatureActs) -> SparseFeatureActs:
        """The same map on sparse activations (every value > 0): no dense B × F tensor."""
        t = self._dev_tables
        F = self.num_features
        b, f, v = acts.batch_idx, acts.feature_idx, acts.values
        keys = b * F + f
        order = torch.argsort(keys)
        b, f, v, keys = b[order], f[order], v[order], keys[order]

        def value_at(qb: torch.Tensor, qf: torch.Tensor) -> torch.Tensor:
            """a[qb, qf] (0 when feature qf does not fire in row qb): binary search in the sorted keys."""
            q = qb * F + qf
            pos = torch.searchsorted(keys, q).clamp(max=max(keys.numel() - 1, 0))
            if keys.numel() == 0:
                return torch.zeros(q.shape, dtype=v.dtype, device=v.device)
            return torch.where(keys[pos] == q, v[pos], torch.zeros((), dtype=v.dtype, device=v.device))

        # Own outputs (relay, first fanout, suppression), suppressed where the suppressor fires.
        keep = torch.ones_like(b, dtype=torch.bool)
        sup = t["supp_I"][f]
        has = (sup >= 0).nonzero().squeeze(1)
        keep[has] = value_at(b[has], sup[has]) == 0
        parts_b, parts_j, parts_v = [b[keep]], [f[keep]], [t["prim_gain_I"][f[keep]] * v[keep]]
        # Second fanout outputs.
        fan2 = t["fan2_I"][f]
        has = (fan2 >= 0).nonzero().squeeze(1)
        parts_b.append(b[has])
        parts_j.append(fan2[has])
        parts_v.append(t["fan2_gain_I"][f[has]] * v[has])
        # AND outputs owned by each entry's feature (CSR expand), kept where the partner fires.
        ptr = t["and_ptr_I"]
        cnt = ptr[f + 1] - ptr[f]
        if bool((cnt > 0).any()):
            rows = torch.repeat_interleave(torch.arange(b.numel(), device=b.device), cnt)
            first = torch.cumsum(cnt, 0) - cnt
            slot = ptr[f[rows]] + torch.arange(rows.numel(), device=b.device) - first[rows]
            pv = value_at(b[rows], t["and_partner_A"][slot])
            hit = pv > 0
            parts_b.append(b[rows][hit])
            parts_j.append(t["and_out_A"][slot][hit])
            parts_v.append(t["and_gain_A"][slot][hit] * torch.minimum(v[rows][hit], pv[hit]))
        ob, oj, ov = torch.cat(parts_b), torch.cat(parts_j), torch.cat(parts_v)
        order = torch.argsort(ob * self.num_output_features + oj)
        return SparseFeatureActs(ob[order], oj[order], ov[order].float(), acts.batch_size, self.num_output_features)

    # ------------------------------------------------------------------ sampling
    def _target(self, x_BD: torch.Tensor, codes: SparseFeatureActs) -> torch.Tensor:
        """y = Σ c u + S x + b_out + ε; ε drawn from the world's generator (after the inputs)."""
        y_BE = decode_sparse(codes, self.u_out_FE, self.bias_out_E)
        if self._has_skip:
            y_BE = y_BE + x_BD.to(self.skip_ED.dtype) @ self.skip_ED.T
        if self.cfg.noise_std > 0:
            eps_BE = torch.randn(y_BE.shape, generator=self.generator, device=y_BE.device, dtype=y_BE.dtype)
            y_BE = y_BE + self.cfg.noise_std * eps_BE
        return y_BE

    @torch.no_grad()
    def sample_sparse(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, SparseFeatureActs, SparseFeatureActs]:
        """(x_BD, y_BE, input acts, output codes), the feature parts as sparse triples."""
        x_BD, acts = self.input_model.sample_sparse(batch_size)
        if self.cfg.input_noise_std > 0:
            xi_BD = torch.randn(x_BD.shape, generator=self.generator, device=x_BD.device, dtype=x_BD.dtype)
            x_BD = x_BD + self.cfg.input_noise_std * xi_BD
        codes = self.output_codes_sparse(acts)
        return x_BD, self._target(x_BD, codes), acts, codes

    @torch.no_grad()
    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BD, y_BE) for a fresh batch."""
        x_BD, y_BE, _, _ = self.sample_sparse(batch_size)
        return x_BD, y_BE

    next_pair = sample

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """x_BD only (the target is drawn and dropped, so the stream matches `next_pair`)."""
        return self.sample(batch_size)[0]

    @torch.no_grad()
    def sample_with_features(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_BD, y_BE, acts_BF [B, F_in], codes_BF [B, F_out]), dense; same samples as `sample_sparse`."""
        x_BD, y_BE, acts, codes = self.sample_sparse(batch_size)
        return x_BD, y_BE, acts.to_dense(), codes.to_dense()

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(batch_size)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        from saelab.synthetic.transcoder_persist import save_transcoder_world

        save_transcoder_world(self, path)

    def __repr__(self) -> str:
        counts = {k: int(v.numel()) for k, v in self.output_kinds().items()}
        return (
            f"TranscoderWorld(d_in={self.d_in}, d_out={self.d_out}, inputs={self.num_features}, "
            f"outputs={self.num_output_features}, kinds={counts}, device={self.device})"
        )


def _check_structure(
    cfg: TranscoderWorldConfig, kind_F: torch.Tensor, src_F: torch.Tensor, other_F: torch.Tensor, gain_F: torch.Tensor
) -> None:
    """The output table obeys the layout of the module docstring; ConfigError names what does not."""
    F, nf, F_out = cfg.input.num_features, cfg.num_fanout, cfg.num_output_features
    require(bool((gain_F > 0).all()), "gain_out_F", float(gain_F.min()), "every gain must be > 0")
    require(
        bool(((kind_F >= 0) & (kind_F < len(KIND_NAMES))).all()), "kind_out_F", "values", f"must index {KIND_NAMES}"
    )
    own = torch.arange(F)
    require(bool((src_F[:F] == own).all()), "src_out_F", "first F_in entries", "output j < F_in must be input j's own")
    require(bool(((src_F >= 0) & (src_F < F)).all()), "src_out_F", "values", f"must lie in [0, {F})")
    require(bool((kind_F[:F] != KIND_AND).all()), "kind_out_F", "first F_in entries", "must not be 'and'")
    supp = kind_F == KIND_SUPPRESSION
    require(
        int(supp.sum()) == cfg.num_suppression,
        "kind_out_F",
        int(supp.sum()),
        f"must hold num_suppression={cfg.num_suppression} suppression outputs",
    )
    needs_other = supp | (kind_F == KIND_AND)
    require(
        bool(((other_F[needs_other] >= 0) & (other_F[needs_other] < F)).all()),
        "other_out_F",
        "values",
        f"AND partners and suppressors must lie in [0, {F})",
    )
    require(
        bool((other_F[~needs_other] == -1).all()), "other_out_F", "values", "must be -1 for relay and fanout outputs"
    )
    require(
        bool((other_F[needs_other] != src_F[needs_other]).all()),
        "other_out_F",
        "values",
        "a partner or suppressor must differ from the owner input",
    )
    second = torch.arange(F, F + nf)
    require(
        bool((kind_F[second] == KIND_FANOUT).all()),
        "kind_out_F",
        "fanout block",
        f"outputs {F}..{F + nf - 1} must be fanout",
    )
    firsts = (kind_F[:F] == KIND_FANOUT).nonzero().squeeze(1)
    require(
        torch.equal(src_F[second].sort().values, firsts),
        "src_out_F",
        "fanout block",
        "the second outputs must be the first fanout outputs' inputs, each once",
    )
    require(
        bool((kind_F[F + nf :] == KIND_AND).all()) and F_out - F - nf == cfg.num_and,
        "kind_out_F",
        "and block",
        f"the last {cfg.num_and} outputs must be AND",
    )
