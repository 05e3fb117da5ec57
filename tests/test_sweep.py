"""scripts/sweep.py: the experiment list and the comparison built from `dvc exp show --json` (its real shape)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
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


def synthetic_predictions(extra_errors):
    """100 utterances of 10 words; the best (median, 4.0%) has one error on each of the first 40; ``extra_errors``
    maps utterance -> errors added on top."""
    from fedwhisper.decode.significance import UtteranceCounts

    errors = np.array([1] * 40 + [0] * 60)
    for i, e in extra_errors.items():
        errors[i] += e
    counts = np.stack([errors, np.full(100, 10), errors, np.full(100, 50)], 1).astype(np.int64)
    ids, refs = [f"u{i}" for i in range(100)], [f"sentence {i}" for i in range(100)]
    return UtteranceCounts("x", ids, ["a"] * 50 + ["b"] * 50, refs, refs, np.ones(100, bool), counts)


PREDICTIONS = {  # experiment commit -> its predictions, matching the WER in exp_show_json
    "3da274a5": synthetic_predictions({}),
    "1a2b3c4d": synthetic_predictions({70: 5}),  # ties 4.5: five more errors, all on one utterance
    "9ec03659": synthetic_predictions({i: 1 for i in range(60, 80)}),  # bias_best_light 6.0: 20 more, spread
    "bbbb2222": synthetic_predictions({}),  # median 4.0
}


def fake_predictions_at(rev):
    from fedwhisper.errors import FedWhisperError

    if rev not in PREDICTIONS:
        raise FedWhisperError(f"git show {rev[:7]}:metrics/eval/aggregated_predictions.csv: bad object")
    return PREDICTIONS[rev]


def test_collect_and_comparison(sweep, monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(exp_show_json()))
    monkeypatch.setattr(sweep, "predictions_at", fake_predictions_at)
    rows = sweep.collect()
    assert [(r["name"], r["status"]) for r in rows] == [
        ("bias_best_light", "ok"), ("krum", "failed"), ("median", "ok"), ("multi-krum", "failed"), ("ties", "ok")]
    assert {r["name"]: r["baseline"] for r in rows}["median"] == "0ldc0mm"
    markdown = sweep.write_comparison(rows, tmp_path)
    table = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    assert table[0] == ("| experiment | strategy | settings | WER | 95% CI | vs best (B - best, CI, p) | WER a | WER b "
                        "| BLEU |")
    # sorted by WER, the failed runs last; the newer ties run (4.50) replaced the older one (9.00)
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[1:]]
    assert cells[0][:4] == ["median", "median", "-", "4.00"] and cells[0][5:] == ["best", "3.00", "5.00", "86.00"]
    low, high = (float(x) for x in cells[0][4].strip("[]").split(","))
    assert 2.0 < low < 4.0 < high < 6.0
    assert cells[1][:4] == ["ties", "ties", "-", "4.50"] and cells[1][5].startswith("n.d.: +0.50 [0.00, ")
    assert cells[1][6:] == ["3.50", "5.50", "85.50"]
    assert cells[2][:4] == ["bias_best_light", "mean", "preset=bias_best_light", "6.00"]
    assert cells[2][5].startswith("worse: +2.00 [") and cells[2][5].endswith("p <0.002")
    assert table[4].startswith("| krum | krum | f=0 | failed | failed | failed |")
    assert table[5].startswith("| multi-krum | multi_krum | f=0, m=2 | failed")
    assert "Best: `median`. Not distinguishable from it at 95%: `ties`. Worse: `bias_best_light`. Paired" in markdown
    assert "Experiments from 2 baseline commits: 0ldc0mm (1), 3da274a (4)." in markdown
    assert (tmp_path / "sweep.md").read_text().startswith("# Aggregation sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_sweep_intervals_from_metrics_and_experiments_without_predictions(sweep, monkeypatch, tmp_path):
    """Newer experiments carry wer_ci_low/high in their metrics; one whose CSV git cannot show gets no verdict."""
    shown = exp_show_json()
    ties = shown[1]["experiments"][1]["revs"][0]["data"]["metrics"]["metrics/eval/aggregated.json"]["data"]
    ties.update(wer_ci_low=3.25, wer_ci_high=5.75, wer_ci_low_a=1.0, wer_ci_high_a=6.0)
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(shown))
    monkeypatch.setattr(sweep, "predictions_at", fake_predictions_at)
    monkeypatch.delitem(PREDICTIONS, "9ec03659")
    markdown = sweep.write_comparison(sweep.collect(), tmp_path)
    assert "| ties | ties | - | 4.50 | [3.25, 5.75] | n.d.: +0.50" in markdown
    assert "| WER a | WER b |" in markdown and "WER ci_low" not in markdown
    assert "| bias_best_light | mean | preset=bias_best_light | 6.00 | n/a | n/a | 5.00 |" in markdown
    assert "No predictions, so no interval or comparison, for: `bias_best_light` (git show 9ec0365:" in markdown
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_at_reads_the_experiment_commit(sweep, tmp_path, monkeypatch):
    """The CSV comes from the commit git has for the experiment (here: a throwaway repository)."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    csv_path = tmp_path / sweep.PREDICTIONS
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("id,client,reference,hypothesis\nu1,a,the cat sat,the cat sad\nu2,b,a dog,a dog\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "exp"], check=True)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    csv_path.unlink()
    counts = sweep.predictions_at(rev)
    assert counts.ids == ["u1", "u2"] and counts.counts[:, :2].tolist() == [[1, 3], [0, 2]]
    from fedwhisper.errors import FedWhisperError

    with pytest.raises(FedWhisperError, match="git show 0000000:metrics/eval/aggregated_predictions.csv"):
        sweep.predictions_at("0" * 40)


def test_main_collect_reports_failures(sweep, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(exp_show_json()))
    monkeypatch.setattr(sweep, "predictions_at", fake_predictions_at)
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


def test_sweep_does_not_compare_experiments_on_other_utterances(sweep, monkeypatch, tmp_path):
    from dataclasses import replace

    other = replace(PREDICTIONS["1a2b3c4d"], ids=[f"v{i}" for i in range(100)])
    monkeypatch.setitem(PREDICTIONS, "1a2b3c4d", other)
    monkeypatch.setattr(sweep, "dvc", lambda *args, capture=False: json.dumps(exp_show_json()))
    monkeypatch.setattr(sweep, "predictions_at", fake_predictions_at)
    markdown = sweep.write_comparison(sweep.collect(), tmp_path)
    assert [ln for ln in markdown.splitlines() if ln.startswith("| ties |")][0].split(" | ")[5] == "not comparable"
    assert "Worse: `bias_best_light`. Evaluated on other utterances, not comparable: `ties`." in markdown
