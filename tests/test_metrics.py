import pytest

from fedwhisper.decode.metrics import get_normalizer, normalize_texts, score_corpus
from fedwhisper.errors import DecodeError


def test_wer_counts_substitutions_deletions_insertions():
    s = score_corpus(["the cat sat", "hello world", "a b"], ["the cat sit", "hello", "a b c"], normalizer="none")
    assert (s["substitutions"], s["deletions"], s["insertions"], s["hits"]) == (1, 1, 1, 5)
    assert s["ref_words"] == 7
    assert s["wer"] == pytest.approx(100 * 3 / 7)
    assert s["n_samples"] == 3 and s["n_empty_refs"] == 0


def test_cer_is_character_level_with_spaces():
    s = score_corpus(["abc", "ab cd"], ["abd", "ab cd"], normalizer="none")
    assert s["cer"] == pytest.approx(100 * 1 / 8)
    assert s["ref_chars"] == 8


def test_corpus_level_not_mean_of_utterances():
    refs = ["a", "b c d e f g h i j"]
    hyps = ["x", "b c d e f g h i j"]
    s = score_corpus(refs, hyps, normalizer="none")
    assert s["wer"] == pytest.approx(10.0)  # 1 error / 10 words; the per-utterance mean would be 50


def test_normaliser_changes_the_score():
    refs = ["Hello, World!", "Mr. Smith paid $20."]
    hyps = ["hello world", "mister smith paid twenty dollars"]
    assert score_corpus(refs, hyps, normalizer="english")["wer"] == 0.0
    assert score_corpus(refs[:1], hyps[:1], normalizer="basic")["wer"] == 0.0
    assert score_corpus(refs[:1], hyps[:1], normalizer="none")["wer"] == 100.0


def test_empty_references_are_excluded_and_counted():
    s = score_corpus(["", "  ", "hello there"], ["noise words", "", "hello there"], normalizer="english")
    assert s["n_empty_refs"] == 2 and s["n_samples"] == 1
    assert s["wer"] == 0.0 and s["insertions"] == 0


def test_reference_empty_only_after_normalisation_is_excluded():
    s = score_corpus(["Um.", "yes"], ["something", "yes"], normalizer="english")
    assert s["n_empty_refs"] == 1 and s["wer"] == 0.0


def test_all_empty_references_give_no_scores():
    s = score_corpus([""], ["x"])
    assert s["wer"] is None and s["n_samples"] == 0 and s["n_empty_refs"] == 1


def test_bleu_and_signature():
    s = score_corpus(["the quick brown fox jumps"], ["the quick brown fox jumps"])
    assert s["bleu"] == pytest.approx(100.0)
    assert "tok:13a" in s["bleu_signature"] and "version:" in s["bleu_signature"]
    assert score_corpus(["the quick brown fox jumps"], ["a slow red dog sleeps"])["bleu"] < 5


def test_errors_name_the_problem():
    with pytest.raises(DecodeError, match="2 references but 1 hypotheses"):
        score_corpus(["a", "b"], ["a"])
    with pytest.raises(DecodeError, match="evaluate.normalizer.*'klingon'"):
        get_normalizer("klingon")


def test_normalize_texts_collapses_whitespace():
    assert normalize_texts(["  Hello,   World! "], "basic") == ["hello world"]
    assert normalize_texts(["A  b"], "none") == ["A b"]
