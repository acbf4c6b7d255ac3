"""Corpora: text file, folder, `datasets` folder, token files; held-out and per-rank splits."""

import numpy as np
import pytest
import torch

from saelab.activations.text import ContextStream, load_documents
from saelab.errors import ConfigError


class WordTokenizer:
    """Stands in for a HF tokenizer: one id per word, BOS = 1 prepended."""

    pad_token_id = 0
    all_special_ids = [0, 1]

    def __call__(self, texts, truncation=True, max_length=None, add_special_tokens=True):
        ids = [[1] + [2 + len(w) for w in t.split()] for t in texts]
        return {"input_ids": [s[:max_length] for s in ids]}


def test_text_file_and_folder(tmp_path, corpus_path, corpus_lines):
    assert load_documents(corpus_path) == corpus_lines
    (tmp_path / "b.txt").write_text("second file line one\n\nsecond file line two\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "ignore.json").write_text("{}")
    assert load_documents(tmp_path) == ["first file", "second file line one", "second file line two"]


def test_saved_dataset_text_column_and_missing_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": ["alpha beta", "gamma delta"], "id": [1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_documents(tmp_path / "ds", text_column="content") == ["alpha beta", "gamma delta"]
    with pytest.raises(ConfigError) as err:
        load_documents(tmp_path / "ds")
    assert err.value.field == "text_column" and err.value.value == "text"
    assert "['content', 'id']" in str(err.value)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_documents(tmp_path / "dd", text_column="content") == ["alpha beta", "gamma delta"]


def test_token_files(tmp_path):
    np.save(tmp_path / "tok.npy", np.arange(12, dtype=np.int64).reshape(3, 4))
    assert load_documents(tmp_path / "tok.npy") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    torch.save(torch.arange(10), tmp_path / "flat.pt")
    assert load_documents(tmp_path / "flat.pt", context_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(Exception, match="integer tensor"):
        load_documents(tmp_path / "bad.npy")


def test_missing_and_empty_dataset(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="no non-empty documents"):
        load_documents(tmp_path / "empty.txt")


def test_holdout_and_ranks_partition_the_corpus():
    docs = [f"doc {i}" for i in range(100)]
    tok = WordTokenizer()
    held = ContextStream(docs, tok, split="eval").documents
    r0 = ContextStream(docs, tok, rank=0, world_size=2).documents
    r1 = ContextStream(docs, tok, rank=1, world_size=2).documents
    assert len(held) == 5 and not set(held) & set(r0 + r1)
    assert not set(r0) & set(r1) and sorted(held + r0 + r1) == sorted(docs)


def test_context_stream_resumes_exactly_and_truncates():
    docs = [" ".join(["w"] * n) for n in range(1, 40)]
    stream = ContextStream(docs, WordTokenizer(), context_size=8, seed=3)
    stream.next_batch(30)  # crosses into the second epoch
    state = stream.state_dict()
    a = stream.next_batch(20)
    stream.load_state_dict(state)
    b = stream.next_batch(20)
    assert torch.equal(a.input_ids_BS, b.input_ids_BS) and a.input_ids_BS.shape[1] == 8
