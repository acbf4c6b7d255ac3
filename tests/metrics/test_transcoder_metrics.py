"""Transcoder ground-truth metrics, validated by construction: the exact transcoder of a world scores
perfectly, and each corruption costs exactly the metric it should."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.metrics.matching import iter_abs_cos
from saelab.metrics.names import METRICS, TRANSCODER, TRANSCODER_GROUND_TRUTH, ground_truth_keys
from saelab.metrics.transcoder import COS_THRESHOLD, evaluate_transcoder
from saelab.synthetic import (
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    SyntheticModelConfig,
    TranscoderWorld,
    TranscoderWorldConfig,
    ZipfianFiringProbabilityConfig,
)

# z for a two-sided normal tail of 6.3e-5 (≤ 1e-4 false failures per check).
Z = 4.0
N = 20_000


def world_config(**overrides) -> TranscoderWorldConfig:
    inp = SyntheticModelConfig(
        num_features=300,
        hidden_dim=32,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=0.01),
        hierarchy=HierarchyConfig(
            total_root_nodes=5,
            branching_factor=3,
            max_depth=2,
            mutually_exclusive_portion=0.5,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        correlation=LowRankCorrelationConfig(rank=4, correlation_scale=0.2),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=0.5,
        bias=0.5,
        seed=3,
    )
    kw = dict(
        input=inp,
        d_out=24,
        num_fanout=8,
        num_and=8,
        num_suppression=8,
        skip_scale=0.5,
        noise_std=0.5,
        min_cofire_rate=0.01,
        pilot_samples=8192,
        seed=11,
    )
    kw.update(overrides)
    return TranscoderWorldConfig(**kw)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def world(single_torch_thread) -> TranscoderWorld:
    return TranscoderWorld(world_config())


class Recorder:
    """The world, remembering the true codes of the batch it last gave out (for the oracle's encode)."""

    def __init__(self, world, pool: int | None = None, seed: int = 0):
        self.world = world
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pool = None
        if pool is not None:  # a fixed pool served in order: any batch split sees the same samples
            with world.forked_stream(seed):
                self.pool = world.sample_with_features(pool)
            self.pos = 0

    def __getattr__(self, name):
        return getattr(self.world, name)

    def sample_with_features(self, b):
        if self.pool is None:
            out = self.world.sample_with_features(b)
        else:
            out = tuple(t[self.pos : self.pos + b] for t in self.pool)
            self.pos += b
        self.last = (out[0], out[3])
        return out


class ExactTranscoder:
    """Latents = output features, decoder rows = u_j, skip = S, b_dec = b_out; encode returns the true
    codes of the recorded batch, passed through `code_map` (a corruption) when given."""

    def __init__(self, recorder, code_map=None, W_dec_LE=None, W_skip_ED="true"):
        w = recorder.world
        self.recorder = recorder
        self.code_map = code_map
        self.W_dec_LE = (w.u_out_FE if W_dec_LE is None else W_dec_LE).clone()
        self.W_skip_ED = w.skip_ED.clone() if isinstance(W_skip_ED, str) else W_skip_ED
        self.b_dec_E = w.bias_out_E.clone()

    def encode(self, x_BD):
        x_seen, codes_BF = self.recorder.last
        assert torch.equal(x_seen, x_BD)  # the metric encodes exactly the batch it sampled
        return codes_BF if self.code_map is None else self.code_map(codes_BF.clone())

    def decode(self, acts_BL):
        return acts_BL @ self.W_dec_LE + self.b_dec_E


def _unit(v):
    return v / v.norm()


def test_exact_transcoder_scores_perfectly(world):
    rec = Recorder(world)
    r = evaluate_transcoder(ExactTranscoder(rec), rec, N, batch_size=4096, seed=0)
    fired = r.diagnostics["firing_count_F"] > 0
    # Each latent fires exactly when its own feature does: F1 = 1 for every feature seen firing, 0 otherwise.
    assert r.f1 == pytest.approx(float(fired.double().mean()), abs=1e-12) and r.f1 == 1.0
    assert r.precision == r.recall == r.accuracy == 1.0
    assert r.mcc == pytest.approx(1.0, abs=1e-6) and r.uniqueness == 1.0
    assert r.skip_rel_error == 0.0 and r.skip_norm == pytest.approx(float(world.skip_ED.double().norm()), rel=1e-12)
    assert (r.and_recovered, r.suppression_recovered, r.fanout_recovered) == (1.0, 1.0, 1.0)
    assert r.computing_features_recovered == 1.0
    assert r.l0 == r.true_l0 and r.dead_latents == int((~fired).sum()) == 0 and r.n_samples == N
    # y − ŷ = ε exactly, so FVU · tr Cov(y) / (d_out σ²) = mean ε² / σ² = χ²_M / M with M = N·d_out.
    ratio = r.fvu * float(r.diagnostics["y_total_variance"]) / (world.d_out * world.cfg.noise_std**2)
    assert abs(ratio - 1) < Z * math.sqrt(2 / (N * world.d_out)) + 1e-5
    # One latent per fanout output is not the merged reading: that needs a row near g u + g' u'.
    merged_NE = world.fanout_merged_direction()
    cos_NF = torch.cat([c for _, c in iter_abs_cos(merged_NE, world.u_out_FE)])
    first, second = world.fanout_pairs().unbind(1)
    near = (cos_NF[torch.arange(8), first] >= COS_THRESHOLD) | (cos_NF[torch.arange(8), second] >= COS_THRESHOLD)
    assert r.fanout_merged_recovered == float(near.double().mean()) == 0.0


def test_each_corruption_costs_its_metric(world):
    rec = Recorder(world)
    exact = evaluate_transcoder(ExactTranscoder(rec), rec, N, batch_size=4096, seed=0)
    kinds = world.output_kinds()
    first, second = world.fanout_pairs().unbind(1)
    g = world.gain_out_F
    merged_NE = world.fanout_merged_direction()
    # ‖g u + g' u'‖: one merged latent carrying a_i with this scale reproduces both outputs' sum.
    scale_N = (g[first, None] * world.u_out_FE[first] + g[second, None] * world.u_out_FE[second]).norm(dim=1)

    def corrupt(codes_BF):
        codes_BF[:, kinds["and"]] = 0  # AND latents silenced
        codes_BF[:, first] = codes_BF[:, first] / g[first] * scale_N  # fanouts merged into one latent
        codes_BF[:, second] = 0
        return codes_BF

    W = world.u_out_FE.clone()
    W[first] = merged_NE
    gen = torch.Generator().manual_seed(0)
    for j in kinds["suppression"].tolist():  # suppression rows pointed elsewhere
        W[j] = _unit(torch.randn(world.d_out, generator=gen))
    broken = ExactTranscoder(rec, corrupt, W_dec_LE=W, W_skip_ED=torch.zeros_like(world.skip_ED))
    r = evaluate_transcoder(broken, rec, N, batch_size=4096, seed=0)
    assert (r.and_recovered, r.suppression_recovered, r.fanout_recovered) == (0.0, 0.0, 0.0)
    assert r.computing_features_recovered == 0.0
    assert r.fanout_merged_recovered == 1.0  # the merged reading is found instead
    assert r.skip_rel_error == 1.0 and r.skip_norm == 0.0
    assert r.dead_latents == 16  # 8 AND latents + 8 second fanout latents
    assert r.f1 <= 1 - 16 / world.num_output_features and r.f1 < exact.f1
    assert r.mcc < exact.mcc - 0.02
    # Losing the skip and the AND outputs leaves their variance unexplained (merging fanouts costs nothing).
    assert r.fvu > exact.fvu + 0.05


def test_thresholds_of_recovery(world):
    rec = Recorder(world)
    j = int(world.output_kinds()["and"][0])
    u = world.u_out_FE[j]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(world.d_out, generator=gen)
    v = _unit(v - (v @ u) * u)  # ⟂ u

    def with_row(cos):
        W = world.u_out_FE.clone()
        W[j] = cos * u + math.sqrt(1 - cos * cos) * v
        return ExactTranscoder(rec, W_dec_LE=W)

    def recovered(t):
        r = evaluate_transcoder(t, rec, 5000, seed=2)
        comp = r.diagnostics["computing_F"]
        return bool(r.diagnostics["computing_recovered_F"][(comp == j).nonzero().item()])

    assert recovered(with_row(0.91)) and not recovered(with_row(0.89))

    def always_on(codes_BF):  # fires on every sample: F1 = 2p/(1+p) < 0.5 for a rate p < 1/3
        codes_BF[:, j] = codes_BF[:, j].clamp(min=1e-3)
        return codes_BF

    assert not recovered(ExactTranscoder(rec, always_on))


def test_streaming_does_not_depend_on_the_batch_split(world):
    results = []
    for bs in (6000, 1000, 1700):
        rec = Recorder(world, pool=6000, seed=4)
        results.append(evaluate_transcoder(ExactTranscoder(rec), rec, 6000, batch_size=bs).to_dict())
    for other in results[1:]:
        for k, v in results[0].items():
            assert other[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_seeded_evaluation_is_reproducible_and_leaves_the_stream(world):
    rec = Recorder(world)
    world.manual_seed(77)
    before = world.sample(8)
    world.manual_seed(77)
    a = evaluate_transcoder(ExactTranscoder(rec), rec, 3000, seed=5)
    assert torch.equal(world.sample(8)[0], before[0])  # the world's stream did not move
    b = evaluate_transcoder(ExactTranscoder(rec), rec, 3000, seed=5)
    assert a.to_dict() == b.to_dict()


def test_no_skip_and_no_computing_features():
    plain = TranscoderWorld(world_config(num_fanout=0, num_and=0, num_suppression=0, skip_scale=0.0))
    rec = Recorder(plain)
    r = evaluate_transcoder(ExactTranscoder(rec, W_skip_ED=None), rec, 3000, seed=0)
    assert r.skip_rel_error is None and r.skip_norm is None
    assert r.computing_features_recovered is None and r.and_recovered is None and r.fanout_merged_recovered is None
    # S = 0 in the world: a learned skip is reported by its norm only.
    r = evaluate_transcoder(ExactTranscoder(rec, W_skip_ED=torch.ones(24, 32)), rec, 3000, seed=0)
    assert r.skip_rel_error is None and r.skip_norm == pytest.approx(math.sqrt(24 * 32))


def test_interface_errors_name_the_field(world):
    rec = Recorder(world)
    with pytest.raises(ConfigError) as info:
        evaluate_transcoder(ExactTranscoder(rec, W_dec_LE=torch.zeros(5, 23)), rec, 100)
    assert info.value.field == "W_dec_LE" and info.value.value == (5, 23)
    with pytest.raises(ConfigError) as info:
        evaluate_transcoder(ExactTranscoder(rec, W_skip_ED=torch.zeros(32, 24)), rec, 100)
    assert info.value.field == "W_skip_ED"
    with pytest.raises(ConfigError) as info:
        evaluate_transcoder(ExactTranscoder(rec, code_map=lambda c: c[:, :10]), rec, 100)
    assert info.value.field == "encode"
    with pytest.raises(ConfigError) as info:
        evaluate_transcoder(object(), rec, 100)
    assert info.value.field == "encode"
    with pytest.raises(ConfigError) as info:
        evaluate_transcoder(ExactTranscoder(rec), rec, 0)
    assert info.value.field == "n_samples"


def test_metric_specs_are_registered():
    assert METRICS["fvu"].group == TRANSCODER and not METRICS["fvu"].needs_ground_truth
    for key in ("skip_rel_error", "computing_features_recovered"):
        assert METRICS[key].group == TRANSCODER_GROUND_TRUTH and METRICS[key].needs_ground_truth
    assert METRICS["fvu"].higher_is_better is False and METRICS["computing_features_recovered"].higher_is_better
    assert "fvu" not in ground_truth_keys()  # the SAE ground-truth set is unchanged
