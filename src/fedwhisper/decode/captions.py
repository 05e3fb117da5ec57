"""Batched inference over files and folders (seed 003's ``test.py``): which files to decode, their reference
captions from sidecars, and the ``{file, pred_caption[, gt_caption]}`` rows written as CSV or JSON Lines."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedwhisper.atomic import write_text_atomic
from fedwhisper.audio import AUDIO_EXTENSIONS
from fedwhisper.errors import ParamsError

SIDECAR_SUFFIXES = (".txt", ".json", ".csv")  # captions and metadata.csv next to the audio: never decoded
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def expand_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(audio files to decode, sidecars skipped): a folder gives its audio files, recursively, sorted; a sidecar
    named directly (``dir/*`` expands to them) is skipped; any other file is kept, so a bad one is reported."""
    files: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            files += found
            skipped += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SIDECAR_SUFFIXES)
        elif path.suffix.lower() in SIDECAR_SUFFIXES:
            skipped.append(path)
        else:
            files.append(path)
    return list(dict.fromkeys(files)), skipped


def reference_caption(audio: str | Path, text_key: str = "text") -> str | None:
    """The caption in ``<stem>.txt``, else ``<stem>.json`` (``text_key``, dotted for nested), as prepare reads them;
    None where there is no sidecar or it holds no string caption."""
    from fedwhisper.data.sources import _checked_text, _json_text, _text_from, _utf8_text

    stem = Path(audio).with_suffix("")
    txt, js = stem.with_suffix(".txt"), stem.with_suffix(".json")
    if txt.is_file():
        text = _utf8_text(txt.read_bytes())
    elif js.is_file():
        text, _ = _checked_text(_text_from(_json_text(js.read_bytes(), str(js)), text_key), text_key)
    else:
        return None
    return text.strip() if isinstance(text, str) else None


def caption_rows(results: Iterable[dict[str, Any]], text_key: str = "text") -> list[dict[str, Any]]:
    """``{file, pred_caption}`` per transcribed file, plus ``gt_caption`` where a sidecar holds a reference."""
    rows = []
    for r in results:
        row = {"file": r["file"], "pred_caption": r["text"]}
        gt = reference_caption(r["file"], text_key)
        if gt is not None:
            row["gt_caption"] = gt
        rows.append(row)
    return rows


def write_captions(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """``.jsonl``: one object per line (``gt_caption`` only where known); ``.csv``: columns file, pred_caption,
    gt_caption (empty where there is no reference). Written to a temporary name, then renamed."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["file", "pred_caption", "gt_caption"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({"gt_caption": "", **r} for r in rows)
        text = buf.getvalue()
    else:
        raise ParamsError(f"--out {path}: name a .csv or .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
