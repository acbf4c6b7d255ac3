"""Transcoder worlds: the documented map a → c, the target y, streams, persistence, presets, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import saelab.cli.synth  # noqa: F401  (registers the `synth` sub-app)
from saelab.cli import app
from saelab.errors import ConfigError, FileFormatError
from saelab.synthetic import (
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    SyntheticModelConfig,
    TranscoderWorld,
    TranscoderWorldConfig,
    ZipfianFiringProbabilityConfig,
    describe_transcoder_world,
    get_preset,
    list_all_presets,
    list_presets,
    list_transcoder_presets,
    load_source,
    load_synthetic_model,
    load_transcoder_world,
    save_transcoder_world,
)
from saelab.synthetic.transcoder import (
    KIND_AND,
    KIND_FANOUT,
    KIND_RELAY,
    KIND_SUPPRESSION,
    SEED_OFFSET_PILOT,
    pilot_stats,
)

# z for a two-sided normal tail of 6.3e-5 (≤ 1e-4 false failures per check).
Z = 4.0


def small_input(**overrides) -> SyntheticModelConfig:
    kw = dict(
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
    kw.update(overrides)
    return SyntheticModelConfig(**kw)


def small_world_config(**overrides) -> TranscoderWorldConfig:
    kw = dict(
        input=small_input(),
        d_out=24,
        num_fanout=8,
        num_and=8,
        num_suppression=8,
        skip_scale=0.5,
        noise_std=0.3,
        min_cofire_rate=0.01,
        pilot_samples=8192,
        seed=11,
    )
    kw.update(overrides)
    return TranscoderWorldConfig(**kw)


@pytest.fixture(scope="module")
def world() -> TranscoderWorld:
    return TranscoderWorld(small_world_config())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_out", 0),
        ("num_and", -1),
        ("gain_min", 0.0),
        ("gain_max", 0.1),
        ("fanout_gain_ratio", 1.0),
        ("skip_scale", -0.1),
        ("noise_std", float("nan")),
        ("input_noise_std", -0.5),
        ("min_cofire_rate", 0.0),
        ("pilot_samples", 0),
        ("seed", -1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        small_world_config(**{field: value})
    assert info.value.field == field
    if value == value:  # NaN is not equal to itself
        assert info.value.value == value


def test_config_rejects_more_owners_than_inputs_and_round_trips():
    with pytest.raises(ConfigError) as info:
        small_world_config(num_and=200, num_suppression=101)
    assert info.value.field == "num_fanout+num_and+num_suppression" and info.value.value == 309
    cfg = small_world_config()
    assert TranscoderWorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError) as info:
        TranscoderWorldConfig.from_dict({**cfg.to_dict(), "d_outt": 3})
    assert info.value.value == ["d_outt"]


def test_too_few_qualifying_inputs_is_a_config_error():
    # At a 20% co-firing floor hardly any pair qualifies (the top rate is 0.4).
    with pytest.raises(ConfigError) as info:
        TranscoderWorld(small_world_config(min_cofire_rate=0.2))
    assert info.value.field == "num_and" and info.value.value == 8


# ----------------------------------------------------------------------------- the map a → c


def test_output_table_follows_the_documented_layout_and_choice_rules(world):
    cfg, F = world.cfg, world.num_features
    kinds = world.output_kinds()
    assert {k: int(v.numel()) for k, v in kinds.items()} == {"relay": F - 16, "fanout": 16, "and": 8, "suppression": 8}
    assert world.num_output_features == F + 8 + 8 == world.u_out_FE.shape[0]
    assert torch.equal(world.src_out_F[:F], torch.arange(F))
    pairs = world.fanout_pairs()
    assert torch.equal(world.kind_out_F[pairs[:, 0]], torch.full((8,), KIND_FANOUT))
    assert torch.allclose(world.gain_out_F[pairs[:, 1]], cfg.fanout_gain_ratio * world.gain_out_F[pairs[:, 0]])
    # Every computing output has its own owner input.
    comp = world.computing_features()
    first_of_fanout = comp[comp < F]
    owners = torch.cat([first_of_fanout, world.src_out_F[kinds["and"]]])
    assert owners.unique().numel() == owners.numel() == 24
    # The pairs qualify on the same pilot sample the world was built from (deterministic).
    model = world.input_model
    stats = pilot_stats(model, cfg.pilot_samples, world.seed + SEED_OFFSET_PILOT, cfg.min_cofire_rate)
    co = {(int(i), int(k)): float(r) for i, k, r in zip(stats.pair_i_P, stats.pair_k_P, stats.pair_rate_P)}
    parent = model.hierarchy.compiled.parent_F

    def ancestors(i):
        out = set()
        while int(parent[i]) >= 0:
            i = int(parent[i])
            out.add(i)
        return out

    unordered = set()
    for j in torch.cat([kinds["and"], kinds["suppression"]]).tolist():
        i, k = int(world.src_out_F[j]), int(world.other_out_F[j])
        rate = co.get((min(i, k), max(i, k)), 0.0)
        assert rate >= cfg.min_cofire_rate and k not in ancestors(i) and i not in ancestors(k)
        if world.kind_out_F[j] == KIND_SUPPRESSION:
            assert float(stats.rate_F[i]) - rate >= cfg.min_cofire_rate  # it fires unsuppressed often enough
        else:
            unordered.add((min(i, k), max(i, k)))
    assert len(unordered) == 8  # AND pairs are distinct


def test_sparse_map_equals_the_dense_reference(world):
    with world.forked_stream(5):
        x_BD, y_BE, acts_BF, codes_BF = world.sample_with_features(3000)
    assert torch.equal(world.output_codes(acts_BF), codes_BF)


def test_codes_follow_the_documented_formulas(world):
    with world.forked_stream(6):
        _, _, a_BF, c_BF = world.sample_with_features(4000)
    F, g = world.num_features, world.gain_out_F
    kind, src, other = world.kind_out_F, world.src_out_F, world.other_out_F
    relay = (kind == KIND_RELAY).nonzero().squeeze(1)
    assert torch.equal(c_BF[:, relay], g[relay] * a_BF[:, relay])
    for j in (kind == KIND_SUPPRESSION).nonzero().squeeze(1).tolist():
        blocked = a_BF[:, other[j]] > 0
        assert torch.equal(c_BF[:, j], torch.where(blocked, 0.0, g[j] * a_BF[:, j]))
        assert int((blocked & (a_BF[:, j] > 0)).sum()) > 0  # suppression actually happens in the sample
    for j in (kind == KIND_AND).nonzero().squeeze(1).tolist():
        i, k = int(src[j]), int(other[j])
        assert torch.equal(c_BF[:, j] != 0, (a_BF[:, i] > 0) & (a_BF[:, k] > 0))
        assert torch.equal(c_BF[:, j], g[j] * torch.minimum(a_BF[:, i], a_BF[:, k]))
    first, second = world.fanout_pairs().unbind(1)
    assert torch.equal(c_BF[:, first] != 0, c_BF[:, second] != 0)
    assert torch.allclose(c_BF[:, second], world.cfg.fanout_gain_ratio * c_BF[:, first], rtol=1e-6)
    assert bool((c_BF >= 0).all()) and c_BF.shape[1] == world.num_output_features
    assert F == a_BF.shape[1]


def test_target_is_the_documented_sum():
    quiet = TranscoderWorld(small_world_config(noise_std=0.0))
    x_BD, y_BE, _, c_BF = quiet.sample_with_features(2000)
    expected = c_BF @ quiet.u_out_FE + x_BD @ quiet.skip_ED.T + quiet.bias_out_E
    torch.testing.assert_close(y_BE, expected, atol=1e-4, rtol=1e-5)
    # ‖S‖_F ≈ skip_scale · √d_in: E‖G‖_F² / d_out = d_in, relative sd √(2 / (d_out d_in)).
    cfg = quiet.cfg
    assert quiet.skip_ED.norm().item() == pytest.approx(
        cfg.skip_scale * math.sqrt(cfg.input.hidden_dim), rel=Z * math.sqrt(2 / (cfg.d_out * cfg.input.hidden_dim)) / 2
    )
    assert quiet.bias_out_E.norm().item() == pytest.approx(cfg.bias_out, rel=1e-5)
    assert torch.allclose(quiet.u_out_FE.norm(dim=1), torch.ones(quiet.num_output_features), atol=1e-5)


def test_noise_has_the_configured_std(world):
    n = 4000
    with world.forked_stream(7):
        x_BD, y_BE, _, c_BF = world.sample_with_features(n)
    eps = y_BE - (c_BF @ world.u_out_FE + x_BD @ world.skip_ED.T + world.bias_out_E)
    # mean ε² / σ² is χ²_N / N with N = n·d_out: sd √(2/N); float32 rounding adds < 1e-5.
    ratio = float(eps.double().pow(2).mean()) / world.cfg.noise_std**2
    assert abs(ratio - 1) < Z * math.sqrt(2 / (n * world.d_out)) + 1e-4
    assert abs(float(eps.double().mean())) < Z * world.cfg.noise_std / math.sqrt(n * world.d_out)


def test_input_noise_is_dense_gaussian_and_the_skip_reads_the_noisy_input():
    sigma = 0.7
    noisy = TranscoderWorld(small_world_config(noise_std=0.0, input_noise_std=sigma))
    n = 4000
    x_BD, y_BE, a_BF, c_BF = noisy.sample_with_features(n)
    model = noisy.input_model
    xi_BD = x_BD - (a_BF @ model.feature_vectors_FD + model.bias_D)
    # mean ξ² / σ² is χ²_N / N with N = n·d_in: sd √(2/N); float32 rounding adds < 1e-4.
    ratio = float(xi_BD.double().pow(2).mean()) / sigma**2
    assert abs(ratio - 1) < Z * math.sqrt(2 / (n * noisy.d_in)) + 1e-4
    # Dense: every coordinate of every sample moves (a zero has probability 0 under a Gaussian).
    assert bool((xi_BD != 0).all())
    # S acts on the noisy input: y − Σ c u − b_out = S x exactly, not S (x − ξ).
    expected = c_BF @ noisy.u_out_FE + x_BD @ noisy.skip_ED.T + noisy.bias_out_E
    torch.testing.assert_close(y_BE, expected, atol=1e-4, rtol=1e-5)
    d = describe_transcoder_world(noisy, n_samples=n, seed=2)
    assert d["input_noise_std"] == sigma and 0 < d["input_noise_var_fraction"] < 1


# ----------------------------------------------------------------------------- streams


def test_streams_seed_fork_resume_and_pairs(world):
    world.manual_seed(123)
    x1, y1 = world.sample(64)
    with world.forked_stream(9):
        world.sample(50)  # does not move the main stream
    x2, y2 = world.next_pair(64)
    state = world.state_dict()
    x3 = world.next_batch(64)
    world.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(world.sample(64), (x1, y1)))
    assert all(torch.equal(a, b) for a, b in zip(world.sample(64), (x2, y2)))
    world.load_state_dict(state)
    assert torch.equal(world.next_batch(64), x3)
    assert world.generator is world.input_model.generator
    assert (world.d_in, world.hidden_dim, world.d_out) == (32, 32, 24)


def test_build_is_deterministic_in_the_seed(world):
    again = TranscoderWorld(small_world_config())
    for name in ("u_out_FE", "skip_ED", "bias_out_E", "kind_out_F", "src_out_F", "other_out_F", "gain_out_F"):
        assert torch.equal(getattr(again, name), getattr(world, name)), name
    other = TranscoderWorld(small_world_config(seed=12))
    assert not torch.equal(other.u_out_FE, world.u_out_FE)
    assert not torch.equal(other.src_out_F, world.src_out_F)


# ----------------------------------------------------------------------------- persistence


def test_save_load_round_trip(world, tmp_path):
    save_transcoder_world(world, tmp_path / "w")
    loaded = load_transcoder_world(tmp_path / "w")
    assert loaded.cfg == world.cfg and loaded.seed == world.seed
    for name in ("u_out_FE", "skip_ED", "bias_out_E", "kind_out_F", "src_out_F", "other_out_F", "gain_out_F"):
        assert torch.equal(getattr(loaded, name), getattr(world, name)), name
    assert torch.equal(loaded.input_model.feature_vectors_FD, world.input_model.feature_vectors_FD)
    world.manual_seed(world.sample_seed)
    for a, b in zip(loaded.sample_with_features(500), world.sample_with_features(500)):
        assert torch.equal(a, b)
    assert isinstance(load_source(str(tmp_path / "w")), TranscoderWorld)


def test_load_errors_name_the_file(world, tmp_path):
    path = tmp_path / "w"
    save_transcoder_world(world, path)
    with pytest.raises(FileFormatError, match="transcoder world"):
        load_synthetic_model(path)
    weights = load_file(str(path / "transcoder_world.safetensors"))
    bad = dict(weights)
    bad["kind_out"] = bad["kind_out"].clone()
    bad["kind_out"][0] = KIND_AND  # an AND output among the inputs' own outputs
    save_file(bad, str(path / "transcoder_world.safetensors"))
    with pytest.raises(FileFormatError, match="transcoder_world.safetensors.*kind_out_F"):
        load_transcoder_world(path)
    save_file({k: v for k, v in weights.items() if k != "skip"}, str(path / "transcoder_world.safetensors"))
    with pytest.raises(FileFormatError, match="missing tensor 'skip'"):
        load_transcoder_world(path)
    meta = json.loads((path / "saelab_transcoder_world.json").read_text())
    (path / "saelab_transcoder_world.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(FileFormatError, match="saelab_transcoder_world.json: unsupported format version 99"):
        load_transcoder_world(path)
    (path / "saelab_transcoder_world.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load_transcoder_world(path)


# ----------------------------------------------------------------------------- statistics, presets, CLI


def test_describe_reports_l0_kinds_and_variance_parts(world):
    n = 20_000
    d = describe_transcoder_world(world, n_samples=n, seed=1, batch_size=5000)
    assert d["kinds"]["and"]["count"] == 8 and d["kinds"]["fanout"]["count"] == 16
    assert d["computing_features"] == 32 and d["num_output_features"] == 316
    parts = d["feature_var_fraction"] + d["skip_var_fraction"] + d["noise_var_fraction"] + d["cross_var_fraction"]
    assert parts == pytest.approx(1.0, abs=1e-12)
    # Noise: tr Cov(ε) = d_out σ² up to sampling (relative sd √(2/(n d_out))); the total is the same sample's.
    expected = world.d_out * world.cfg.noise_std**2 / d["y_total_variance"]
    assert d["noise_var_fraction"] == pytest.approx(expected, rel=Z * math.sqrt(2 / (n * world.d_out)) + 1e-4)
    # Output L0 is the sum of the output firing rates, which the per-kind rows report.
    per_kind = sum(k["count"] * k["firing_rate_mean"] for k in d["kinds"].values())
    assert d["output_true_l0"] == pytest.approx(per_kind, rel=1e-9)
    assert d["skip_norm"] == pytest.approx(float(world.skip_ED.norm()), rel=1e-6)


def test_presets_are_registered_beside_the_sae_worlds():
    assert list_presets() == ["sbw-toy", "synth-16k", "synth-mini"]
    assert list_transcoder_presets() == ["tc-16k", "tc-mini"]
    assert set(list_all_presets()) == set(list_presets()) | {"tc-16k", "tc-mini"}
    mini, big = get_preset("tc-mini"), get_preset("tc-16k")
    assert mini.input == get_preset("synth-mini") and big.input == get_preset("synth-16k")
    assert (mini.d_out, mini.num_output_features, big.d_out, big.num_output_features) == (256, 4224, 768, 16896)
    with pytest.raises(ConfigError, match="tc-mini"):
        get_preset("tc-99k")


@pytest.mark.slow
def test_tc_mini_describe_and_sample_cli(tmp_path, monkeypatch):
    # Builds tc-mini once (cached), then the second command loads it: ~1 min on a busy 2-core machine.
    monkeypatch.setenv("SAELAB_SYNTH_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "describe", "tc-mini", "--samples", "4000", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert (info["d_in"], info["d_out"], info["num_features"], info["num_output_features"]) == (256, 256, 4096, 4224)
    assert {k: v["count"] for k, v in info["kinds"].items()} == {
        "relay": 3968,
        "fanout": 128,
        "and": 64,
        "suppression": 64,
    }
    # Input L0 of synth-mini is 16.05 (SAELens); 4,000 samples give SE ≈ 0.07.
    assert info["true_l0"] == pytest.approx(16.05, abs=Z * 0.07)
    assert info["noise_var_fraction"] > 0 and info["skip_var_fraction"] > 0 and info["feature_var_fraction"] > 0.5
    # Dense input noise std 1 on a clean input of ≈ 1.45 variance per dimension: ≈ 0.41 of x's variance.
    assert info["input_noise_std"] == 1.0 and 0.3 < info["input_noise_var_fraction"] < 0.5
    out_file = tmp_path / "s.safetensors"
    result = runner.invoke(
        app,
        ["synth", "sample", "tc-mini", "--samples", "1500", "--batch-size", "1000", "--out", str(out_file), "--json"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["d_out"] == 256 and out["mean_output_l0"] > 0
    t = load_file(str(out_file))
    assert t["hidden"].shape == (1500, 256) and t["target"].shape == (1500, 256)
    assert int(t["output_batch_idx"].max()) < 1500
