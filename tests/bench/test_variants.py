"""Variant specs (bench/variants.py): `ARCH:key=value` parsed, named deterministically, registered and checked."""

from __future__ import annotations

import pytest

from saelab.bench.variants import VariantSpec, parse_variant_spec, register_variant_spec, resolve_arch
from saelab.errors import ConfigError
from saelab.saes.registry import SAE_REGISTRY


def test_names_are_deterministic_and_list_values_stay_whole():
    a = parse_variant_spec("matryoshka:inner_loss_multipliers=[0.5,0.5,0.5],detach_inner=false")
    b = parse_variant_spec("matryoshka:detach_inner=false,inner_loss_multipliers=[0.5, 0.5, 0.5]")
    assert a.name == b.name == "matryoshka[detach_inner=false,inner_loss_multipliers=[0.5,0.5,0.5]]"
    assert a.overrides == {"inner_loss_multipliers": [0.5, 0.5, 0.5], "detach_inner": False}
    s = parse_variant_spec("recipe:ista_residual=least_squares,k_initial=null")
    assert s.name == "recipe[ista_residual=least_squares,k_initial=null]"
    assert s.overrides == {"ista_residual": "least_squares", "k_initial": None}


def test_user_class_bases_and_plain_names():
    s = parse_variant_spec("ideas/my.py:MySAE:knob=2")
    assert (s.base, s.overrides, s.name) == ("ideas/my.py:MySAE", {"knob": 2}, "ideas/my.py:MySAE[knob=2]")
    for plain in ("recipe", "tanh_sae:TanhSAE", "ideas/my.py:MySAE"):
        assert parse_variant_spec(plain) is None


@pytest.mark.parametrize(
    "bad, why",
    [
        ("recipe:ista_steps=1,ista_steps=2", "twice"),
        ("recipe:ista_steps=1,oops", "'oops' is not key=value"),
        (":ista_steps=0", "no base architecture"),
    ],
)
def test_malformed_specs_name_the_spec(bad, why):
    with pytest.raises(ConfigError, match=why) as info:
        parse_variant_spec(bad)
    assert info.value.field == "variant" and info.value.value == bad


def test_registration_is_idempotent_and_a_bad_override_leaves_no_trace():
    name, spec = resolve_arch("recipe:ista_steps=0")
    cls = SAE_REGISTRY[name]
    assert name == "recipe[ista_steps=0]" and cls.variant_overrides == {"ista_steps": 0}
    assert register_variant_spec(spec) is cls  # a worker registering it again gets the same class
    cfg = cls.config_for_l0(d_in=16, d_sae=64, l0=4.0, total_steps=100)
    assert cfg.ista_steps == 0 and cfg.k == 4.0
    with pytest.raises(ConfigError, match="not_a_field") as info:
        resolve_arch("recipe:not_a_field=1")
    assert info.value.value == "recipe:not_a_field=1" and "recipe[not_a_field=1]" not in SAE_REGISTRY
    with pytest.raises(ConfigError, match="ista_steps"):  # the config's own validation
        resolve_arch("recipe:ista_steps=-1")
    with pytest.raises(ConfigError, match="already registered"):  # a name cannot be reused for other overrides
        register_variant_spec(VariantSpec(name="recipe[ista_steps=0]", base="recipe", overrides={"ista_steps": 2}))
