"""Dataset sources. Each yields RawItem per source split; decoding and checks happen in prepare.

Sources: a local folder (seed 003 layout), an HF hub dataset (streamed), an HF ``save_to_disk`` directory, and
webdataset ``.tar`` shards. Column names come from ``data.columns`` and may be dotted (``json.text``).
"""

from __future__ import annotations

import csv
import glob
import json
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


def _json_text(raw: bytes, origin: str) -> Any:
    """Parse JSON bytes; return the bytes unchanged when they are not UTF-8 (prepare reports that)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _BadJson(f"{origin}: invalid JSON ({exc})")


@dataclass(frozen=True)
class _BadJson:
    message: str


def _text_from(parsed: Any, column: str) -> str | bytes | None:
    if isinstance(parsed, (bytes, _BadJson)):
        return parsed if isinstance(parsed, bytes) else None
    value = lookup({"json": parsed, **parsed} if isinstance(parsed, dict) else {}, column, None)
    if value is None or isinstance(value, (str, bytes)):
        return value
    return str(value)


# --------------------------------------------------------------------------- local folder


class LocalFolderSource:
    """``root/[split/]<id>.<audio>`` with sidecar ``<id>.txt`` or ``<id>.json``; optional ``metadata.csv``."""

    def __init__(self, root: Path, data: DataParams, limit: int | None = None):
        if not root.is_dir():
            raise DataError(f"data.path: {root} is not a directory; point it at a folder of audio files")
        self.root, self.data, self.limit = root, data, limit
        self.metadata = self._read_metadata(root / data.metadata) if data.metadata else {}

    def split_names(self) -> list[str]:
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        with_audio = [d for d in subdirs if any(self._audio_files(self.root / d))]
        return with_audio if with_audio else [""]

    def iter_split(self, split: str) -> Iterator[RawItem]:
        folder = self.root / split if split else self.root
        metadata = dict(self.metadata)
        if split and self.data.metadata and (folder / self.data.metadata).is_file():
            for name, row in self._read_metadata(folder / self.data.metadata).items():
                metadata[f"{split}/{name}"] = row
        return _limited((self._item(p, split, metadata) for p in self._audio_files(folder)), self.limit)

    def count(self, split: str) -> int | None:
        return _capped(sum(1 for _ in self._audio_files(self.root / split if split else self.root)), self.limit)

    @staticmethod
    def _audio_files(folder: Path) -> Iterator[Path]:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                yield path

    def _item(self, path: Path, split: str, metadata: dict[str, dict]) -> RawItem:
        rel = path.relative_to(self.root).as_posix()
        row = metadata.get(rel, {})
        stem = path.with_suffix("")
        text: Any = None
        problem = ""
        if stem.with_suffix(".txt").is_file():
            raw = stem.with_suffix(".txt").read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw
        elif stem.with_suffix(".json").is_file():
            parsed = _json_text(stem.with_suffix(".json").read_bytes(), str(stem) + ".json")
            text = _text_from(parsed, self.data.columns.text)
            problem = parsed.message if isinstance(parsed, _BadJson) else ""
        else:
            text = lookup(row, self.data.columns.text, None)
        item_id = lookup(row, self.data.columns.id, None) if self.data.columns.id else None
        if item_id is None:
            item_id = Path(rel).with_suffix("").as_posix()
        return RawItem(str(item_id), path, text, dict(row), split or None, str(path), problem)

    def _read_metadata(self, path: Path) -> dict[str, dict]:
        if not path.is_file():
            return {}
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise DataError(f"{path}: needs a 'file_name' column (audio path relative to {path.parent})")
            prefix = path.parent.relative_to(self.root).as_posix() if path.parent != self.root else ""
            rows = {}
            for row in reader:
                name = row["file_name"].strip().lstrip("./")
                rows[f"{prefix}/{name}" if prefix else name] = {k: v for k, v in row.items() if k != "file_name"}
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


def _hf_audio(value: Any) -> tuple[AudioRef | None, str]:
    """(audio, problem) from an undecoded Audio value, raw bytes, a path, or an {array, sampling_rate} dict."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if isinstance(value, str):
        return Path(value), ""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), ""
        if value.get("array") is not None:
            return (np.asarray(value["array"], dtype=np.float32), int(value.get("sampling_rate") or 16000)), ""
        if value.get("path"):
            return Path(value["path"]), ""
        return None, "audio value has neither bytes, array nor path"
    return None, f"audio value is {type(value).__name__}, not bytes, a path or an audio dict"


def _hf_items(rows: Iterator[dict], split: str, data: DataParams, where: str) -> Iterator[RawItem]:
    cols = data.columns
    for i, row in enumerate(rows):
        origin = f"{where}[{split}] row {i}"
        audio_value = lookup(row, cols.audio, MISSING)
        if audio_value is MISSING and i == 0:
            raise DataError(
                f"{where}: no audio column {cols.audio!r} (columns: {', '.join(row)}); set data.columns.audio"
            )
        text = lookup(row, cols.text, None)
        if text is not None and not isinstance(text, (str, bytes)):
            text = str(text)
        item_id = lookup(row, cols.id, None) if cols.id else None
        extra = {k: v for k, v in row.items() if k != cols.audio.split(".")[0]}
        audio, problem = _hf_audio(None if audio_value is MISSING else audio_value)
        item_id = str(item_id) if item_id is not None else f"{split}/{i:07d}"
        yield RawItem(item_id, audio, text, extra, split or None, origin, problem)


class HFHubSource:
    """A hub dataset id (or a local data directory) streamed with ``datasets.load_dataset(..., streaming=True)``."""

    def __init__(self, path: str, data: DataParams, limit: int | None = None):
        import datasets

        self.path, self.data, self.limit = path, data, limit
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
        return _limited(_hf_items(iter(ds), split, self.data, self.path), self.limit)

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
        return _limited(_hf_items(rows, split, self.data, str(self.path)), self.limit)

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
                try:
                    record[ext] = raw.decode("utf-8").strip("\n") if ext != "txt" else raw.decode("utf-8")
                except UnicodeDecodeError:
                    record[ext] = raw
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
        if text is not None and not isinstance(text, (str, bytes)):
            text = str(text)
        item_id = lookup(flat, cols.id, None) if cols.id else None
        extra = {k: v for k, v in flat.items() if not isinstance(v, (bytes, _BadJson))}
        item_id = str(item_id) if item_id is not None else (f"{split}/{key}" if split else key)
        problems = [parsed.message] if isinstance(parsed, _BadJson) else []
        if not isinstance(audio, bytes):
            audio = None
            problems.append(f"no audio member {cols.audio!r} (members: {', '.join(sorted(members))})")
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
