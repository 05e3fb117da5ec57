"""The four-way comparison (stage `compare`) on synthetic evaluation outputs: local-only, one-shot merge, federated
rounds and centralised, per group and pooled, with intervals, paired verdicts and the gap to centralised."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedwhisper.decode.significance import BootstrapSettings, interval_metrics, read_predictions
from fedwhisper.errors import FedWhisperError
from fedwhisper.federated_report import build_four_way_report, local_only_counts

GROUPS = ["a", "b"]
N, WORDS = 20, 10  # utterances per group, reference words per utterance
SETTINGS = BootstrapSettings(resamples=200, seed=0)


def write_model(eval_dir: Path, name: str, errors: dict[str, int]) -> None:
    """``name``'s predictions CSV and metrics JSON: ``errors[g]`` word errors in every utterance of group g."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"{name}_predictions.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "client", "reference", "hypothesis", "word_errors", "ref_words", "char_errors", "ref_chars"])
        for g in GROUPS:
            for i in range(N):
                w.writerow([f"{g}-{i}", g, " ".join(["word"] * WORDS), "x", errors[g], WORDS, errors[g], 5 * WORDS])
    counts = read_predictions(path)
    metrics = {"wer": 100.0 * sum(errors.values()) / (len(GROUPS) * WORDS), "normalizer": "english",
               **{f"wer_{g}": 100.0 * errors[g] / WORDS for g in GROUPS}, **interval_metrics(counts, SETTINGS)}
    (eval_dir / f"{name}.json").write_text(json.dumps(metrics))


@pytest.fixture
def metrics_dir(tmp_path) -> Path:
    eval_dir, fed_dir = tmp_path / "eval", tmp_path / "federated"
    write_model(eval_dir, "a", {"a": 1, "b": 8})  # each client is good on its own group
    write_model(eval_dir, "b", {"a": 7, "b": 2})
    write_model(eval_dir, "aggregated", {"a": 5, "b": 5})
    write_model(fed_dir / "eval", "federated", {"a": 3, "b": 3})
    write_model(fed_dir / "eval", "centralised", {"a": 1, "b": 1})
    (fed_dir / "metrics.json").write_text(json.dumps({
        "rounds_done": 3, "clients_per_round": [["a", "b"]] * 3,
        "params": {"local_steps": 10, "strategy": "fedavg", "server_optimizer": "fedavg", "server_lr": 1.0,
                   "proximal_mu": 0.0, "fraction_fit": 1.0}}))
    (fed_dir / "centralise.json").write_text(json.dumps(
        {"one_shot_steps_per_client": {"a": 18, "b": 16}, "global_step": 34}))
    return tmp_path


def test_local_only_scores_each_group_with_its_own_client(metrics_dir):
    eval_dir = metrics_dir / "eval"
    combined = local_only_counts({g: read_predictions(eval_dir / f"{g}_predictions.csv") for g in GROUPS})
    groups = np.array(combined.groups)
    assert combined.counts[groups == "a", 0].tolist() == [1] * N  # client a's errors on group a
    assert combined.counts[groups == "b", 0].tolist() == [2] * N  # client b's errors on group b
    assert combined.scored.all()


def test_report_has_four_models_gaps_and_verdicts(metrics_dir):
    report = build_four_way_report(metrics_dir, GROUPS, SETTINGS)
    assert report == (metrics_dir / "federated/report.md").read_text()
    rows: dict[str, str] = {}  # the first table's row per model (the WER table; the gap table comes after)
    for line in report.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert rows["local-only"].startswith("| local-only | 15.0 [")  # (1 + 2) errors per 20 words, pooled
    assert " | 10.0 [" in rows["local-only"] and " | 20.0 [" in rows["local-only"]  # client a on a, b on b
    assert rows["one-shot merge"].startswith("| one-shot merge | 50.0 [")
    assert rows["federated rounds"].startswith("| federated rounds | 30.0 [")
    assert rows["centralised"].startswith("| centralised | 10.0 [")
    assert "federated rounds +20.0" in report and "one-shot merge +40.0" in report  # gap to centralised, pooled
    assert "Federated rounds close 50% of the one-shot merge's gap to centralised" in report
    assert "Federated rounds beat the one-shot merge pooled at 95% (better: -20.00" in report
    assert rows["federated rounds vs centralised"].startswith("| federated rounds vs centralised | worse: +20.00")
    assert "3 round(s) x 10 local steps per picked client (60 client optimizer steps in all)" in report
    assert "34 steps (the one-shot steps summed)" in report
    flat = json.loads((metrics_dir / "federated/comparison.json").read_text())
    assert flat["federated/gap_to_centralised"] == pytest.approx(20.0)
    assert flat["local-only/wer_b"] == pytest.approx(20.0) and flat["local-only/wer"] == pytest.approx(15.0)
    assert flat["federated_vs_aggregated/delta"] == pytest.approx(-20.0)


def test_missing_evaluation_names_the_file_and_the_stage(metrics_dir):
    (metrics_dir / "federated/eval/centralised.json").unlink()
    with pytest.raises(FedWhisperError, match=r"centralised\.json not found; run `dvc repro "
                       r"pipelines/federated/dvc\.yaml:evaluate@centralised`"):
        build_four_way_report(metrics_dir, GROUPS, SETTINGS)


def test_different_test_sets_are_not_paired(metrics_dir):
    write_model(metrics_dir / "federated/eval", "federated", {"a": 3, "b": 3})
    path = metrics_dir / "federated/eval/federated_predictions.csv"
    path.write_text(path.read_text().replace("a-0,", "a-zz,", 1))
    report = build_four_way_report(metrics_dir, GROUPS, SETTINGS)
    assert "| federated rounds vs one-shot merge | n/a (different test utterances)" in report
