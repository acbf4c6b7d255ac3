import json

import pytest
import torch

from saelab.errors import FileFormatError
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.training.trainer import build_sae

ARCHS = {
    "standard": {},
    "jumprelu": {},
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "matryoshka": {"k": 3, "matryoshka_widths": [4, 12]},
    "matching_pursuit": {"max_iterations": 3, "residual_threshold": 0.0},
}


def _trained(arch, normalize="none"):
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=8, d_sae=24, normalize_activations=normalize, **ARCHS[arch])
    with torch.no_grad():
        sae.W_dec_LD.mul_(torch.rand(24, 1) + 0.5)
        sae.b_dec_D.normal_(std=0.3)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.05)
        sae.input_scale.fill_(2.0)
    return sae


# Matching pursuit's input-scale folding is covered in test_matching_pursuit.
ROUNDTRIP_CASES = [
    (a, n) for a in ARCHS for n in ("none", "expected_average_only_in") if not (a == "matching_pursuit" and n != "none")
]


@pytest.mark.parametrize("arch,normalize", ROUNDTRIP_CASES)
def test_save_load_roundtrip_preserves_inference_outputs(tmp_path, arch, normalize):
    sae = _trained(arch, normalize)
    x = torch.randn(64, 8) * 3
    expected = sae.to_inference()(x)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["training_architecture"] == arch
    assert cfg["normalize_activations"] == "none"


def test_batchtopk_saves_as_jumprelu_with_its_threshold(tmp_path):
    sae = _trained("batchtopk")
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    loaded = load_sae(tmp_path / "s")
    torch.testing.assert_close(loaded.threshold_L, torch.full((24,), 0.05))


def test_corrupt_or_missing_files_are_clear_errors(tmp_path):
    save_sae(_trained("topk"), tmp_path / "s")
    with pytest.raises(FileFormatError, match="does not exist"):
        load_sae(tmp_path / "nope")
    data = (tmp_path / "s" / "sae_weights.safetensors").read_bytes()
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load_sae(tmp_path / "s")


@pytest.mark.interop
@pytest.mark.parametrize("arch", list(ARCHS))
def test_saelens_loads_what_saelab_saves(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _trained(arch, "none")
    x = torch.randn(64, 8) * 3
    save_sae(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    torch.testing.assert_close(theirs(x), sae.to_inference()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize(
    "arch", ["standard", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "matching_pursuit"]
)
def test_saelab_loads_what_saelens_saves(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_training_class

    torch.manual_seed(1)
    cls, cfg_cls = get_sae_training_class(arch)
    extra = {"k": 3} if "topk" in arch else {}
    if arch == "matryoshka_batchtopk":
        extra["matryoshka_widths"] = [4, 12, 24]
    if arch == "matching_pursuit":
        extra.update(max_iterations=3, residual_threshold=0.0)
    theirs = cls(cfg_cls(d_in=8, d_sae=24, **extra))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if hasattr(theirs, "topk_threshold"):
            theirs.topk_threshold.fill_(0.05)
    theirs.save_inference_model(str(tmp_path / "s"))
    reloaded = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    ours = load_sae(tmp_path / "s")
    x = torch.randn(64, 8) * 3
    torch.testing.assert_close(ours(x), reloaded(x), rtol=1e-5, atol=1e-5)
