"""`saelab train --init-from DIR`: fine-tuning starts where the pretrained SAE was, and mismatches are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.cli import main
from saelab.data import DataSpec, open_data
from saelab.errors import ConfigError, FileFormatError
from saelab.runs import RunConfig, run_training
from saelab.runs.run import build_run_saes
from saelab.saes.base import mse_per_sample
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.training.trainer import build_sae

NAME = "batchtopk-l0_3"


def config(model_dir, **overrides):
    base = dict(
        data=str(model_dir),
        arch=["batchtopk"],
        l0=[3],
        width=32,
        samples=256 * 30,
        batch_size=256,
        lr=3e-3,
        eval_samples=2000,
        checkpoint_minutes=0,
    )
    return RunConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pretrained(tiny_synthetic_model_dir, tmp_path_factory) -> Path:
    """A BatchTopK SAE trained by saelab and saved (as a JumpReLU inference SAE)."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run_training(config(tiny_synthetic_model_dir, lr=2e-2), run_dir, progress=False)  # loss ~10 → ~2.2
    return run_dir / "saes" / NAME


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def first_logged(run_dir: Path, key: str) -> float:
    history = json.loads((run_dir / "run.json").read_text())["history"]
    return next(h[f"{NAME}/{key}"] for h in history if f"{NAME}/{key}" in h)


def test_fine_tuning_starts_at_the_saved_sae_loss(tiny_synthetic_model_dir, pretrained, tmp_path):
    torch.set_num_threads(1)
    # Two steps: the trainer logs at the last one, on the second batch of the run's stream.
    short = dict(samples=256 * 2)
    run_training(config(tiny_synthetic_model_dir, init_from=str(pretrained), **short), tmp_path / "ft", progress=False)
    run_training(config(tiny_synthetic_model_dir, **short), tmp_path / "fresh", progress=False)
    tuned, fresh = first_logged(tmp_path / "ft", "loss"), first_logged(tmp_path / "fresh", "loss")

    # The saved SAE's own loss (MSE; AuxK is 0 with no dead latents yet) on that same second batch.
    stream = open_data(DataSpec(data=str(tiny_synthetic_model_dir)), seed=0, batch_size=256).source
    stream.next_batch(256)
    x_BD = stream.next_batch(256)
    with torch.no_grad():
        saved = float(mse_per_sample(load_sae(pretrained)(x_BD), x_BD).mean())
    # Not a statistical tolerance (same batch, same weights): one Adam step at lr 3e-3, BatchTopK's
    # per-batch selection vs the JumpReLU threshold and, where the CPU has bf16 units, bf16 autocast
    # make a small difference (measured 0.3% in fp32). A fresh SAE after the same two steps sits at
    # ~10, the pretrained one near 2.2.
    assert tuned == pytest.approx(saved, rel=0.05)
    assert tuned < 0.35 * fresh

    cfg = json.loads((tmp_path / "ft" / "run.json").read_text())["config"]
    assert cfg["init_from"] == str(pretrained)
    meta = json.loads((tmp_path / "ft" / "saes" / NAME / "cfg.json").read_text())["metadata"]
    assert meta["init_from"] == str(pretrained) and meta["training_architecture"] == "batchtopk"


def test_init_copies_weights_and_threshold(tiny_synthetic_model_dir, pretrained):
    saved = load_sae(pretrained)
    cfg = config(tiny_synthetic_model_dir, init_from=str(pretrained))
    sae = build_run_saes(cfg, 24)[NAME]
    for name in ("W_enc_DL", "b_enc_L", "W_dec_LD", "b_dec_D"):
        torch.testing.assert_close(getattr(sae, name), getattr(saved, name), rtol=0, atol=0, msg=name)
    assert float(sae.topk_threshold) == pytest.approx(float(saved.threshold_L.detach()[0]))
    assert sae.cfg.normalize_activations == "none" and sae.cfg.k == 3
    # With unit decoder rows (saved folded), rescaling by decoder norm changes nothing: the arch default stays.
    assert sae.cfg.rescale_acts_by_decoder_norm


def save_dictionary_learning_batchtopk(saved: Path, out: Path, k: int) -> Path:
    """A saelab BatchTopK SAE (saved as JumpReLU) as dictionary_learning's BatchTopKSAE: ae.pt + config.json."""
    sae = load_sae(saved)
    out.mkdir(parents=True)
    state = {
        "encoder.weight": sae.W_enc_DL.detach().t().contiguous(),
        "encoder.bias": sae.b_enc_L.detach().clone(),
        "decoder.weight": sae.W_dec_LD.detach().t().contiguous(),
        "b_dec": sae.b_dec_D.detach().clone(),
        "threshold": sae.threshold_L.detach()[0].clone(),
        "k": torch.tensor(k),
    }
    torch.save(state, out / "ae.pt")
    trainer = {"dict_class": "BatchTopKSAE", "activation_dim": sae.cfg.d_in, "dict_size": sae.cfg.d_sae, "k": k}
    (out / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    return out


def test_dictionary_learning_batchtopk_fine_tunes_as_batchtopk(tiny_synthetic_model_dir, pretrained, tmp_path, capsys):
    """A foreign BatchTopK saved in its JumpReLU inference form: the folder's class names the training
    architecture and its k the L0, and the weights go into a BatchTopK SAE."""
    folder = save_dictionary_learning_batchtopk(pretrained, tmp_path / "dl", k=3)
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        tiny_synthetic_model_dir,
        "--init-from",
        folder,
        "--batch-size",
        "256",
        "--samples",
        "512",
        "--eval-samples",
        "1k",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    assert "JumpReLU inference SAE trained as batchtopk" in " ".join(out.split())
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (run["config"]["arch"], run["config"]["l0"], run["config"]["width"]) == (["batchtopk"], [3.0], 32)
    cfg = config(tiny_synthetic_model_dir, init_from=str(folder))
    sae = build_run_saes(cfg, 24)[NAME]
    saved = load_sae(pretrained)
    for name in ("W_enc_DL", "b_enc_L", "W_dec_LD", "b_dec_D"):
        torch.testing.assert_close(getattr(sae, name), getattr(saved, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["jumprelu", "topk", "gemma_scope"])
def test_same_architecture_keeps_the_function(kind, tmp_path):
    """Fine-tuning a folder of the same class starts from exactly its function: here with decoder rows
    that are not unit-norm (where a TopK SAE must not rescale by them) and, for Gemma Scope's layout,
    an encoder that does not subtract b_dec from its input."""
    g = torch.Generator().manual_seed(0)
    if kind == "topk":
        src = build_sae("topk", d_in=8, d_sae=16, k=3, rescale_acts_by_decoder_norm=False)
    else:
        src = build_sae("jumprelu", d_in=8, d_sae=16, apply_b_dec_to_input=kind == "jumprelu")
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
    folder = tmp_path / "sae"
    if kind == "gemma_scope":
        import numpy as np

        folder.mkdir()
        names = {
            "W_enc": "W_enc_DL",
            "W_dec": "W_dec_LD",
            "b_enc": "b_enc_L",
            "b_dec": "b_dec_D",
            "threshold": "threshold_L",
        }
        np.savez(folder / "params.npz", **{k: getattr(src, v).detach().numpy() for k, v in names.items()})
    else:
        save_sae(src, folder, metadata={"l0_target": 3})
    from saelab.saes.formats import load_pretrained

    saved = load_pretrained(folder)
    arch = "topk" if kind == "topk" else "jumprelu"
    cfg = RunConfig(data="sbw-toy", arch=[arch], l0=[3], width=16, samples=1024, init_from=str(folder))
    sae = build_run_saes(cfg, 8)[f"{arch}-l0_3"]
    x_BD = torch.randn(64, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sae.to_inference()(x_BD), saved(x_BD))
        torch.testing.assert_close(sae.to_inference()(x_BD), src(x_BD))
    assert sae.cfg.apply_b_dec_to_input == (kind != "gemma_scope")
    if kind == "topk":
        assert not sae.cfg.rescale_acts_by_decoder_norm


def test_mismatches_are_one_line_errors(tiny_synthetic_model_dir, pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"^width=64: differs from d_sae=32 of the SAE in"):
        run_training(config(tiny_synthetic_model_dir, init_from=str(pretrained), width=64), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^arch='topk': differs from the architecture .*\(batchtopk or jumprelu\)"):
        run_training(config(tiny_synthetic_model_dir, init_from=str(pretrained), arch=["topk"]), tmp_path / "b")
    acts = tmp_path / "acts.pt"
    torch.save(torch.randn(4096, 16), acts)
    data = dict(data=str(acts))  # an activation file, 16 wide
    with pytest.raises(ConfigError, match=r"has d_in=24 but the data .*acts.pt has d_in=16"):
        run_training(config(tiny_synthetic_model_dir, init_from=str(pretrained), **data), tmp_path / "c")
    with pytest.raises(FileFormatError, match="does not exist"):
        run_training(config(tiny_synthetic_model_dir, init_from=str(tmp_path / "nope")), tmp_path / "d")
    for sub in "abcd":
        assert not (tmp_path / sub).exists()  # nothing left behind


def test_cli_takes_arch_width_and_l0_from_the_folder(tiny_synthetic_model_dir, pretrained, tmp_path, capsys):
    torch.set_num_threads(1)
    common = ("--data", tiny_synthetic_model_dir, "--init-from", pretrained, "--batch-size", "256")
    code, out, err = run_cli(
        capsys, "train", *common, "--samples", "512", "--eval-samples", "1k", "--out", tmp_path / "r", "--json"
    )
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert (line["arch"], line["l0_target"]) == ("batchtopk", 3)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["width"] == 32

    code, out, err = run_cli(capsys, "train", *common, "--width", "64", "--out", tmp_path / "w")
    assert code == 2 and "width=64" in err and "d_sae=32" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "train", *common, "--arch", "standard", "--out", tmp_path / "s")
    assert code == 2 and "arch='standard'" in err and "batchtopk or jumprelu" in err
    code, out, err = run_cli(capsys, "train", *common[:2], "--init-from", tmp_path / "nope", "--out", tmp_path / "n")
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / sub).exists() for sub in "wsn")
