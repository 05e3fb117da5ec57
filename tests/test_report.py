"""metrics/report.md: intervals and better / worse / not distinguishable verdicts on a small synthetic run."""

import csv
import json

from fedwhisper.decode.evaluate import Predictions, prediction_rows, score_predictions, write_predictions_csv
from fedwhisper.decode.significance import BootstrapSettings
from fedwhisper.report import build_report

SENTENCES = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)} alpha beta gamma delta epsilon zeta eta theta iota"
             for i in range(40)]


def _model(eval_dir, name, hypotheses, with_intervals=True):
    pred = Predictions([f"u{i}" for i in range(40)], ["a"] * 20 + ["b"] * 20, [1.0] * 40, SENTENCES, hypotheses,
                       40.0, 4.0)
    metrics = {"model": name, **score_predictions(pred, "english", BootstrapSettings() if with_intervals else None)}
    (eval_dir / f"{name}.json").write_text(json.dumps(metrics))
    write_predictions_csv(eval_dir / f"{name}_predictions.csv", prediction_rows(pred, "english"))
    return metrics


def test_report_marks_each_model_against_base_and_aggregate(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    # base: 3 of 10 words wrong everywhere; aggregated: perfect; client a: one error on one utterance of group b
    _model(eval_dir, "base", [s.replace("alpha beta gamma", "x y z") for s in SENTENCES])
    agg = _model(eval_dir, "aggregated", SENTENCES)
    _model(eval_dir, "a", SENTENCES[:39] + [SENTENCES[39].replace("theta", "tita")], with_intervals=False)
    markdown = build_report(tmp_path, ["a", "b"], BootstrapSettings())
    lines = markdown.splitlines()
    assert "| base | 30.0 [30.0, 30.0] | 30.0 | 30.0 |" in lines[6]
    assert lines[8].startswith(f"| **aggregated** | 0.0 [{agg['wer_ci_low']:.1f}, {agg['wer_ci_high']:.1f}] |")
    assert "| base | - | worse: +30.00 [30.00, 30.00], p <0.002 |" in markdown
    assert "| **aggregated** | better: -30.00 [-30.00, -30.00], p <0.002 | - |" in markdown
    client = next(ln for ln in lines if ln.startswith("| client `a` | better: "))
    assert client.startswith("| client `a` | better: -29.75 [") and "| not distinguishable: +0.25 [0.00, " in client
    assert "| client `a` | better / n.d. | better / n.d. |" in markdown
    assert ("- Pooled WER: base 30.0% -> aggregated 0.0% (0.00x the base); the aggregate is better than the base at "
            "95% (-30.00 points [-30.00, -30.00], p <0.002).") in markdown
    assert "the aggregate (0.0%) is not distinguishable from it at 95% (-0.25 points" in markdown
    assert "significantly (paired bootstrap, 95%) on 2 of them" in markdown
    with (tmp_path / "wer_by_group.csv").open() as f:
        plot = {r["label"]: r for r in csv.DictReader(f)}
    # a's metrics predate the intervals: they are recomputed from its predictions
    assert float(plot["a | pooled"]["wer_ci_low"]) == 0.0 and float(plot["a | pooled"]["wer_ci_high"]) > 0
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_predictions_still_writes_and_says_why(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    _model(eval_dir, "base", SENTENCES)
    _model(eval_dir, "aggregated", SENTENCES)
    (eval_dir / "aggregated_predictions.csv").unlink()
    markdown = build_report(tmp_path, [])
    assert "| base | - | n/a (no predictions) |" in markdown
    assert "- `aggregated`: no paired comparison (" in markdown and "aggregated_predictions.csv not found" in markdown
