"""Shared by the compare and research tests: a tiny protocol on the tiny synthetic model, and the CLI
run in-process with its exit code and output."""

import pytest

from saelab.bench.protocols import PROTOCOLS, Protocol
from saelab.cli import main


def install_tiny_protocol(model_dir, monkeypatch, **overrides) -> Protocol:
    """Register (for one test) a protocol named "tiny" on the tiny synthetic model; `overrides` replace fields."""
    fields = dict(
        name="tiny",
        data=str(model_dir),
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
    proto = Protocol(**{**fields, **overrides})
    monkeypatch.setitem(PROTOCOLS, "tiny", proto)
    return proto


@pytest.fixture
def tiny(tiny_synthetic_model_dir, monkeypatch):
    return install_tiny_protocol(tiny_synthetic_model_dir, monkeypatch)


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
