"""`benchmarks/bench_recipe_variants.py --variant` specs (a list value once split on its own commas)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_recipe_variants.py"
_spec = importlib.util.spec_from_file_location("bench_recipe_variants", _PATH)
variants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variants)


def test_list_values_stay_whole():
    assert variants.parse_variant("inner=inner_loss_multipliers:[0.5,0.5,0.5],tilt:0") == (
        "inner",
        {"inner_loss_multipliers": [0.5, 0.5, 0.5], "tilt": 0},
    )


def test_values_parse_as_json_else_string_and_base_suffix_is_kept():
    name, overrides = variants.parse_variant("dk@recipe=use_matryoshka:false,k_anneal_shape:cosine,ista_eta:0.2")
    assert name == "dk@recipe"
    assert overrides == {"use_matryoshka": False, "k_anneal_shape": "cosine", "ista_eta": 0.2}


@pytest.mark.parametrize("bad", ["no_equals", "x=ista_steps"])
def test_malformed_specs_exit_with_the_spec(bad):
    with pytest.raises(SystemExit, match="--variant"):
        variants.parse_variant(bad)


def test_unknown_override_fails_before_training():
    with pytest.raises(SystemExit, match="not_a_field"):
        variants._register("recipe", {"typo": {"not_a_field": 1}})
