"""Property-based fuzzing of the command line: bad input is one `error:` line and exit status 2, never a traceback.

Hypothesis builds one command at a time: a small, valid command (tiny model, 2k samples, output in a
temporary folder) with one flag or one input file replaced by something bad: malformed numbers,
negative, zero, huge or non-finite values, unknown names, paths that are files, folders or missing,
and files (cfg.json, .safetensors, .npy, run.json, manifest.json, a results store) that are JSON lists,
truncated, or binary junk. Each runs in-process through `saelab.cli.main`, as the `saelab` script
does, and must:

* raise nothing but SystemExit (any other exception is an untranslated traceback);
* exit 2 with exactly one stderr line, `error: ...`, naming the field or the file, or exit 0 where
  the drawn value happens to be valid (those cases are marked and stay a tiny run).

Values that are valid but would start long work (a huge --samples, --seeds or describe --samples)
are never drawn. SAELAB_FUZZ_EXAMPLES sets the number of examples (default 100, about a minute);
`derandomize=True` makes every run of the suite draw the same examples.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from saelab.cli import main  # noqa: E402

EXAMPLES = int(os.environ.get("SAELAB_FUZZ_EXAMPLES", "100"))


@dataclass
class Case:
    argv: list[str]
    names: list[str]  # the error line must contain one of these (the field, or the file)
    may_succeed: bool = False  # the drawn value may be valid: exit 0 is then fine too


@dataclass
class Files:
    root: Path
    model: Path  # a tiny synthetic model folder (96 features, 24 dims)
    sae: Path  # a valid SAE folder for that model (d_in 24, width 32)
    store: Path | None  # an empty results store, when the store module can make one
    counter: itertools.count

    def fresh(self, name: str) -> Path:
        """A new folder path per example, so outputs and corrupted copies never collide."""
        return self.root / f"ex{next(self.counter)}" / name


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_synthetic_model_dir) -> Files:
    from saelab.saes.saelens_format import save_sae
    from saelab.training.trainer import build_sae

    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    sae = save_sae(build_sae("batchtopk", d_in=24, d_sae=32, k=3), root / "sae")
    store = root / "store.sqlite"
    try:
        from saelab.bench.store import ResultsStore

        ResultsStore(store)
    except Exception:  # noqa: BLE001 (the store's module belongs to another part of the project)
        store = None
    return Files(root=root, model=Path(tiny_synthetic_model_dir), sae=sae, store=store, counter=itertools.count())


# ------------------------------------------------------------------------------------------- values
DIGITS = st.text("0123456789", min_size=1, max_size=3)
NON_NUMERIC = st.one_of(
    # (not "1,000" or "1_000": counts take digit separators; not "1..2": an L0 range; not "٣": Python
    # reads every script's digits)
    st.sampled_from(["", " ", "abc", "1;2", "--", "0x10", "1e", "e5", "1_k_x", "1..x", "None", "true", "½", "1/2"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Nd"]), min_size=1, max_size=6).filter(
        lambda s: not s.startswith("-")
    ),
)
NEGATIVE_INT = st.integers(max_value=-1).map(str)
HUGE_INT = st.integers(min_value=2**63, max_value=2**200).map(str)
FRACTION = (
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
    .filter(lambda x: not float(x).is_integer())
    .map(repr)
)
NON_FINITE = st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"])


def bad_int(zero_ok: bool = False):
    """Text that is not a valid value for an integer flag that must be positive (or ≥ 0)."""
    choices = [NON_NUMERIC, NEGATIVE_INT, FRACTION, NON_FINITE]
    if not zero_ok:
        choices.append(st.just("0"))
    return st.one_of(*choices)


def bad_count():
    """Counts such as --samples 5M: never a valid one, so nothing long starts."""
    return st.one_of(
        NON_NUMERIC.filter(lambda s: s.strip().lower() not in ("k", "m", "b", "g")),
        NON_FINITE,
        NEGATIVE_INT,
        st.sampled_from(["0", "0k", "0.4", "1e-9", "-2M", "5X", "M5", "1.5.5", "nanM"]),
    )


def bad_float(allow_zero: bool = False):
    vals = [NON_NUMERIC, NON_FINITE, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr)]
    if not allow_zero:
        vals.append(st.just("0"))
    return st.one_of(*vals)


def bad_l0():
    return st.one_of(
        NON_NUMERIC,
        NON_FINITE,
        NEGATIVE_INT,
        st.just("0"),
        st.sampled_from(["20..5", "5..25:0", "5..25:-1", "3,abc", "1e30", "..", "5..", "-3..4"]),
    )


BAD_ARCH = st.one_of(
    st.sampled_from(
        [
            "nope",
            "BatchTopK",
            "batchtopk2",
            "recipe-no_nothing",
            "no_such_module_xyz:Cls",
            "saelab.errors:ConfigError",
            "missing_file.py:Cls",
            "a:b:c",
            ":",
            "batchtopk:",
            "topk.k",
        ]
    ),
    st.text("abcdefghijklmnopqrstuvwxyz_-.0123456789", min_size=1, max_size=12).filter(
        lambda s: s not in _known_archs() and not s.startswith("-")
    ),
)


def _known_archs() -> set[str]:
    from saelab.saes import registry

    registry.load_builtin_architectures()
    return set(registry.SAE_REGISTRY)


BAD_DEVICE = st.one_of(
    st.sampled_from(
        [
            "bogus",
            "cuda:x",
            "gpu",
            "cpu:abc",
            "",
            "cuda:-1",
            "meta:0",
            "cuda" if not torch.cuda.is_available() else "cuda:999",
        ]
    ),
    st.text("abcdefghijklmnopqrstuvwxyz:0123456789", min_size=1, max_size=8).filter(
        lambda s: s not in ("cpu",) and not s.startswith("cpu:")
    ),
)
BAD_SEED = st.one_of(NON_NUMERIC, NEGATIVE_INT, FRACTION, st.integers(min_value=2**32, max_value=2**300).map(str))
JUNK = st.binary(max_size=300)


# ------------------------------------------------------------------------------------------- files
def _corrupt_copy(draw, files: Files, source: Path, name: str, target: str) -> tuple[Path, str]:
    """A copy of folder `source` with file `target` replaced by junk, a truncation or a JSON list."""
    folder = files.fresh(name)
    shutil.copytree(source, folder)
    path = folder / target
    kind = draw(st.sampled_from(["junk", "truncated", "json_list", "json_scalar", "empty", "folder", "missing"]))
    data = path.read_bytes()
    if kind == "junk":
        path.write_bytes(draw(JUNK))
    elif kind == "truncated":
        path.write_bytes(data[: draw(st.integers(min_value=0, max_value=max(0, len(data) - 2)))])
    elif kind == "json_list":
        path.write_text(json.dumps(draw(st.lists(st.integers(), max_size=3))))
    elif kind == "json_scalar":
        path.write_text(json.dumps(draw(st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()))))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.unlink()
    return folder, kind


def bad_activation_file(draw, files: Files) -> Path:
    """An .npy/.safetensors/.pt activation file that must be refused."""
    folder = files.fresh("acts")
    folder.mkdir(parents=True)
    kind = draw(
        st.sampled_from(
            [
                "junk_npy",
                "junk_st",
                "junk_pt",
                "pickle_npy",
                "pickle_pt",
                "one_d",
                "three_d",
                "empty_rows",
                "ints_st",
                "two_tensors",
                "truncated_npy",
                "truncated_st",
                "text",
            ]
        )
    )
    rows = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    if kind.startswith("junk"):
        path = folder / {"junk_npy": "a.npy", "junk_st": "a.safetensors", "junk_pt": "a.pt"}[kind]
        path.write_bytes(draw(JUNK))
    elif kind == "pickle_npy":
        path = folder / "a.npy"
        np.save(path, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "pickle_pt":
        import pickle

        path = folder / "a.pt"
        path.write_bytes(pickle.dumps({"x": [1, 2]}) + b"junk")
    elif kind in ("one_d", "three_d", "empty_rows"):
        path = folder / "a.npy"
        np.save(path, {"one_d": rows[0], "three_d": rows.reshape(4, 16, 24), "empty_rows": rows[:0]}[kind])
    elif kind in ("ints_st", "two_tensors", "truncated_st"):
        from safetensors.numpy import save_file

        path = folder / "a.safetensors"
        tensors = {
            "ints_st": {"x": rows.astype(np.int32)},
            "two_tensors": {"a": rows, "b": rows},
            "truncated_st": {"x": rows},
        }[kind]
        save_file(tensors, str(path))
        if kind == "truncated_st":
            path.write_bytes(path.read_bytes()[: draw(st.integers(0, path.stat().st_size - 1))])
    elif kind == "truncated_npy":
        path = folder / "a.npy"
        np.save(path, rows)
        path.write_bytes(path.read_bytes()[: draw(st.integers(0, path.stat().st_size - 1))])
    else:
        path = folder / "a.npy"
        path.write_text("1 2 3\n4 5 6\n")
    return path


def bad_cache_folder(draw, files: Files) -> Path:
    folder = files.fresh("cache")
    folder.mkdir(parents=True)
    kind = draw(
        st.sampled_from(
            ["no_manifest", "list", "junk", "wrong_format", "no_shards", "missing_shard", "escaping_shard", "fields"]
        )
    )
    manifest = folder / "manifest.json"
    if kind == "list":
        manifest.write_text("[1, 2]")
    elif kind == "junk":
        manifest.write_bytes(draw(JUNK))
    elif kind == "wrong_format":
        manifest.write_text(json.dumps({"format": "something-else", "shards": []}))
    elif kind == "no_shards":
        manifest.write_text(
            json.dumps(
                {"format": "saelab-activation-cache-v1", "shards": [], "d_in": 24, "total_rows": 0, "dtype": "float32"}
            )
        )
    elif kind == "escaping_shard":
        manifest.write_text(
            json.dumps(
                {
                    "format": "saelab-activation-cache-v1",
                    "d_in": 24,
                    "total_rows": 10,
                    "dtype": "float32",
                    "shards": [{"file": "../x.safetensors", "rows": 10, "bytes": 100}],
                }
            )
        )
    elif kind == "fields":
        fields = {"format": "saelab-activation-cache-v1", "d_in": 24, "total_rows": 0, "dtype": "float32", "shards": []}
        key = draw(st.sampled_from(["d_in", "total_rows", "dtype", "shards"]))
        fields[key] = draw(
            st.one_of(
                st.none(),
                st.text(max_size=3),
                st.floats(),
                st.lists(st.integers(), max_size=2),
                st.integers(max_value=-1),
            )
        )
        manifest.write_text(json.dumps(fields))
    elif kind == "missing_shard":
        manifest.write_text(
            json.dumps(
                {
                    "format": "saelab-activation-cache-v1",
                    "d_in": 24,
                    "total_rows": 10,
                    "dtype": "float32",
                    "shards": [{"file": "shard_00000.safetensors", "rows": 10, "bytes": 100}],
                }
            )
        )
    return folder


# ------------------------------------------------------------------------------------------- commands
def _flag_names(flag: str) -> list[str]:
    bare = flag.lstrip("-")
    return [flag, bare, bare.replace("-", "_")]


def train_case(draw, files: Files) -> Case:
    out = files.fresh("run")
    base = [
        "train",
        "--data",
        str(files.model),
        "--arch",
        "batchtopk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "2k",
        "--batch-size",
        "256",
        "--eval-samples",
        "1k",
        "--out",
        str(out),
        "--json",
    ]
    choice = draw(
        st.sampled_from(
            [
                "width",
                "batch-size",
                "samples",
                "eval-samples",
                "l0",
                "seed",
                "lr",
                "lr-decay-fraction",
                "lr-schedule",
                "arch",
                "device",
                "option",
                "out",
                "data",
                "activations",
                "cache",
                "eval-every",
                "checkpoint-every",
                "dead-feature-window",
                "lr-warmup-steps",
                "huge-width",
                "huge-batch",
            ]
        )
    )
    if choice in ("width", "batch-size", "dead-feature-window"):
        return Case(base + [f"--{choice}", draw(bad_int())], _flag_names(f"--{choice}") + ["l0", "samples"])
    if choice in ("eval-every", "checkpoint-every", "lr-warmup-steps"):
        value = draw(st.one_of(bad_int(zero_ok=True), HUGE_INT))
        return Case(base + [f"--{choice}", value], _flag_names(f"--{choice}"), may_succeed=value.isdigit())
    if choice == "huge-width":
        return Case(base + ["--width", draw(st.integers(10**13, 10**40).map(str))], ["width"])
    if choice == "huge-batch":
        value = draw(st.integers(10**10, 10**40))
        return Case(base + ["--batch-size", str(value), "--samples", str(value)], ["batch_size"])
    if choice in ("samples", "eval-samples"):
        return Case(base + [f"--{choice}", draw(bad_count())], _flag_names(f"--{choice}"))
    if choice == "l0":
        return Case(base + ["--l0", draw(bad_l0())], ["l0"])
    if choice == "seed":
        return Case(base + ["--seed", draw(BAD_SEED)], ["seed"])
    if choice == "lr":
        return Case(base + ["--lr", draw(bad_float())], ["lr"])
    if choice == "lr-decay-fraction":
        value = draw(st.one_of(NON_NUMERIC, NON_FINITE, st.sampled_from(["-0.1", "1.5", "2", "-1e-9", "1.0000001"])))
        return Case(base + ["--lr-decay-fraction", value], _flag_names("--lr-decay-fraction"))
    if choice == "lr-schedule":
        value = draw(
            st.text(min_size=0, max_size=8).filter(lambda s: s not in ("constant", "cosine") and not s.startswith("-"))
        )
        return Case(base + ["--lr-schedule", value], _flag_names("--lr-schedule"))
    if choice == "arch":
        return Case(base + ["--arch", draw(BAD_ARCH)], ["arch"])
    if choice == "device":
        return Case(base + ["--device", draw(BAD_DEVICE)], ["device"])
    if choice == "option":
        value = draw(
            st.one_of(
                st.sampled_from(
                    [
                        "bogus=1",
                        "batchtopk.k=abc",
                        "k",
                        "=3",
                        "k=",
                        "topk.k=3",
                        "d_in=3",
                        "device=cpu",
                        "batchtopk.k=-1",
                        "batchtopk.k=NaN",
                        "batchtopk.k=[1]",
                        "batchtopk.dtype=float8",
                        "batchtopk.k=1e999",
                        "batchtopk.topk_threshold_lr=5",
                        "batchtopk.normalize_activations=x",
                    ]
                ),
                st.text(min_size=1, max_size=10).filter(lambda s: not s.startswith("-")),
            )
        )
        return Case(base + ["--option", value], ["option", "k", "dtype", "topk_threshold_lr", "normalize_activations"])
    if choice == "out":
        existing = files.fresh("file")
        existing.parent.mkdir(parents=True)
        existing.write_text("x")
        target = draw(st.sampled_from([existing, existing / "below"]))
        return Case(base + ["--out", str(target)], ["out"])
    if choice == "data":
        kind = draw(st.sampled_from(["name", "config", "tensors", "meta"]))
        if kind == "name":
            name = draw(
                st.text(min_size=0, max_size=10).filter(lambda s: not s.startswith("-") and not Path(s).exists())
            )
            return Case(base + ["--data", name], ["data", "source", repr(name)[1:-1]])
        target = {
            "config": "synthetic_model_config.json",
            "tensors": "synthetic_model.safetensors",
            "meta": "saelab_synthetic.json",
        }[kind]
        folder, how = _corrupt_copy(draw, files, files.model, "model", target)
        # saelab reads its own saelab_synthetic.json, or without one the SAELens config beside it
        return Case(
            base + ["--data", str(folder)],
            [str(folder)],
            may_succeed=kind == "config" or (kind == "meta" and how == "missing"),
        )
    if choice == "activations":
        path = bad_activation_file(draw, files)
        return Case(base + ["--activations", str(path)], [str(path), "activations"])
    folder = bad_cache_folder(draw, files)
    return Case(base + ["--cache", str(folder)], [str(folder), "cache"])


def eval_case(draw, files: Files) -> Case:
    base = ["eval", "--sae", str(files.sae), "--data", str(files.model), "--samples", "1k", "--json"]
    choice = draw(st.sampled_from(["sae_cfg", "sae_weights", "sae_missing", "samples", "seed", "device", "data"]))
    if choice == "sae_cfg":
        folder, _ = _corrupt_copy(draw, files, files.sae, "sae", "cfg.json")
        return Case(base + ["--sae", str(folder)], [str(folder)])
    if choice == "sae_weights":
        folder, _ = _corrupt_copy(draw, files, files.sae, "sae", "sae_weights.safetensors")
        return Case(base + ["--sae", str(folder)], [str(folder)])
    if choice == "sae_missing":
        path = files.fresh("nothing")
        return Case(base + ["--sae", str(path)], [str(path)])
    if choice == "samples":
        return Case(base + ["--samples", draw(bad_count())], ["samples"])
    if choice == "seed":
        return Case(base + ["--seed", draw(BAD_SEED)], ["seed"])
    if choice == "device":
        return Case(base + ["--device", draw(BAD_DEVICE)], ["device"])
    folder, how = _corrupt_copy(draw, files, files.model, "model", "saelab_synthetic.json")
    return Case(base + ["--data", str(folder)], [str(folder)], may_succeed=how == "missing")


def synth_case(draw, files: Files) -> Case:
    command = draw(st.sampled_from(["sample", "describe"]))
    base = ["synth", command, str(files.model), "--samples", "500", "--json"]
    choices = [
        "samples",
        "threads",
        "device",
        "source",
        "seed" if command == "describe" else "out",
        "width" if command == "describe" else "batch-size",
    ]
    choice = draw(st.sampled_from(choices))
    if choice == "samples":
        return Case(base + ["--samples", draw(bad_count())], _flag_names("--samples"))
    if choice == "threads":
        value = draw(st.one_of(bad_int(), st.integers(1025, 2**80).map(str)))
        return Case(base + ["--threads", value], _flag_names("--threads"))
    if choice == "device":
        return Case(base + ["--device", draw(BAD_DEVICE)], _flag_names("--device"))
    if choice == "seed":
        return Case(base + ["--seed", draw(BAD_SEED)], ["--seed", "seed"])
    if choice == "width":
        value = draw(st.one_of(bad_int(), st.integers(97, 2**70).map(str)))  # the model has 96 features
        return Case(base + ["--width", value], ["--width", "width"])
    if choice == "batch-size":
        value = draw(st.one_of(bad_int(), st.integers(10**6, 2**70).map(str)))
        return Case(base + ["--batch-size", value], ["--batch-size", "batch_size"], may_succeed=value.isdigit())
    if choice == "out":
        existing = files.fresh("file")
        existing.parent.mkdir(parents=True)
        existing.write_text("x")
        target = draw(st.sampled_from([existing.parent, existing / "below.safetensors"]))
        return Case(base + ["--out", str(target)], _flag_names("--out"))
    kind = draw(st.sampled_from(["name", "meta", "tensors"]))
    if kind == "name":
        name = draw(st.text(min_size=0, max_size=10).filter(lambda s: not s.startswith("-") and not Path(s).exists()))
        return Case(["synth", command, name, "--samples", "500"], ["source", repr(name)[1:-1]])
    target = "saelab_synthetic.json" if kind == "meta" else "synthetic_model.safetensors"
    folder, how = _corrupt_copy(draw, files, files.model, "model", target)
    return Case(
        ["synth", command, str(folder), "--samples", "500"],
        [str(folder)],
        may_succeed=kind == "meta" and how == "missing",
    )


def l0_case(draw, files: Files) -> Case:
    base = [
        "l0",
        "--data",
        str(files.model),
        "--l0",
        "3",
        "--width",
        "16",
        "--samples",
        "1k",
        "--batch-size",
        "256",
        "--eval-samples",
        "256",
        "--gt-eval-samples",
        "1k",
        "--out",
        str(files.fresh("l0")),
        "--json",
    ]
    choice = draw(
        st.sampled_from(
            [
                "l0",
                "width",
                "samples",
                "eval-samples",
                "gt-eval-samples",
                "batch-size",
                "lr",
                "n",
                "seed",
                "device",
                "out",
                "activations",
                "huge-width",
            ]
        )
    )
    if choice == "l0":
        return Case(base + ["--l0", draw(bad_l0())], ["l0"])
    if choice in ("width", "batch-size"):
        return Case(base + [f"--{choice}", draw(bad_int())], _flag_names(f"--{choice}") + ["l0"])
    if choice == "huge-width":
        return Case(base + ["--width", draw(st.integers(10**13, 10**40).map(str))], ["width"])
    if choice in ("samples", "eval-samples", "gt-eval-samples"):
        return Case(base + [f"--{choice}", draw(bad_count())], _flag_names(f"--{choice}"))
    if choice == "lr":
        return Case(base + ["--lr", draw(bad_float())], ["lr"])
    if choice == "n":
        value = draw(st.one_of(NON_NUMERIC, NEGATIVE_INT, st.just("0"), NON_FINITE, FRACTION))
        return Case(base + ["--n", value], ["n"])
    if choice == "seed":
        return Case(base + ["--seed", draw(BAD_SEED)], ["seed"])
    if choice == "device":
        return Case(base + ["--device", draw(BAD_DEVICE)], ["device"])
    if choice == "out":
        existing = files.fresh("file")
        existing.parent.mkdir(parents=True)
        existing.write_text("x")
        return Case(base + ["--out", str(existing)], ["out"])
    path = bad_activation_file(draw, files)
    return Case(base + ["--activations", str(path)], [str(path), "activations", "data"])


def bench_case(draw, files: Files) -> Case:
    # Only values that are refused before training: a valid bench would run the `mini` protocol.
    base = ["bench", "--protocol", "mini", "--no-store", "--out", str(files.fresh("bench")), "--json"]
    choice = draw(
        st.sampled_from(["protocol", "seeds", "jobs", "l0", "arch", "samples", "device", "seed-start", "out"])
    )
    if choice == "protocol":
        name = draw(
            st.text(min_size=0, max_size=10).filter(lambda s: s not in ("mini", "16k") and not s.startswith("-"))
        )
        return Case(base + ["--protocol", name], ["protocol"])
    if choice in ("seeds", "jobs"):
        return Case(base + [f"--{choice}", draw(bad_int())], [choice])
    if choice == "l0":
        value = draw(
            st.one_of(
                NON_NUMERIC, NON_FINITE, NEGATIVE_INT, st.just("0"), st.sampled_from(["20..5", "5..25:0", "3,abc"])
            )
        )
        return Case(base + ["--l0", value], ["l0"])
    if choice == "arch":
        return Case(base + ["--arch", draw(BAD_ARCH)], ["arch"])
    if choice == "samples":
        return Case(base + ["--samples", draw(bad_count())], ["samples"])
    if choice == "device":
        return Case(base + ["--device", draw(BAD_DEVICE)], ["device"])
    if choice == "seed-start":
        return Case(base + ["--seed-start", draw(BAD_SEED)], _flag_names("--seed-start"))
    existing = files.fresh("file")
    existing.parent.mkdir(parents=True)
    existing.write_text("x")
    return Case(base + ["--out", str(existing)], ["out"])


def results_case(draw, files: Files) -> Case:
    kind = draw(st.sampled_from(["junk", "truncated", "json_list", "folder", "field"]))
    if kind == "field" and files.store is not None:
        store = ["--store", str(files.store)]
        choice = draw(st.sampled_from(["l0", "since", "status", "format", "export_out", "plot_out"]))
        if choice == "l0":
            value = draw(st.one_of(NON_NUMERIC, NON_FINITE, NEGATIVE_INT, st.just("0")))
            return Case(["results", *store, "--l0", value], ["l0"])
        if choice == "since":
            value = draw(st.one_of(NON_NUMERIC, st.sampled_from(["2025-13-01", "yesterday", "2025-02-30T00:00"])))
            return Case(["results", *store, "--since", value], ["since"])
        if choice == "status":
            value = draw(
                st.text(min_size=0, max_size=8).filter(
                    lambda s: s not in ("running", "complete", "failed", "incomplete") and not s.startswith("-")
                )
            )
            return Case(["results", *store, "--status", value], ["status"])
        if choice == "format":
            value = draw(
                st.text(min_size=0, max_size=5).filter(
                    lambda s: s not in ("csv", "json", "md") and not s.startswith("-")
                )
            )
            return Case(
                ["results", "export", *store, "--format", value, "--out", str(files.fresh("x.csv"))], ["format"]
            )
        existing = files.fresh("dir")
        existing.mkdir(parents=True)
        if choice == "export_out":
            return Case(["results", "export", *store, "--format", "csv", "--out", str(existing)], ["out"])
        return Case(["results", "plot", *store, "--out", str(existing)], ["out"])
    path = files.fresh("store.sqlite")
    path.parent.mkdir(parents=True)
    may_succeed = False
    if kind == "junk":
        path.write_bytes(draw(JUNK.filter(lambda b: len(b) > 0)))
    elif kind == "truncated" and files.store is not None:
        data = files.store.read_bytes()
        path.write_bytes(data[: draw(st.integers(1, len(data) - 1))])
        # SQLite reads a file cut inside its unused last page as intact: refused or read, never a traceback
        may_succeed = True
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_text("[1, 2]")
    sub = draw(
        st.sampled_from([[], ["leaderboard"], ["export", "--format", "csv", "--out", str(path.parent / "o.csv")]])
    )
    return Case(["results", *sub, "--store", str(path)], [str(path), "store"], may_succeed=may_succeed)


FAMILIES = [train_case, eval_case, synth_case, l0_case, bench_case, results_case]


@st.composite
def bad_invocations(draw, files: Files) -> Case:
    return draw(st.sampled_from(FAMILIES))(draw, files)


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


class LongRunStarted(AssertionError):
    """A fuzzed command got as far as a long training run: some bad value was silently accepted."""


@pytest.fixture
def no_long_training(monkeypatch):
    # A safety net: the valid tiny runs train ≤ 2k samples; anything bigger means a flag was ignored.
    from saelab.training import trainer

    real_init = trainer.Trainer.__init__

    def guarded(self, saes, source, cfg, *args, **kwargs):
        if cfg.samples > 20_000:
            raise LongRunStarted(f"training {cfg.samples} samples started")
        real_init(self, saes, source, cfg, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "__init__", guarded)


def test_cli_fuzz_bad_input_is_one_error_line(files, no_long_training):
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=bad_invocations(files))
    def check(case: Case) -> None:
        # Any exception but SystemExit propagates out of run_in_process: that is the traceback a user would see.
        code, _, err = run_in_process(case.argv)
        if code == 0 and case.may_succeed:
            return
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (case.argv, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case.argv, err)
        assert any(name in lines[0] for name in case.names), (case.argv, lines[0], case.names)

    check()
