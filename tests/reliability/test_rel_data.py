"""Reliability, data: every bad input is either a counted drop (with its id, file and reason in the drops CSV) or
an error naming what is at fault; good items in odd formats are decoded correctly; nothing is lost or corrupted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import yaml
from reliability_helpers import ROOT, STAGES, subprocess_env, tree_bytes

from fedwhisper.audio import load_16k_mono
from fedwhisper.data.prepare import DROP_REASONS, run_prepare
from fedwhisper.data.prepared import load_split, read_manifest
from fedwhisper.errors import DataError, ParamsError
from fedwhisper.params import load_params, params_from_dict

RATE = 16000


def count_words(text: str) -> int:
    return len(text.split()) + 3


def tone(seconds: float, rate: int, amp: float = 0.25) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


def clip(folder: Path, stem: str, data: np.ndarray, rate: int, text: str | bytes | None, ext: str = ".wav",
         subtype: str | None = "PCM_16") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{stem}{ext}", data, rate, subtype=subtype)
    if isinstance(text, bytes):
        (folder / f"{stem}.txt").write_bytes(text)
    elif text is not None:
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return f"{folder.name}/{stem}{ext}"


def write_metadata(root: Path, rows: list[tuple[str, str]]) -> None:
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file_name", "accent"])
        w.writerows(rows)


def params_for(corpus: Path, clients=("a", "b"), **prepare) -> object:
    prepare = {"max_drop_fraction": 0.9, "split": {"validation": 0.0, "test": 0.2}, **prepare}
    return params_from_dict({"data": {"path": str(corpus)}, "prepare": prepare, "clients": list(clients)})


def read_drops(path: Path) -> dict[str, dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def prepared_rows(root: Path, clients=("a", "b")) -> dict[str, dict]:
    rows = {}
    for c in clients:
        for split in ("train", "validation", "test"):
            ds = load_split(root, c, split)
            for r in ds:
                rows[r["id"]] = {**r, "split": split}
    return rows


# Good items whose audio format is unusual but valid: (stem, writer kwargs, expected mono 16 kHz signal).
def _good_items(train: Path) -> tuple[list[tuple[str, str]], dict[str, tuple[str, np.ndarray]]]:
    rows, expected = [], {}
    base = tone(0.5, RATE)
    rows.append((clip(train, "a_pcm16", base, RATE, "plain sixteen bit"), "a"))
    expected["train/a_pcm16"] = ("plain sixteen bit", base)
    rows.append((clip(train, "a_u8", base, RATE, "eight bit audio", subtype="PCM_U8"), "a"))
    expected["train/a_u8"] = ("eight bit audio", base)
    rows.append((clip(train, "a_pcm24", base, RATE, "twenty four bit", subtype="PCM_24"), "a"))
    expected["train/a_pcm24"] = ("twenty four bit", base)
    stereo = np.stack([base, np.zeros_like(base)], axis=1)  # mono mix = base / 2
    rows.append((clip(train, "a_stereo", stereo, RATE, "stereo left only"), "a"))
    expected["train/a_stereo"] = ("stereo left only", base / 2)
    rows.append((clip(train, "a_44k", tone(0.5, 44100), 44100, "forty four point one"), "a"))
    expected["train/a_44k"] = ("forty four point one", base)
    rows.append((clip(train, "a_flac24", base, RATE, "flac twenty four", ext=".flac", subtype="PCM_24"), "a"))
    expected["train/a_flac24"] = ("flac twenty four", base)
    for i in range(4):
        rows.append((clip(train, f"b_ok{i}", base, RATE, f"b good {i}"), "b"))
        expected[f"train/b_ok{i}"] = (f"b good {i}", base)
    return rows, expected


def _bad_items(train: Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """One bad item per case; returns metadata rows and id -> expected drop reason."""
    rows, reasons = [], {}
    ok = tone(0.3, RATE)
    (train / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    (train / "corrupt.txt").write_text("corrupt bytes", encoding="utf-8")
    rows.append(("train/corrupt.wav", "a"))
    reasons["train/corrupt"] = "undecodable"
    rows.append((clip(train, "zero", np.zeros(0, np.float32), RATE, "zero length"), "a"))
    reasons["train/zero"] = "empty_audio"
    nan = tone(0.3, RATE)
    nan[10] = np.nan
    nan[20] = np.inf
    rows.append((clip(train, "nan", nan, RATE, "not a number", subtype="FLOAT"), "b"))
    reasons["train/nan"] = "non_finite"
    rows.append((clip(train, "long", tone(31.0, 8000), 8000, "thirty one seconds"), "b"))
    reasons["train/long"] = "too_long"
    rows.append((clip(train, "nosidecar", ok, RATE, None), "a"))
    reasons["train/nosidecar"] = "missing_transcript"
    rows.append((clip(train, "emptytext", ok, RATE, " \n\t"), "a"))
    reasons["train/emptytext"] = "empty_transcript"
    rows.append((clip(train, "latin1", ok, RATE, "caf\xe9 cr\xe8me".encode("latin-1")), "b"))
    reasons["train/latin1"] = "invalid_utf8"
    # Same id twice (id = path without extension): the first (dup.flac, sorted) is kept, dup.wav is dropped.
    rows.append((clip(train, "dup", ok, RATE, "first copy", ext=".flac"), "a"))
    rows.append((clip(train, "dup", ok, RATE, "first copy", ext=".wav"), "a"))
    reasons["train/dup"] = "duplicate_id"
    return rows, reasons


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("rel_corpus") / "corpus"
    train, test = root / "train", root / "test"
    good_rows, expected = _good_items(train)
    bad_rows, reasons = _bad_items(train)
    test_rows = []
    for c in ("a", "b"):
        test_rows.append((clip(test, f"{c}_t", tone(0.4, RATE), RATE, f"{c} test"), c))
        expected[f"test/{c}_t"] = (f"{c} test", tone(0.4, RATE))
    write_metadata(root, good_rows + bad_rows + test_rows)
    return root, expected, reasons


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, expected, reasons = corpus
    out = tmp_path_factory.mktemp("rel_prepared")
    summary = run_prepare(params_for(root), count_words, out / "prepared", out / "metrics")
    return out, summary


def test_every_bad_item_is_a_counted_drop_with_its_reason_and_file(corpus, prepared):
    _, expected, reasons = corpus
    out, summary = prepared
    drops = read_drops(out / "metrics" / "prepare_drops.csv")
    assert {i: d["reason"] for i, d in drops.items()} == reasons
    assert drops["train/corrupt"]["origin"].endswith("corrupt.wav")
    assert "corrupt.wav: cannot decode audio" in drops["train/corrupt"]["detail"]
    assert drops["train/nan"]["detail"] == "2 NaN/Inf samples"
    assert "31.00 s > prepare.max_duration_s 30.0" in drops["train/long"]["detail"]
    assert drops["train/dup"]["origin"].endswith("dup.wav")
    assert "not valid UTF-8" in drops["train/latin1"]["detail"]
    metrics = json.loads((out / "metrics" / "prepare.json").read_text())
    counted = {r: metrics[f"drops/{r}"] for r in DROP_REASONS}
    want = {r: sum(1 for v in reasons.values() if v == r) for r in DROP_REASONS}
    assert counted == want
    # Nothing lost: every item seen is either kept or listed as dropped.
    assert summary.seen == len(expected) + len(reasons) + 1  # +1: the dropped second copy of "dup" (kept first)
    assert metrics["items/seen"] == summary.seen and metrics["drops/total"] == len(reasons)


def test_kept_items_are_all_there_with_exact_text_and_correct_audio(corpus, prepared):
    _, expected, _ = corpus
    out, summary = prepared
    rows = prepared_rows(out / "prepared")
    kept_ids = set(expected) | {"train/dup"}
    assert set(rows) == kept_ids
    assert summary.kept == len(kept_ids)
    assert rows["train/dup"]["text"] == "first copy"
    tol = {"train/a_u8": 2 / 128, "train/a_44k": 2e-3}
    for item_id, (text, signal) in expected.items():
        row = rows[item_id]
        assert row["text"] == text, item_id
        audio = np.asarray(row["audio"], np.float32)
        assert audio.dtype == np.float32 and np.isfinite(audio).all(), item_id
        assert abs(len(audio) - len(signal)) <= 1, (item_id, len(audio), len(signal))
        n = min(len(audio), len(signal))
        # Resampling has edge transients; compare the steady middle.
        mid = slice(n // 10, n - n // 10)
        err = float(np.max(np.abs(audio[mid] - signal[mid])))
        assert err <= tol.get(item_id, 1e-3), (item_id, err)
        assert row["duration_s"] == pytest.approx(len(audio) / RATE)
    manifest = read_manifest(out / "prepared")
    assert sum(sum(s.values()) for s in manifest["splits"].values()) == len(kept_ids)


def test_direct_decoding_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match=r"clip\.wav: cannot decode audio"):
        load_16k_mono(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 4, name="clip.wav")
    with pytest.raises(DataError, match=r"empty\.wav: audio is 0 bytes"):
        load_16k_mono(b"", name="empty.wav")
    with pytest.raises(DataError, match=r"nowhere\.wav"):
        load_16k_mono(tmp_path / "nowhere.wav")


def test_client_left_with_no_usable_sample_is_named_and_old_output_is_kept(tmp_path):
    corpus = tmp_path / "corpus"
    rows = [(clip(corpus / "train", f"a{i}", tone(0.3, RATE), RATE, f"a item {i}"), "a") for i in range(4)]
    rows += [(clip(corpus / "test", "a_t", tone(0.3, RATE), RATE, "a test"), "a")]
    write_metadata(corpus, rows)
    out, metrics = tmp_path / "prepared", tmp_path / "metrics"
    run_prepare(params_for(corpus, clients=("a",)), count_words, out, metrics)
    before = tree_bytes(out)
    # Client b exists only as undecodable / empty-transcript items.
    (corpus / "train" / "b0.wav").write_bytes(b"not audio at all" * 16)
    (corpus / "train" / "b0.txt").write_text("b zero")
    rows.append(("train/b0.wav", "b"))
    rows.append((clip(corpus / "train", "b1", tone(0.3, RATE), RATE, "   "), "b"))
    write_metadata(corpus, rows)
    with pytest.raises(DataError, match=r"client 'b' \(listed in params.yaml `clients:`\) has no usable training "
                                        r"items"):
        run_prepare(params_for(corpus, clients=("a", "b")), count_words, out, metrics)
    assert tree_bytes(out) == before  # the previous prepared data is untouched
    assert not list(tmp_path.glob("prepared.tmp-*")) and not list(tmp_path.glob("prepared.old-*"))
    drops = read_drops(metrics / "prepare_drops.csv")  # the reasons are still reported
    assert {i: d["reason"] for i, d in drops.items()} == {"train/b0": "undecodable", "train/b1": "empty_transcript"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prepare": {"max_duraton_s": 10}}, r"unknown key 'prepare\.max_duraton_s'.*allowed keys under prepare"),
        ({"aggregaton": {}}, r"unknown key 'aggregaton'"),
        ({"finetune": {"batch_size": "eight"}}, r"finetune\.batch_size: got 'eight'; expected an integer"),
        ({"finetune": {"batch_size": 8.5}}, r"finetune\.batch_size: got 8\.5; expected an integer"),
        ({"finetune": {"freeze_encoder": "yes"}}, r"finetune\.freeze_encoder: got 'yes'; expected true or false"),
        ({"aggregation": {"weights": "0.5 0.5"}}, r"aggregation\.weights: got '0\.5 0\.5'; expected a list"),
        ({"aggregation": {"weights": [0.5, "x"]}}, r"aggregation\.weights\[1\]: got 'x'; expected a number"),
        ({"clients": "en-us"}, r"clients: got 'en-us'; expected a list"),
    ],
)
def test_bad_params_name_the_key(data, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(data)


def test_bad_params_file_fails_the_stage_before_any_work(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["max_duraton_s"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"params\.yaml: unknown key 'prepare\.max_duraton_s'"):
        load_params(tmp_path / "params.yaml")
    proc = subprocess.run([sys.executable, str(STAGES / "prepare.py"), "--out", "prepared"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "prepare: error: params.yaml: unknown key 'prepare.max_duraton_s'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_prepared_arrow_files_are_valid_streams(prepared):
    out, _ = prepared
    for path in sorted((out / "prepared").rglob("*.arrow")):
        with pa.memory_map(str(path)) as src:
            table = pa.ipc.open_stream(src).read_all()
        ids = table.column("id").to_pylist()
        assert ids == sorted(ids), path
