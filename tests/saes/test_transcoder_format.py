"""Transcoders in SAELens's formats: saved under SAELens's names (transcoder, skip_transcoder,
jumprelu_transcoder, jumprelu_skip_transcoder) with `d_out` and `W_skip`, loaded back by saelab, and
(sae_lens installed) loaded by SAELens with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.errors import ConfigError, FileFormatError
from saelab.saes.base import transcoder_fields
from saelab.saes.registry import get_sae_class
from saelab.saes.saelens_format import load_sae, parse_transcoder_architecture, save_sae, transcoder_architecture
from saelab.training.trainer import build_sae

D_IN, D_SAE, D_OUT = 8, 24, 6
ARCHS = {
    "standard": {},
    "jumprelu": {},
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "matryoshka": {"k": 3, "matryoshka_widths": [4, 12]},
    "recipe": {"k": 3, "matryoshka_widths": [4, 12], "ista_steps": 0, "leave_one_out": False},
}
# The inference architecture each trains into, and so its saved name's stem.
SAVED_AS = {
    "standard": "",
    "jumprelu": "jumprelu_",
    "topk": "topk_",
    "batchtopk": "jumprelu_",
    "matryoshka": "jumprelu_",
    "recipe": "jumprelu_",
}
SAELENS_KNOWS = ("standard", "jumprelu", "batchtopk", "matryoshka", "recipe")


def _transcoder(arch: str, skip: bool, normalize: str = "none"):
    """A transcoder with non-trivial weights in every part (the decoder norms differ, biases, skip, threshold)."""
    torch.manual_seed(0)
    sae = build_sae(
        arch,
        d_in=D_IN,
        d_sae=D_SAE,
        normalize_activations=normalize,
        **transcoder_fields(D_OUT, skip),
        **ARCHS[arch],
    )
    with torch.no_grad():
        sae.W_dec_LD.mul_(torch.rand(D_SAE, 1) + 0.5)
        sae.b_enc_L.normal_(std=0.05)
        sae.b_dec_D.normal_(std=0.3)
        if skip:
            sae.W_skip_ED.normal_(std=0.3)
        state = dict(sae.named_parameters()) | dict(sae.named_buffers())
        for name, value in (
            ("topk_threshold", 0.05),
            ("topk_threshold_weight", 1.0),
            ("ista_thresholds", 0.05),
            ("ista_threshold_weights", 1.0),
            ("threshold_L", 0.05),
        ):
            if name in state:
                state[name].fill_(value)
        sae.input_scale.fill_(2.0)
    return sae


def _inputs() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5)) * 3


CASES = [(a, s) for a in ARCHS for s in (False, True)]


@pytest.mark.parametrize("arch,skip", CASES)
@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
def test_saved_transcoder_loads_back_with_the_same_outputs(tmp_path, arch, skip, normalize):
    sae = _transcoder(arch, skip, normalize)
    x = _inputs()
    expected = sae.to_inference()(x)
    assert expected.shape == (64, D_OUT)
    save_sae(sae, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == f"{SAVED_AS[arch]}{'skip_' if skip else ''}transcoder"
    assert cfg["d_out"] == D_OUT and cfg["d_in"] == D_IN and cfg["apply_b_dec_to_input"] is False
    loaded = load_sae(tmp_path / "tc")
    assert loaded.cfg.d_out == D_OUT and loaded.cfg.skip is skip
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    if skip:  # the skip is stored as SAELens's W_skip [d_out, d_in], unchanged by folding the input scale
        torch.testing.assert_close(loaded.W_skip_ED, sae.W_skip_ED.detach())


def test_the_skip_is_in_forward_not_decode():
    sae = _transcoder("jumprelu", skip=True)
    x = _inputs()
    acts = sae.encode(x)
    torch.testing.assert_close(sae(x), sae.decode(acts) + x @ sae.W_skip_ED.detach().T)


@pytest.mark.interop
@pytest.mark.parametrize("arch,skip", [(a, s) for a in SAELENS_KNOWS for s in (False, True)])
def test_saelens_loads_saelabs_transcoders_with_the_same_outputs(tmp_path, arch, skip):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _transcoder(arch, skip)
    x = _inputs()
    save_sae(sae, tmp_path / "tc")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    expected_class = {
        ("", False): "Transcoder",
        ("", True): "SkipTranscoder",
        ("jumprelu_", False): "JumpReLUTranscoder",
        ("jumprelu_", True): "JumpReLUSkipTranscoder",
    }[(SAVED_AS[arch], skip)]
    assert type(theirs).__name__ == expected_class
    ours = sae.to_inference()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("name", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelab_loads_saelens_transcoders(tmp_path, name):
    pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_class as saelens_class

    cls, cfg_cls = saelens_class(name)
    torch.manual_seed(1)
    fields = {"d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT, "apply_b_dec_to_input": False}
    theirs = cls(cfg_cls(**fields))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, p in theirs.named_parameters():
            if name == "threshold":
                p.fill_(0.05)
    theirs.save_model(str(tmp_path / "tc"))
    ours = load_sae(tmp_path / "tc")
    assert ours.cfg.d_out == D_OUT and ours.cfg.skip == ("skip" in name)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_transcoder_names_round_trip():
    for arch in ("standard", "jumprelu", "topk"):
        for skip in (False, True):
            assert parse_transcoder_architecture(transcoder_architecture(arch, skip)) == (arch, skip)
    assert transcoder_architecture("standard", True) == "skip_transcoder"
    assert parse_transcoder_architecture("jumprelu") is None
    assert parse_transcoder_architecture("notatranscoder") is None


def test_a_transcoder_file_without_d_out_is_a_clear_error(tmp_path):
    save_sae(_transcoder("jumprelu", skip=True), tmp_path / "tc")
    cfg_path = tmp_path / "tc" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["d_out"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="d_out"):
        load_sae(tmp_path / "tc")


def test_a_wrong_skip_shape_names_the_tensor_and_d_out(tmp_path):
    from safetensors.torch import load_file, save_file

    save_sae(_transcoder("standard", skip=True), tmp_path / "tc")
    weights = tmp_path / "tc" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_skip"] = torch.zeros(D_IN, D_OUT)  # transposed
    save_file(tensors, str(weights))
    with pytest.raises(FileFormatError, match=r"'W_skip'.*d_out=6"):
        load_sae(tmp_path / "tc")


def test_transcoder_configs_are_checked():
    with pytest.raises(ConfigError, match="apply_b_dec_to_input"):
        build_sae("topk", d_in=D_IN, d_sae=D_SAE, k=3, d_out=D_OUT)  # b_dec is the output's bias
    with pytest.raises(ConfigError, match="skip"):
        build_sae("topk", d_in=D_IN, d_sae=D_SAE, k=3, skip=True)  # a skip needs d_out
    with pytest.raises(ConfigError, match="matching_pursuit|MatchingPursuit"):
        build_sae("matching_pursuit", d_in=D_IN, d_sae=D_SAE, **transcoder_fields(D_OUT, False))
    with pytest.raises(ConfigError, match="ista_steps"):
        build_sae("recipe", d_in=D_IN, d_sae=D_SAE, k=3, ista_steps=1, **transcoder_fields(D_OUT, False))
    # The recipe's benchmark config turns ISTA and leave-one-out off for a transcoder by itself.
    cfg = get_sae_class("recipe").config_for_l0(D_IN, D_SAE, 3.0, 100, **transcoder_fields(D_OUT, True))
    assert cfg.ista_steps == 0 and not cfg.leave_one_out  # type: ignore[attr-defined]


def test_an_autoencoders_config_dict_is_unchanged():
    """d_out and skip appear in an SAE's config dict only for transcoders (stored configs stay as they were)."""
    ae = build_sae("topk", d_in=D_IN, d_sae=D_SAE, k=3)
    assert "d_out" not in ae.cfg.to_dict() and "skip" not in ae.cfg.to_dict()
    tc = _transcoder("topk", skip=True)
    assert tc.cfg.to_dict()["d_out"] == D_OUT and tc.cfg.to_dict()["skip"] is True
    assert tuple(tc.W_dec_LD.shape) == (D_SAE, D_OUT) and tuple(tc.W_skip_ED.shape) == (D_OUT, D_IN)
