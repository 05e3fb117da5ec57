"""Bootstrap intervals and the paired bootstrap (fedwhisper.decode.significance) and `python -m fedwhisper compare`."""

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest

from fedwhisper.__main__ import main as cli
from fedwhisper.decode.evaluate import PREDICTION_COLUMNS, Predictions, prediction_rows, score_predictions
from fedwhisper.decode.metrics import score_corpus
from fedwhisper.decode.significance import (
    BootstrapSettings, UtteranceCounts, compare_counts, interval_metrics, paired_bootstrap, rate_intervals,
    read_predictions, resample_totals,
)
from fedwhisper.errors import DecodeError


def counts_of(word_errors, ref_words, groups=None, char_errors=None, ref_chars=None, refs=None, source="x"):
    n = len(word_errors)
    char_errors = word_errors if char_errors is None else char_errors
    ref_chars = [5 * w for w in ref_words] if ref_chars is None else ref_chars
    refs = refs or [f"sentence {i}" for i in range(n)]
    counts = np.array([word_errors, ref_words, char_errors, ref_chars], np.int64).T
    return UtteranceCounts(source, [f"u{i}" for i in range(n)], groups or ["g"] * n, list(refs), list(refs),
                           np.ones(n, bool), counts)


def test_interval_matches_the_exact_bootstrap_distribution_by_enumeration():
    """Five utterances: all 5^5 equally likely resamples give the exact bootstrap distribution of corpus WER."""
    errors, words = np.array([0, 1, 3, 0, 6]), np.array([4, 9, 7, 5, 10])
    exact = np.array([100 * errors[list(i)].sum() / words[list(i)].sum()
                      for i in itertools.product(range(5), repeat=5)])
    got = rate_intervals(counts_of(errors, words), BootstrapSettings(resamples=20000, seed=3))["wer"]
    assert got.estimate == pytest.approx(100 * 10 / 35)
    assert np.quantile(exact, 0.015) <= got.low <= np.quantile(exact, 0.035)
    assert np.quantile(exact, 0.965) <= got.high <= np.quantile(exact, 0.985)


def test_spread_matches_the_closed_form_for_equal_length_utterances():
    """With n utterances of m words each, WER* is a mean of n draws: sd = 100 * sd_pop(e) / (m sqrt(n))."""
    rng = np.random.default_rng(0)
    errors = rng.integers(0, 6, 200)
    words = np.full(200, 10)
    totals = resample_totals(np.stack([errors, words], 1), 4000, seed=1)
    wer = 100 * totals[:, 0] / totals[:, 1]
    assert wer.mean() == pytest.approx(100 * errors.mean() / 10, rel=0.01)
    assert wer.std() == pytest.approx(100 * errors.std() / (10 * np.sqrt(200)), rel=0.05)


def test_resample_totals_equal_the_gather_loop_with_the_same_draws():
    """The bincount + matrix product shortcut sums exactly the rows a textbook loop gathers."""
    values = np.random.default_rng(5).integers(0, 20, (37, 3)).astype(float)
    rng = np.random.default_rng(9)
    expected = np.array([values[rng.integers(0, 37, 37)].sum(0) for _ in range(50)])
    np.testing.assert_array_equal(resample_totals(values, 50, seed=9), expected)


def test_same_predictions_twice_are_a_null_pair():
    a = counts_of([0, 2, 1, 3, 0, 1], [5, 8, 6, 9, 4, 7], groups=list("aabbcc"))
    for c in compare_counts(a, a, BootstrapSettings()):
        assert (c.delta, c.low, c.high, c.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert c.verdict == "not distinguishable"
    assert [(c.metric, c.group) for c in compare_counts(a, a, BootstrapSettings())][:4] == [
        ("wer", "pooled"), ("wer", "a"), ("wer", "b"), ("wer", "c")]


def test_known_significant_pair_in_both_directions():
    words = [10] * 40
    a = counts_of([3] * 40, words, source="a")
    b = counts_of([0] * 39 + [2], words, source="b")
    wer = paired_bootstrap(a, b, BootstrapSettings())["wer"]
    assert wer.a == pytest.approx(30.0) and wer.b == pytest.approx(0.5) and wer.delta == pytest.approx(-29.5)
    assert wer.high < 0 and wer.p_value < 0.002 and wer.verdict == "better"
    back = paired_bootstrap(b, a, BootstrapSettings())["wer"]
    assert back.low > 0 and back.verdict == "worse" and back.delta == pytest.approx(29.5)


def test_a_small_difference_on_noisy_utterances_is_not_distinguishable():
    rng = np.random.default_rng(2)
    words = rng.integers(5, 15, 60)
    ea = rng.binomial(words, 0.2)
    eb = ea.copy()
    eb[0] += 1  # one more error in 60 utterances
    c = paired_bootstrap(counts_of(ea, words), counts_of(eb, words), BootstrapSettings())["wer"]
    assert c.delta > 0 and c.low <= 0 <= c.high and c.p_value > 0.05 and c.verdict == "not distinguishable"


def test_deterministic_under_the_seed():
    rng = np.random.default_rng(4)
    words = rng.integers(3, 20, 80)
    a = counts_of(rng.binomial(words, 0.3), words)
    b = counts_of(rng.binomial(words, 0.25), words)
    s0, s1 = BootstrapSettings(seed=0), BootstrapSettings(seed=1)
    assert rate_intervals(a, s0) == rate_intervals(a, s0)
    assert paired_bootstrap(a, b, s0) == paired_bootstrap(a, b, s0)
    assert rate_intervals(a, s0)["wer"] != rate_intervals(a, s1)["wer"]
    assert paired_bootstrap(a, b, s0)["wer"].low != paired_bootstrap(a, b, s1)["wer"].low


def test_sentence_unit_draws_each_sentence_with_all_its_recordings():
    """Four sentences, each read in two accents: 4 units, and delta follows the exact sentence-level bootstrap."""
    refs = ["one two", "three four five", "six", "seven eight", "one two", "three four five", "six", "seven eight"]
    words = [2, 3, 1, 2, 2, 3, 1, 2]
    a = counts_of([2, 0, 1, 1, 1, 0, 1, 0], words, refs=refs)
    b = counts_of([0, 1, 0, 0, 0, 0, 1, 0], words, refs=refs)
    assert paired_bootstrap(a, b, BootstrapSettings())["wer"].units == 8
    got = paired_bootstrap(a, b, BootstrapSettings(unit="sentence", resamples=20000))["wer"]
    assert got.units == 4
    # per sentence (both recordings summed): A errors, B errors, words
    ea, eb, n = np.array([3, 0, 2, 1]), np.array([0, 1, 1, 0]), np.array([4, 6, 2, 4])
    exact = np.array([100 * (eb[list(i)].sum() - ea[list(i)].sum()) / n[list(i)].sum()
                      for i in itertools.product(range(4), repeat=4)])
    assert got.delta == pytest.approx(100 * (2 - 6) / 16)
    assert np.quantile(exact, 0.015) <= got.low <= np.quantile(exact, 0.035)
    assert np.quantile(exact, 0.965) <= got.high <= np.quantile(exact, 0.985)


def test_interval_metrics_flat_keys_per_group():
    a = counts_of([1, 0, 2, 4], [10, 8, 9, 12], groups=["x", "x", "y", "y"])
    m = interval_metrics(a, BootstrapSettings())
    for suffix in ("", "_x", "_y"):
        for metric in ("wer", "cer"):
            assert m[f"{metric}_ci_low{suffix}"] <= m[f"{metric}_ci_high{suffix}"]
    assert m["wer_ci_low_x"] >= 0 and m["wer_ci_high_x"] <= 100 * 1 / 8
    assert (m["ci_confidence"], m["ci_resamples"], m["ci_seed"], m["ci_unit"]) == (0.95, 1000, 0, "utterance")


def _pred():
    return Predictions(
        ids=["1", "2", "3", "4"], clients=["a", "a", "b", "b"], durations=[1.0] * 4,
        references=["The cat sat.", "Two dogs ran home", "", "a b c d"],
        hypotheses=["the cat sad", "two dogs ran home now", "noise", "a b d"],
        audio_seconds=4.0, decode_seconds=1.0,
    )


def _write(path: Path, rows, columns=PREDICTION_COLUMNS):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_counts_redo_the_corpus_scores(tmp_path):
    pred = _pred()
    rows = list(prediction_rows(pred, "english"))
    assert set(PREDICTION_COLUMNS) >= {"word_errors", "ref_words", "char_errors", "ref_chars"}
    scored = [r for r in rows if r["scored"]]
    assert [r["char_errors"] for r in rows if not r["scored"]] == [""]
    corpus = score_corpus(pred.references, pred.hypotheses, "english")
    words = sum(r["ref_words"] for r in scored)
    chars = sum(r["ref_chars"] for r in scored)
    assert 100 * sum(r["word_errors"] for r in scored) / words == pytest.approx(corpus["wer"])
    assert 100 * sum(r["char_errors"] for r in scored) / chars == pytest.approx(corpus["cer"])
    assert (words, chars) == (corpus["ref_words"], corpus["ref_chars"])
    # the file round-trips, and a file from before the count columns is recounted to the same numbers
    new = read_predictions(_write(tmp_path / "new.csv", rows))
    old_columns = [c for c in PREDICTION_COLUMNS if c not in ("char_errors", "ref_chars")]
    old = read_predictions(_write(tmp_path / "old.csv", rows, old_columns))
    bare = read_predictions(_write(tmp_path / "bare.csv", rows, ["id", "client", "reference", "hypothesis"]))
    for counts in (old, bare):
        np.testing.assert_array_equal(counts.counts, new.counts)
        np.testing.assert_array_equal(counts.scored, [True, True, False, True])


def test_score_predictions_carries_the_intervals():
    m = score_predictions(_pred(), "english", BootstrapSettings())
    for suffix in ("", "_a", "_b"):
        assert m[f"wer_ci_low{suffix}"] <= m[f"wer{suffix}"] <= m[f"wer_ci_high{suffix}"]
        assert m[f"cer_ci_low{suffix}"] <= m[f"cer{suffix}"] <= m[f"cer_ci_high{suffix}"]
    assert "wer_ci_low" not in score_predictions(_pred(), "english")


def test_refuses_different_utterance_sets_naming_what_differs():
    a = counts_of([1, 0, 2], [5, 5, 5], source="A.csv")
    b = counts_of([1, 0, 2, 1], [5, 5, 5, 5], source="B.csv")
    with pytest.raises(DecodeError, match=r"different utterance sets \(3 vs 4 rows\): 1 only in B \(B.csv\): u3"):
        compare_counts(a, b, BootstrapSettings())
    c = counts_of([1, 0, 2], [5, 5, 5], refs=["sentence 0", "another text", "sentence 2"], source="C.csv")
    with pytest.raises(DecodeError, match=r"utterance 'u1' has a different reference in A \(A.csv: 'sentence 1'\)"):
        compare_counts(a, c, BootstrapSettings())


def test_bad_count_cell_names_file_line_and_column(tmp_path):
    rows = list(prediction_rows(_pred(), "english"))
    rows[1]["ref_words"] = "many"
    with pytest.raises(DecodeError, match=r"bad.csv: line 3: ref_words = 'many'; expected a whole number"):
        read_predictions(_write(tmp_path / "bad.csv", rows))
    with pytest.raises(DecodeError, match=r"no column 'reference'"):
        read_predictions(_write(tmp_path / "cols.csv", rows, ["id", "hypothesis"]))


def test_compare_cli_verdicts_and_refusal(tmp_path, capsys):
    pred = _pred()
    a = _write(tmp_path / "a.csv", prediction_rows(pred, "english"))
    perfect = Predictions(pred.ids, pred.clients, pred.durations, pred.references, pred.references)
    b = _write(tmp_path / "b.csv", prediction_rows(perfect, "english"))
    params = ["--params", str(tmp_path / "none.yaml")]
    assert cli(["compare", str(a), str(a), "--params", "params.yaml"]) == 0
    out = capsys.readouterr().out
    assert "A and B are not distinguishable at 95% (not distinguishable: +0.00 [0.00, 0.00], p 1.000)" in out
    assert cli(["compare", str(a), str(b), "--md", "--metric", "wer"]) == 0
    out = capsys.readouterr().out
    assert "| WER | pooled |" in out and "| CER |" not in out
    assert cli(["compare", str(a), str(b), "--confidence", "2"]) == 1
    assert "evaluate.bootstrap.confidence: got 2.0; must be <= 0.999" in capsys.readouterr().err
    short = _write(tmp_path / "short.csv", list(prediction_rows(pred, "english"))[:2])
    assert cli(["compare", str(a), str(short)]) == 1
    assert "2 only in A" in capsys.readouterr().err
    assert cli(["compare", str(a), str(b), *params]) == 1
    assert "none.yaml: params file not found" in capsys.readouterr().err
