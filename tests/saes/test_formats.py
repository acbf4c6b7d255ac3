"""Pretrained formats (issue 19): each reader gives the source library's own encode/decode, round-trips
through saelab's SAELens format, and turns every malformed file into one line naming the file.

The references (`format_fixtures.ref_*`) transcribe each library's inference code and run it in float64
on the files as written; saelab's float32 SAE must match them within 1e-5 on rows that are clear of
any discontinuity (see `clear_rows`). The comparison with SAELens's own converters is in
`test_formats_saelens.py` (needs the test extra)."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import ConfigError, FileFormatError
from saelab.saes.formats import detect_format, is_sae_path, load_pretrained, load_pretrained_with_info
from saelab.saes.saelens_format import load_sae, save_sae
from tests.saes import format_fixtures as ff

D, L, B = 8, 16, 256
E = 12  # a Gemma Scope 2 transcoder's output width (sparsify's transcoders write d_in)

DL_CLASSES = {
    "AutoEncoder": "standard",
    "AutoEncoderNew": "standard",
    "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "jumprelu",
    "MatryoshkaBatchTopKSAE": "jumprelu",
    "GatedAutoEncoder": "gated",
}


def _dl(cls: str) -> Callable[[Path], Path]:
    return lambda folder: ff.write_dictionary_learning(folder, cls, D, L)


# id -> (writer, reference, format, saelab architecture)
CASES: dict[str, tuple[Callable[[Path], Path], Callable, str, str]] = {
    "gemma_scope": (lambda f: ff.write_gemma_scope(f, D, L), ff.ref_gemma_scope, "gemma_scope", "jumprelu"),
    "gemma_scope_2": (lambda f: ff.write_gemma_scope_2(f, D, L), ff.ref_gemma_scope, "gemma_scope", "jumprelu"),
    **{
        f"dl_{cls}": (_dl(cls), ff.ref_dictionary_learning, "dictionary_learning", arch)
        for cls, arch in DL_CLASSES.items()
    },
    "gemma_scope_2_skip_transcoder": (
        lambda f: ff.write_gemma_scope_2(f, D, L, d_out=E, skip=True),
        ff.ref_gemma_scope,
        "gemma_scope",
        "jumprelu",
    ),
    "sparsify": (lambda f: ff.write_sparsify(f, D, L), ff.ref_sparsify, "sparsify", "topk"),
    "sparsify_skip_transcoder": (
        lambda f: ff.write_sparsify(f, D, L, skip=True, transcode=True),
        ff.ref_sparsify,
        "sparsify",
        "topk",
    ),
    "llama_scope": (lambda f: ff.write_llama_scope(f, D, L), ff.ref_llama_scope, "llama_scope", "jumprelu"),
}


def predict(sae, x_BD: torch.Tensor) -> torch.Tensor:
    """What the SAE outputs for x: decode(encode(x)), plus x W_skipᵀ for a skip transcoder."""
    y_hat = sae.decode(sae.encode(x_BD))
    if getattr(sae.cfg, "skip", False):
        y_hat = y_hat + x_BD @ sae.W_skip_ED.T
    return y_hat


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def _check_against(sae, reference, folder: Path) -> None:
    x_BD = _inputs()
    f_ref, x_hat_ref, margin = reference(folder, x_BD)
    keep = ff.clear_rows(margin)
    assert int(keep.sum()) >= B // 2  # ~1% of rows lie within 1e-3 of a cut at these scales
    with torch.no_grad():
        f_BL = sae.encode(x_BD)
        x_hat_BD = predict(sae, x_BD)
    assert 0 < int((f_BL[keep] != 0).sum()) < f_BL[keep].numel()  # some latents fire, some do not
    torch.testing.assert_close(f_BL[keep].double(), f_ref[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat_BD[keep].double(), x_hat_ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_loader_matches_the_source_librarys_own_math(case, tmp_path):
    writer, reference, fmt, arch = CASES[case]
    folder = writer(tmp_path / case)
    assert detect_format(folder) == fmt
    sae, info = load_pretrained_with_info(folder)
    assert sae.architecture == arch and info.format == fmt
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, L)
    assert sae.cfg.d_out == (E if "gemma" in case and "transcoder" in case else D if "transcoder" in case else None)
    _check_against(sae, reference, folder)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_the_saelens_format(case, tmp_path):
    writer, reference, _, arch = CASES[case]
    folder = writer(tmp_path / case)
    sae = load_pretrained(folder)
    out = save_sae(sae, tmp_path / "converted")
    again = load_pretrained(out)
    assert detect_format(out) == "saelens" and again.architecture == arch
    x_BD = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x_BD), sae.encode(x_BD), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(predict(again, x_BD), predict(sae, x_BD), atol=1e-6, rtol=1e-6)
    _check_against(load_sae(out), reference, folder)


def test_gemma_scope_embedding_sae_is_rescaled_by_sqrt_d_in(tmp_path):
    plain = ff.write_gemma_scope(tmp_path / "layer_3" / "width_4k" / "average_l0_6", D, L)
    embedding = ff.write_gemma_scope(tmp_path / "embedding" / "width_4k" / "average_l0_6", D, L)
    a, (b, info) = load_pretrained(plain), load_pretrained_with_info(embedding)
    torch.testing.assert_close(b.W_enc_DL, a.W_enc_DL / math.sqrt(D))
    torch.testing.assert_close(b.W_dec_LD, a.W_dec_LD * math.sqrt(D))
    assert "embedding" in info.notes[0]


def test_llama_scope_folds_the_dataset_norm(tmp_path):
    folder = ff.write_llama_scope(tmp_path / "L3R", D, L, norm_in=2.0)
    sae, info = load_pretrained_with_info(folder)
    s = math.sqrt(D) / 2.0
    raw = load_file(str(folder / "checkpoints" / "final.safetensors"))
    torch.testing.assert_close(sae.W_enc_DL, raw["encoder.weight"].t() * s)
    torch.testing.assert_close(sae.b_dec_D, raw["decoder.bias"] / s)
    torch.testing.assert_close(sae.threshold_L, torch.full((L,), 0.4 * s))
    assert sae.cfg.normalize_activations == "none" and "folded" in info.notes[0]


def test_batchtopk_threshold_never_set_keeps_every_positive_entry(tmp_path):
    folder = ff.write_dictionary_learning(tmp_path / "btk", "BatchTopKSAE", D, L)
    state = torch.load(folder / "ae.pt", weights_only=True)
    state["threshold"] = torch.tensor(-1.0)
    torch.save(state, folder / "ae.pt")
    sae = load_pretrained(folder)
    x_BD = _inputs()
    pre_BL = (x_BD - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"]
    torch.testing.assert_close(sae.encode(x_BD), torch.relu(pre_BL), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- malformed files
def _rewrite(path: Path, change: Callable[[dict], dict]) -> None:
    """Load a tensor file, change its dict of tensors, write it back in the same container."""
    if path.suffix == ".npz":
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        ff.savez(path, **{k: np.asarray(v) for k, v in change(arrays).items()})
    elif path.suffix == ".pt":
        torch.save(change(torch.load(path, weights_only=True)), path)
    else:
        save_file({k: v.contiguous() for k, v in change(load_file(str(path))).items()}, str(path))


def _rename(old: str, new: str) -> Callable[[dict], dict]:
    return lambda d: {(new if k == old else k): v for k, v in d.items()}


def _reshape(name: str) -> Callable[[dict], dict]:
    def change(d: dict) -> dict:
        value = d[name]
        d[name] = value[:-1] if isinstance(value, np.ndarray) else value[:-1].clone()
        return d

    return change


# format -> (writer, weights file, a tensor every variant has, config file, a required config field path)
MALFORMED = {
    # W_enc gives Gemma Scope's d_in and d_sae, so the tensor to damage is W_dec.
    "gemma_scope": (lambda f: ff.write_gemma_scope(f, D, L), "params.npz", "W_dec", None, None),
    "dictionary_learning": (
        _dl("AutoEncoderTopK"),
        "ae.pt",
        "encoder.weight",
        "config.json",
        ("trainer", "dict_size"),
    ),
    "sparsify": (lambda f: ff.write_sparsify(f, D, L), "sae.safetensors", "encoder.weight", "cfg.json", ("d_in",)),
    "llama_scope": (
        lambda f: ff.write_llama_scope(f, D, L),
        "checkpoints/final.safetensors",
        "encoder.weight",
        "hyperparams.json",
        ("d_sae",),
    ),
}


def _one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(FileFormatError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert "\n" not in message and "__init__" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("fmt", list(MALFORMED))
def test_wrong_tensor_name_is_one_line_naming_file_and_tensor(fmt, tmp_path):
    writer, weights, tensor, _, _ = MALFORMED[fmt]
    folder = writer(tmp_path / fmt)
    _rewrite(folder / weights, _rename(tensor, "renamed"))
    _one_line_error(folder, str(folder / weights), repr(tensor), "'renamed'")


@pytest.mark.parametrize("fmt", list(MALFORMED))
def test_wrong_tensor_shape_is_one_line_naming_file_and_shapes(fmt, tmp_path):
    writer, weights, tensor, _, _ = MALFORMED[fmt]
    folder = writer(tmp_path / fmt)
    _rewrite(folder / weights, _reshape(tensor))
    _one_line_error(folder, str(folder / weights), repr(tensor), "shape", "expected")


@pytest.mark.parametrize("fmt", list(MALFORMED))
def test_truncated_weights_file_is_one_line(fmt, tmp_path):
    writer, weights, _, _, _ = MALFORMED[fmt]
    folder = writer(tmp_path / fmt)
    data = (folder / weights).read_bytes()
    (folder / weights).write_bytes(data[: len(data) // 2])
    _one_line_error(folder, str(folder / weights), "truncated or corrupt")


@pytest.mark.parametrize("fmt", [f for f, spec in MALFORMED.items() if spec[3] is not None])
def test_missing_config_field_is_one_line_naming_it(fmt, tmp_path):
    writer, _, _, config, field_path = MALFORMED[fmt]
    folder = writer(tmp_path / fmt)
    cfg = json.loads((folder / config).read_text())
    *parents, last = field_path
    node = cfg
    for key in parents:
        node = node[key]
    del node[last]
    (folder / config).write_text(json.dumps(cfg))
    _one_line_error(folder, str(folder / config), ".".join(field_path), "missing")


@pytest.mark.parametrize("fmt", [f for f, spec in MALFORMED.items() if spec[3] is not None])
def test_config_that_is_not_json_is_one_line(fmt, tmp_path):
    writer, _, _, config, _ = MALFORMED[fmt]
    folder = writer(tmp_path / fmt)
    (folder / config).write_text('{"d_in": 8,')
    _one_line_error(folder, str(folder / config), "not valid JSON")


def test_wrong_config_value_type_names_field(tmp_path):
    folder = ff.write_sparsify(tmp_path / "sp", D, L)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["k"] = "three"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _one_line_error(folder, "cfg.json", "'k'", "'three'", "integer")


def test_config_and_weights_that_disagree_on_width(tmp_path):
    folder = ff.write_dictionary_learning(tmp_path / "dl", "AutoEncoder", D, L)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_size"] = 2 * L
    (folder / "config.json").write_text(json.dumps(cfg))
    _one_line_error(folder, "ae.pt", "shape", f"dict_size={2 * L}")


def test_unexpected_extra_tensor_is_refused(tmp_path):
    folder = ff.write_gemma_scope(tmp_path / "g", D, L)
    _rewrite(folder / "params.npz", lambda d: {**d, "affine_extra": np.zeros(3, dtype=np.float32)})
    _one_line_error(folder, "params.npz", "'affine_extra'", "not supported")


def test_nan_weights_are_refused(tmp_path):
    folder = ff.write_sparsify(tmp_path / "sp", D, L)
    _rewrite(folder / "sae.safetensors", lambda d: {**d, "b_dec": torch.full_like(d["b_dec"], float("nan"))})
    _one_line_error(folder, "sae.safetensors", "'b_dec'", "NaN")


def test_dictionary_learning_k_mismatch_and_unknown_class(tmp_path):
    folder = ff.write_dictionary_learning(tmp_path / "topk", "AutoEncoderTopK", D, L, k=3)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["k"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    _one_line_error(folder, "'k' is 3", "trainer.k is 4")
    cfg["trainer"]["dict_class"] = "CrossCoder"
    (folder / "config.json").write_text(json.dumps(cfg))
    _one_line_error(folder, "config.json", "'CrossCoder'", "not supported", "BatchTopKSAE")


def test_dictionary_learning_training_backup_is_refused(tmp_path):
    folder = ff.write_dictionary_learning(tmp_path / "dl", "AutoEncoder", D, L)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save(
        {"step": 10, "ae": state, "optimizer": {"state": {}}, "config": {}, "norm_factor": 1.0}, folder / "ae.pt"
    )
    _one_line_error(folder, "training backup")


def test_dictionary_learning_without_config_json(tmp_path):
    folder = ff.write_dictionary_learning(tmp_path / "dl", "AutoEncoder", D, L)
    (folder / "config.json").unlink()
    _one_line_error(folder, str(folder / "config.json"), "missing")


# ------------------------------------------------------------------------------------------- unsupported variants
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"skip_connection": True}, "skip_connection=true without transcode"),
        ({"activation": "groupmax"}, "'groupmax'"),
        ({"signed": True}, "signed"),
    ],
)
def test_sparsify_variants_saelab_cannot_represent_are_one_line(extra, needle, tmp_path):
    folder = ff.write_sparsify(tmp_path / "sp", D, L, **extra)
    _one_line_error(folder, "cfg.json", needle)


def test_transcoder_with_wrong_skip_shape_is_one_line(tmp_path):
    folder = ff.write_gemma_scope_2(tmp_path / "tc", D, L, d_out=E, skip=True)
    _rewrite(folder / "params.safetensors", lambda d: {**d, "affine_skip_connection": torch.zeros(E, D)})
    _one_line_error(folder, "params.safetensors", "'affine_skip_connection'", f"({D}, {E})", "output width 12")


def test_llama_scope_other_activation_or_norm_is_refused(tmp_path):
    folder = ff.write_llama_scope(tmp_path / "ls", D, L)
    hyper = json.loads((folder / "hyperparams.json").read_text())
    (folder / "hyperparams.json").write_text(json.dumps({**hyper, "norm_activation": "token-wise"}))
    _one_line_error(folder, "hyperparams.json", "'token-wise'")
    (folder / "hyperparams.json").write_text(json.dumps({**hyper, "act_fn": "topk"}))
    _one_line_error(folder, "hyperparams.json", "'topk'")


# ------------------------------------------------------------------------------------------- untrusted pickles
class _WritesMarker:
    """Unpickling this creates `path`: the file's existence proves the pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_pickle_that_would_run_code_is_refused_and_never_runs(container, tmp_path):
    folder = ff.write_dictionary_learning(tmp_path / "dl", "AutoEncoder", D, L)
    marker = tmp_path / "pwned"
    state = {**torch.load(folder / "ae.pt", weights_only=True), "bias": _WritesMarker(marker)}
    if container == "torch_save":
        torch.save(state, folder / "ae.pt")
    else:
        (folder / "ae.pt").write_bytes(pickle.dumps(state))
    message = _one_line_error(folder, str(folder / "ae.pt"), "refused", "weights_only=True")
    if container == "torch_save":  # torch names the global it would have imported
        assert "would import and run code" in message and "open" in message
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- detection
def test_files_inside_an_sae_folder_name_it(tmp_path):
    g = ff.write_gemma_scope(tmp_path / "g", D, L)
    sp = ff.write_sparsify(tmp_path / "sp", D, L)
    ls = ff.write_llama_scope(tmp_path / "ls", D, L)
    dl = ff.write_dictionary_learning(tmp_path / "dl", "AutoEncoder", D, L)
    (dl / "checkpoints").mkdir()
    (dl / "checkpoints" / "ae_100.pt").write_bytes((dl / "ae.pt").read_bytes())
    for path, fmt in [
        (g / "params.npz", "gemma_scope"),
        (sp / "sae.safetensors", "sparsify"),
        (sp / "cfg.json", "sparsify"),
        (ls / "checkpoints" / "final.safetensors", "llama_scope"),
        (ls / "hyperparams.json", "llama_scope"),
        (dl / "ae.pt", "dictionary_learning"),
        (dl / "checkpoints" / "ae_100.pt", "dictionary_learning"),
    ]:
        assert detect_format(path) == fmt, path
        assert load_pretrained(path).cfg.d_sae == L


def test_folder_holding_no_sae_says_what_it_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _one_line_error(empty, str(empty), "holds no SAE", "params.npz", "ae.pt", "sae.safetensors")
    assert "hyperparams.json" in message and "sae_weights.safetensors" in message
    _one_line_error(tmp_path / "nope", "does not exist")
    assert not is_sae_path(empty) and not is_sae_path(tmp_path / "nope")


def test_folder_missing_its_weights_names_the_missing_file(tmp_path):
    sp = ff.write_sparsify(tmp_path / "sp", D, L)
    (sp / "sae.safetensors").unlink()
    _one_line_error(sp, str(sp / "sae.safetensors"), "missing")
    ls = ff.write_llama_scope(tmp_path / "ls", D, L)
    (ls / "checkpoints" / "final.safetensors").unlink()
    _one_line_error(ls, "final.safetensors", "missing")


def test_checkpoint_folder_with_one_sae_per_layer_points_at_them(tmp_path):
    root = tmp_path / "sae-pythia"
    for layer in range(3):
        ff.write_sparsify(root / f"layers.{layer}", D, L)
    _one_line_error(root, "layers.0, layers.1, layers.2", "name one of them")


def test_arch_applies_to_saelens_folders_only(tmp_path):
    folder = ff.write_gemma_scope(tmp_path / "g", D, L)
    with pytest.raises(ConfigError, match="SAELens-format folders only"):
        load_pretrained(folder, arch="standard")
