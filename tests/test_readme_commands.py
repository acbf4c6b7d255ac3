"""Every shell command in README.md's code blocks runs as written, scaled down.

The commands are read from README.md each time, so a command added or changed there is tested as it is written;
nothing here lists them. What counts as a command, and how each kind is checked:

- In ```bash / ```sh / ```shell / ```console blocks every line is a command (`#` comments dropped, `\\` line
  continuations joined, `a && b` run in turn); in other blocks only lines starting with `$ ` are (the rest is the
  output shown). Identical commands are checked once.
- `saelab ...` and `python -m saelab ...` RUN FULLY, in-process through `saelab.cli.main`, in one scratch folder
  shared by all of them in README order (as a reader types them: `results leaderboard` reads the store the
  `bench` commands above it wrote), and must exit 0; a `--json` command must end with a JSON line. Scaled down:
  every synthetic preset (`synth-mini`, `synth-16k`, `sbw-toy`; checked to exist first) is replaced by a tiny
  96-feature model, every benchmark protocol by a tiny one of the same name (width 32, 512 samples, the same
  schedule and tiers; a transcoder protocol on a small saved transcoder world), `--samples` by 512 (two steps), `--seeds` by 1, `--jobs` by 1 (no worker processes),
  `--eval-samples` by 1k, `--batch-size` by 256; commands that default to large budgets get those values added
  (`--samples` where no protocol sets the budget, `--eval-samples`, `--gt-eval-samples`, `--batch-size`, `--steps`
  50) and `--no-estimate` (no timing run before a two-step run). Placeholders: `runs/<run>`, `<name>` and `RUN_DIR` name a
  tiny run trained first; `[--flag]` is checked without and with the flag. `acts.npy`, `more.safetensors` and
  `t.pt` are small activation files made here.
- PARSE ONLY (the arguments are parsed against the command's options and types; nothing runs) for what this
  machine cannot provide: a local language model (`--model`, `saelab cache`), an activation cache made from one
  (`--cache`, `cache/...`), a GPU (`--device cuda`), or options the README elides (`...`).
- `python path/script.py ...`: parse only: the script's argparse parser must accept the arguments (the script
  runs up to `parse_args` and stops there).
- `make TARGET`: `make -n TARGET` (a dry run: the target exists and its recipe expands; nothing is built).
- `torchrun ... -m saelab ...`: torchrun's arguments through torch's own parser, the saelab part parse only.
- Any other program fails the test: decide here how to cover it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
RUN_NAME = "readme-run"  # the tiny run behind runs/<run>, <name> and RUN_DIR
# Given values replaced (option -> value), and values added where a command has the option but no value is given.
SCALE = {"--samples": "512", "--seeds": "1", "--jobs": "1", "--eval-samples": "1k", "--batch-size": "256"}
ADD_IF_MISSING = {
    "samples": "512",
    "eval_samples": "1k",
    "gt_eval_samples": "1k",
    "batch_size": "256",
    "steps": "50",
    "seeds": "1",
    "estimate": "--no-estimate",  # a flag: timing a few steps of a 2-step run tells nothing
}
# Needs a local language model, an activation cache made from one, a GPU, or options the README leaves out.
PARSE_ONLY_OPTIONS = {"--model", "--cache", "--hook-module", "--dataset"}


@dataclass(frozen=True)
class Command:
    line: int  # README line the command starts on
    text: str  # as written (continuations joined)
    argv: tuple[str, ...]

    @property
    def id(self) -> str:
        short = re.sub(r"\s+", " ", self.text)
        return f"L{self.line}: {short[:70]}"


def readme_commands(text: str) -> list[Command]:
    """The commands of `text`'s code blocks (see the module docstring), in order, each distinct command once."""
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        shell = fence.group(1).lower() in SHELL_BLOCKS
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            start, line = i + 1, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # `\` continues the command
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            stripped = line.strip()
            if stripped.startswith("$ "):
                stripped = stripped[2:]
            elif not shell:
                continue  # output shown in a non-shell block
            for part in re.split(r"\s&&\s", stripped):
                argv = tuple(shlex.split(part, comments=True))
                if argv:
                    commands.append(Command(start, part.split(" #")[0].strip(), argv))
        i += 1
    seen, unique = set(), []
    for c in commands:
        if c.argv not in seen:
            seen.add(c.argv)
            unique.append(c)
    return unique


def expand_optional(argv: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`[--train]` (an optional flag, as usage lines write it): the command without it and with it."""
    bracketed = [k for k, a in enumerate(argv) if a.startswith("[") and a.endswith("]")]
    if not bracketed:
        return [argv]
    without = tuple(a for k, a in enumerate(argv) if k not in bracketed)
    with_ = tuple(a[1:-1] if k in bracketed else a for k, a in enumerate(argv))
    return [without, with_]


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_commands():
    # the extraction itself on the real README: if this fails, its code blocks changed shape (or the parser broke)
    assert any(c.argv[0] == "saelab" for c in COMMANDS), [c.text for c in COMMANDS]
    assert not any(c.text.startswith(("{", "$")) for c in COMMANDS)  # output lines and prompts are not commands


def test_extraction_rules():
    text = "\n".join(
        [
            "```bash",
            "saelab a --x 1   # comment",
            "saelab b \\",
            "   --y 2 && saelab c",
            "# only a comment",
            "```",
            "```",
            "$ saelab d --json",
            '{"out": 1}',
            "```",
        ]
    )
    got = [(c.line, c.argv) for c in readme_commands(text)]
    assert got == [
        (2, ("saelab", "a", "--x", "1")),
        (3, ("saelab", "b", "--y", "2")),
        (3, ("saelab", "c")),
        (8, ("saelab", "d", "--json")),
    ]
    assert expand_optional(("saelab", "t", "--p", "1", "[--train]")) == [
        ("saelab", "t", "--p", "1"),
        ("saelab", "t", "--p", "1", "--train"),
    ]


# --------------------------------------------------------------------------------------------- the workspace
@pytest.fixture(scope="module")
def workspace(tiny_synthetic_model_dir, tiny_transcoder_world_dir, tmp_path_factory):
    """A scratch folder as a reader's clone would be: `examples/` and `benchmarks/` at hand, a tiny run for the
    placeholders, small activation files; every protocol replaced by a tiny one for the module's tests."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from saelab.bench.protocols import PROTOCOLS
    from saelab.runs import RunConfig, run_training
    from saelab.synthetic import load_source

    root = tmp_path_factory.mktemp("readme")
    for folder in ("examples", "benchmarks"):
        (root / folder).symlink_to(ROOT / folder, target_is_directory=True)
    cfg = RunConfig(
        data=str(tiny_synthetic_model_dir), arch=["batchtopk"], l0=[3], width=32, samples=4096, eval_samples=2000
    )
    run_training(cfg, root / "runs" / RUN_NAME, progress=False)
    acts_ND = load_source(str(tiny_synthetic_model_dir)).sample(3000).float()
    np.save(root / "acts.npy", acts_ND.numpy())
    save_file({"acts": acts_ND.contiguous()}, str(root / "more.safetensors"))
    torch.save(acts_ND, root / "t.pt")
    with pytest.MonkeyPatch.context() as mp:
        for name, proto in list(PROTOCOLS.items()):
            data_dir = tiny_synthetic_model_dir if proto.transcoder == "none" else tiny_transcoder_world_dir
            mp.setitem(PROTOCOLS, name, tiny_protocol(proto, data_dir))
        yield root


def tiny_protocol(proto, data_dir: Path):
    """`proto` at toy size, keeping its name, schedule, options and tier names."""
    return dataclasses.replace(
        proto,
        data=str(data_dir),
        width=32,
        samples=512,
        batch_size=256,
        seeds=1,
        eval_samples=1000,
        tiers={name: 512 for name in proto.tiers},
    )


def scaled(argv: tuple[str, ...], data_dir: Path, sae_name: str) -> list[str]:
    """The command with presets, placeholders and budgets scaled down (see the module docstring)."""
    from saelab.synthetic.presets import list_presets

    presets = set(list_presets())
    out: list[str] = []
    k = 0
    while k < len(argv):
        a = argv[k]
        if a in SCALE and k + 1 < len(argv):
            out += [a, SCALE[a]]
            k += 2
            continue
        if a in presets:
            a = str(data_dir)
        a = (
            a.replace("runs/<run>", f"runs/{RUN_NAME}")
            .replace("<name>", sae_name)
            .replace("RUN_DIR", f"runs/{RUN_NAME}")
        )
        if re.search(r"<[^>]+>", a):
            pytest.fail(f"README placeholder {a!r} is unknown to tests/test_readme_commands.py: teach `scaled` it")
        out.append(a)
        k += 1
    return out


def parse_only_reason(argv: list[str]) -> str | None:
    if "..." in argv:
        return "elided options (...)"
    if len(argv) > 1 and argv[1] == "cache":
        return "saelab cache reads a local language model"
    for k, a in enumerate(argv):
        if a in PARSE_ONLY_OPTIONS:
            return f"{a} needs a local language model or a cache made from one"
        if a == "--device" and k + 1 < len(argv) and argv[k + 1].startswith("cuda"):
            return "--device cuda needs a GPU"
        if a.startswith(("cache/", "~/", "/shared/")):
            return f"{a} is made from a local language model"
    return None


# --------------------------------------------------------------------------------------------- saelab itself
def resolve(args: list[str]):
    """Parse `saelab ARGS` down to its leaf command without running it: (command, its click context)."""
    import typer

    from saelab.cli import _register, app
    from saelab.cli.common import expand_multi_value_args

    _register()
    args = expand_multi_value_args(list(args))
    cmd: Any = typer.main.get_command(app)
    ctx = cmd.make_context("saelab", list(args))
    while hasattr(cmd, "resolve_command"):  # a group: descend to the subcommand
        # the subcommand's name and arguments (click ≥ 8.2 and typer's vendored copy: _protected_args)
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []
        rest = [*protected, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        assert cmd is not None and name is not None
        ctx = cmd.make_context(name, list(rest), parent=ctx)
    return cmd, ctx


def with_small_defaults(args: list[str]) -> list[str]:
    """Add ADD_IF_MISSING's options the command has and the command line leaves at their (large) defaults."""
    cmd, ctx = resolve(args)
    params = {p.name: p for p in cmd.params}
    given = {p.name for p in cmd.params if ctx.get_parameter_source(p.name).name == "COMMANDLINE"}  # type: ignore[union-attr]
    extra: list[str] = []
    for name, value in ADD_IF_MISSING.items():
        if name == "samples" and "protocol" in params:
            continue  # the protocol sets the budget (already tiny)
        param = params.get(name)
        if param is None or name in given or not getattr(param, "opts", None):
            continue
        extra += [value] if value.startswith("--") else [param.opts[0], value]
    return args + extra


def run_saelab(args: list[str], capsys) -> tuple[int, str, str]:
    from saelab.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else int(code) if isinstance(code, int) else 1), captured.out, captured.err


class _Parsed(Exception):
    pass


def parse_script(script: Path, args: list[str], monkeypatch) -> None:
    """Run a script's own argparse parser on `args` and stop right after it (nothing else of the script runs)."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return
    except SystemExit as err:
        pytest.fail(f"python {script.name} refused its README arguments (exit {err.code})")
    pytest.fail(f"python {script.name} never parsed its arguments with argparse: this test cannot check it")


# --------------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs(
    command, workspace, tiny_synthetic_model_dir, monkeypatch, capsys, no_plain_imported_architectures
):
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("SAELAB_STORE", raising=False)
    sae_name = next(p.name for p in (workspace / "runs" / RUN_NAME / "saes").iterdir())
    program, *rest = command.argv
    if program == "python" and rest[:2] == ["-m", "saelab"]:
        program, rest = "saelab", rest[2:]

    if program == "make":
        assert shutil.which("make"), "make is not installed"
        proc = subprocess.run(["make", "-n", *rest], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"make -n {' '.join(rest)}: {proc.stderr}"
        return

    if program == "python":
        script = ROOT / rest[0]
        assert script.is_file(), f"{rest[0]} does not exist"
        parse_script(script, scaled(tuple(rest[1:]), tiny_synthetic_model_dir, sae_name), monkeypatch)
        return

    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args([a for a in rest if a != "..."])
        assert ns.module and ns.training_script == "saelab", "torchrun must start `-m saelab`"
        resolve(scaled(tuple(a for a in ns.training_script_args if a != "..."), tiny_synthetic_model_dir, sae_name))
        return

    assert program == "saelab", (
        f"README line {command.line} runs {program!r}, a program tests/test_readme_commands.py does not cover: "
        "decide there how to check it"
    )
    for argv in expand_optional(tuple(rest)):
        args = scaled(argv, tiny_synthetic_model_dir, sae_name)
        if parse_only_reason(args) is not None:
            resolve(args)  # parse only (see the module docstring)
            continue
        args = with_small_defaults(args)
        code, out, err = run_saelab(args, capsys)
        assert code == 0, f"`saelab {' '.join(args)}` exited {code}: {err[-2000:]}"
        if "--json" in args:
            last = [line for line in out.splitlines() if line.strip()][-1]
            json.loads(last)  # a --json command ends with a JSON line
