"""Read a dataset, drop unusable items (with reasons), partition into clients and splits, write prepared data."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.audio import (
    SAMPLING_RATE,
    AudioTooLongError,
    TruncatedAudioError,
    audio_problem,
    load_16k_mono,
    to_16k_mono,
)
from fedwhisper.data.partition import SPLITS, assign_clients, assign_splits, client_names, resolve_split_map, subsample
from fedwhisper.data.prepared import split_path, write_manifest, write_split
from fedwhisper.data.sources import RawItem, Source, lookup, open_source
from fedwhisper.errors import CheckpointError, DataError, ParamsError
from fedwhisper.params import Params

log = logging.getLogger(__name__)

DROP_REASONS = (
    "duplicate_id",
    "missing_transcript",
    "invalid_utf8",
    "empty_transcript",
    "too_many_tokens",
    "missing_client",
    "undecodable",
    "empty_audio",
    "non_finite",
    "too_long",
    "missing_audio",
    "duplicate_metadata",
    "non_string_transcript",
    "audio_outside_root",
    "truncated_audio",
)
DROPS_CSV = "prepare_drops.csv"
METRICS_JSON = "prepare.json"
_POOL_SCHEMA = pa.schema([("audio", pa.list_(pa.float32()))])


@dataclass(frozen=True)
class Drop:
    id: str
    origin: str
    reason: str
    detail: str


@dataclass
class _Kept:
    id: str
    text: str
    role: str | None
    group: str | None
    label: str | None
    duration_s: float


@dataclass(frozen=True)
class PrepareSummary:
    seen: int
    kept: int
    drops: dict[str, int]
    drop_fraction: float
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)


def load_token_counter(base_dir: Path) -> Callable[[str], int]:
    """len(label ids) with the base model's tokenizer (special prefix/suffix tokens included, as in training)."""
    from transformers import WhisperTokenizerFast

    if not (base_dir / "tokenizer.json").is_file() and not (base_dir / "vocab.json").is_file():
        raise CheckpointError(
            f"{base_dir}: no tokenizer files; run the base stage first (`dvc repro base` or python stages/base.py)"
        )
    tokenizer = WhisperTokenizerFast.from_pretrained(str(base_dir))
    return lambda text: len(tokenizer(text).input_ids)


def run_prepare(
    params: Params,
    count_tokens: Callable[[str], int],
    out_dir: str | Path = "data/prepared",
    metrics_dir: str | Path = "metrics",
    source: Source | None = None,
) -> PrepareSummary:
    """Prepare ``params.data`` into ``out_dir`` and write ``metrics_dir/prepare.json`` and ``prepare_drops.csv``.

    ``count_tokens(text)`` gives the label length in tokens (the base model's tokenizer in the stage).
    """
    started = time.monotonic()
    implicit_client(params)
    out_dir, metrics_dir = Path(out_dir), Path(metrics_dir)
    source = source or open_source(params.data)
    source_splits = source.split_names()
    split_map = resolve_split_map(source_splits, params.data.splits)
    if "train" in split_map:
        to_read = [(theirs, ours) for ours, theirs in sorted(split_map.items(), key=lambda kv: SPLITS.index(kv[0]))]
        ignored = sorted(set(source_splits) - set(split_map.values()))
        if ignored:
            log.info("prepare: ignoring dataset splits %s (not mapped in data.splits)", ignored)
    else:
        to_read = [(s, None) for s in source_splits]

    remove_stale_siblings(out_dir)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kept, drops, seen = _read_and_filter(params, source, to_read, count_tokens, tmp / "_pool.arrow")
        _write_drops_csv(metrics_dir / DROPS_CSV, drops)
        counts_by_reason = Counter(d.reason for d in drops)
        if counts_by_reason["too_long"]:
            log.warning(
                "prepare: dropped %d clip(s) longer than prepare.max_duration_s %.0f s (too_long; Whisper trains on "
                "30 s windows and long clips are not split); cut them into shorter captioned segments to use them; "
                "listed in %s", counts_by_reason["too_long"], params.prepare.max_duration_s, metrics_dir / DROPS_CSV,
            )
        drop_fraction = len(drops) / seen if seen else 0.0
        if seen == 0:
            raise DataError(f"data.path: {params.data.path} ({params.data.source}) yielded no items; check the path")
        if drop_fraction > params.prepare.max_drop_fraction:
            top = ", ".join(f"{r}: {n}" for r, n in counts_by_reason.most_common())
            raise DataError(
                f"prepare: dropped {len(drops)} of {seen} items ({drop_fraction:.1%}) > prepare.max_drop_fraction "
                f"{params.prepare.max_drop_fraction:.1%} ({top}); see {metrics_dir / DROPS_CSV} and fix the data "
                "or raise prepare.max_drop_fraction"
            )
        selected = _partition(params, kept)
        counts, seconds = _write_outputs(tmp, kept, selected, params.clients)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out_dir)

    summary = PrepareSummary(
        seen, len(kept), {r: counts_by_reason.get(r, 0) for r in DROP_REASONS}, drop_fraction, counts, seconds
    )
    _write_metrics(metrics_dir / METRICS_JSON, summary, params.clients)
    total_items = sum(sum(c.values()) for c in counts.values())
    total_h = sum(sum(s.values()) for s in seconds.values()) / 3600
    log.info(
        "prepare: %d items (%.3f h) for %d clients in %s; %d of %d dropped (%.1f%%); %.1f s",
        total_items, total_h, len(params.clients), out_dir, len(drops), seen, 100 * drop_fraction,
        time.monotonic() - started,
    )
    return summary


def implicit_client(params: Params) -> str | None:
    """The one client every item belongs to when the data has no client column (``data.columns.client: null``
    with ``prepare.partition.mode: column``): the single name listed under ``clients:``; else None.

    One model is trained (seed 003's captioning use); the name is the user's, e.g. ``clients: [captions]``.
    """
    if params.prepare.partition.mode != "column" or params.data.columns.client is not None:
        return None
    if len(params.clients) != 1:
        raise ParamsError(
            f"data.columns.client is null, so all data forms one implicit client (one model), but clients: lists "
            f"{len(params.clients)} names {params.clients}; list exactly one name, e.g. `clients: [captions]`, or "
            "name the client column in data.columns.client, or use prepare.partition.mode iid / dirichlet"
        )
    return params.clients[0]


def _read_and_filter(
    params: Params,
    source: Source,
    to_read: list[tuple[str, str | None]],
    count_tokens: Callable[[str], int],
    pool_path: Path,
) -> tuple[list[_Kept], list[Drop], int]:
    """Decode and check each item; append usable audio to an Arrow spool file (bounded memory)."""
    prep, cols = params.prepare, params.data.columns
    label_column = prep.partition.label_column or cols.client
    implicit = implicit_client(params)
    kept: list[_Kept] = []
    drops: list[Drop] = []
    seen_ids: set[str] = set()
    seen = 0
    counts = [source.count(theirs) for theirs, _ in to_read]
    total = None if None in counts else sum(counts)
    with pa.OSFile(str(pool_path), "wb") as sink, pa.ipc.new_stream(sink, _POOL_SCHEMA) as pool, tqdm(
        desc="prepare", unit="item", total=total
    ) as bar:
        for theirs, ours in to_read:
            for item in source.iter_split(theirs):
                seen += 1
                bar.update(1)
                result = _check(item, params, count_tokens, seen_ids)
                if isinstance(result, Drop):
                    drops.append(result)
                    continue
                text, audio = result
                group = _value(lookup(item.extra, cols.client, None)) if cols.client else implicit
                if prep.partition.mode == "column" and group is None:
                    drops.append(Drop(item.id, item.origin, "missing_client", f"no value in column {cols.client!r}"))
                    continue
                label = _value(lookup(item.extra, label_column, None)) if label_column else None
                pool.write_batch(pa.record_batch([pa.array([audio], pa.list_(pa.float32()))], schema=_POOL_SCHEMA))
                kept.append(_Kept(item.id, text, ours, group, label, len(audio) / SAMPLING_RATE))
    return kept, drops, seen


def _value(v: object) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return str(v).strip()


def _check(
    item: RawItem, params: Params, count_tokens: Callable[[str], int], seen_ids: set[str]
) -> Drop | tuple[str, np.ndarray]:
    """(text, 16 kHz audio) for a usable item, else the Drop saying why not."""
    prep = params.prepare

    def drop(reason: str, detail: str) -> Drop:
        return Drop(item.id, item.origin, reason, detail)

    if item.drop_reason:
        return drop(item.drop_reason, item.problem)
    if item.id in seen_ids:
        return drop("duplicate_id", "id already used by an earlier item")
    seen_ids.add(item.id)
    text = item.text
    if text is None:
        return drop(
            "missing_transcript",
            item.problem or f"no transcript (sidecar .txt/.json or column {params.data.columns.text!r})",
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return drop("invalid_utf8", f"transcript is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return drop("invalid_utf8", f"transcript is not valid UTF-8 ({exc.reason} at char {exc.start})")
    text = text.strip()
    if all(c.isspace() or unicodedata.category(c) == "Cf" for c in text):
        return drop("empty_transcript", "transcript is empty, whitespace or invisible (zero-width) characters")
    n_tokens = count_tokens(text)
    if n_tokens > prep.max_label_tokens:
        return drop("too_many_tokens", f"{n_tokens} label tokens > prepare.max_label_tokens {prep.max_label_tokens}")
    try:
        if item.audio is None:
            raise DataError(item.problem or f"no audio (column {params.data.columns.audio!r})")
        if isinstance(item.audio, tuple):
            array, rate = item.audio
            if rate > 0 and len(array) / rate > prep.max_duration_s:
                raise AudioTooLongError(item.origin, len(array) / rate)
            audio = to_16k_mono(array, rate)
        else:
            audio = load_16k_mono(item.audio, name=item.origin, max_seconds=prep.max_duration_s)
    except AudioTooLongError as exc:
        return drop("too_long", f"{exc.seconds:.2f} s > prepare.max_duration_s {prep.max_duration_s}")
    except TruncatedAudioError as exc:
        return drop("truncated_audio", str(exc))
    except DataError as exc:
        return drop("undecodable", str(exc))
    problem = audio_problem(audio)
    if problem is not None:
        return drop(*problem)
    duration = audio.size / SAMPLING_RATE
    if duration > prep.max_duration_s:
        return drop("too_long", f"{duration:.2f} s > prepare.max_duration_s {prep.max_duration_s}")
    return text, audio


def _partition(params: Params, kept: list[_Kept]) -> dict[tuple[str, str], list[int]]:
    """(client, split) -> indices into ``kept`` (sorted by id, subsampled per prepare.max_items_per_client)."""
    prep = params.prepare
    ids = [k.id for k in kept]
    roles = [k.role for k in kept]
    clients = assign_clients(ids, [k.group for k in kept], [k.label for k in kept], prep.partition, prep.seed, roles)
    listed = set(params.clients)
    unknown = sorted(set(clients) - listed)
    if unknown:
        hint = (
            f"the {prep.partition.mode} partition names clients {client_names(prep.partition.num_clients)}"
            if prep.partition.mode != "column"
            else f"values of column {params.data.columns.client!r}"
        )
        raise DataError(
            f"prepare: clients {unknown} found in the data ({hint}) are not listed in params.yaml `clients:` "
            f"{params.clients}; update `clients:` to the clients you want"
        )
    splits = assign_splits(ids, clients, roles, prep.split, prep.seed)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (client, split) in enumerate(zip(clients, splits)):
        groups[(client, split)].append(i)
    for client in params.clients:
        if not groups.get((client, "train")):
            raise DataError(
                f"prepare: client {client!r} (listed in params.yaml `clients:`) has no usable training items "
                f"(items per split: { {s: len(groups.get((client, s), [])) for s in SPLITS} }); remove it from "
                "`clients:` or check the client column / partition settings and the drops CSV"
            )
    return {
        (c, s): subsample(groups.get((c, s), []), ids, prep.max_items_per_client, prep.seed, c, s)
        for c in params.clients
        for s in SPLITS
    }


def _write_outputs(
    tmp: Path, kept: list[_Kept], selected: dict[tuple[str, str], list[int]], clients: list[str]
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    pool_path = tmp / "_pool.arrow"
    counts: dict[str, dict[str, int]] = {c: {} for c in clients}
    seconds: dict[str, dict[str, float]] = {c: {} for c in clients}
    with pa.memory_map(str(pool_path)) as mm:
        audio_col = pa.ipc.open_stream(mm).read_all().column("audio")

        for (client, split), indices in tqdm(selected.items(), desc="write", unit="split"):
            rows = (
                {
                    "id": kept[i].id,
                    "client": client,
                    "text": kept[i].text,
                    "audio": audio_col[i].values.to_numpy(zero_copy_only=False),
                    "duration_s": kept[i].duration_s,
                }
                for i in indices
            )
            counts[client][split] = write_split(split_path(tmp, client, split), rows)
            seconds[client][split] = float(sum(kept[i].duration_s for i in indices))
        del audio_col
    pool_path.unlink()
    write_manifest(tmp, counts, clients)
    return counts, seconds


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_drops_csv(path: Path, drops: list[Drop]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "origin", "reason", "detail"])
    for d in drops:
        writer.writerow([d.id, d.origin, d.reason, d.detail])
    write_text_atomic(path, buf.getvalue())


def metrics_dict(summary: PrepareSummary, clients: list[str]) -> dict[str, float | int]:
    """Flat keys: ``items/<client>/<split>``, ``hours/<client>/<split>``, totals, ``drops/<reason>``."""
    out: dict[str, float | int] = {}
    for client in clients:
        for split in SPLITS:
            out[f"items/{client}/{split}"] = summary.counts[client].get(split, 0)
            out[f"hours/{client}/{split}"] = round(summary.seconds[client].get(split, 0.0) / 3600, 6)
    for split in SPLITS:
        out[f"items/total/{split}"] = sum(summary.counts[c].get(split, 0) for c in clients)
        out[f"hours/total/{split}"] = round(sum(summary.seconds[c].get(split, 0.0) for c in clients) / 3600, 6)
    out["items/total"] = sum(out[f"items/total/{s}"] for s in SPLITS)
    out["hours/total"] = round(sum(sum(summary.seconds[c].values()) for c in clients) / 3600, 6)
    out["items/seen"] = summary.seen
    for reason in DROP_REASONS:
        out[f"drops/{reason}"] = summary.drops[reason]
    out["drops/total"] = sum(summary.drops.values())
    out["drop_fraction"] = round(summary.drop_fraction, 6)
    return out


def _write_metrics(path: Path, summary: PrepareSummary, clients: list[str]) -> None:
    write_text_atomic(path, json.dumps(metrics_dict(summary, clients), indent=2) + "\n")
