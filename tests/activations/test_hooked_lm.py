"""The hooked LM: activations equal output_hidden_states at the layer, special tokens excluded,
the forward pass stops at the hook, bad layer / module names list the valid ones."""

import pytest
import torch

pytest.importorskip("transformers")

from saelab.activations.hooked_lm import HookedLM  # noqa: E402
from saelab.activations.text import ContextStream, load_documents  # noqa: E402
from saelab.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [0, 1])
def test_activations_equal_hidden_states_at_layer(arch, layer, request, corpus_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    hooked = HookedLM.from_pretrained(model_dir, layer=layer)
    docs = load_documents(corpus_path)
    batch = ContextStream(docs, hooked.tokenizer, context_size=24, seed=1).next_batch(6)
    # Contexts of different lengths, so the batch is padded.
    assert (batch.attention_mask_BS == 0).any()
    acts_ND = hooked.activations(batch.input_ids_BS, batch.attention_mask_BS)
    out = hooked.model(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS, output_hidden_states=True)
    keep_BS = batch.attention_mask_BS.bool() & ~torch.isin(
        batch.input_ids_BS, torch.tensor(hooked.tokenizer.all_special_ids)
    )
    expected_ND = out.hidden_states[layer + 1][keep_BS]
    assert acts_ND.shape == (int(keep_BS.sum()), 32)
    torch.testing.assert_close(acts_ND, expected_ND, rtol=1e-5, atol=1e-5)


def test_bos_and_padding_are_excluded(tiny_gpt2):
    hooked = HookedLM.from_pretrained(tiny_gpt2, layer=1)
    tok = hooked.tokenizer
    enc = tok(["the cat sat", "the river ran slowly past the old mill"], padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
    n_words = 3 + 8
    acts_ND = hooked.activations(enc["input_ids"], enc["attention_mask"])
    assert acts_ND.shape[0] == n_words
    # The first row is the token after BOS of the first context, not BOS itself.
    full_BSD = hooked.hooked_output(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(acts_ND[0], full_BSD[0, 1])
    assert not any(torch.allclose(acts_ND[i], full_BSD[0, 0]) for i in range(acts_ND.shape[0]))


def test_forward_stops_at_hooked_layer(tiny_gpt2):
    hooked = HookedLM.from_pretrained(tiny_gpt2, layer=0)
    calls = []
    handle = hooked.model.transformer.h[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = torch.tensor([[1, 5, 6, 7]])
        hooked.activations(ids, torch.ones_like(ids))
        assert calls == []
        hooked.logits(ids, torch.ones_like(ids))  # the full model still runs the later blocks
        assert calls == [1]
    finally:
        handle.remove()


def test_unknown_layer_lists_valid_layers(tiny_gpt2):
    with pytest.raises(ConfigError) as err:
        HookedLM.from_pretrained(tiny_gpt2, layer=6)
    assert err.value.field == "layer" and err.value.value == 6
    assert "0..2" in str(err.value) and "transformer.h.0" in str(err.value)


def test_unknown_module_lists_module_names(tiny_llama):
    with pytest.raises(ConfigError) as err:
        HookedLM.from_pretrained(tiny_llama, hook_module="model.layers.9.mlp")
    assert err.value.field == "hook_module"
    assert "model.layers.1.mlp" in str(err.value) and "model.layers.2" in str(err.value)


def test_named_module_hook(tiny_llama):
    hooked = HookedLM.from_pretrained(tiny_llama, hook_module="model.layers.1")
    by_layer = HookedLM.from_pretrained(tiny_llama, layer=1)
    ids = torch.tensor([[1, 8, 9, 10, 11]])
    torch.testing.assert_close(
        hooked.activations(ids, torch.ones_like(ids)), by_layer.activations(ids, torch.ones_like(ids))
    )


def test_model_folder_must_exist_locally(tmp_path):
    with pytest.raises(ConfigError) as err:
        HookedLM.from_pretrained("gpt2", layer=0)  # a hub name: never downloaded
    assert err.value.field == "model" and "local model folder" in str(err.value)


def test_bfloat16_model_loads_in_bfloat16_and_matches_float32(tiny_gpt2):
    ids = torch.tensor([[1, 8, 9, 10, 11, 12]])
    fp32 = HookedLM.from_pretrained(tiny_gpt2, layer=1).activations(ids, torch.ones_like(ids))
    bf16 = HookedLM.from_pretrained(tiny_gpt2, layer=1, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16.activations(ids, torch.ones_like(ids)).float(), fp32, rtol=0.05, atol=0.05)
