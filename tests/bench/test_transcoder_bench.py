"""A transcoder protocol end to end: skip-transcoders by default, `ARCH:skip=false` as the plain one,
results with their transcoder metrics in the store, the bench summary and the leaderboard."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.bench.protocols import PROTOCOLS, Protocol, get_protocol
from saelab.bench.runner import BenchRequest, run_bench, summarize
from saelab.bench.store import ResultsStore
from saelab.bench.variants import parse_variant_spec
from saelab.synthetic import save_transcoder_world
from tests.training.transcoder_worlds import small_world

TRANSCODER_METRICS = ("f1", "mcc", "fvu", "skip_rel_error", "computing_features_recovered")


@pytest.fixture
def tc_tiny(tmp_path_factory, monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tc-world") / "world"
    save_transcoder_world(small_world(), str(path))
    proto = Protocol(
        name="tc-tiny",
        data=str(path),
        width=32,
        samples=15_000,
        batch_size=256,
        lr=1e-2,
        l0_sweep=(3,),
        natural_l0=3,
        seeds=1,
        eval_samples=4000,
        precision="fp32",
        transcoder="skip",
    )
    monkeypatch.setitem(PROTOCOLS, "tc-tiny", proto)
    yield proto
    torch.set_num_threads(old)


def test_a_transcoder_protocol_stores_and_ranks_transcoder_metrics(tc_tiny, tmp_path):
    plain = parse_variant_spec("batchtopk:skip=false")
    assert plain is not None
    request = BenchRequest(
        protocol=tc_tiny,
        archs=["batchtopk", plain.name],
        l0s=[3.0],
        seeds=[0],
        out_dir=tmp_path / "runs",
        variants=[plain],
    )
    store = ResultsStore(tmp_path / "results.sqlite")
    records = run_bench(request, store=store, progress=False)
    by_arch = {r["arch"]: r for r in records}
    assert set(by_arch) == {"batchtopk", "batchtopk[skip=false]"}
    assert by_arch["batchtopk"]["skip_rel_error"] is not None  # the protocol's kind: a skip-transcoder
    assert by_arch["batchtopk[skip=false]"]["skip_rel_error"] is None  # the variant keeps its own: plain
    for run in store.runs(protocol="tc-tiny", status="complete"):
        for key in TRANSCODER_METRICS:
            assert key in run["metrics"], key
    saved = json.loads((tmp_path / "runs").glob("tc-tiny-*-seed0").__next__().joinpath("run.json").read_text())
    assert saved["config"]["transcoder"] == "skip"
    board = {row["arch"]: row for row in store.leaderboard("tc-tiny")}
    for key in ("fvu", "skip_rel_error", "computing_features_recovered"):
        assert board["batchtopk"][f"{key}_mean"] is not None, key
    assert board["batchtopk[skip=false]"]["skip_rel_error_mean"] is None
    summary = {row["arch"]: row for row in summarize(records)}
    assert summary["batchtopk"]["fvu_mean"] == pytest.approx(by_arch["batchtopk"]["fvu"])


def test_sae_protocols_keep_their_leaderboard_columns(tmp_path):
    """Rows without transcoder metrics gain no transcoder columns (exports and reports read them as before)."""
    from saelab.bench.leaderboard import summarize_seeds, with_transcoder_metrics

    records = [{"arch": "a", "l0_target": 3.0, "f1": 0.5, "mcc": 0.6}]
    assert with_transcoder_metrics(records, ("f1",)) == ("f1",)
    assert "fvu_mean" not in summarize_seeds(records, with_transcoder_metrics(records, ("f1", "mcc")))[0]


def test_tc_mini_protocol_trains_skip_transcoders_on_tc_mini():
    proto = get_protocol("tc-mini")
    assert proto.data == "tc-mini" and proto.transcoder == "skip"
    cfg = BenchRequest(protocol=proto, archs=["batchtopk"], l0s=[12.0], seeds=[0]).run_config(0)
    assert cfg.transcoder == "skip" and cfg.data == "tc-mini"
