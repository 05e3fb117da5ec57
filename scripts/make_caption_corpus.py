"""Build the offline captioning sample in data/sample-captions/ from the German sample's audio (no espeak needed).

Seed 003 fine-tunes one Whisper for audio *captioning* with the `translate` task: English text that describes the
audio, not a transcript of it. Its example corpus describes speech (emotion captions). This sample does the same with
what can be heard in data/sample-de's clips: who speaks (a man or a woman, or a robotic synthetic voice), the language,
how fast, and whether there is an echo. Each caption is derived from the clip's row in data/sample-de/metadata.csv:

    voice de+m3 -> "A man",  de+f2 -> "A woman",  de+klatt3 -> "A man with a robotic voice",
    de+f4 -> "A woman" + ", with an echo" (the espeak-ng variant f4 adds an echo)
    speaking rate (words per minute) < 155 -> "slowly", > 170 -> "quickly", else "at a steady pace"

    e.g. "A woman speaks German quickly, with an echo."

The layout is seed 003's local one, and the project's: train/, validation/ and test/ folders of audio, each clip
with a .json ({"text": caption}) or .txt sidecar, and a metadata.csv with the attributes (no client column: one
model). The audio files are copied unchanged; the same --seed gives identical files.

    python scripts/make_caption_corpus.py --source data/sample-de --out data/sample-captions --seed 0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_corpus import directory_bytes, replace_directory  # noqa: E402  (the English corpus script)

SPEAKERS = {
    "de+m3": "A man",
    "de+f2": "A woman",
    "de+klatt3": "A man with a robotic voice",
    "de+f4": "A woman",
}
EFFECTS = {"de+f4": "with an echo"}
SLOW_BELOW_WPM = 155
FAST_ABOVE_WPM = 170
# clips per voice: (source split, target split, count); validation comes from the source's train split
PLAN = (("train", "train", 24), ("train", "validation", 6), ("test", "test", 10))
JSON_SIDECAR_SHARE = 0.75
METADATA_COLUMNS = ("file_name", "split", "voice", "speaker", "pace", "effect", "speaking_rate", "pitch",
                    "source_file")
MAX_BYTES = 5 * 1024 * 1024


class CaptionCorpusError(RuntimeError):
    pass


def pace(words_per_minute: int) -> str:
    if words_per_minute < SLOW_BELOW_WPM:
        return "slowly"
    if words_per_minute > FAST_ABOVE_WPM:
        return "quickly"
    return "at a steady pace"


def caption(voice: str, words_per_minute: int) -> str:
    effect = EFFECTS.get(voice)
    text = f"{SPEAKERS[voice]} speaks German {pace(words_per_minute)}"
    return f"{text}, {effect}." if effect else f"{text}."


def read_source(source: Path) -> list[dict]:
    path = source / "metadata.csv"
    if not path.is_file():
        raise CaptionCorpusError(f"{path}: not found; build the German sample first (scripts/make_german_corpus.py)")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows, start=2):
        missing = [c for c in ("file_name", "voice", "split", "speaking_rate", "pitch") if not row.get(c)]
        if missing:
            raise CaptionCorpusError(f"{path} row {number}: no {', '.join(missing)}")
        if row["voice"] not in SPEAKERS:
            raise CaptionCorpusError(f"{path} row {number}: voice {row['voice']!r} has no caption; "
                                     f"known: {', '.join(SPEAKERS)}")
        if not (source / row["file_name"]).is_file():
            raise CaptionCorpusError(f"{path} row {number}: {source / row['file_name']} does not exist")
    return rows


def select(rows: list[dict], seed: int) -> list[tuple[str, dict]]:
    """(target split, source row) for every chosen clip: per voice, a seeded draw without repeats."""
    rng = random.Random(seed)
    chosen = []
    for voice in SPEAKERS:
        pools = {split: sorted((r for r in rows if r["voice"] == voice and r["split"] == split),
                               key=lambda r: r["file_name"]) for split in ("train", "test")}
        for pool in pools.values():
            rng.shuffle(pool)
        taken = Counter()
        for source_split, target_split, count in PLAN:
            start = taken[source_split]
            picked = pools[source_split][start:start + count]
            if len(picked) < count:
                raise CaptionCorpusError(f"voice {voice}: {len(pools[source_split])} {source_split} clips in the "
                                         f"source, {start + count} needed")
            taken[source_split] += count
            chosen += [(target_split, row) for row in picked]
    return chosen


def build(source: Path, out: Path, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    rows = []
    serial = Counter()
    for split, row in select(read_source(source), seed):
        src = source / row["file_name"]
        clip_id = f"clip_{split}_{serial[split]:03d}"
        serial[split] += 1
        (out / split).mkdir(parents=True, exist_ok=True)
        audio_name = f"{clip_id}{src.suffix}"
        shutil.copyfile(src, out / split / audio_name)
        text = caption(row["voice"], int(row["speaking_rate"]))
        if rng.random() < JSON_SIDECAR_SHARE:
            (out / split / f"{clip_id}.json").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        else:
            (out / split / f"{clip_id}.txt").write_text(text + "\n", encoding="utf-8")
        rows.append({
            "file_name": f"{split}/{audio_name}",
            "split": split,
            "voice": row["voice"],
            "speaker": SPEAKERS[row["voice"]],
            "pace": pace(int(row["speaking_rate"])),
            "effect": EFFECTS.get(row["voice"], ""),
            "speaking_rate": row["speaking_rate"],
            "pitch": row["pitch"],
            "source_file": f"{source.name}/{row['file_name']}",
        })
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("data/sample-de"))
    parser.add_argument("--out", type=Path, default=Path("data/sample-captions"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    keep_readme = (out / "README.md").read_text(encoding="utf-8") if (out / "README.md").is_file() else None
    try:
        rows = build(args.source.resolve(), tmp, args.seed)
        if keep_readme is not None:
            (tmp / "README.md").write_text(keep_readme, encoding="utf-8")
        size = directory_bytes(tmp)
        if size > MAX_BYTES:
            raise CaptionCorpusError(f"{out}: {size} bytes, over the {MAX_BYTES} allowed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out)
    for key in ("split", "speaker", "pace", "effect"):
        counts = Counter(row[key] or "-" for row in rows)
        print(f"{key:>8}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"{len(rows)} clips, {size} bytes in {out}")


if __name__ == "__main__":
    try:
        main()
    except CaptionCorpusError as error:
        sys.exit(f"make_caption_corpus: {error}")
