"""scripts/sweep.py: the experiment list and the comparison built from `dvc exp show --json` (its real shape)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rev(name, rev, agg_params, wer=None, error=None, timestamp="2026-11-27T09:18:09"):
    metrics = {"metrics/prepare.json": {"data": {"items/en-us/train": 65}},
               "metrics/aggregate.json": {"data": {"weight/a": 0.5}}}
    if wer is not None:
        metrics["metrics/eval/aggregated.json"] = {"data": {"wer": wer, "bleu": 90.0 - wer, "wer_a": wer - 1,
                                                             "wer_b": wer + 1, "cer": wer / 2}}
    return {"rev": rev, "name": name, "error": error, "experiments": None,
            "data": {"rev": rev, "timestamp": timestamp, "meta": {}, "deps": {}, "outs": {},
                     "params": {"params.yaml": {"data": {"aggregation": agg_params, "clients": ["a", "b"]}}},
                     "metrics": metrics}}


def exp_show_json():
    """The layout `dvc exp show --json` prints (DVC 3.x): workspace, then each baseline with its experiments."""
    main = _rev("main", "3da274a5", {"strategy": "mean", "preset": None, "weights": None}, 5.2)
    main["experiments"] = [
        {"executor": None, "name": "sweep-bias_best_light",
         "revs": [_rev("sweep-bias_best_light", "9ec03659",
                       {"strategy": "mean", "preset": "bias_best_light", "weights": None}, 6.0)]},
        {"executor": None, "name": "sweep-ties",
         "revs": [_rev("sweep-ties", "1a2b3c4d", {"strategy": "ties", "preset": None, "weights": None}, 4.5)]},
        {"executor": None, "name": "sweep-krum",  # failed: no metrics of the aggregated model
         "revs": [_rev("sweep-krum", "5e6f7a8b", {"strategy": "krum", "preset": None, "weights": None})]},
        {"executor": {"state": "failed"}, "name": "sweep-multi-krum",  # failed, but lists the baseline's metrics
         "revs": [_rev("sweep-multi-krum", "6f7a8b9c", {"strategy": "multi_krum", "preset": None, "weights": None},
                       5.2, error={"type": "ReproductionError", "msg": "failed to reproduce 'aggregate'"})]},
        {"executor": None, "name": "finer-ring",  # not part of the sweep
         "revs": [_rev("finer-ring", "0badc0de", {"strategy": "mean", "preset": None, "weights": [1, 2]}, 9.9)]},
    ]
    older = _rev("0ldc0mm1t", "0ldc0mm1t", {"strategy": "mean", "preset": None, "weights": None}, 5.2)
    older["experiments"] = [  # an earlier sweep on an older commit: its ties run is replaced by the newer one
        {"executor": None, "name": "sweep-ties", "revs": [_rev("sweep-ties", "aaaa1111", {"strategy": "ties"}, 9.0,
                                                                timestamp="2026-11-26T10:00:00")]},
        {"executor": None, "name": "sweep-median", "revs": [_rev("sweep-median", "bbbb2222", {"strategy": "median"},
                                                                  4.0, timestamp="2026-11-26T10:01:00")]},
    ]
    workspace = _rev(None, "workspace", {"strategy": "mean", "preset": None, "weights": None}, 5.2)
    return [workspace, main, older]


def test_experiments_cover_the_ten_presets_and_the_other_strategies(sweep):
    from fedwhisper.merge.presets import PRESETS

    runs = sweep.experiments()
    assert len(PRESETS) == 10 and len(runs) == 10 + len(sweep.STRATEGIES)
    assert runs["sweep-bias_best_heavy"] == ["aggregation.preset=bias_best_heavy"]
    assert runs["sweep-multi-krum"] == ["aggregation.strategy=multi_krum", "aggregation.f=0", "aggregation.m=2"]
    assert runs["sweep-krum"] == ["aggregation.strategy=krum", "aggregation.f=0"]
    assert all(name.startswith(sweep.PREFIX) for name in runs)


def test_collect_and_comparison(sweep, monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(exp_show_json()))
    rows = sweep.collect()
    assert [(r["name"], r["status"]) for r in rows] == [
        ("bias_best_light", "ok"), ("krum", "failed"), ("median", "ok"), ("multi-krum", "failed"), ("ties", "ok")]
    assert {r["name"]: r["baseline"] for r in rows}["median"] == "0ldc0mm"
    markdown = sweep.write_comparison(rows, tmp_path)
    table = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    assert table[0] == "| experiment | strategy | settings | WER | WER a | WER b | BLEU |"
    # sorted by WER, the failed runs last; the newer ties run (4.50) replaced the older one (9.00)
    assert table[1] == "| median | median | - | 4.00 | 3.00 | 5.00 | 86.00 |"
    assert table[2] == "| ties | ties | - | 4.50 | 3.50 | 5.50 | 85.50 |"
    assert table[3] == "| bias_best_light | mean | preset=bias_best_light | 6.00 | 5.00 | 7.00 | 84.00 |"
    assert table[4].startswith("| krum | krum | f=0 | failed")
    assert table[5].startswith("| multi-krum | multi_krum | f=0, m=2 | failed")
    assert "Experiments from 2 baseline commits: 0ldc0mm (1), 3da274a (4)." in markdown
    assert (tmp_path / "sweep.md").read_text().startswith("# Aggregation sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_main_collect_reports_failures(sweep, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(exp_show_json()))
    assert sweep.main(["--collect", "--out", str(tmp_path)]) == 1
    assert "2 experiment(s) failed: krum, multi-krum" in capsys.readouterr().err
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(exp_show_json()[:1]))
    assert sweep.main(["--collect", "--out", str(tmp_path)]) == 1  # workspace only: no experiments
    assert "no sweep experiments found" in capsys.readouterr().err


def test_queueing_never_forces_a_full_repro(sweep, monkeypatch):
    """`dvc exp run --force` is `dvc repro --force`: it would re-train every client. Old runs are removed instead."""
    calls = []

    def fake_dvc(*args, capture=False):
        calls.append(args)
        return "finer-ring\nsweep-ties\nsweep-equal_avg\n" if args[:2] == ("exp", "list") else ""

    monkeypatch.setattr(sweep, "dvc", fake_dvc)
    runs = sweep.experiments()
    assert sweep.remove_previous(runs) == ["sweep-equal_avg", "sweep-ties"]
    sweep.queue_all(runs)
    assert ("exp", "remove", "sweep-equal_avg", "sweep-ties") in calls
    queued = [c for c in calls if c[:3] == ("exp", "run", "--queue")]
    assert len(queued) == len(runs)
    assert not any("--force" in c or "-f" in c for c in queued)


def test_only_runs_the_named_experiments(sweep, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: calls.append(args) or (
        json.dumps(exp_show_json()) if args[:2] == ("exp", "show") else ""))
    waited = []
    monkeypatch.setattr(sweep, "wait_for_queue", lambda names: waited.append(names))
    sweep.main(["--only", "krum", "ties", "--out", str(tmp_path)])
    queued = [c for c in calls if c[:3] == ("exp", "run", "--queue")]
    assert [c[4] for c in queued] == ["sweep-krum", "sweep-ties"]
    assert waited == [["sweep-krum", "sweep-ties"]]  # waits for its own experiments only
    with pytest.raises(SystemExit):
        sweep.main(["--only", "kurm"])


QUEUE_STATUS = """Task     Name                   Created    Status
9ec0365  sweep-bias_best_light  10:02 AM   Success
1a2b3c4  sweep-ties             10:02 AM   Running
5e6f7a8  sweep-median           10:03 AM   Queued
0b1c2d3  sweep-krum             Nov 26     Failed
77aa88b  other-exp              10:04 AM   Queued

Worker status: 1 active, 0 idle
"""


def test_parse_queue_status(sweep):
    statuses, workers = sweep.parse_queue_status(QUEUE_STATUS)
    assert statuses == {"sweep-bias_best_light": "Success", "sweep-ties": "Running", "sweep-median": "Queued",
                        "sweep-krum": "Failed", "other-exp": "Queued"}
    assert workers == 1
    assert sweep.parse_queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n") == ({}, 0)


def test_wait_for_queue_reports_progress_and_returns_when_ours_are_done(sweep, capsys):
    """Another experiment still queued does not keep the sweep waiting; progress is printed as it changes."""
    names = ["sweep-bias_best_light", "sweep-ties", "sweep-median"]
    outputs = iter([
        QUEUE_STATUS,
        QUEUE_STATUS.replace("Running", "Success"),
        QUEUE_STATUS.replace("Running", "Success").replace("10:03 AM   Queued", "10:03 AM   Success"),
    ])
    sweep.wait_for_queue(names, poll_s=0, status=lambda: next(outputs))
    out = capsys.readouterr().out.splitlines()
    assert out == ["sweep: 1/3 done (0 failed), 1 running, 1 queued",
                   "sweep: 2/3 done (0 failed), 0 running, 1 queued",
                   "sweep: 3/3 done (0 failed), 0 running, 0 queued"]


def test_wait_for_queue_stops_when_no_worker_is_left(sweep):
    """Queued experiments with no worker (killed, or never started) end the wait with an error, not a hang."""
    dead = QUEUE_STATUS.replace("Running", "Queued").replace("1 active, 0 idle", "0 active, 0 idle")
    calls = []

    def status():
        calls.append(1)
        if len(calls) > 50:
            raise AssertionError("wait_for_queue kept polling")
        return dead

    with pytest.raises(SystemExit, match=r"2 experiment\(s\) still queued but no queue worker is running"):
        sweep.wait_for_queue(["sweep-ties", "sweep-median"], poll_s=0, stall_polls=3, status=status)
    assert len(calls) == 3
