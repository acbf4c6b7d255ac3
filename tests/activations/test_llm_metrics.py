"""Spliced-LM metrics: CE loss recovered is 1 for a perfect splice and 0 for zero-ablation; an SAE
sits in between; the LM source resumes exactly."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from saelab.activations.hooked_lm import HookedLM  # noqa: E402
from saelab.activations.sources import LMActivationSource  # noqa: E402
from saelab.activations.text import ContextStream, load_documents  # noqa: E402
from saelab.metrics.lm import evaluate_sae_on_lm, spliced_lm_metrics  # noqa: E402
from saelab.training.trainer import build_sae  # noqa: E402


@pytest.fixture(scope="module")
def hooked_and_batches(tiny_gpt2, corpus_path):
    hooked = HookedLM.from_pretrained(tiny_gpt2, layer=1)
    stream = ContextStream(load_documents(corpus_path), hooked.tokenizer, context_size=32, split="eval")
    return hooked, list(stream.iter_once(8))


def test_identity_splice_recovers_everything_and_zero_nothing(hooked_and_batches):
    hooked, batches = hooked_and_batches
    ident = spliced_lm_metrics(hooked, batches, lambda a: a)
    # A random LM: ablating the layer changes the loss (in either direction), so the ratio is defined.
    assert abs(ident["ce_loss_zero_ablation"] - ident["ce_loss_clean"]) > 1e-3
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_div"] == pytest.approx(0.0, abs=1e-7) and ident["kl_div_zero_ablation"] > 1e-4
    zero = spliced_lm_metrics(hooked, batches, torch.zeros_like)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    half = spliced_lm_metrics(hooked, batches, lambda a: 0.5 * a)
    assert math.isfinite(half["ce_loss_recovered"]) and half["ce_loss_recovered"] != pytest.approx(1.0, abs=1e-3)
    assert half["kl_div"] > 0


def test_sae_metrics_on_lm(hooked_and_batches):
    hooked, batches = hooked_and_batches
    torch.manual_seed(0)
    sae = build_sae("topk", d_in=hooked.d_in, d_sae=64, k=4)
    m = evaluate_sae_on_lm(sae.to_inference(), hooked, batches)
    n_tokens = sum(int(hooked.token_mask(b.input_ids_BS, b.attention_mask_BS).sum()) for b in batches)
    assert m["l0"] == pytest.approx(4.0) and 0 <= m["dead_latents"] <= 64
    assert m["eval_tokens"] > 0 and n_tokens > 0
    assert m["explained_variance"] < 0.5  # an untrained SAE reconstructs badly...
    assert m["kl_div"] > 0 and m["ce_loss_recovered"] < 0.99  # ...and the LM notices


def test_lm_source_batches_and_resume(tiny_gpt2, corpus_path):
    hooked = HookedLM.from_pretrained(tiny_gpt2, layer=1)
    docs = load_documents(corpus_path)

    def make():
        return LMActivationSource(
            hooked,
            ContextStream(docs, hooked.tokenizer, context_size=32, seed=0),
            model_batch_size=4,
            buffer_size=400,
            seed=0,
        )

    src = make()
    assert src.next_batch(100).shape == (100, 32)
    state = src.state_dict()
    a = src.next_batch(500)
    other = make()
    other.load_state_dict(state)
    assert torch.equal(other.next_batch(500), a)
