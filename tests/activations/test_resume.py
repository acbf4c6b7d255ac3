"""A run on a live LM (with the prefetch thread) killed mid-way resumes exactly from its checkpoint."""

import pytest
import torch

pytest.importorskip("transformers")

from saelab.activations.buffer import PrefetchSource  # noqa: E402
from saelab.activations.hooked_lm import HookedLM  # noqa: E402
from saelab.activations.sources import LMActivationSource  # noqa: E402
from saelab.activations.text import ContextStream, load_documents  # noqa: E402
from saelab.training import checkpoint as ckpt_io  # noqa: E402
from saelab.training.trainer import TrainConfig, Trainer, build_sae  # noqa: E402


class Killed(Exception):
    pass


class KillAfter:
    """Passes batches through, then dies like a killed process would."""

    def __init__(self, source, n):
        self.source, self.n, self.d_in = source, n, source.d_in

    def next_batch(self, b):
        self.n -= 1
        if self.n < 0:
            raise Killed
        return self.source.next_batch(b)

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, s):
        self.source.load_state_dict(s)


def test_lm_run_resumes_exactly(tiny_gpt2, corpus_path, tmp_path):
    hooked = HookedLM.from_pretrained(tiny_gpt2, layer=1)
    docs = load_documents(corpus_path)
    cfg = TrainConfig(samples=24 * 64, batch_size=64, lr=3e-3, log_every=4, checkpoint_every=10)

    def make(kill=None):
        lm = LMActivationSource(
            hooked,
            ContextStream(docs, hooked.tokenizer, context_size=32, seed=2),
            model_batch_size=4,
            buffer_size=512,
            seed=2,
        )
        src = PrefetchSource(lm, batch_size=64, depth=2)
        torch.manual_seed(0)
        sae = build_sae("topk", d_in=hooked.d_in, d_sae=48, k=3)
        return Trainer(
            {"s": sae}, KillAfter(src, kill) if kill else src, cfg, checkpoint_path=tmp_path / "ckpt.pt", progress=False
        ), src

    full, src = make()
    full.train()
    src.close()
    expected = {k: v.clone() for k, v in full.saes["s"].state_dict().items()}

    ckpt_io.remove(tmp_path / "ckpt.pt")  # a checkpoint is a folder (training/checkpoint.py)
    killed, src = make(kill=15)  # the checkpoint at step 10 survives, steps 11-14 are lost
    with pytest.raises(Killed):
        killed.train()
    src.close()
    resumed, src = make()
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 10
    resumed.train()
    src.close()
    for k, v in resumed.saes["s"].state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
