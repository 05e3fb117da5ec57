"""The committed data/sample/ corpus meets its spec (no espeak-ng needed)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
ACCENTS = {"en-us", "en-gb-scotland", "en-029", "en-gb-x-gbcwmd"}
AUDIO_EXTENSIONS = {".flac", ".wav", ".mp3", ".ogg"}
SIDECAR_EXTENSIONS = {".txt", ".json"}
SPLITS = ("train", "test")
MAX_BYTES = 15 * 1024 * 1024

pytestmark = pytest.mark.skipif(not (SAMPLE / "metadata.csv").exists(), reason="data/sample/ not generated")


def audio_files() -> list[Path]:
    return sorted(p for split in SPLITS for p in (SAMPLE / split).iterdir() if p.suffix in AUDIO_EXTENSIONS)


def metadata_rows() -> list[dict]:
    with open(SAMPLE / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def transcript(audio: Path) -> str:
    txt, js = audio.with_suffix(".txt"), audio.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8").strip()
    return json.loads(js.read_text(encoding="utf-8"))["text"].strip()


def transcripts(split: str) -> dict[str, str]:
    return {p.stem: transcript(p) for p in audio_files() if p.parent.name == split}


def test_every_file_is_audio_or_sidecar():
    for split in SPLITS:
        odd = [p.name for p in (SAMPLE / split).iterdir() if p.suffix not in AUDIO_EXTENSIONS | SIDECAR_EXTENSIONS]
        assert not odd, f"unexpected files in {split}/: {odd}"


def test_every_audio_file_has_exactly_one_sidecar():
    for audio in audio_files():
        sidecars = [ext for ext in SIDECAR_EXTENSIONS if audio.with_suffix(ext).exists()]
        assert len(sidecars) == 1, f"{audio.name} has sidecars {sidecars}, expected exactly one"


def test_every_sidecar_has_one_audio_file():
    for split in SPLITS:
        for sidecar in (SAMPLE / split).iterdir():
            if sidecar.suffix in SIDECAR_EXTENSIONS:
                audio = [ext for ext in AUDIO_EXTENSIONS if sidecar.with_suffix(ext).exists()]
                assert len(audio) == 1, f"{sidecar.name} matches audio {audio}, expected exactly one"


def test_both_sidecar_kinds_are_used_and_hold_text():
    kinds = Counter(p.suffix for split in SPLITS for p in (SAMPLE / split).iterdir() if p.suffix in SIDECAR_EXTENSIONS)
    assert kinds[".txt"] > 0 and kinds[".json"] > 0, kinds
    assert all(transcript(p) for p in audio_files())


def test_metadata_rows_match_audio_files_one_to_one():
    rows = metadata_rows()
    names = [row["file_name"] for row in rows]
    on_disk = [p.relative_to(SAMPLE).as_posix() for p in audio_files()]
    assert names == sorted(names), "metadata.csv rows are not sorted by file_name"
    assert len(names) == len(set(names)), "metadata.csv repeats a file_name"
    assert sorted(names) == on_disk


def test_metadata_columns_and_values():
    rows = metadata_rows()
    assert list(rows[0]) == ["file_name", "accent", "split", "speaking_rate", "pitch", "sampling_rate", "format"]
    for row in rows:
        name = Path(row["file_name"])
        assert row["accent"] in ACCENTS, row
        assert row["split"] == name.parent.name, row
        assert name.stem.startswith(f"{row['accent']}_{row['split']}_"), row
        assert row["format"] == name.suffix[1:], row


def test_each_accent_has_enough_train_and_test_items():
    counts = Counter((row["accent"], row["split"]) for row in metadata_rows())
    for accent in ACCENTS:
        assert counts[(accent, "train")] >= 60, (accent, counts[(accent, "train")])
        assert counts[(accent, "test")] >= 30, (accent, counts[(accent, "test")])


def test_train_and_test_sentences_are_disjoint():
    shared = set(transcripts("train").values()) & set(transcripts("test").values())
    assert not shared, f"sentences in both splits: {sorted(shared)[:5]}"


def test_every_accent_speaks_the_same_test_sentences():
    by_accent: dict[str, set[str]] = {}
    accent_of = {Path(row["file_name"]).stem: row["accent"] for row in metadata_rows()}
    for stem, text in transcripts("test").items():
        by_accent.setdefault(accent_of[stem], set()).add(text)
    assert set(by_accent) == ACCENTS
    assert len({frozenset(texts) for texts in by_accent.values()}) == 1


def test_at_least_150_distinct_sentences_of_plain_words():
    sentences = set(transcripts("train").values()) | set(transcripts("test").values())
    assert len(sentences) >= 150, len(sentences)
    for sentence in sentences:
        assert 6 <= len(sentence.split()) <= 16, sentence
        assert not any(ch.isdigit() for ch in sentence), sentence


def test_all_four_formats_and_some_lossless_variety():
    infos = [sf.info(str(p)) for p in audio_files()]
    assert {i.format for i in infos} == {"FLAC", "WAV", "MP3", "OGG"}
    lossless = [i for i in infos if i.format in ("FLAC", "WAV")]
    assert len({i.samplerate for i in lossless}) > 1
    assert any(i.channels == 2 for i in lossless)
    assert len({i.subtype for i in lossless}) > 1


def test_total_size_is_within_limit():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"data/sample/ is {total} bytes, limit {MAX_BYTES}"


def test_every_audio_file_decodes_to_finite_nonempty_audio():
    rates = {row["file_name"]: int(row["sampling_rate"]) for row in metadata_rows()}
    for path in audio_files():
        audio, sr = sf.read(str(path), dtype="float32")
        assert audio.size > 0 and np.isfinite(audio).all(), path.name
        assert np.abs(audio).max() > 0.05, f"{path.name} is near silent"
        assert 1.0 < len(audio) / sr < 15.0, f"{path.name} lasts {len(audio) / sr:.2f} s"
        assert sr == rates[path.relative_to(SAMPLE).as_posix()], path.name
