"""The architecture registry (issue 14): its own module, duplicate names refused, old imports kept."""

from __future__ import annotations

import sys

import pytest
import torch

import saelab.saes.kernels as kernels
import saelab.saes.registry as registry
from saelab.errors import ConfigError
from saelab.saes import SAE, AutotuneTarget, StepContext


class _ReLU(SAE):
    def encode(self, x_BD):
        return torch.relu(self.pre_acts(x_BD))

    def train_forward(self, x_BD, ctx):
        raise NotImplementedError


@pytest.fixture
def clean_registry():
    """Architectures registered by a test are gone afterwards (the registry is process-wide)."""
    registry.load_builtin_architectures()  # imported once per process: they must be in the snapshot
    before = dict(registry.SAE_REGISTRY)
    yield
    registry.SAE_REGISTRY.clear()
    registry.SAE_REGISTRY.update(before)


def test_register_sae_refuses_a_duplicate_name(clean_registry):
    first = registry.register_sae("dup_test")(type("First", (_ReLU,), {}))
    second = type("Second", (_ReLU,), {})
    with pytest.raises(ConfigError, match="override=True") as err:
        registry.register_sae("dup_test")(second)
    assert err.value.field == "architecture" and err.value.value == "dup_test"
    assert "First" in str(err.value) and "Second" in str(err.value)
    assert registry.get_sae_class("dup_test") is first


def test_built_in_names_cannot_be_taken_silently(clean_registry):
    original = registry.get_sae_class("batchtopk")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_sae("batchtopk")(type("Mine", (_ReLU,), {}))
    assert registry.get_sae_class("batchtopk") is original


def test_register_sae_override_replaces_explicitly(clean_registry):
    registry.register_sae("dup_test")(type("First", (_ReLU,), {}))
    second = registry.register_sae("dup_test", override=True)(type("Second", (_ReLU,), {}))
    assert registry.get_sae_class("dup_test") is second and second.architecture == "dup_test"


def test_registering_the_same_class_again_is_harmless(clean_registry):
    cls = registry.register_sae("dup_test")(type("Same", (_ReLU,), {}))
    assert registry.register_sae("dup_test")(cls) is cls


def test_multi_l0_lives_in_its_own_module_and_registers_with_the_built_ins():
    assert "saelab.saes.multi_l0" in registry.BUILTIN_ARCHITECTURE_MODULES
    assert registry.get_sae_class("multi_l0").__module__ == "saelab.saes.multi_l0"
    assert registry.get_sae_class("recipe").__module__ == "saelab.saes.recipe"
    for name in ("gather_matmul", "least_squares_values", "gather_pre_acts", "SparseActs"):
        assert hasattr(kernels, name)


def test_the_registry_imports_in_a_fresh_interpreter():
    # An import loop (registry ↔ base ↔ __init__) shows only in a process that has imported nothing yet.
    import subprocess

    code = (
        "import saelab.saes.registry as r; import sys; "
        "assert 'saelab.saes.recipe' not in sys.modules; "  # built-ins load lazily, on the first lookup
        "print(r.registered_sae_class('multi_l0').__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MultiL0SAE"


# ----- the typed autotune hook (issue 14) -----------------------------------------------------------
def test_autotune_target_is_typed_and_matches_the_configs():
    std = registry.get_sae_class("standard")
    cfg = std.config_for_l0(8, 32, 5.0, 300)
    target = std(cfg).autotune_target()
    assert (target.coefficient, target.target_l0, target.start_fraction) == ("l1", 5.0, cfg.autotune_start_fraction)
    jr = registry.get_sae_class("jumprelu")
    assert jr(jr.config_for_l0(8, 32, 5.0, 300)).autotune_target() == AutotuneTarget("l0", 5.0, 0.0)
    quadratic = jr.config_class(d_in=8, d_sae=32, target_l0=5.0, jumprelu_sparsity_loss_mode="quadratic")
    assert jr(quadratic).autotune_target() is None
    bt = registry.get_sae_class("batchtopk")
    assert bt(bt.config_for_l0(8, 32, 5.0, 300)).autotune_target() is None


def test_trainer_builds_its_autotuner_from_the_hook():
    from saelab.training.trainer import TrainConfig, _make_autotuner

    std = registry.get_sae_class("standard")
    sae = std(std.config_for_l0(8, 32, 5.0, 300))
    tuner, name = _make_autotuner(sae, TrainConfig(samples=300 * 10, batch_size=10))
    assert name == "l1" and tuner.target_l0 == 5.0 and tuner.start_step == 100
    bt = registry.get_sae_class("batchtopk")
    assert _make_autotuner(bt(bt.config_for_l0(8, 32, 5.0, 300)), TrainConfig(samples=100, batch_size=10)) == (
        None,
        None,
    )


def test_classes_written_before_the_hook_keep_their_autotuning():
    from dataclasses import dataclass

    from saelab.saes import SAEConfig

    @dataclass(kw_only=True)
    class LegacyConfig(SAEConfig):
        target_l0: float | None = None

    class Legacy(_ReLU):
        config_class = LegacyConfig

        @property
        def autotuned_coefficient(self):
            return "tanh"

    sae = Legacy(LegacyConfig(d_in=4, d_sae=8, target_l0=3.0))
    assert sae.autotune_target() == AutotuneTarget("tanh", 3.0, 0.0)
    assert Legacy(LegacyConfig(d_in=4, d_sae=8)).autotune_target() is None


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"coefficient": "", "target_l0": 3.0}, "coefficient"),
        ({"coefficient": "l1", "target_l0": 0.0}, "target_l0"),
        ({"coefficient": "l1", "target_l0": float("nan")}, "target_l0"),
        ({"coefficient": "l1", "target_l0": 3.0, "start_fraction": 1.0}, "autotune_start_fraction"),
    ],
)
def test_autotune_target_validates(kwargs, field):
    with pytest.raises(ConfigError) as err:
        AutotuneTarget(**kwargs)
    assert err.value.field == field


def test_user_file_spec_trains(clean_registry, tmp_path):
    """--arch path/to/file.py:Class imports that file (the README's example architecture)."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "tanh_sae.py"
    spec = f"{example}:TanhSAE"
    registry.SAE_REGISTRY.pop("tanh_relu", None)  # another test may have imported it as module tanh_sae
    cls = registry.get_sae_class(spec)
    assert cls.__name__ == "TanhSAE" and registry.get_sae_class(spec) is cls  # imported once
    sae = cls(cls.config_for_l0(8, 16, 3.0, 10))
    assert sae.autotune_target() == AutotuneTarget("tanh", 3.0, 0.0)
    out = sae.train_forward(torch.randn(4, 8), StepContext(0, 10, {"tanh": 0.1}))
    assert torch.isfinite(out.loss)
    assert registry.arch_label(spec) == "tanh_sae.py:TanhSAE"  # folder names never carry the path
    with pytest.raises(ConfigError, match="does not exist"):
        registry.get_sae_class(str(tmp_path / "nope.py") + ":X")
    sys.modules.pop(cls.__module__, None)
