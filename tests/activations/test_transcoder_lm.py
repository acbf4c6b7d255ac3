"""Transcoders on a real model's MLP: paired hooks (the MLP's input and output), the paired cache,
the transcoder spliced in place of the MLP (CE/KL recovered, FVU), and the CLI end to end.

The model is a tiny GPT-2 fitted to the corpus for a few steps (`tiny_gpt2_trained`), so zeroing its
layer-1 MLP costs loss and CE recovered is a real ratio (each test asserts the gap it relies on).
"""

import json
import math
from typing import Any, cast

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from saelab.activations.cache import cache_source, write_cache  # noqa: E402
from saelab.activations.hooked_lm import HookedLM, load_causal_lm  # noqa: E402
from saelab.activations.text import ContextStream, load_documents  # noqa: E402
from saelab.data import DataSpec, PairedSource, is_paired, open_data  # noqa: E402
from saelab.errors import ConfigError, FileFormatError  # noqa: E402
from saelab.metrics.lm import evaluate_sae_on_lm, replaced_output_lm_metrics  # noqa: E402
from saelab.saes.base import transcoder_fields  # noqa: E402
from saelab.saes.registry import get_sae_class  # noqa: E402
from tests.activations.test_cli import SMALL, last_json, run_cli  # noqa: E402

IN, OUT = "transformer.h.1.mlp:input", "transformer.h.1.mlp"
LM_KEYS = (
    "ce_loss_recovered",
    "kl_div",
    "fvu",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero_ablation",
    "kl_div_zero_ablation",
    "explained_variance",
    "l0",
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def lm(tiny_gpt2_trained, corpus_path):
    model, tokenizer = load_causal_lm(tiny_gpt2_trained)
    hooked = HookedLM(model, tokenizer, hook_module=IN, out_hook_module=OUT)
    stream = ContextStream(load_documents(corpus_path), tokenizer, context_size=32, split="eval")
    return hooked, list(stream.iter_once(8))


def mlp_of(model: nn.Module, layer: int = 1):
    """The MLP's own computation, called without its module (whose hooks would fire again)."""
    mlp: Any = model.get_submodule(f"transformer.h.{layer}.mlp")
    return lambda x_ND: mlp.c_proj(mlp.act(mlp.c_fc(x_ND)))


def test_paired_activations_are_the_mlps_input_and_output(lm):
    hooked, batches = lm
    assert hooked.paired and (hooked.d_in, hooked.d_out) == (32, 32)
    batch = batches[0]
    seen = {}
    mlp = hooked.model.get_submodule("transformer.h.1.mlp")
    handle = mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    try:
        hooked.model(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS, use_cache=False)
    finally:
        handle.remove()
    keep_BS = hooked.token_mask(batch.input_ids_BS, batch.attention_mask_BS)
    x_ND, y_NE = hooked.paired_activations(batch.input_ids_BS, batch.attention_mask_BS)
    assert x_ND.shape[0] == int(keep_BS.sum()) > 0 and y_NE.shape == x_ND.shape
    assert torch.equal(x_ND, seen["x"][keep_BS]) and torch.equal(y_NE, seen["y"][keep_BS])
    # x alone is what the input hook gives an SAE
    assert torch.equal(hooked.activations(batch.input_ids_BS, batch.attention_mask_BS), x_ND)


def test_paired_cache_round_trip_keeps_rows_aligned(lm, tiny_gpt2_trained, corpus_path, tmp_path):
    hooked, _ = lm
    spec = DataSpec(
        model=str(tiny_gpt2_trained),
        hook_module=IN,
        out_hook_module=OUT,
        dataset=str(corpus_path),
        context_size=32,
        buffer_size=512,
        prefetch=False,
    )
    opened = open_data(spec, hooked=hooked)
    assert is_paired(opened.source) and cast(PairedSource, opened.source).d_out == 32
    identity = hooked.identity()
    assert identity["out_hook_module"] == OUT and identity["d_out"] == 32
    write_cache(opened.source, tmp_path / "c", tokens=600, identity=identity, shard_tokens=250)
    # Rerunning with more rows continues after the last complete shard.
    write_cache(opened.source, tmp_path / "c", tokens=1000, identity=identity, shard_tokens=250)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["total_rows"] == 1000 and manifest["d_out"] == 32 and manifest["out_hook_module"] == OUT
    from safetensors.torch import load_file

    shard = load_file(str(tmp_path / "c" / "shard_00000.safetensors"))
    assert shard["activations"].shape == (250, 32) and shard["targets"].shape == (250, 32)
    source = cast(PairedSource, cache_source(tmp_path / "c"))
    x_ND, y_NE = source.next_pair(1000)
    # The rows were shuffled, yet each stored target is the MLP of its own stored input.
    with torch.no_grad():
        torch.testing.assert_close(mlp_of(hooked.model)(x_ND), y_NE, rtol=1e-5, atol=1e-5)
    assert not torch.equal(x_ND[:1], x_ND[1:2])
    # A cache of pairs cannot be continued as a cache of inputs alone.
    unpaired = {k: v for k, v in identity.items() if k not in ("out_hook_module", "d_out")}
    with pytest.raises(ConfigError, match="holds paired rows"):
        write_cache(opened.source, tmp_path / "c", tokens=2000, identity=unpaired)


def test_exact_replacement_recovers_everything_and_zero_nothing(lm):
    hooked, batches = lm
    mlp = mlp_of(hooked.model)
    exact = replaced_output_lm_metrics(hooked, batches, lambda x, y: mlp(x))
    # Zeroing the fitted model's MLP costs loss, so the ratio is defined (the gap is ≈ 0.11 nats).
    assert exact["ce_loss_zero_ablation"] - exact["ce_loss_clean"] > 0.02
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact["kl_div"] < 1e-8 and exact["kl_div_zero_ablation"] > 1e-3
    zero = replaced_output_lm_metrics(hooked, batches, lambda x, y: torch.zeros_like(y))
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert zero["kl_div"] == pytest.approx(exact["kl_div_zero_ablation"])
    # The prediction must come from the MLP's *input*: the MLP of the input one token later is wrong.
    shifted = replaced_output_lm_metrics(hooked, batches, lambda x, y: mlp(torch.roll(x, 1, dims=0)))
    assert shifted["kl_div"] > 1e-3 and shifted["ce_loss_recovered"] < 0.99


def test_an_exact_skip_transcoder_spliced_in_recovers_everything(tiny_gpt2_trained, corpus_path):
    """A linear MLP (activation removed) is reproduced exactly by a skip transcoder: W_skip = (W1 W2)ᵀ,
    b_dec = b1 W2 + b2, no latents. Through `evaluate_sae_on_lm` it scores FVU ≈ 0, CE recovered ≈ 1,
    KL ≈ 0; with its weights zeroed, CE recovered 0 and FVU ≥ 1."""
    model, tokenizer = load_causal_lm(tiny_gpt2_trained)
    mlp: Any = model.get_submodule("transformer.h.1.mlp")
    mlp.act = nn.Identity()
    hooked = HookedLM(model, tokenizer, hook_module=IN, out_hook_module=OUT)
    batches = list(ContextStream(load_documents(corpus_path), tokenizer, context_size=32, split="eval").iter_once(8))
    cls = get_sae_class("topk")
    torch.manual_seed(0)
    sae = cls(cls.config_for_l0(32, 16, 2.0, 100, **transcoder_fields(32, skip=True)))
    with torch.no_grad():
        sae.W_dec_LD.zero_()
        sae.W_skip_ED.copy_((mlp.c_fc.weight @ mlp.c_proj.weight).t())
        sae.b_dec_D.copy_(mlp.c_fc.bias @ mlp.c_proj.weight + mlp.c_proj.bias)
    tc = sae.to_inference()
    m = evaluate_sae_on_lm(tc, hooked, batches)
    assert m["ce_loss_zero_ablation"] - m["ce_loss_clean"] > 0.01  # ≈ 0.04 nats: the ratio is defined
    assert m["fvu"] < 1e-8 and m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4) and m["kl_div"] < 1e-6
    assert m["skip_norm"] > 0 and m["l0"] == pytest.approx(2.0)
    with torch.no_grad():
        tc.W_skip_ED.zero_()
        tc.b_dec_D.zero_()
    zero = evaluate_sae_on_lm(tc, hooked, batches)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9) and zero["fvu"] >= 1.0
    # A transcoder on an LM without the output hook: one clear error.
    unpaired = HookedLM(model, tokenizer, hook_module=IN)
    with pytest.raises(ConfigError, match="out_hook_module"):
        evaluate_sae_on_lm(tc, unpaired, batches)


TRAIN = [*SMALL, "--json"]


def test_cache_then_train_a_transcoder_spliced_into_the_lm(tiny_gpt2_trained, corpus_path, tmp_path, capsys):
    model, cache = tiny_gpt2_trained, tmp_path / "cache"
    hooks = ["--hook-module", IN, "--out-hook-module", OUT]
    code, out, err = run_cli(
        capsys,
        "cache",
        "--model",
        model,
        *hooks,
        "--dataset",
        corpus_path,
        "--out",
        cache,
        "--tokens",
        "3k",
        "--shard-tokens",
        "1500",
        "--context-size",
        "32",
        "--buffer-size",
        "1024",
        "--json",
    )
    assert code in (0, None), err
    [summary] = last_json(out)
    assert summary["rows"] == 3000 and summary["d_in"] == 32 and summary["d_out"] == 32
    # A paired cache without --transcoder: refused, naming the option.
    code, out, err = run_cli(capsys, "train", "--cache", cache, *TRAIN, "--out", tmp_path / "sae")
    assert code == 2 and "transcoder='none'" in err and "--transcoder plain" in err
    assert not (tmp_path / "sae").exists()
    # The cache with its model and corpus: the transcoder replaces the MLP in the forward pass.
    lm = ["--model", model, *hooks, "--dataset", corpus_path]
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--cache", cache, *lm, "--transcoder", "skip", *TRAIN, "--out", run)
    assert code in (0, None), err
    [line] = last_json(out)
    for key in LM_KEYS:
        assert math.isfinite(line[key]), (key, line)
    assert line["kl_div"] >= 0 and line["fvu"] == pytest.approx(1 - line["explained_variance"])
    assert line["ce_loss_zero_ablation"] > line["ce_loss_clean"] and line["skip_norm"] > 0
    saved = json.loads((run / "saes" / "topk-l0_4" / "cfg.json").read_text())
    assert saved["d_out"] == 32 and saved["architecture"] == "topk_skip_transcoder"  # SAELens's name
    assert saved["metadata"]["data"]["out_hook_module"] == OUT  # where it reads and writes, with the weights
    # The same cache with the model but without the output hook: one clear error.
    code, out, err = run_cli(
        capsys,
        "train",
        "--cache",
        cache,
        "--model",
        model,
        "--hook-module",
        IN,
        "--transcoder",
        "plain",
        *TRAIN,
        "--out",
        tmp_path / "run2",
    )
    assert code == 2 and "out_hook_module=None" in err and f"--out-hook-module {OUT}" in err


def test_train_a_transcoder_streaming_from_the_model(tiny_gpt2_trained, corpus_path, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_gpt2_trained,
        "--hook-module",
        IN,
        "--out-hook-module",
        OUT,
        "--dataset",
        corpus_path,
        "--transcoder",
        "plain",
        *TRAIN,
        "--out",
        tmp_path / "run",
    )
    assert code in (0, None), err
    [line] = last_json(out)
    assert all(math.isfinite(line[key]) for key in LM_KEYS) and line["skip_norm"] is None
    assert line["l0"] == pytest.approx(4.0)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["out_hook_module"] == OUT and run["status"] == "complete"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--out-hook-module", "transformer.h.1.mlpx", "out_hook_module='transformer.h.1.mlpx': no such module"),
        ("--out-hook-module", "transformer.h.1.mlp:inptu", "out_hook_module='transformer.h.1.mlp:inptu': the part"),
        ("--hook-module", "transformer.h.9.mlp:input", "hook_module='transformer.h.9.mlp:input': no such module"),
    ],
)
def test_a_bad_hook_names_the_option_and_value(tiny_gpt2, corpus_path, tmp_path, capsys, option, value, message):
    hooks = {"--hook-module": IN, "--out-hook-module": OUT, option: value}
    code, out, err = run_cli(
        capsys,
        "cache",
        "--model",
        tiny_gpt2,
        *[a for pair in hooks.items() for a in pair],
        "--dataset",
        corpus_path,
        "--out",
        tmp_path / "c",
        "--tokens",
        "500",
    )
    assert code == 2 and message in err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_cache_whose_inputs_and_targets_differ_in_length_is_refused(tmp_path, capsys):
    from saelab.data import TensorSource

    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(600, 8, generator=g)
    identity = {
        "model": "m",
        "model_fingerprint": "f",
        "layer": None,
        "hook_module": "h.0.mlp:input",
        "d_in": 8,
        "out_hook_module": "h.0.mlp",
        "d_out": 4,
    }
    write_cache(TensorSource(x_ND, x_ND[:, :4] * 2), tmp_path / "c", tokens=600, identity=identity, shard_tokens=300)
    assert cast(PairedSource, cache_source(tmp_path / "c")).next_pair(4)[1].shape == (4, 4)
    # Rewrite one shard with 300 inputs but 299 targets (and record its new size, so only alignment is wrong).
    from safetensors.torch import save_file

    shard = tmp_path / "c" / "shard_00001.safetensors"
    save_file({"activations": x_ND[:300].contiguous(), "targets": x_ND[:299, :4].contiguous()}, str(shard))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = shard.stat().st_size
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        FileFormatError, match=r"shard_00001.safetensors holds inputs \[300, 8\] but targets \[299, 4\]"
    ):
        cache_source(tmp_path / "c")
    code, out, err = run_cli(
        capsys, "train", "--cache", tmp_path / "c", "--transcoder", "plain", *TRAIN, "--out", tmp_path / "run"
    )
    assert code == 2 and "holds inputs [300, 8] but targets [299, 4]" in err
