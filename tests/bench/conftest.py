"""Shared by the compare and research tests: a tiny protocol on the tiny synthetic model, and the CLI
run in-process with its exit code and output."""

import pytest

from saelab.bench.protocols import PROTOCOLS, Protocol
from saelab.cli import main


@pytest.fixture
def tiny(tiny_synthetic_model_dir, monkeypatch):
    proto = Protocol(
        name="tiny",
        data=str(tiny_synthetic_model_dir),
        width=32,
        samples=40_000,
        batch_size=256,
        lr=3e-3,
        l0_sweep=(3,),
        natural_l0=3,
        seeds=2,
        eval_samples=2000,
        tiers={"quick": 4096},
    )
    monkeypatch.setitem(PROTOCOLS, "tiny", proto)
    return proto


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
