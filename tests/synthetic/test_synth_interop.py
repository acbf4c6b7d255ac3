"""Against SAELens itself: files it writes load here exactly, and sampling statistics agree."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.interop

sl = pytest.importorskip("sae_lens")

from sae_lens.synthetic import (  # noqa: E402
    FoldedNormalMagnitudeConfig as SLFolded,
    LinearMagnitudeConfig as SLLinear,
    RandomFiringProbabilityConfig as SLRandom,
    ZipfianFiringProbabilityConfig as SLZipf,
    orthogonalize_embeddings,
)
from sae_lens.synthetic.hierarchy import HierarchyConfig as SLHierarchy  # noqa: E402
from sae_lens.synthetic.synthetic_model import (  # noqa: E402
    LowRankCorrelationConfig as SLLowRank,
    OrthogonalizationConfig as SLOrtho,
    SyntheticModel as SLModel,
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


def test_sampling_statistics_match_saelens(saelens_saved):
    sl_model, path = saelens_saved
    ours = load_synthetic_model(path)
    a = _saelens_stats(sl_model, N_SAMPLES, seed=0).double()
    b = _our_stats(ours, N_SAMPLES, seed=0).double()
    n = N_SAMPLES
    # True L0: two-sample z-test.
    la, lb = (a > 0).sum(1).double(), (b > 0).sum(1).double()
    se = ((la.var() + lb.var()) / n).sqrt()
    assert abs(la.mean() - lb.mean()) < 4 * se, (la.mean(), lb.mean())
    # Per-feature firing rates: two-proportion z-scores over 200 features; |z| < 4.5 fails by
    # chance with probability ≈ 1e-3 in total. The mean z² checks the spread is binomial.
    ra, rb = (a > 0).double().mean(0), (b > 0).double().mean(0)
    pooled = (ra + rb) / 2
    ok = pooled > 0
    z = (ra - rb)[ok] / (pooled * (1 - pooled) * 2 / n).sqrt()[ok]
    assert z.abs().max() < 4.5
    assert 0.7 < (z**2).mean() < 1.3
    # Per-feature mean activation (captures magnitudes, scale_children_by_parent and ReLU).
    ma, mb = a.mean(0), b.mean(0)
    se_m = ((a.var(0) + b.var(0)) / n).sqrt().clamp(min=1e-9)
    zm = ((ma - mb) / se_m)[ok]
    assert zm.abs().max() < 4.5
    # Hierarchy invariants hold in both.
    c = ours.hierarchy.compiled
    kids = (c.parent_F >= 0).nonzero().squeeze(1)
    for acts in (a, b):
        assert not ((acts[:, kids] > 0) & (acts[:, c.parent_F[kids]] == 0)).any()


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
