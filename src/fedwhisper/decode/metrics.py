"""Corpus-level WER / CER / BLEU on normalised text (Open ASR Leaderboard conventions)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jiwer
import sacrebleu

from fedwhisper.errors import DecodeError

NORMALIZERS = ("english", "basic", "none")

# Same transforms as HF `evaluate`'s wer/cer metrics, so the numbers equal evaluate.load("wer"/"cer").
_WORDS = jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
_CHARS = jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfChars()])


def _identity(text: str) -> str:
    return text


@functools.lru_cache(maxsize=None)
def get_normalizer(name: str) -> Callable[[str], str]:
    """`english`: Whisper's EnglishTextNormalizer; `basic`: BasicTextNormalizer (multilingual); `none`: identity."""
    if name == "english":
        from whisper.normalizers import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "basic":
        from whisper.normalizers import BasicTextNormalizer

        return BasicTextNormalizer()
    if name == "none":
        return _identity
    raise DecodeError(f"evaluate.normalizer: unknown normaliser {name!r}; use one of {', '.join(NORMALIZERS)}")


def normalize_texts(texts: Sequence[str], normalizer: str = "english") -> list[str]:
    """Normalise and collapse whitespace, so that a text with no words becomes ''."""
    norm = get_normalizer(normalizer)
    return [" ".join(norm(t or "").split()) for t in texts]


def score_corpus(refs: Sequence[str], hyps: Sequence[str], normalizer: str = "english") -> dict[str, Any]:
    """Corpus-level scores: total errors over total reference words (or characters), in percent.

    References that are empty after normalisation are excluded and counted in ``n_empty_refs``.
    BLEU is sacrebleu's corpus BLEU on the same normalised text; ``bleu_signature`` records its settings.
    With no usable reference, the scores are None.
    """
    if len(refs) != len(hyps):
        raise DecodeError(
            f"score_corpus: got {len(refs)} references but {len(hyps)} hypotheses; pass one hypothesis per reference"
        )
    norm_refs = normalize_texts(refs, normalizer)
    norm_hyps = normalize_texts(hyps, normalizer)
    keep = [i for i, r in enumerate(norm_refs) if r]
    r = [norm_refs[i] for i in keep]
    h = [norm_hyps[i] for i in keep]
    bleu = sacrebleu.BLEU()
    bleu_score = bleu.corpus_score(h, [r]) if keep else None
    out: dict[str, Any] = {
        "n_samples": len(keep),
        "n_empty_refs": len(refs) - len(keep),
        "normalizer": normalizer,
        "bleu_signature": str(bleu.get_signature()) if keep else None,
    }
    if not keep:
        return {**out, **dict.fromkeys(
            ("wer", "cer", "bleu", "substitutions", "deletions", "insertions", "hits", "ref_words", "ref_chars"))}
    words = jiwer.process_words(r, h, reference_transform=_WORDS, hypothesis_transform=_WORDS)
    chars = jiwer.process_characters(r, h, reference_transform=_CHARS, hypothesis_transform=_CHARS)
    ref_words = words.substitutions + words.deletions + words.hits
    ref_chars = chars.substitutions + chars.deletions + chars.hits
    word_errors = words.substitutions + words.deletions + words.insertions
    char_errors = chars.substitutions + chars.deletions + chars.insertions
    return {
        **out,
        "wer": 100.0 * word_errors / ref_words,
        "cer": 100.0 * char_errors / ref_chars,
        "bleu": float(bleu_score.score),
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "hits": words.hits,
        "ref_words": ref_words,
        "ref_chars": ref_chars,
    }


def utterance_counts(ref_normalized: str, hyp_normalized: str) -> tuple[int, int, int, int]:
    """(word errors, reference words, char errors, reference chars) of one normalised pair.

    Summed over utterances they give exactly `score_corpus`'s totals (same jiwer transforms), so corpus WER is
    ``sum(word errors) / sum(reference words)`` and resampling these counts redoes the corpus statistic.
    """
    if not ref_normalized:
        raise DecodeError(
            "utterance_counts: empty reference; only scored utterances (non-empty references) have counts"
        )
    w = jiwer.process_words(ref_normalized, hyp_normalized, reference_transform=_WORDS, hypothesis_transform=_WORDS)
    c = jiwer.process_characters(ref_normalized, hyp_normalized, reference_transform=_CHARS,
                                 hypothesis_transform=_CHARS)
    return (w.substitutions + w.deletions + w.insertions, w.substitutions + w.deletions + w.hits,
            c.substitutions + c.deletions + c.insertions, c.substitutions + c.deletions + c.hits)
