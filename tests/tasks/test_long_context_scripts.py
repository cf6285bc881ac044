"""The pieces of benchmarks/long_context that compute rather than run: the reset control's cut of a document, the
stateful/stateless table, and the head-to-head plot from saved results."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "long_context"))

extrapolation = pytest.importorskip("extrapolation")
head_to_head = pytest.importorskip("head_to_head")

from megalodon.inference.evaluate import EvalDocument  # noqa: E402


@pytest.mark.parametrize("length, every", [(2500, 1024), (1025, 1024), (7, 3), (2, 5)])
def test_pieces_predict_every_token_once_with_all_the_bytes(length, every):
    doc = EvalDocument(torch.arange(length) * 7 % 101, 9973, "d")
    pieces = extrapolation.pieces([doc], every)
    assert all(p.ids.numel() - 1 <= every for p in pieces)
    assert sum(p.ids.numel() - 1 for p in pieces) == length - 1
    assert sum(p.n_bytes for p in pieces) == doc.n_bytes
    # (input, target) pairs: the same as the whole document's, in order
    pairs = [(int(p.ids[i]), int(p.ids[i + 1])) for p in pieces for i in range(p.ids.numel() - 1)]
    assert pairs == [(int(doc.ids[i]), int(doc.ids[i + 1])) for i in range(length - 1)]


def test_pairs_table_calls_a_consistent_difference_larger_than_the_spread():
    pairs = {0: {"megalodon": 2.35, "megalodon-stateless": 2.32}, 1: {"megalodon": 2.36, "megalodon-stateless": 2.33}}
    assert "(stateless better)" in extrapolation.pairs_table(pairs)
    pairs[1] = {"megalodon": 2.50, "megalodon-stateless": 2.53}
    assert "(tie)" in extrapolation.pairs_table(pairs)


@pytest.mark.parametrize("walltime_corpora", [("shakespeare", "bible"), ("bible",)])
def test_head_to_head_plot_from_saved_results(tmp_path, monkeypatch, walltime_corpora):
    """Also when one phase holds fewer corpora than the other (the suite's lanes each write one corpus first)."""
    monkeypatch.setattr(head_to_head, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(head_to_head, "IMAGES", tmp_path / "images")
    phases = (("tokens", "", ("shakespeare", "bible")), ("walltime", "-walltime", walltime_corpora))
    for phase, suffix, corpora in phases:
        runs = {f"{corpus}/{arch}{suffix}/{seed}": {"val_bpb": 2.0 + 0.1 * seed + 0.01 * len(arch)}
                for corpus in corpora for arch in ("megalodon", "llama") for seed in (0, 1)}
        out = tmp_path / "runs" / f"head-to-head-t-{phase}"
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"seeds": [0, 1], "budget": {"seconds": 60.0}, "runs": runs}))
    path = head_to_head.plot("t")
    assert path == tmp_path / "images" / "head_to_head_t.png" and path.stat().st_size > 0


def test_a_finished_experiment_is_skipped_only_when_rerun_with_the_same_options(tmp_path, monkeypatch):
    import common

    monkeypatch.setattr(common, "RUNS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["benchmarks/long_context/memory.py", "--threads", "1", "--seeds", "0"])
    assert not common.already_done("memory-t")
    common.save_results("memory-t", {"command": common.command()}, "the table\n")
    monkeypatch.setattr(sys, "argv", ["benchmarks/long_context/memory.py", "--seeds", "0", "--threads", "2"])
    assert common.already_done("memory-t")
    monkeypatch.setattr(sys, "argv", ["benchmarks/long_context/memory.py", "--seeds", "0", "1"])
    assert not common.already_done("memory-t")
