"""Seed 003's use: one model trained on a folder of clips with .txt/.json captions, no client column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedwhisper.data.prepare import run_prepare
from fedwhisper.errors import ParamsError
from fedwhisper.params import params_from_dict


def count_words(text: str) -> int:
    return len(text.split()) + 3


def write_captioned(folder: Path, stem: str, caption: str, seconds: float = 0.4, freq: float = 440.0,
                    sidecar: str = "json") -> Path:
    """A tone clip with its caption in a ``.json`` (``{"text": ...}``) or ``.txt`` sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    path = folder / f"{stem}.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    if sidecar == "json":
        (folder / f"{stem}.json").write_text(json.dumps({"text": caption, "tags": ["x"]}), encoding="utf-8")
    else:
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return path


def caption_folder(root: Path, splits: dict[str, int]) -> Path:
    for split, n in splits.items():
        for i in range(n):
            write_captioned(root / split, f"{split}_{i:02d}", f"a tone at {440 + 20 * i} hertz",
                            freq=440 + 20 * i, sidecar="json" if i % 2 == 0 else "txt")
    return root


def caption_params(root: Path, clients=("captions",), **over):
    data = {"data": {"path": str(root), "columns": {"client": None}}, "clients": list(clients),
            "prepare": {"split": {"validation": 0.2, "test": 0.25}}}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return params_from_dict(data)


def test_no_client_column_is_one_implicit_client_named_in_clients(tmp_path):
    root = caption_folder(tmp_path / "clips", {"train": 8, "validation": 3, "test": 2})
    summary = run_prepare(caption_params(root), count_words, tmp_path / "prepared", tmp_path / "metrics")
    assert summary.drops["missing_client"] == 0 and summary.kept == 13
    m = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    # The folder's own validation/ and test/ are those splits; nothing is carved out of train/.
    assert (m["items/captions/train"], m["items/captions/validation"], m["items/captions/test"]) == (8, 3, 2)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir() if p.is_dir()) == ["captions"]


def test_validation_folder_is_used_and_test_carved_from_train_when_absent(tmp_path):
    root = caption_folder(tmp_path / "clips", {"train": 8, "validation": 3})
    run_prepare(caption_params(root), count_words, tmp_path / "prepared", tmp_path / "metrics")
    m = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert (m["items/captions/train"], m["items/captions/validation"], m["items/captions/test"]) == (6, 3, 2)


def test_no_client_column_with_several_clients_listed_says_list_one(tmp_path):
    root = caption_folder(tmp_path / "clips", {"train": 4})
    with pytest.raises(ParamsError, match=r"data.columns.client is null.*lists 2 names.*`clients: \[captions\]`"):
        run_prepare(caption_params(root, clients=("a", "b")), count_words, tmp_path / "p", tmp_path / "m")
    assert not (tmp_path / "p").exists()
