"""Dataset sources. Each yields RawItem per source split; decoding and checks happen in prepare.

Sources: a local folder (seed 003 layout), an HF hub dataset (streamed), an HF ``save_to_disk`` directory, and
webdataset ``.tar`` shards. Column names come from ``data.columns`` and may be dotted (``json.text``).
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Union

import numpy as np

from fedwhisper.audio import AUDIO_EXTENSIONS
from fedwhisper.errors import DataError
from fedwhisper.params import DataParams

# Audio is encoded bytes, a file path, or a decoded (array, sampling rate) pair.
AudioRef = Union[bytes, Path, tuple[np.ndarray, int]]
MISSING = object()


@dataclass(frozen=True)
class RawItem:
    id: str
    audio: AudioRef | None
    text: str | bytes | None  # bytes when the transcript could not be read as UTF-8 text
    extra: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    origin: str = ""
    problem: str = ""  # why the source could not supply audio or transcript, for the drop report
    drop_reason: str = ""  # set when the source already knows the item is unusable (prepare's DROP_REASONS)


class Source(Protocol):
    def split_names(self) -> list[str]:
        """The dataset's own split names ([""] when it has none)."""

    def iter_split(self, split: str) -> Iterator[RawItem]:
        """Raw items of one split, in a stable order."""

    def count(self, split: str) -> int | None:
        """Items in the split (after ``max_items``) when known without reading it, for progress bars."""


def lookup(record: Any, dotted: str | None, default: Any = MISSING) -> Any:
    """``record['a']['b']`` for ``'a.b'``; an exact key containing dots wins over nesting."""
    if dotted is None:
        return default
    if isinstance(record, dict) and dotted in record:
        return record[dotted]
    head, _, rest = dotted.partition(".")
    if not rest or not isinstance(record, dict) or head not in record:
        return default
    return lookup(record[head], rest, default)


def open_source(data: DataParams, max_items: int | None = None) -> Source:
    """The source named by ``data.source`` reading ``data.path``."""
    limit = max_items if max_items is not None else data.max_items
    if data.source == "local":
        return LocalFolderSource(Path(data.path), data, limit)
    if data.source == "hf":
        return HFHubSource(data.path, data, limit)
    if data.source == "hf_disk":
        return HFDiskSource(Path(data.path), data, limit)
    return WebDatasetSource(data.path, data, limit)


def _capped(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _limited(items: Iterator[RawItem], limit: int | None) -> Iterator[RawItem]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def _utf8_text(raw: bytes) -> str | bytes:
    """UTF-8 text without a leading BOM; the bytes unchanged when they are not UTF-8 (prepare reports that)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw


def _json_text(raw: bytes, origin: str) -> Any:
    """Parse JSON bytes; return the bytes unchanged when they are not UTF-8 (prepare reports that)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _BadJson(f"{origin}: invalid JSON ({exc})")


@dataclass(frozen=True)
class _BadJson:
    message: str


def _text_from(parsed: Any, column: str) -> Any:
    if isinstance(parsed, (bytes, _BadJson)):
        return parsed if isinstance(parsed, bytes) else None
    return lookup({"json": parsed, **parsed} if isinstance(parsed, dict) else {}, column, None)


def _checked_text(value: Any, column: str) -> tuple[str | bytes | None, str]:
    """(transcript, problem): a number, dict, list, NaN or boolean is no transcript, never its Python repr."""
    if value is None or isinstance(value, (str, bytes)):
        return value, ""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return None, f"transcript {column!r} is a {type(value).__name__} ({shown}), not a string"


def _within(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root``."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


# --------------------------------------------------------------------------- local folder


@dataclass
class _MetadataRow:
    values: dict[str, str]
    where: list[str]  # "<csv> line <n>" of every row naming the file (more than one: listed twice)


class LocalFolderSource:
    """``root/[split/]<id>.<audio>`` with sidecar ``<id>.txt`` or ``<id>.json``; optional ``metadata.csv``.

    ``file_name`` in a metadata file is relative to that file's folder and must stay inside the data root (inside
    the split folder for a split's own metadata file, so a row cannot move a file to another split). Rows
    naming no audio file found in the folder, and files listed more than once, become items with a drop reason
    (``missing_audio``, ``duplicate_metadata``): rows outside every split folder are reported with the first split.
    """

    def __init__(self, root: Path, data: DataParams, limit: int | None = None):
        if not root.is_dir():
            raise DataError(f"data.path: {root} is not a directory; point it at a folder of audio files")
        self.root, self.data, self.limit = root, data, limit
        self._splits: list[str] | None = None
        self.metadata = self._read_metadata(root / data.metadata) if data.metadata else {}

    def split_names(self) -> list[str]:
        if self._splits is None:
            subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            with_audio = [d for d in subdirs if any(self._audio_files(self.root / d))]
            self._splits = with_audio if with_audio else [""]
        return self._splits

    def iter_split(self, split: str) -> Iterator[RawItem]:
        metadata = self._split_metadata(split)
        files = list(self._audio_files(self.root / split if split else self.root))
        items = (self._item(p, split, metadata) for p in files)
        missing = (self._missing_item(key, metadata[key], split) for key in self._missing_keys(split, metadata, files))
        return _limited(itertools.chain(items, missing), self.limit)

    def count(self, split: str) -> int | None:
        files = list(self._audio_files(self.root / split if split else self.root))
        return _capped(len(files) + len(self._missing_keys(split, self._split_metadata(split), files)), self.limit)

    def _split_metadata(self, split: str) -> dict[str, _MetadataRow]:
        """The root metadata plus the split folder's own metadata file, if any."""
        metadata = {k: _MetadataRow(v.values, list(v.where)) for k, v in self.metadata.items()}
        own = self.root / split / self.data.metadata if split and self.data.metadata else None
        if own is not None and own.is_file():
            for key, row in self._read_metadata(own, self.root / split).items():
                if key in metadata:
                    metadata[key].where += row.where
                else:
                    metadata[key] = row
        return metadata

    def _missing_keys(self, split: str, metadata: dict[str, _MetadataRow], files: list[Path]) -> list[str]:
        """Metadata keys of this split naming no audio file that was found."""
        found = {p.relative_to(self.root).as_posix() for p in files}
        splits = self.split_names() if split else [""]

        def in_split(key: str) -> bool:
            top = key.split("/")[0] if "/" in key else ""
            return not split or top == split or (top not in splits and split == splits[0])

        return sorted(k for k in metadata if k not in found and in_split(k))

    def _missing_item(self, key: str, row: _MetadataRow, split: str) -> RawItem:
        path = self.root / key
        if not path.is_file():
            why = f"{key}, which does not exist under {self.root}"
        elif path.suffix.lower() not in AUDIO_EXTENSIONS:
            why = f"{key}, which is not a supported audio file ({', '.join(AUDIO_EXTENSIONS)})"
        else:
            why = f"{key}, which is outside every split folder ({', '.join(self.split_names())})"
        item_id = lookup(row.values, self.data.columns.id, None) if self.data.columns.id else None
        item_id = str(item_id) if item_id is not None else Path(key).with_suffix("").as_posix()
        return RawItem(item_id, None, None, dict(row.values), split or None, "; ".join(row.where),
                       f"metadata names {why}", "missing_audio")

    @staticmethod
    def _audio_files(folder: Path) -> Iterator[Path]:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                yield path

    def _item(self, path: Path, split: str, metadata: dict[str, _MetadataRow]) -> RawItem:
        rel = path.relative_to(self.root).as_posix()
        meta = metadata.get(rel)
        row = meta.values if meta is not None else {}
        stem = path.with_suffix("")
        text: Any = None
        problem = reason = ""
        if stem.with_suffix(".txt").is_file():
            text = _utf8_text(stem.with_suffix(".txt").read_bytes())
        elif stem.with_suffix(".json").is_file():
            parsed = _json_text(stem.with_suffix(".json").read_bytes(), str(stem) + ".json")
            text, text_problem = _checked_text(_text_from(parsed, self.data.columns.text), self.data.columns.text)
            if text_problem:
                problem, reason = f"{stem}.json: {text_problem}", "non_string_transcript"
            elif isinstance(parsed, _BadJson):
                problem = parsed.message
        else:
            text = lookup(row, self.data.columns.text, None)
        item_id = lookup(row, self.data.columns.id, None) if self.data.columns.id else None
        if item_id is None:
            item_id = Path(rel).with_suffix("").as_posix()
        if meta is not None and len(meta.where) > 1:
            problem = f"listed {len(meta.where)} times in metadata ({'; '.join(meta.where)}); keep one row"
            reason = "duplicate_metadata"
        return RawItem(str(item_id), path, text, dict(row), split or None, str(path), problem, reason)

    def _read_metadata(self, path: Path, within: Path | None = None) -> dict[str, _MetadataRow]:
        """Rows keyed by the audio path relative to the data root (file_name is relative to the CSV's folder and
        must name a path inside ``within``, by default the data root)."""
        if not path.is_file():
            return {}
        try:
            content = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} on line {line}); re-save it as UTF-8, "
                "e.g. `iconv -f latin1 -t utf-8`"
            ) from None
        reader = csv.DictReader(io.StringIO(content, newline=""))
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise DataError(f"{path}: needs a 'file_name' column (audio path relative to {path.parent})")
        within = within or self.root
        rows: dict[str, _MetadataRow] = {}
        for row in reader:
            where = f"{path} line {reader.line_num}"
            name = (row["file_name"] or "").strip()
            if not name:
                raise DataError(f"{where}: empty file_name; name the audio file or delete the row")
            target = os.path.abspath(path.parent / name)
            inside = os.path.relpath(target, os.path.abspath(within))
            if inside == "." or inside == ".." or inside.startswith("../"):
                raise DataError(
                    f"{where}: file_name {name!r} points outside {within}; "
                    "give a path inside it, relative to the metadata file's folder"
                )
            key = Path(os.path.relpath(target, os.path.abspath(self.root))).as_posix()
            values = {k: v for k, v in row.items() if k != "file_name"}
            if key in rows:
                rows[key].where.append(where)
            else:
                rows[key] = _MetadataRow(values, [where])
        return rows


# --------------------------------------------------------------------------- Hugging Face


def _undecoded(ds: Any) -> Any:
    """Turn off datasets' own audio decoding (it needs torchcodec/ffmpeg); rows keep raw bytes/paths."""
    from datasets import Audio

    features = getattr(ds, "features", None)
    if features:
        for name, feature in features.items():
            if isinstance(feature, Audio) and feature.decode:
                ds = ds.cast_column(name, Audio(decode=False))
    if hasattr(ds, "decode"):
        ds = ds.decode(False)
    return ds


def _hf_audio(value: Any, root: Path | None) -> tuple[AudioRef | None, str, str]:
    """(audio, problem, drop reason) from an undecoded Audio value, raw bytes, a path or an {array, sampling_rate}.

    A path is read only inside ``root`` (the dataset's local folder; relative paths are taken from there)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "", ""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), "", ""
        if value.get("array") is not None:
            return (np.asarray(value["array"], dtype=np.float32), int(value.get("sampling_rate") or 16000)), "", ""
        if not value.get("path"):
            return None, "audio value has neither bytes, array nor path", ""
        value = value["path"]
    if isinstance(value, str):
        if root is None or not _within(root, root / value):
            where = f"the dataset folder {root}" if root is not None else "a local dataset folder (a hub dataset)"
            return None, f"audio path {value!r} has no bytes and is outside {where}; refused", "audio_outside_root"
        return root / value, "", ""
    return None, f"audio value is {type(value).__name__}, not bytes, a path or an audio dict", ""


def _hf_items(rows: Iterator[dict], split: str, data: DataParams, where: str, root: Path | None) -> Iterator[RawItem]:
    cols = data.columns
    for i, row in enumerate(rows):
        origin = f"{where}[{split}] row {i}"
        audio_value = lookup(row, cols.audio, MISSING)
        if audio_value is MISSING and i == 0:
            raise DataError(
                f"{where}: no audio column {cols.audio!r} (columns: {', '.join(row)}); set data.columns.audio"
            )
        text, text_problem = _checked_text(lookup(row, cols.text, None), cols.text)
        item_id = lookup(row, cols.id, None) if cols.id else None
        extra = {k: v for k, v in row.items() if k != cols.audio.split(".")[0]}
        audio, problem, reason = _hf_audio(None if audio_value is MISSING else audio_value, root)
        item_id = str(item_id) if item_id is not None else f"{split}/{i:07d}"
        if text_problem:
            problem, reason = text_problem, "non_string_transcript"
        yield RawItem(item_id, audio, text, extra, split or None, origin, problem, reason)


class HFHubSource:
    """A hub dataset id (or a local data directory) streamed with ``datasets.load_dataset(..., streaming=True)``."""

    def __init__(self, path: str, data: DataParams, limit: int | None = None):
        import datasets

        self.path, self.data, self.limit = path, data, limit
        self.root = Path(path) if Path(path).is_dir() else None
        try:
            self.ds = datasets.load_dataset(path, data.hf_config, streaming=True)
        except Exception as exc:  # network, auth and format errors come as many types
            raise DataError(
                f"data.path: cannot stream dataset {path!r} (config {data.hf_config!r}): {exc}; "
                "check the id/config, network access and `huggingface-cli login` for gated datasets"
            ) from None

    def split_names(self) -> list[str]:
        return sorted(self.ds.keys())

    def iter_split(self, split: str) -> Iterator[RawItem]:
        ds = _undecoded(self.ds[split])
        return _limited(_hf_items(iter(ds), split, self.data, self.path, self.root), self.limit)

    def count(self, split: str) -> int | None:
        info = getattr(self.ds[split], "info", None)
        known = info.splits.get(split) if info is not None and info.splits else None
        return _capped(known.num_examples, self.limit) if known is not None and known.num_examples else None


class HFDiskSource:
    """A ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory."""

    def __init__(self, path: Path, data: DataParams, limit: int | None = None):
        import datasets

        self.path, self.data, self.limit = path, data, limit
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"data.path: {path} is not a save_to_disk directory ({exc})") from None
        self.ds = loaded if isinstance(loaded, datasets.DatasetDict) else {"": loaded}

    def split_names(self) -> list[str]:
        return sorted(self.ds.keys())

    def iter_split(self, split: str) -> Iterator[RawItem]:
        ds = _undecoded(self.ds[split])
        rows = (ds[i] for i in range(len(ds)))
        return _limited(_hf_items(rows, split, self.data, str(self.path), self.path), self.limit)

    def count(self, split: str) -> int | None:
        return _capped(len(self.ds[split]), self.limit)


# --------------------------------------------------------------------------- webdataset


class WebDatasetSource:
    """``.tar`` shards in webdataset layout: members ``<key>.<ext>`` grouped by key (e.g. ``x.flac`` + ``x.json``).

    ``data.path`` is a directory (split subfolders of shards if present) or a glob of shard files.
    """

    def __init__(self, path: str, data: DataParams, limit: int | None = None):
        self.path, self.data, self.limit = path, data, limit
        root = Path(path)
        if root.is_dir():
            splits = {d.name: sorted(d.glob("*.tar*")) for d in sorted(root.iterdir()) if d.is_dir()}
            splits = {k: v for k, v in splits.items() if v}
            self.shards = splits or {"": sorted(root.glob("*.tar*"))}
        else:
            self.shards = {"": [Path(p) for p in sorted(glob.glob(path))]}
        if not any(self.shards.values()):
            raise DataError(f"data.path: no .tar shards found at {path!r}; give a shard directory or glob")

    def split_names(self) -> list[str]:
        return list(self.shards)

    def iter_split(self, split: str) -> Iterator[RawItem]:
        return _limited(self._items(split), self.limit)

    def count(self, split: str) -> int | None:
        return None

    def _items(self, split: str) -> Iterator[RawItem]:
        for shard in self.shards[split]:
            for key, members in _tar_samples(shard):
                yield self._item(shard, key, members, split)

    def _item(self, shard: Path, key: str, members: dict[str, bytes], split: str) -> RawItem:
        origin = f"{shard}:{key}"
        cols = self.data.columns
        record: dict[str, Any] = {}
        for ext, raw in members.items():
            if ext == "json":
                record["json"] = _json_text(raw, f"{origin}.json")
            elif ext in ("txt", "text", "cls", "id"):
                text = _utf8_text(raw)
                record[ext] = text.strip("\n") if ext != "txt" and isinstance(text, str) else text
            else:
                record[ext] = raw
        parsed = record.get("json")
        flat = {**parsed, **record} if isinstance(parsed, dict) else record
        audio = lookup(flat, cols.audio, None)
        if audio is None:
            audio_exts = [e for e in members if "." + e.split(".")[-1] in AUDIO_EXTENSIONS]
            audio = members[audio_exts[0]] if len(audio_exts) == 1 else None
        text = lookup(flat, cols.text, None)
        if text is None and isinstance(parsed, (bytes, _BadJson)):
            text = parsed if isinstance(parsed, bytes) else None
        text, text_problem = _checked_text(text, cols.text)
        item_id = lookup(flat, cols.id, None) if cols.id else None
        extra = {k: v for k, v in flat.items() if not isinstance(v, (bytes, _BadJson))}
        item_id = str(item_id) if item_id is not None else (f"{split}/{key}" if split else key)
        problems = [parsed.message] if isinstance(parsed, _BadJson) else []
        if not isinstance(audio, bytes):
            audio = None
            problems.append(f"no audio member {cols.audio!r} (members: {', '.join(sorted(members))})")
        if text_problem:
            return RawItem(item_id, audio, None, extra, split or None, origin, text_problem, "non_string_transcript")
        return RawItem(item_id, audio, text, extra, split or None, origin, "; ".join(problems))


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key: the path up to the first dot of the file name."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or stem.startswith("_"):
                    continue
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key and members:
                    yield key, members
                    members = {}
                key = member_key
                members[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{shard}: unreadable tar shard ({exc}); re-create or remove it") from None
    if members:
        yield key, members
