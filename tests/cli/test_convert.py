"""`saelab convert IN --to saelens OUT`, and `eval` / `diagnose` reading foreign-format folders directly (issue 19)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from saelab.cli import main
from saelab.saes.formats import load_pretrained
from saelab.saes.saelens_format import load_sae
from tests.saes import format_fixtures as ff

D, L = 24, 32  # the tiny synthetic model's hidden width

WRITERS = {
    "gemma_scope": lambda f: ff.write_gemma_scope(f, D, L),
    "dictionary_learning": lambda f: ff.write_dictionary_learning(f, "BatchTopKSAE", D, L, k=4),
    "sparsify": lambda f: ff.write_sparsify(f, D, L, k=4),
    "llama_scope": lambda f: ff.write_llama_scope(f, D, L),
}


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def one_error_line(capsys, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_convert_writes_a_saelens_folder_with_the_same_sae(fmt, tmp_path, capsys):
    src = WRITERS[fmt](tmp_path / fmt)
    out = tmp_path / "out" / fmt
    code, stdout, err = run_cli(capsys, "convert", src, "--to", "saelens", out, "--json")
    assert code == 0, err
    (line,) = [json.loads(s) for s in stdout.splitlines() if s.strip()]
    original = load_pretrained(src)
    assert line["format"] == fmt and line["architecture"] == original.architecture
    assert (line["d_in"], line["d_sae"], line["d_out"], line["out"]) == (D, L, None, str(out))
    converted = load_sae(out)
    x_BD = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted.encode(x_BD), original.encode(x_BD), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(converted(x_BD), original(x_BD), atol=1e-6, rtol=1e-6)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["converted_from"]["format"] == fmt
    assert sorted(p.name for p in out.parent.iterdir()) == [fmt]  # no temporary folders left behind


def test_convert_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    src = WRITERS["sparsify"](tmp_path / "sp")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(capsys, "convert", src, "--to", "saelens", out)
    assert "already holds files" in line and "--force" in line and (out / "keep.txt").exists()
    code, _, err = run_cli(capsys, "convert", src, "--to", "saelens", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sp"]


def test_convert_bad_input_is_one_line(tmp_path, capsys):
    src = WRITERS["gemma_scope"](tmp_path / "g")
    line = one_error_line(capsys, "convert", src, "--to", "hdf5", tmp_path / "o")
    assert "to='hdf5'" in line and "saelens" in line
    (src / "params.npz").write_bytes(b"PK\x03\x04 truncated")
    line = one_error_line(capsys, "convert", src, "--to", "saelens", tmp_path / "o")
    assert "params.npz" in line and "truncated or corrupt" in line
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no SAE" in one_error_line(capsys, "convert", empty, "--to", "saelens", tmp_path / "o")


def test_eval_reads_a_foreign_folder_like_its_conversion(tiny_synthetic_model_dir, tmp_path, capsys):
    src = WRITERS["gemma_scope"](tmp_path / "gemma")
    assert run_cli(capsys, "convert", src, "--to", "saelens", tmp_path / "conv")[0] == 0
    results = []
    for folder in (src, tmp_path / "conv"):
        code, stdout, err = run_cli(
            capsys, "eval", "--sae", folder, "--data", tiny_synthetic_model_dir, "--samples", "1k", "--json"
        )
        assert code == 0, err
        (line,) = [json.loads(s) for s in stdout.splitlines() if s.strip()]
        results.append({k: v for k, v in line.items() if k not in ("samples_per_second", "run_dir")})
    assert results[0] == results[1] and results[0]["l0"] > 0


def test_diagnose_reads_a_foreign_folder(tiny_synthetic_model_dir, tmp_path, capsys):
    src = WRITERS["sparsify"](tmp_path / "layers.3")
    code, stdout, err = run_cli(
        capsys,
        "diagnose",
        src,
        "--data",
        tiny_synthetic_model_dir,
        "--samples",
        "1k",
        "--json",
        "--out",
        tmp_path / "diag",
    )
    assert code == 0, err
    (line,) = [json.loads(s) for s in stdout.splitlines() if s.strip()]
    assert line["name"] == "layers.3" and line["l0"] == pytest.approx(4.0, abs=0.5)


class _WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_eval_refuses_a_pickle_that_would_run_code(tiny_synthetic_model_dir, tmp_path, capsys):
    src = WRITERS["dictionary_learning"](tmp_path / "dl")
    marker = tmp_path / "pwned"
    state = torch.load(src / "ae.pt", weights_only=True)
    torch.save({**state, "b_dec": _WritesMarker(marker)}, src / "ae.pt")
    line = one_error_line(capsys, "eval", "--sae", src, "--data", tiny_synthetic_model_dir, "--samples", "1k")
    assert "ae.pt was refused" in line and not marker.exists()
    (src / "ae.pt").write_bytes(pickle.dumps({"b_dec": _WritesMarker(marker)}))
    line = one_error_line(capsys, "convert", src, "--to", "saelens", tmp_path / "o")
    assert "ae.pt was refused" in line and not marker.exists()
