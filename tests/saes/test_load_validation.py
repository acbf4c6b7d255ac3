"""A bad SAE folder is refused in one line naming the file and the field or tensor (issue 15)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.cli import main
from saelab.errors import FileFormatError
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.training.trainer import build_sae


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "sae"
    torch.manual_seed(0)
    save_sae(build_sae("jumprelu", d_in=6, d_sae=12), path)
    return path


def _edit_cfg(folder, edit):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(edit(cfg)))


def _edit_tensor(folder, name, value):
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors[name] = value(tensors[name]) if callable(value) else value
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def _refused(folder, *needles):
    with pytest.raises(FileFormatError) as err:
        load_sae(folder)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_fixture_folder_loads(folder):
    assert load_sae(folder).cfg.d_sae == 12


def test_cfg_that_is_a_json_list(folder):
    (folder / "cfg.json").write_text("[1, 2]")
    _refused(folder, str(folder / "cfg.json"), "JSON object", "JSON list")


def test_cfg_missing_d_sae_names_the_field(folder):
    _edit_cfg(folder, lambda c: {k: v for k, v in c.items() if k != "d_sae"})
    message = _refused(folder, str(folder / "cfg.json"), "'d_sae'", "missing")
    assert "__init__" not in message


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("d_sae", "big", "'d_sae'"),
        ("d_in", 6.5, "'d_in'"),
        ("d_sae", True, "'d_sae'"),
        ("apply_b_dec_to_input", "yes", "'apply_b_dec_to_input'"),
        ("d_sae", -3, "d_sae=-3"),
    ],
)
def test_cfg_field_of_the_wrong_type_or_value_names_it(folder, field, value, needle):
    _edit_cfg(folder, lambda c: {**c, field: value})
    _refused(folder, str(folder / "cfg.json"), needle)


def test_integer_weights_are_refused_naming_tensor_and_dtype(folder):
    _edit_tensor(folder, "W_enc", lambda t: t.round().to(torch.int32))
    _refused(folder, str(folder / "sae_weights.safetensors"), "'W_enc'", "int32", "floating point")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(folder, bad):
    def poison(t):
        t = t.clone()
        t[3, 1] = bad
        return t

    _edit_tensor(folder, "W_dec", poison)
    _refused(folder, str(folder / "sae_weights.safetensors"), "'W_dec'", "1 NaN or infinite")


def test_weights_that_overflow_the_configured_dtype_are_refused(folder):
    _edit_cfg(folder, lambda c: {**c, "dtype": "float16"})
    _edit_tensor(folder, "b_dec", lambda t: torch.full_like(t, 1e6))  # finite in float32, inf in float16
    _refused(folder, "'b_dec'", "as float16")


def test_wrong_shape_names_tensor_and_expected_shape(folder):
    _edit_tensor(folder, "threshold", torch.zeros(11))
    _refused(folder, "'threshold'", "shape (11,)", "expected (12,)")


def test_an_absurd_width_is_refused_before_anything_that_size_is_allocated(folder):
    _edit_cfg(folder, lambda c: {**c, "d_sae": 10**12})  # 24 TB of float32 if it were built
    _refused(folder, "'W_enc'", f"expected (6, {10**12})")


def test_missing_tensor_is_named(folder):
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    del tensors["b_enc"]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    _refused(folder, "'b_enc'")


def test_cli_prints_one_error_line(folder, capsys):
    (folder / "cfg.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--sae", str(folder), "--data", "synth-mini", "--samples", "1k"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "cfg.json" in err


def test_an_integer_written_as_a_float_still_loads(tmp_path):
    # JSON writers may store TopK's k as 3.0; the type check must not refuse what validate() accepts.
    save_sae(build_sae("topk", d_in=6, d_sae=12, k=3), tmp_path / "t")
    _edit_cfg(tmp_path / "t", lambda c: {**c, "k": 3.0})
    assert load_sae(tmp_path / "t").cfg.k == 3
