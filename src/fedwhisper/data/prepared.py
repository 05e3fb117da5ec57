"""The prepared-data format: one Arrow IPC stream file per client and split, plus a manifest.

Layout: ``<root>/<client>/<split>.arrow`` with columns id, client, text, audio (list<float32>, 16 kHz mono),
duration_s, rows sorted by id; ``<root>/manifest.json`` lists clients and item counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import datasets
import numpy as np
import pyarrow as pa

from fedwhisper.errors import DataError

SAMPLING_RATE = 16000
SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("client", pa.string()),
        ("text", pa.string()),
        ("audio", pa.list_(pa.float32())),
        ("duration_s", pa.float64()),
    ]
)
BATCH_ROWS = 64


def split_path(root: str | Path, client: str, split: str) -> Path:
    return Path(root) / client / f"{split}.arrow"


def write_split(path: Path, rows: Iterable[dict]) -> int:
    """Write rows (dicts with the SCHEMA columns, already sorted by id) as an Arrow IPC stream; return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                writer.write_batch(_to_batch(batch))
                n += len(batch)
                batch = []
        if batch:
            writer.write_batch(_to_batch(batch))
            n += len(batch)
    return n


def _to_batch(rows: list[dict]) -> pa.RecordBatch:
    audio = [np.asarray(r["audio"], dtype=np.float32) for r in rows]
    offsets = np.zeros(len(audio) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in audio], out=offsets[1:])
    values = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    audio_arr = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32())).cast(
        pa.list_(pa.float32())
    )
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r["id"] for r in rows], pa.string()),
            pa.array([r["client"] for r in rows], pa.string()),
            pa.array([r["text"] for r in rows], pa.string()),
            audio_arr,
            pa.array([float(r["duration_s"]) for r in rows], pa.float64()),
        ],
        schema=SCHEMA,
    )


def write_manifest(root: Path, splits: dict[str, dict[str, int]], clients: list[str]) -> None:
    manifest = {"clients": list(clients), "splits": splits, "sampling_rate": SAMPLING_RATE}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: prepared data not found; run `dvc repro prepare` (or python stages/prepare.py)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); delete {root} and re-run the prepare stage") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("clients"), list):
        raise DataError(f"{path}: manifest lacks a 'clients' list; re-run the prepare stage")
    return manifest


def list_clients(root: str | Path) -> list[str]:
    """Client names in the prepared data, in params order."""
    return list(read_manifest(root)["clients"])


def load_split(root: str | Path, client: str, split: str) -> datasets.Dataset:
    """One client's split as a memory-mapped ``datasets.Dataset`` (columns id, client, text, audio, duration_s).

    ``audio`` comes out as a float32 numpy array (16 kHz mono), the other columns as Python values.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = split_path(root, client, split)
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in Path(root).iterdir() if p.is_dir())) if Path(root).is_dir() else ""
        raise DataError(
            f"{path}: no prepared {split} split for client {client!r}"
            + (f" (prepared clients: {known})" if known else "")
            + "; check `clients:` in params.yaml and re-run the prepare stage"
        )
    try:
        ds = datasets.Dataset.from_file(str(path))
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: not a readable Arrow stream ({exc}); re-run the prepare stage") from None
    if ds.data.schema.remove_metadata() != SCHEMA:
        raise DataError(f"{path}: columns {ds.column_names} do not match the prepared format; re-run the prepare stage")
    return _audio_as_numpy(ds)


def _audio_as_numpy(ds: datasets.Dataset) -> datasets.Dataset:
    return ds.with_format("numpy", columns=["audio"], output_all_columns=True)


def load_test_pooled(root: str | Path) -> datasets.Dataset:
    """All clients' test rows in one dataset (clients in manifest order, each sorted by id)."""
    parts = [load_split(root, c, "test") for c in list_clients(root)]
    if not parts:
        raise DataError(f"{root}: manifest lists no clients; re-run the prepare stage")
    return _audio_as_numpy(datasets.concatenate_datasets([p.with_format(None) for p in parts]))


def iter_split_arrays(root: str | Path, client: str, split: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """(id, text, audio float32) for each row, without copying audio out of the memory map."""
    path = split_path(root, client, split)
    with pa.memory_map(str(path)) as source:
        for batch in pa.ipc.open_stream(source):
            ids, texts, audio = batch.column(0), batch.column(2), batch.column(3)
            for i in range(batch.num_rows):
                yield ids[i].as_py(), texts[i].as_py(), audio[i].values.to_numpy(zero_copy_only=True)
