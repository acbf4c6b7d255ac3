"""Each pretrained-format reader against SAELens's own converter for that format, on the same files.

SAELens's hub loaders are run on local files (their `hf_hub_download` answers from the test's folder;
nothing touches the network) through `SAE.from_pretrained(..., converter=...)`, the path SAELens users
take. saelab's SAE must give the same codes and reconstructions within 1e-5, and the folder
`save_sae` writes from it must load in SAELens with the same outputs. Needs the test extra (sae_lens)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from saelab.saes.formats import load_pretrained
from saelab.saes.saelens_format import save_sae
from tests.saes import format_fixtures as ff

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as LensSAE  # noqa: E402
from sae_lens.loading import pretrained_sae_loaders as lens_loaders  # noqa: E402

D, L, B = 8, 16, 256
REPO = "local/gemma-scope-2b-pt-res"  # not a registered release; "2b" and "res" steer the Gemma 2 loader


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local stand-in for the hub: `hf_hub_download` returns files under tmp_path/hub."""
    root = tmp_path / "hub"

    def download(repo_id: str, filename: str, subfolder: str | None = None, **_: Any) -> str:
        path = root / (subfolder or "") / filename
        if not path.exists():
            raise FileNotFoundError(path)
        return str(path)

    monkeypatch.setattr(lens_loaders, "hf_hub_download", download)
    return root


def lens_sae(loader: Callable, folder_name: str, **overrides: Any):
    """SAELens's from_pretrained with `loader` as the converter (cfg overrides shrink Gemma's fixed widths)."""

    def converter(
        repo_id: str, folder_name: str, device: str, force_download: bool, cfg_overrides: dict[str, Any] | None
    ) -> Any:
        return loader(
            repo_id=repo_id,
            folder_name=folder_name,
            device=device,
            force_download=force_download,
            cfg_overrides={**(cfg_overrides or {}), **overrides},
        )

    with _quiet():
        return LensSAE.from_pretrained(REPO, folder_name, device="cpu", dtype="float32", converter=converter)


@contextlib.contextmanager
def _quiet():
    """SAELens warns that a repo id is not a registered release, and that no norm factor is known for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def assert_same_outputs(ours, theirs, reference: Callable, folder: Path) -> None:
    x_BD = torch.randn(B, D, generator=torch.Generator().manual_seed(5))
    keep = ff.clear_rows(reference(folder, x_BD)[2])
    assert int(keep.sum()) >= B // 2
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x_BD), theirs.encode(x_BD)
        x_ours, x_theirs = ours.decode(f_ours), theirs.decode(f_theirs)
        if getattr(ours.cfg, "skip", False):  # a skip transcoder's output adds x W_skipᵀ (SAELens: in forward)
            x_ours, x_theirs = x_ours + x_BD @ ours.W_skip_ED.T, theirs(x_BD)
    assert 0 < int((f_ours[keep] != 0).sum()) < f_ours[keep].numel()
    torch.testing.assert_close(f_ours[keep], f_theirs[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_ours[keep], x_theirs[keep], atol=1e-5, rtol=1e-5)


def check_converted_folder_loads_in_saelens(ours, reference, folder: Path, tmp_path: Path) -> None:
    out = save_sae(ours, tmp_path / "converted")
    with _quiet():
        theirs = LensSAE.load_from_disk(out)
    assert_same_outputs(ours, theirs, reference, folder)


@pytest.mark.parametrize("folder_name", ["layer_3/width_16k/average_l0_50", "embedding/width_4k/average_l0_6"])
def test_gemma_scope_matches_saelens(hub, tmp_path, folder_name):
    folder = ff.write_gemma_scope(hub / folder_name, D, L)
    theirs = lens_sae(lens_loaders.gemma_2_sae_huggingface_loader, folder_name, d_in=D, d_sae=L)
    ours = load_pretrained(folder)
    assert_same_outputs(ours, theirs, ff.ref_gemma_scope, folder)
    check_converted_folder_loads_in_saelens(ours, ff.ref_gemma_scope, folder, tmp_path)


@pytest.mark.parametrize(
    ("folder_name", "d_out"),
    [("resid_post/layer_3_width_16k_l0_small", None), ("transcoder/layer_3_width_16k_l0_small_affine", 12)],
)
def test_gemma_scope_2_matches_saelens(hub, tmp_path, monkeypatch, folder_name, d_out):
    from safetensors import safe_open

    folder = ff.write_gemma_scope_2(hub / folder_name, D, L, d_out=d_out, skip=d_out is not None)

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        with safe_open(str(hub / filename), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    monkeypatch.setattr(lens_loaders, "get_safetensors_tensor_shapes", shapes)
    theirs = lens_sae(lens_loaders.gemma_3_sae_huggingface_loader, folder_name)
    ours = load_pretrained(folder)
    if d_out is not None:
        assert theirs.cfg.architecture() == "jumprelu_skip_transcoder" and ours.cfg.d_out == d_out
    assert_same_outputs(ours, theirs, ff.ref_gemma_scope, folder)
    check_converted_folder_loads_in_saelens(ours, ff.ref_gemma_scope, folder, tmp_path)


# AutoEncoderNew is left out: SAELens's converter finds no b_dec in it (it reads bias/b_dec/decoder_bias only).
@pytest.mark.parametrize(
    "dict_class",
    [
        "AutoEncoder",
        "JumpReluAutoEncoder",
        "AutoEncoderTopK",
        "BatchTopKSAE",
        "MatryoshkaBatchTopKSAE",
        "GatedAutoEncoder",
    ],
)
def test_dictionary_learning_matches_saelens(hub, tmp_path, dict_class):
    folder_name = f"resid_post_layer_3/{dict_class}"
    folder = ff.write_dictionary_learning(hub / folder_name, dict_class, D, L)
    theirs = lens_sae(lens_loaders.dictionary_learning_sae_huggingface_loader_1, folder_name)
    ours = load_pretrained(folder)
    assert_same_outputs(ours, theirs, ff.ref_dictionary_learning, folder)
    check_converted_folder_loads_in_saelens(ours, ff.ref_dictionary_learning, folder, tmp_path)


def test_llama_scope_matches_saelens(hub, tmp_path, monkeypatch):
    import sae_lens.saes.sae as lens_sae_module

    folder_name = "Llama3_1-8B-Base-L3R-8x"
    folder = ff.write_llama_scope(hub / folder_name, D, L, norm_in=1.7)
    # The release table gives SAELens this factor for hub SAEs; it is √d_model / the stored norm.
    monkeypatch.setattr(lens_sae_module, "get_norm_scaling_factor", lambda release, sae_id: math.sqrt(D) / 1.7)
    theirs = lens_sae(lens_loaders.llama_scope_sae_huggingface_loader, folder_name)
    assert theirs.cfg.normalize_activations == "none"  # SAELens folded the factor, as saelab does
    ours = load_pretrained(folder)
    assert_same_outputs(ours, theirs, ff.ref_llama_scope, folder)
    check_converted_folder_loads_in_saelens(ours, ff.ref_llama_scope, folder, tmp_path)


def test_sparsify_matches_saelens_converter_tensors(tmp_path):
    """SAELens's `sparsify_disk_loader` reads the same tensors but hands W_dec over transposed ([d_in, d_sae]),
    which its SAE cannot load unless d_in = d_sae; with W_dec put back the right way round (and
    normalize_decoder false, where its b_dec handling agrees with sparsify), its TopK SAE matches saelab's."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    folder = ff.write_sparsify(tmp_path / "layers.3", D, L)
    cfg_dict, state = lens_loaders.sparsify_disk_loader(folder, device="cpu", cfg_overrides={"dtype": "float32"})
    ours = load_pretrained(folder)
    torch.testing.assert_close(state["W_enc"], ours.W_enc_DL)
    torch.testing.assert_close(state["b_enc"], ours.b_enc_L)
    torch.testing.assert_close(state["b_dec"], ours.b_dec_D)
    W_dec = state["W_dec"]
    if tuple(W_dec.shape) == (D, L):  # the orientation SAELens 6.54 produces
        W_dec = W_dec.t().contiguous()
    torch.testing.assert_close(W_dec, ours.W_dec_LD)
    with _quiet():
        theirs = LensSAE.from_dict(handle_config_defaulting(cfg_dict))
        theirs.load_state_dict({**state, "W_dec": W_dec})
    assert theirs.cfg.architecture() == "topk" and theirs.cfg.k == 3
    assert_same_outputs(ours, theirs, ff.ref_sparsify, folder)
    check_converted_folder_loads_in_saelens(ours, ff.ref_sparsify, folder, tmp_path)
