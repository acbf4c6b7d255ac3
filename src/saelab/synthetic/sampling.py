"""Drawing feature activations: firing events, magnitudes, decoding (hierarchy: hierarchy_sampling).

Semantics are SAELens's (`ActivationGenerator` + hierarchy modifier + `FeatureDictionary`):

* firing: Gaussian copula. z = ε Fᵀ + η ⊙ s with ε ~ N(0, I_R), η ~ N(0, I_F), s = √diag;
  feature i fires iff z_i > t_i = Φ⁻¹(1 − p_i). (No correlation: F = 0, s = 1. Full matrix:
  z = η Lᵀ with L Lᵀ = C.)
* magnitudes at firing positions: ReLU(μ_i + σ_i·N(0, 1)).
* hierarchy, level by level: a child is zeroed when its parent is inactive, or multiplied by
  parent_act / parent_mean when its parent scales its children; then among active siblings of a
  mutually-exclusive group one uniformly random winner is kept. Final ReLU.

Fast exact firing draw for rare features (same distribution, far fewer random numbers).
With m = ε Fᵀ (computed densely: a cheap rank-R product) a cell fires iff η > c = (t − m)/s.
For a level L per feature, call H = {η > L} and E = {c < L} = {m > t − sL}. Outside H ∪ E we
have η ≤ L ≤ c, so the cell cannot fire. H is a Bernoulli(Φ̄(L)) set of cells, drawn sparsely
by geometric skipping; E is read off m. Each candidate in H ∪ E then fires with its exact
conditional probability:  H∩E → 1;  H only → Φ̄(c)/Φ̄(L);  E only → (Φ(L) − Φ(c))/Φ(L).
L is chosen per feature (from a small grid, so features sharing L form one "bucket") to
minimise the expected candidates per cell, Φ̄(L) + P(E); features where even the best L leaves
many candidates (frequent features) draw η densely instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Candidate rate per cell above which drawing η densely is cheaper than the sparse path
# (a dense cell costs one normal draw; a candidate costs ~20 small tensor ops' worth of work).
DENSE_CANDIDATE_RATE = 0.06
# Grid of bucket levels L; step 0.25 keeps the independent case within ~2x of the minimum.
_LEVEL_GRID = [0.25 * k for k in range(-4, 25)]
# Cells processed per chunk of rows: bounds memory at ~16 MB of float32 per chunk.
_CHUNK_CELLS = 1 << 22


def _norm_sf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(-x)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0. index_select is several times faster than advanced indexing on CPU."""
    return x.index_select(0, idx)


# =============================================================================
# sparse representation
# =============================================================================


@dataclass
class SparseFeatureActs:
    """Nonzero ground-truth feature activations as (batch, feature, value) triples.

    Entries are sorted by (batch_idx, feature_idx); every value is > 0.
    """

    batch_idx: torch.Tensor
    feature_idx: torch.Tensor
    values: torch.Tensor
    batch_size: int
    num_features: int

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def l0_per_sample(self) -> torch.Tensor:
        return torch.bincount(self.batch_idx, minlength=self.batch_size)

    def to_dense(self) -> torch.Tensor:
        out_BF = torch.zeros(self.batch_size, self.num_features, dtype=self.values.dtype, device=self.values.device)
        out_BF[self.batch_idx, self.feature_idx] = self.values
        return out_BF

    def to_torch_sparse(self) -> torch.Tensor:
        return torch.sparse_coo_tensor(
            torch.stack([self.batch_idx, self.feature_idx]),
            self.values,
            (self.batch_size, self.num_features),
            is_coalesced=True,
            check_invariants=False,  # sorted and unique by construction
        )


# =============================================================================
# firing plan
# =============================================================================


@dataclass
class _Bucket:
    level: float  # L
    rate: float  # Φ̄(L)
    col_start: int  # columns [col_start, col_end) of the sparse-feature block
    col_end: int


@dataclass
class FiringPlan:
    """Precomputed per-feature data for the firing draw, on the sampling device."""

    kind: str  # "independent" | "low_rank" | "full"
    num_features: int
    thresholds_F: torch.Tensor  # float32 t = Φ⁻¹(1 − p)
    scale_F: torch.Tensor  # float32 s = √diag (1 without correlation)
    factor_FR: torch.Tensor | None  # low-rank factor
    chol_FF: torch.Tensor | None  # full-matrix factor L
    dense_features: torch.Tensor  # long, features whose η is drawn densely
    dense_t_D: torch.Tensor  # float32 thresholds of the dense features
    dense_s_D: torch.Tensor  # float32 √diag of the dense features
    sparse_features: torch.Tensor  # long, features handled by buckets (bucket order)
    sparse_cut_S: torch.Tensor  # float32 t − s·L per sparse column (E iff m > cut)
    sparse_t_S: torch.Tensor  # float64 threshold per sparse column
    sparse_s_S: torch.Tensor  # float64 √diag per sparse column
    sparse_rate_S: torch.Tensor  # float64 Φ̄(L) of the column's bucket
    sparse_factor_T_RS: torch.Tensor | None  # factor rows of sparse features, transposed
    dense_factor_T_RD: torch.Tensor | None
    buckets: list[_Bucket]
    expected_candidates_per_cell: float

    def to(self, device: torch.device | str) -> FiringPlan:
        moved: dict[str, Any] = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
        }
        return FiringPlan(**moved)


def thresholds_from_probs(probs_F: torch.Tensor) -> torch.Tensor:
    """t = Φ⁻¹(1 − p) = −Φ⁻¹(p), in float64 for accuracy at small p (p=0 → +inf, p=1 → −inf)."""
    return -torch.special.ndtri(probs_F.to(torch.float64))


def make_firing_plan(
    probs_F: torch.Tensor,
    factor_FR: torch.Tensor | None = None,
    diag_F: torch.Tensor | None = None,
    corr_FF: torch.Tensor | None = None,
    dense_candidate_rate: float = DENSE_CANDIDATE_RATE,
) -> FiringPlan:
    """Choose, per feature, the dense draw or a sparse bucket level L (see module docstring)."""
    from saelab.synthetic.correlation import correlation_sampling_factor

    F = probs_F.shape[0]
    t64 = thresholds_from_probs(probs_F.cpu())
    if corr_FF is not None:
        return FiringPlan(
            kind="full",
            num_features=F,
            thresholds_F=t64.float(),
            scale_F=torch.ones(F),
            factor_FR=None,
            chol_FF=correlation_sampling_factor(corr_FF.cpu()),
            dense_features=torch.arange(F),
            dense_t_D=t64.float(),
            dense_s_D=torch.ones(F),
            sparse_features=torch.empty(0, dtype=torch.long),
            sparse_cut_S=torch.empty(0),
            sparse_t_S=torch.empty(0, dtype=torch.float64),
            sparse_s_S=torch.empty(0, dtype=torch.float64),
            sparse_rate_S=torch.empty(0, dtype=torch.float64),
            sparse_factor_T_RS=None,
            dense_factor_T_RD=None,
            buckets=[],
            expected_candidates_per_cell=1.0,
        )
    if factor_FR is not None:
        factor_FR = factor_FR.cpu().float()
        s64 = diag_F.cpu().to(torch.float64).sqrt()  # type: ignore[union-attr]
        sigma64 = factor_FR.to(torch.float64).norm(dim=1)
    else:
        s64 = torch.ones(F, dtype=torch.float64)
        sigma64 = torch.zeros(F, dtype=torch.float64)

    grid = torch.tensor(_LEVEL_GRID, dtype=torch.float64)
    rate_L = _norm_sf(grid)  # Φ̄(L)
    cut_FL = t64.unsqueeze(1) - s64.unsqueeze(1) * grid.unsqueeze(0)  # E iff m > cut
    # P(E) = P(m > cut) with m ~ N(0, σ²); with σ = 0 it is 1 if cut < 0 else 0.
    sig = sigma64.unsqueeze(1)
    p_e_FL = torch.where(sig > 0, _norm_sf(cut_FL / sig.clamp(min=1e-300)), (cut_FL < 0).to(torch.float64))
    cost_FL = rate_L.unsqueeze(0) + p_e_FL
    best_cost_F, best_L_F = cost_FL.min(dim=1)

    never = torch.isposinf(t64)  # p = 0: cannot fire, skip entirely
    dense_mask = (~never) & ((best_cost_F > dense_candidate_rate) | torch.isneginf(t64))
    sparse_mask = (~never) & (~dense_mask)

    dense_features = dense_mask.nonzero().squeeze(1)
    buckets: list[_Bucket] = []
    sparse_cols: list[torch.Tensor] = []
    col = 0
    for li in torch.unique(best_L_F[sparse_mask]).tolist():
        feats = (sparse_mask & (best_L_F == li)).nonzero().squeeze(1)
        buckets.append(
            _Bucket(level=_LEVEL_GRID[li], rate=float(rate_L[li]), col_start=col, col_end=col + feats.numel())
        )
        sparse_cols.append(feats)
        col += feats.numel()
    sparse_features = torch.cat(sparse_cols) if sparse_cols else torch.empty(0, dtype=torch.long)
    level_S = torch.tensor([b.level for b in buckets for _ in range(b.col_end - b.col_start)], dtype=torch.float64)
    cut_S = (t64[sparse_features] - s64[sparse_features] * level_S).float()

    if factor_FR is None:
        # Without correlation m = 0, so E = {cut < 0} would be every cell; such levels cost >= 1
        # and are never chosen over the dense draw. The sampler relies on this.
        assert bool((cut_S >= 0).all())
    expected = float(best_cost_F[sparse_mask].sum() + dense_mask.sum()) / max(F, 1)
    return FiringPlan(
        kind="low_rank" if factor_FR is not None else "independent",
        num_features=F,
        thresholds_F=t64.float(),
        scale_F=s64.float(),
        factor_FR=factor_FR,
        chol_FF=None,
        dense_features=dense_features,
        dense_t_D=t64[dense_features].float(),
        dense_s_D=s64[dense_features].float(),
        sparse_features=sparse_features,
        sparse_cut_S=cut_S,
        sparse_t_S=t64[sparse_features],
        sparse_s_S=s64[sparse_features],
        sparse_rate_S=torch.tensor(
            [b.rate for b in buckets for _ in range(b.col_end - b.col_start)], dtype=torch.float64
        ),
        sparse_factor_T_RS=factor_FR[sparse_features].T.contiguous() if factor_FR is not None else None,
        dense_factor_T_RD=factor_FR[dense_features].T.contiguous() if factor_FR is not None else None,
        buckets=buckets,
        expected_candidates_per_cell=expected,
    )


# =============================================================================
# firing draw
# =============================================================================


def bernoulli_positions(num_cells: int, rate: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Sorted positions in [0, num_cells) of iid Bernoulli(rate) successes, by geometric skipping."""
    if num_cells <= 0 or rate <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if rate >= 1:
        return torch.arange(num_cells, device=device)
    out: list[torch.Tensor] = []
    last = -1  # position of the last success so far
    while True:
        remaining = num_cells - 1 - last
        mean = remaining * rate
        n_draw = int(mean + 6.0 * math.sqrt(mean) + 16)
        gaps = torch.empty(n_draw, dtype=torch.float64, device=device).geometric_(rate, generator=gen)
        pos = last + torch.cumsum(gaps, 0).to(torch.long)
        inside = pos < num_cells
        n_in = int(inside.sum())
        out.append(pos[:n_in])
        if n_in < n_draw:  # the run crossed the end: done
            break
        last = int(pos[-1])
    return torch.cat(out) if len(out) > 1 else out[0]


def draw_firing(
    plan: FiringPlan, batch_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(batch_idx, feature_idx) of firing cells sorted by (batch, feature), and the shared ε_BR.

    ε is returned because lazily-evaluated hierarchy children need the same ε for their cells.
    """
    device = plan.thresholds_F.device
    F = plan.num_features
    B = batch_size
    if plan.kind == "full":
        assert plan.chol_FF is not None
        eta_BF = torch.randn(B, F, generator=gen, device=device)
        z_BF = eta_BF @ plan.chol_FF.T
        b, f = (z_BF > plan.thresholds_F).nonzero(as_tuple=True)
        return b, f, None

    R = plan.factor_FR.shape[1] if plan.factor_FR is not None else 0
    eps_BR = torch.randn(B, R, generator=gen, device=device) if R > 0 else None
    nd = plan.dense_features.numel()
    ns = plan.sparse_features.numel()
    keys: list[torch.Tensor] = []  # b * F + f of firing cells
    rows_per_chunk = max(1, _CHUNK_CELLS // max(nd + ns, 1))
    for r0 in range(0, B, rows_per_chunk):
        r1 = min(B, r0 + rows_per_chunk)
        eps_cR = eps_BR[r0:r1] if eps_BR is not None else None
        if nd:
            keys.append(_fire_dense_block(plan, eps_cR, r0, r1, gen))
        if ns:
            keys.append(_fire_sparse_block(plan, eps_cR, r0, r1, gen))
    if not keys:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, eps_BR
    key = torch.cat(keys)
    key, _ = torch.sort(key)
    return torch.div(key, F, rounding_mode="floor"), key % F, eps_BR


def _fire_dense_block(
    plan: FiringPlan, eps_cR: torch.Tensor | None, r0: int, r1: int, gen: torch.Generator
) -> torch.Tensor:
    feats = plan.dense_features
    n = r1 - r0
    z = torch.randn(n, feats.numel(), generator=gen, device=feats.device)
    z.mul_(plan.dense_s_D)
    if eps_cR is not None:
        assert plan.dense_factor_T_RD is not None  # ε exists only when the plan has a factor
        z.addmm_(eps_cR, plan.dense_factor_T_RD)
    rows, cols = (z > plan.dense_t_D).nonzero(as_tuple=True)
    return (rows + r0) * plan.num_features + take(feats, cols)


def _fire_sparse_block(
    plan: FiringPlan, eps_cR: torch.Tensor | None, r0: int, r1: int, gen: torch.Generator
) -> torch.Tensor:
    device = plan.sparse_features.device
    n = r1 - r0
    ns = plan.sparse_features.numel()
    # H, bucket by bucket: a Bernoulli(Φ̄(L)) subset of the bucket's n × width cells.
    h_parts = []
    for bk in plan.buckets:
        width = bk.col_end - bk.col_start
        pos = bernoulli_positions(n * width, bk.rate, gen, device)
        h_parts.append(torch.div(pos, width, rounding_mode="floor") * ns + bk.col_start + pos % width)
    h_cell = torch.cat(h_parts) if h_parts else torch.empty(0, dtype=torch.long, device=device)
    h_col = h_cell % ns
    h_cut = take(plan.sparse_cut_S, h_col)
    if eps_cR is not None:
        assert plan.sparse_factor_T_RS is not None  # ε exists only when the plan has a factor
        m_flat = torch.mm(eps_cR, plan.sparse_factor_T_RS).view(-1)  # m = ε Fᵀ for every cell
        e_cell = (m_flat.view(n, ns) > plan.sparse_cut_S).view(-1).nonzero().squeeze(1)  # E: m > t − sL
        h_m32 = take(m_flat, h_cell)
        h_in_e = h_m32 > h_cut
        # E-only cells: E minus H, via a scratch mask of the block (cheaper than sorting/merging).
        in_h = torch.zeros(n * ns, dtype=torch.bool, device=device)
        in_h[h_cell] = True
        e_cell = take(e_cell, (~take(in_h, e_cell)).nonzero().squeeze(1))
        e_col = e_cell % ns
        h_m = h_m32.to(torch.float64)
        e_m = take(m_flat, e_cell).to(torch.float64)
    else:
        # m = 0 everywhere and the plan only picks L <= t, so E is empty.
        h_in_e = torch.zeros_like(h_cell, dtype=torch.bool)
        e_cell = e_col = torch.empty(0, dtype=torch.long, device=device)
        h_m = torch.zeros(h_cell.numel(), dtype=torch.float64, device=device)
        e_m = torch.zeros(0, dtype=torch.float64, device=device)
    # H cells: P(η > c | η > L) = Φ̄(c)/Φ̄(L), certain when c < L (the cell is also in E).
    h_c = (take(plan.sparse_t_S, h_col) - h_m) / take(plan.sparse_s_S, h_col)
    h_prob = torch.where(h_in_e, torch.ones_like(h_c), _norm_sf(h_c) / take(plan.sparse_rate_S, h_col))
    # E-only cells: P(η > c | η ≤ L) = (Φ(L) − Φ(c)) / Φ(L).
    e_c = (take(plan.sparse_t_S, e_col) - e_m) / take(plan.sparse_s_S, e_col)
    below = 1.0 - take(plan.sparse_rate_S, e_col)
    e_prob = (below - torch.special.ndtr(e_c)) / below
    cell = torch.cat([h_cell, e_cell])
    u = torch.rand(cell.numel(), generator=gen, device=device, dtype=torch.float64)
    cell = take(cell, (u < torch.cat([h_prob, e_prob])).nonzero().squeeze(1))
    rows = torch.div(cell, ns, rounding_mode="floor")
    return (rows + r0) * plan.num_features + take(plan.sparse_features, cell % ns)


def draw_firing_reference(plan: FiringPlan, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens-style dense draw (η for every cell). For tests: same distribution as draw_firing."""
    device = plan.thresholds_F.device
    B, F = batch_size, plan.num_features
    if plan.kind == "full":
        b, f, _ = draw_firing(plan, batch_size, gen)
        return b, f
    z = torch.randn(B, F, generator=gen, device=device) * plan.scale_F
    if plan.factor_FR is not None:
        eps_BR = torch.randn(B, plan.factor_FR.shape[1], generator=gen, device=device)
        z += eps_BR @ plan.factor_FR.T
    b, f = (z > plan.thresholds_F).nonzero(as_tuple=True)
    return b, f


# =============================================================================
# magnitudes, counter-based randomness, decoding
# =============================================================================


def draw_magnitudes(
    feature_idx: torch.Tensor, mean_F: torch.Tensor, std_F: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """ReLU(μ_f + σ_f·N(0,1)) for each firing entry, one normal per entry in entry order."""
    noise = torch.randn(feature_idx.numel(), generator=gen, device=mean_F.device, dtype=mean_F.dtype)
    return (take(mean_F, feature_idx) + noise * take(std_F, feature_idx)).relu()


_MASK64 = (1 << 64) - 1


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)
_GOLDEN = _signed64(0x9E3779B97F4A7C15)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def mix64_int(z: int) -> int:
    """The same finaliser on a Python int (unsigned arithmetic), returned as signed int64."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed64(z ^ (z >> 31))


def hash_uniform(index: torch.Tensor, key: int) -> torch.Tensor:
    """Counter-based U(0, 1) (float64, never 0 or 1) for each int64 `index` under `key`.

    Used for per-cell randomness of hierarchy children, so that evaluating only the cells that
    matter (sparse path) and evaluating every cell (dense reference) see the same numbers.
    """
    z = mix64(index * _GOLDEN + key)
    return (_srl(z, 11).to(torch.float64) + 0.5) * (2.0**-53)


def decode_sparse(acts: SparseFeatureActs, vectors_FD: torch.Tensor, bias_D: torch.Tensor) -> torch.Tensor:
    """hidden_BD = Σ_f a_bf d_f + bias via embedding_bag: no dense B×F tensor, no B×F×D product."""
    counts = torch.bincount(acts.batch_idx, minlength=acts.batch_size)
    offsets = torch.zeros(acts.batch_size, dtype=torch.long, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    hidden_BD = torch.nn.functional.embedding_bag(
        acts.feature_idx,
        vectors_FD,
        offsets,
        mode="sum",
        per_sample_weights=acts.values.to(vectors_FD.dtype),
    )
    return hidden_BD + bias_D
