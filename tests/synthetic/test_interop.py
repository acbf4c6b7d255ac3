"""Against SAELens itself: files it writes load here exactly, and sampling statistics agree."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.interop

sl = pytest.importorskip("sae_lens")

from sae_lens.synthetic import (  # noqa: E402
    FoldedNormalMagnitudeConfig as SLFolded,
)
from sae_lens.synthetic import (
    LinearMagnitudeConfig as SLLinear,
)
from sae_lens.synthetic import (
    RandomFiringProbabilityConfig as SLRandom,
)
from sae_lens.synthetic import (
    ZipfianFiringProbabilityConfig as SLZipf,
)
from sae_lens.synthetic import (
    orthogonalize_embeddings,
)
from sae_lens.synthetic.hierarchy import HierarchyConfig as SLHierarchy  # noqa: E402
from sae_lens.synthetic.synthetic_model import (  # noqa: E402
    LowRankCorrelationConfig as SLLowRank,
)
from sae_lens.synthetic.synthetic_model import (
    OrthogonalizationConfig as SLOrtho,
)
from sae_lens.synthetic.synthetic_model import (
    SyntheticModel as SLModel,
)
from sae_lens.synthetic.synthetic_model import (
    SyntheticModelConfig as SLConfig,
)

from saelab.synthetic import (  # noqa: E402
    SyntheticModel,
    SyntheticModelConfig,
    get_preset,
    load_synthetic_model,
    orthogonalize,
    save_synthetic_model,
)

N_SAMPLES = 100_000


def _saelens_config(**overrides) -> SLConfig:
    kw = dict(
        num_features=200,
        hidden_dim=16,
        firing_probability=SLZipf(exponent=0.5, max_prob=0.4, min_prob=5e-3),
        hierarchy=SLHierarchy(
            total_root_nodes=4,
            branching_factor=(2, 4),
            max_depth=3,
            mutually_exclusive_portion=0.6,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=SLOrtho(num_steps=10, lr=3e-4),
        correlation=SLLowRank(rank=4, correlation_scale=0.25),
        mean_firing_magnitudes=SLLinear(start=5.0, end=4.0),
        std_firing_magnitudes=SLFolded(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )
    kw.update(overrides)
    return SLConfig(**kw)


@pytest.fixture(scope="module")
def saelens_saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saelens") / "model"
    model = SLModel(_saelens_config())
    model.save(path)
    return model, path


def test_loads_saelens_files_exactly(saelens_saved):
    sl_model, path = saelens_saved
    ours = load_synthetic_model(path)
    gen = sl_model.activation_generator
    assert torch.equal(ours.feature_vectors_FD, sl_model.feature_dict.feature_vectors.data)
    assert torch.equal(ours.bias_D, sl_model.feature_dict.bias.data)
    assert torch.equal(ours.firing_probabilities_F, gen.firing_probabilities)
    assert torch.equal(ours.mean_magnitudes_F, gen.mean_firing_magnitudes)
    assert torch.equal(ours.std_magnitudes_F, gen.std_firing_magnitudes)
    assert torch.equal(ours.low_rank.factor_FR, sl_model.correlation_matrix.correlation_factor)
    assert torch.equal(ours.low_rank.diag_F, sl_model.correlation_matrix.correlation_diag)
    assert ours.hierarchy.to_dict() == sl_model.hierarchy.to_dict()
    assert ours.cfg.to_dict() == json.loads((path / "synthetic_model_config.json").read_text())


def _saelens_stats(sl_model: SLModel, n: int, seed: int):
    torch.manual_seed(seed)  # SAELens samples from the global RNG
    acts = torch.cat([sl_model.activation_generator.sample(10_000) for _ in range(n // 10_000)])
    return acts


def _our_stats(model: SyntheticModel, n: int, seed: int):
    model.manual_seed(seed)
    return torch.cat([model.sample_features_sparse(10_000).to_dense() for _ in range(n // 10_000)])


# The sampling comparison makes four probabilistic checks; a correct sampler fails any of them by chance
# with probability at most FALSE_FAILURE in total (ALPHA_EACH each, a union bound). The bounds come from
# each statistic's distribution at this sample count, never from a hand-picked constant.
FALSE_FAILURE = 1e-4
ALPHA_EACH = FALSE_FAILURE / 4


def _hotelling_bounds(k: int, n_total: int, alpha: float) -> tuple[float, float]:
    """Two-sided bounds on the two-sample Hotelling T² of k-dim means (n_total rows in all):
    (N−k−1)/(k(N−2))·T² ~ F(k, N−k−1) when the means agree (asymptotically, by the CLT, for any
    distribution with finite covariance)."""
    from scipy import stats

    scale = k * (n_total - 2) / (n_total - k - 1)
    f = stats.f(k, n_total - k - 1)
    return scale * f.ppf(alpha / 2), scale * f.isf(alpha / 2)


def _two_sample_hotelling(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(T², rank) for the means of the rows of a and b, with the pooled covariance (pseudo-inverse on
    its numerical rank, so exactly collinear features do not count twice)."""
    na, nb = a.shape[0], b.shape[0]
    d = a.mean(0) - b.mean(0)
    pooled = ((na - 1) * torch.cov(a.T) + (nb - 1) * torch.cov(b.T)) / (na + nb - 2)
    evals, evecs = torch.linalg.eigh(pooled)
    keep = evals > evals.max() * 1e-10
    proj = evecs[:, keep].T @ d
    t2 = float((proj**2 / evals[keep]).sum()) * na * nb / (na + nb)
    return t2, int(keep.sum())


def test_sampling_statistics_match_saelens(saelens_saved):
    from scipy import stats

    sl_model, path = saelens_saved
    ours = load_synthetic_model(path)
    a = _saelens_stats(sl_model, N_SAMPLES, seed=0).double()
    b = _our_stats(ours, N_SAMPLES, seed=0).double()
    n = N_SAMPLES
    # 1. True L0: two-sample z-test (n = 10⁵ per side, so the CLT holds to far beyond this tail).
    la, lb = (a > 0).sum(1).double(), (b > 0).sum(1).double()
    se = ((la.var() + lb.var()) / n).sqrt()
    z_l0 = stats.norm.isf(ALPHA_EACH / 2)  # 4.21
    assert abs(la.mean() - lb.mean()) < z_l0 * se, (la.mean(), lb.mean(), se)
    # 2. Per-feature firing rates: two-proportion z-scores, the largest |z| of k features against a
    #    Bonferroni bound (valid whatever the correlations between features).
    fa, fb = (a > 0).double(), (b > 0).double()
    ra, rb = fa.mean(0), fb.mean(0)
    pooled = (ra + rb) / 2
    ok = pooled > 0
    k = int(ok.sum())
    z = (ra - rb)[ok] / (pooled * (1 - pooled) * 2 / n).sqrt()[ok]
    z_max = stats.norm.isf(ALPHA_EACH / (2 * k))  # 5.3 for k = 200
    assert z.abs().max() < z_max, (z.abs().max(), z_max)
    # 3. The spread of those differences, jointly: the firing indicators are correlated (hierarchy,
    #    correlated firing), so Σz² is not χ²_k; the Hotelling T² of the indicator means, which whitens
    #    them with their pooled covariance, is. Too large: rates differ; too small: the streams are not
    #    independent samples.
    t2, rank = _two_sample_hotelling(fa[:, ok], fb[:, ok])
    lo, hi = _hotelling_bounds(rank, 2 * n, ALPHA_EACH)
    assert lo < t2 < hi, (t2, lo, hi, rank)
    # 4. Per-feature mean activation (magnitudes, scale_children_by_parent and ReLU), Bonferroni as in 2.
    ma, mb = a.mean(0), b.mean(0)
    se_m = ((a.var(0) + b.var(0)) / n).sqrt().clamp(min=1e-9)
    zm = ((ma - mb) / se_m)[ok]
    assert zm.abs().max() < z_max, (zm.abs().max(), z_max)
    # Hierarchy invariants hold in both (exactly: no child fires without its parent).
    c = ours.hierarchy.compiled
    kids = (c.parent_F >= 0).nonzero().squeeze(1)
    for acts in (a, b):
        assert not ((acts[:, kids] > 0) & (acts[:, c.parent_F[kids]] == 0)).any()


def test_hotelling_bounds_hold_at_their_rate_for_correlated_binary_data():
    """The check above is calibrated: on two independent samples from one correlated binary
    distribution, T² lands inside the two-sided (1 − α) bounds at about the nominal rate."""
    g = torch.Generator().manual_seed(0)
    k, n, trials, alpha = 6, 4000, 400, 0.1
    inside = 0
    for _ in range(trials):

        def draw():
            latent = torch.randn(n, 1, generator=g, dtype=torch.float64)
            noise = torch.randn(n, k, generator=g, dtype=torch.float64)
            return ((0.8 * latent + 0.6 * noise) > torch.linspace(-1, 1.5, k, dtype=torch.float64)).double()

        t2, rank = _two_sample_hotelling(draw(), draw())
        lo, hi = _hotelling_bounds(rank, 2 * n, alpha)
        inside += lo < t2 < hi
    # inside ~ Binomial(400, 0.9): sd 6; 0.9·400 ± 5 sd = [330, 390] fails by chance with p < 1e-6.
    assert 330 <= inside <= 390, inside


def test_building_the_same_config_matches_saelens(saelens_saved):
    sl_model, path = saelens_saved
    cfg = SyntheticModelConfig.from_dict(json.loads((path / "synthetic_model_config.json").read_text()))
    built = SyntheticModel(cfg)
    gen = sl_model.activation_generator
    # Everything but the orthogonalisation is drawn from the same seeded generators: bit-equal.
    assert torch.equal(built.bias_D, sl_model.feature_dict.bias.data)
    assert torch.equal(built.firing_probabilities_F, gen.firing_probabilities)
    assert torch.equal(built.low_rank.factor_FR, sl_model.correlation_matrix.correlation_factor)
    assert torch.equal(built.mean_magnitudes_F, gen.mean_firing_magnitudes)
    assert torch.equal(built.std_magnitudes_F, gen.std_firing_magnitudes)
    assert built.hierarchy.to_dict() == sl_model.hierarchy.to_dict()
    # Analytic vs autograd gradients differ only in float32 rounding.
    assert torch.allclose(built.feature_vectors_FD, sl_model.feature_dict.feature_vectors.data, atol=2e-6)


def test_saelens_reads_saelab_folders(tmp_path):
    cfg = get_preset("synth-mini")
    cfg.orthogonalization = None  # keep the test fast; the vectors are stored, not rebuilt
    ours = SyntheticModel(cfg)
    save_synthetic_model(ours, tmp_path / "m")
    theirs = SLModel.load_from_disk(tmp_path / "m")
    assert torch.equal(theirs.feature_dict.feature_vectors.data, ours.feature_vectors_FD)
    assert torch.equal(theirs.activation_generator.firing_probabilities, ours.firing_probabilities_F)
    assert torch.equal(theirs.activation_generator.mean_firing_magnitudes, ours.mean_magnitudes_F)
    assert theirs.hierarchy.to_dict() == ours.hierarchy.to_dict()


def test_probability_generators_are_bit_equal():
    from saelab.synthetic import RandomFiringProbabilityConfig, ZipfianFiringProbabilityConfig

    assert torch.equal(
        ZipfianFiringProbabilityConfig(0.5, 0.4, 5e-4).generate(16_384),
        SLZipf(exponent=0.5, max_prob=0.4, min_prob=5e-4).generate(16_384),
    )
    assert torch.equal(
        RandomFiringProbabilityConfig(0.5, 0.01).generate(1000, seed=3), SLRandom(0.5, 0.01).generate(1000, seed=3)
    )


def test_orthogonalize_matches_saelens():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 24, generator=g)
    theirs = orthogonalize_embeddings(e, num_steps=50, lr=0.01, chunk_size=128)
    ours = orthogonalize(e, num_steps=50, lr=0.01)
    assert torch.allclose(ours, theirs, atol=5e-6)
