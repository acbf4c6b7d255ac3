"""A tiny randomly initialised causal LM with a word-level tokenizer, saved as a local model folder.

For tests, benchmarks and smoke runs without network access: `build_tiny_causal_lm(dir, lines)`
writes what `save_pretrained` writes for a real model, so every code path that takes `--model DIR`
runs on it. The tokenizer prepends BOS, so special-token handling is exercised too.

A random model's MLPs write tiny outputs (weights drawn at std 0.02), so deleting one barely moves
its loss and "CE loss recovered" is a ratio of noise there; `train_steps` first fits the model to
`lines` (next-token loss, Adam) so that its layers matter, as a real model's do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from saelab.errors import require

SPECIAL_TOKENS = ["[UNK]", "[BOS]", "[EOS]", "[PAD]"]


def build_tiny_causal_lm(
    out_dir: str | Path,
    lines: Iterable[str],
    arch: str = "gpt2",
    d_model: int = 32,
    n_layers: int = 3,
    n_heads: int = 2,
    context_size: int = 64,
    seed: int = 0,
    train_steps: int = 0,
) -> Path:
    """Write a random `arch` ("gpt2" or "llama") model and its tokenizer to `out_dir`, fitted to
    `lines` for `train_steps` steps first (0: left random)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    require(arch in ("gpt2", "llama"), "arch", arch, "must be 'gpt2' or 'llama'")
    require(isinstance(train_steps, int) and train_steps >= 0, "train_steps", train_steps, "must be an integer ≥ 0")
    lines = list(lines)
    words = sorted({w for line in lines for w in re.findall(r"\w+|[^\w\s]", line)})
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(vocab),
            n_positions=context_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            bos_token_id=ids["[BOS]"],
            eos_token_id=ids["[EOS]"],
            pad_token_id=ids["[PAD]"],
        )
    else:
        cfg = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            max_position_embeddings=context_size,
            bos_token_id=ids["[BOS]"],
            eos_token_id=ids["[EOS]"],
            pad_token_id=ids["[PAD]"],
        )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg) if isinstance(cfg, GPT2Config) else LlamaForCausalLM(cfg)
    if train_steps:
        _fit(model, tokenizer, lines, context_size, train_steps, seed)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _fit(model: Any, tokenizer: Any, lines: list[str], context_size: int, steps: int, seed: int) -> None:
    """Next-token training on the lines, 32 at a time in a seeded order (CPU, seconds)."""
    import torch

    enc = tokenizer(lines, truncation=True, max_length=context_size, padding=True, return_tensors="pt")
    ids_NS, mask_NS = enc["input_ids"], enc["attention_mask"]
    labels_NS = ids_NS.masked_fill(mask_NS == 0, -100)  # padding is never a target
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows_B = torch.randint(0, ids_NS.shape[0], (32,), generator=g)
        loss = model(input_ids=ids_NS[rows_B], attention_mask=mask_NS[rows_B], labels=labels_NS[rows_B]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
