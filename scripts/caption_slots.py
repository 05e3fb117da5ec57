"""Score captions of data/sample-captions slot by slot: who speaks, the pace, the echo, and the whole caption.

BLEU and WER on templated captions mostly reward the template, which a model learns in a few steps whatever it hears.
The slots say whether it listens. Reads an evaluation's predictions CSV (metrics/eval/<model>_predictions.csv:
`id`, `reference`, `hypothesis`), and prints, per slot, how many hypotheses state the reference's value, with the
share in percent. A hypothesis that states no speaker or pace (for example a transcript or a translation instead of
a caption) counts as wrong for that slot. The echo slot is right when the hypothesis mentions an echo exactly when the
reference does, so a hypothesis that never mentions one is right on the 3 of 4 clips without echo.

    python scripts/caption_slots.py metrics/eval/captions_predictions.csv metrics/eval/base_predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

# longest first: "a man with a robotic voice" must not be read as "a man"
SPEAKERS = ("a man with a robotic voice", "a woman", "a man")
PACES = ("slowly", "quickly", "at a steady pace")
SLOTS = ("speaker", "pace", "echo", "caption")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def slots(caption: str) -> dict[str, str | None]:
    text = _clean(caption)
    speaker = next((s for s in SPEAKERS if text.startswith(s + " ") or text == s), None)
    pace = next((p for p in PACES if f" {p} " in f" {text} "), None)
    return {"speaker": speaker, "pace": pace, "echo": "echo" if "echo" in text.split() else "none",
            "caption": text}


def score(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """slot -> (hypotheses stating the reference's value, rows)."""
    right = dict.fromkeys(SLOTS, 0)
    for row in rows:
        ref, hyp = slots(row["reference"]), slots(row["hypothesis"])
        for slot in SLOTS:
            right[slot] += ref[slot] is not None and hyp[slot] == ref[slot]
    return {slot: (right[slot], len(rows)) for slot in SLOTS}


def read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"reference", "hypothesis"} - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"caption_slots: {path}: no {', '.join(sorted(missing))} column")
        rows = list(reader)
    if not rows:
        raise SystemExit(f"caption_slots: {path}: no rows")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", type=Path, nargs="+")
    args = parser.parse_args(argv)
    print("| predictions | " + " | ".join(SLOTS) + " |")
    print("|---|" + "---:|" * len(SLOTS))
    for path in args.predictions:
        result = score(read(path))
        cells = [f"{right}/{n} ({100 * right / n:.1f}%)" for right, n in result.values()]
        print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
