import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import yaml

from fedwhisper.data.prepare import DROP_REASONS, run_prepare
from fedwhisper.data.prepared import (
    SCHEMA,
    iter_split_arrays,
    list_clients,
    load_split,
    load_test_pooled,
    read_manifest,
)
from fedwhisper.errors import DataError
from fedwhisper.params import params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def count_words(text: str) -> int:
    return len(text.split()) + 3


def write_clip(folder: Path, stem: str, text: str | bytes | None, seconds: float = 0.3, rate: int = 16000,
               value: float = 0.1, ext: str = ".wav", subtype: str = "PCM_16") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{stem}{ext}", np.full(int(seconds * rate), value, np.float32), rate, subtype=subtype)
    if isinstance(text, bytes):
        (folder / f"{stem}.txt").write_bytes(text)
    elif text is not None:
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return f"{folder.name}/{stem}{ext}"


def good_corpus(root: Path, per_client: int = 6, clients=("a", "b")) -> list[tuple[str, str]]:
    rows = []
    for split in ("train", "test"):
        for c in clients:
            for i in range(per_client):
                rows.append((write_clip(root / split, f"{c}{i}", f"{c} says {i}", seconds=0.2 + 0.01 * i), c))
    return rows


def write_metadata(root: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["file_name,accent"] + [f"{name},{accent}" for name, accent in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def bad_corpus(root: Path) -> dict[str, str]:
    """Good items plus one item per drop reason; returns reason -> id."""
    rows = good_corpus(root)
    train = root / "train"
    rows.append((write_clip(train, "dup", "first copy", ext=".flac"), "a"))
    rows.append((write_clip(train, "dup", "second copy", ext=".wav"), "a"))
    rows.append((write_clip(train, "notext", None), "a"))
    rows.append((write_clip(train, "latin1", b"caf\xe9 au lait"), "a"))
    rows.append((write_clip(train, "blank", "  \n"), "b"))
    rows.append((write_clip(train, "wordy", " ".join(["word"] * 40)), "b"))
    rows.append((write_clip(train, "noclient", "who am i"), ""))
    (train / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 8)
    (train / "garbage.txt").write_text("cannot decode me")
    rows.append(("train/garbage.wav", "b"))
    sf.write(train / "silent.wav", np.zeros(0, np.float32), 16000)
    (train / "silent.txt").write_text("nothing here")
    rows.append(("train/silent.wav", "b"))
    nan = np.full(1600, 0.1, np.float32)
    nan[7] = np.nan
    sf.write(train / "nan.wav", nan, 16000, subtype="FLOAT")
    (train / "nan.txt").write_text("not a number")
    rows.append(("train/nan.wav", "a"))
    rows.append((write_clip(train, "long", "far too long", seconds=2.5, rate=8000), "b"))
    rows.append(("train/ghost.wav", "a"))  # listed, never written
    rows += [(write_clip(train, "twice", "listed twice"), "a"), ("train/twice.wav", "b")]
    rows.append((write_clip(train, "numeric", None), "a"))
    (train / "numeric.json").write_text('{"text": 42}')
    rows.append((write_clip(train, "cut", "cut short", seconds=1.0), "b"))
    full = (train / "cut.wav").read_bytes()
    (train / "cut.wav").write_bytes(full[: len(full) // 2])
    write_metadata(root, rows)
    return {
        "duplicate_id": "train/dup", "missing_transcript": "train/notext", "invalid_utf8": "train/latin1",
        "empty_transcript": "train/blank", "too_many_tokens": "train/wordy", "missing_client": "train/noclient",
        "undecodable": "train/garbage", "empty_audio": "train/silent", "non_finite": "train/nan",
        "too_long": "train/long", "missing_audio": "train/ghost", "duplicate_metadata": "train/twice",
        "non_string_transcript": "train/numeric", "truncated_audio": "train/cut",
    }


HF_ONLY_REASONS = {"audio_outside_root"}  # tested with an HF dataset in test_hf_audio_path_outside_root_is_dropped


def make_params(corpus: Path, clients=("a", "b"), **prepare):
    prepare = {"max_duration_s": 2.0, "max_label_tokens": 20, **prepare}
    return params_from_dict({"data": {"path": str(corpus)}, "prepare": prepare, "clients": list(clients)})


def read_drops(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_drop_reason_is_counted_and_listed(tmp_path):
    expected = bad_corpus(tmp_path / "corpus")
    out, metrics = tmp_path / "prepared", tmp_path / "metrics"
    summary = run_prepare(make_params(tmp_path / "corpus", max_drop_fraction=0.5), count_words, out, metrics)
    assert set(expected) == set(DROP_REASONS) - HF_ONLY_REASONS
    m = json.loads((metrics / "prepare.json").read_text())
    for reason in DROP_REASONS:
        assert m[f"drops/{reason}"] == (reason not in HF_ONLY_REASONS), reason
    assert m["drops/total"] == 14 and m["items/seen"] == 39
    assert m["drop_fraction"] == pytest.approx(14 / 39, abs=1e-6)
    assert summary.kept == 25
    drops = read_drops(metrics / "prepare_drops.csv")
    assert {d["reason"]: d["id"] for d in drops} == expected
    by_reason = {d["reason"]: d for d in drops}
    assert by_reason["duplicate_id"]["origin"].endswith("dup.wav")
    assert by_reason["undecodable"]["origin"].endswith("garbage.wav")
    assert "cannot decode audio" in by_reason["undecodable"]["detail"]
    assert "2.50 s > prepare.max_duration_s" in by_reason["too_long"]["detail"]
    assert "43 label tokens" in by_reason["too_many_tokens"]["detail"]
    assert "metadata names train/ghost.wav, which does not exist under" in by_reason["missing_audio"]["detail"]
    assert by_reason["missing_audio"]["origin"].endswith("metadata.csv line 37")
    assert "listed 2 times in metadata" in by_reason["duplicate_metadata"]["detail"]
    assert "numeric.json: transcript 'text' is a int (42), not a string" in by_reason["non_string_transcript"]["detail"]
    assert "truncated audio (7989 of the 16000 frames" in by_reason["truncated_audio"]["detail"]
    # 6 test items per client from the dataset's own test split; validation carved from train (0.1 of 7 -> 1).
    assert m["items/a/test"] == 6 and m["items/a/validation"] == 1 and m["items/a/train"] == 6
    assert m["items/total"] == 25
    assert m["hours/a/test"] == pytest.approx(sum(0.2 + 0.01 * i for i in range(6)) / 3600, abs=1e-6)
    assert read_manifest(out)["splits"]["b"] == {"train": 5, "validation": 1, "test": 6}
    assert "train/dup" in list(load_split(out, "a", "train")["id"]) + list(load_split(out, "a", "validation")["id"])


def test_prepared_format_and_readers(tmp_path):
    good_corpus(tmp_path / "corpus", per_client=4)
    write_metadata(tmp_path / "corpus", [(f"{s}/{c}{i}.wav", c) for s in ("train", "test") for c in "ab"
                                         for i in range(4)])
    out = tmp_path / "prepared"
    run_prepare(make_params(tmp_path / "corpus", split={"validation": 0.25, "test": 0.2}), count_words, out,
                tmp_path / "m")
    assert list_clients(out) == ["a", "b"]
    assert read_manifest(out)["sampling_rate"] == 16000
    with pa.memory_map(str(out / "a" / "train.arrow")) as mm:
        table = pa.ipc.open_stream(mm).read_all()
    assert table.schema == SCHEMA
    ids = table.column("id").to_pylist()
    assert ids == sorted(ids) and len(ids) == 3
    ds = load_split(out, "a", "train")
    row = ds[0]
    assert row["audio"].dtype == np.float32 and row["client"] == "a" and isinstance(row["id"], str)
    assert len(row["audio"]) == round(row["duration_s"] * 16000)
    assert row["text"] == "a says " + row["id"][-1]
    first_id, first_text, first_audio = next(iter_split_arrays(out, "a", "train"))
    assert (first_id, first_text) == (row["id"], row["text"])
    np.testing.assert_array_equal(first_audio, row["audio"])
    pooled = load_test_pooled(out)
    assert len(pooled) == 8 and set(pooled["client"]) == {"a", "b"}
    assert pooled[7]["audio"].dtype == np.float32 and pooled[7]["client"] == "b"
    with pytest.raises(DataError, match="no prepared train split for client 'zz'"):
        load_split(out, "zz", "train")
    with pytest.raises(DataError, match="prepared data not found"):
        load_test_pooled(tmp_path / "nowhere")


def test_drop_fraction_failure_writes_csv_and_no_output(tmp_path):
    bad_corpus(tmp_path / "corpus")
    out, metrics = tmp_path / "prepared", tmp_path / "metrics"
    with pytest.raises(DataError, match=r"dropped 14 of 39 items \(35.9%\) > prepare.max_drop_fraction 20.0%"):
        run_prepare(make_params(tmp_path / "corpus", max_drop_fraction=0.2), count_words, out, metrics)
    assert len(read_drops(metrics / "prepare_drops.csv")) == 14
    assert not out.exists() and not list(tmp_path.glob("prepared.tmp-*"))


def test_listed_client_without_data_is_named(tmp_path):
    rows = good_corpus(tmp_path / "corpus")
    write_metadata(tmp_path / "corpus", rows)
    with pytest.raises(DataError, match="client 'c' .* has no usable training items"):
        run_prepare(make_params(tmp_path / "corpus", clients=("a", "b", "c")), count_words, tmp_path / "o",
                    tmp_path / "m")


def test_unlisted_clients_are_listed(tmp_path):
    rows = good_corpus(tmp_path / "corpus", clients=("a", "b", "x"))
    write_metadata(tmp_path / "corpus", rows)
    with pytest.raises(DataError, match=r"clients \['x'\] found in the data .* update `clients:`"):
        run_prepare(make_params(tmp_path / "corpus"), count_words, tmp_path / "o", tmp_path / "m")


def test_iid_partition_and_max_items_per_client(tmp_path):
    rows = good_corpus(tmp_path / "corpus", per_client=10)
    write_metadata(tmp_path / "corpus", rows)
    params = make_params(tmp_path / "corpus", clients=("client_0", "client_1", "client_2"),
                         partition={"mode": "iid", "num_clients": 3}, max_items_per_client=4)
    run_prepare(params, count_words, tmp_path / "o", tmp_path / "m")
    m = json.loads((tmp_path / "m" / "prepare.json").read_text())
    assert [m[f"items/client_{i}/test"] for i in range(3)] == [4, 4, 4]
    assert all(m[f"items/client_{i}/train"] == 4 for i in range(3))
    assert list(load_split(tmp_path / "o", "client_1", "train")["client"]) == ["client_1"] * 4


def tree_bytes(*roots: Path) -> dict[str, bytes]:
    return {
        f"{i}/{p.relative_to(root)}": p.read_bytes()
        for i, root in enumerate(roots)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_outputs_are_byte_identical_across_runs(tmp_path):
    bad_corpus(tmp_path / "corpus")
    params = make_params(tmp_path / "corpus", max_drop_fraction=0.5,
                         partition={"mode": "dirichlet", "num_clients": 2, "alpha": 0.5},
                         clients=("client_0", "client_1"))
    run_prepare(params, count_words, tmp_path / "r1" / "prepared", tmp_path / "r1" / "metrics")
    run_prepare(params, count_words, tmp_path / "r2" / "prepared", tmp_path / "r2" / "metrics")
    first = tree_bytes(tmp_path / "r1" / "prepared", tmp_path / "r1" / "metrics")
    assert len(first) == 2 * 3 + 1 + 2
    assert first == tree_bytes(tmp_path / "r2" / "prepared", tmp_path / "r2" / "metrics")
    # Re-running over an existing output replaces it atomically and leaves no temporary directories.
    run_prepare(params, count_words, tmp_path / "r1" / "prepared", tmp_path / "r1" / "metrics")
    assert first == tree_bytes(tmp_path / "r1" / "prepared", tmp_path / "r1" / "metrics")
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["metrics", "prepared"]


def test_stage_on_sample_corpus(tmp_path, tiny_en_dir):
    sample = ROOT / "data" / "sample"
    assert (sample / "metadata.csv").is_file(), "data/sample is missing; build it with scripts/make_sample_corpus.py"
    work = tmp_path / "work"
    shutil.copytree(sample, work / "data" / "sample")
    base = work / "models" / "base"
    base.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "normalizer.json"):
        if (tiny_en_dir / name).is_file():
            shutil.copy(tiny_en_dir / name, base / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py")], cwd=work, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((work / "metrics" / "prepare.json").read_text())
    for client in params["clients"]:
        for split in ("train", "validation", "test"):
            assert m[f"items/{client}/{split}"] > 0, (client, split)
    assert m["items/total"] + m["drops/total"] == m["items/seen"]
    assert set(list_clients(work / "data" / "prepared")) == set(params["clients"])
    # The committed metrics came from the same corpus and params: same items and hours, nothing dropped (drop
    # reasons added since then count 0).
    committed = json.loads((ROOT / "metrics" / "prepare.json").read_text())
    assert {k: v for k, v in m.items() if k in committed} == committed
    assert m["drops/total"] == 0 and set(m) - set(committed) <= {f"drops/{r}" for r in DROP_REASONS}
    assert "prepare:" in proc.stderr and "items" in proc.stderr


def test_unsplit_webdataset_is_carved_by_fractions(tmp_path):
    from test_data_sources import flac_bytes, write_shard

    samples = [
        (f"k{i:03d}", {"flac": flac_bytes(value=0.01 * (i + 1)),
                       "json": json.dumps({"text": f"sample {i}", "meta": {"dialect": "xy"[i % 2]}}).encode()})
        for i in range(20)
    ]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a-000.tar", samples[:12])
    write_shard(shards / "a-001.tar", samples[12:])
    params = params_from_dict({
        "data": {"source": "webdataset", "path": str(shards / "*.tar"),
                 "columns": {"audio": "flac", "text": "json.text", "client": "json.meta.dialect"}},
        "prepare": {"split": {"validation": 0.2, "test": 0.3}},
        "clients": ["x", "y"],
    })
    run_prepare(params, count_words, tmp_path / "o", tmp_path / "m")
    assert read_manifest(tmp_path / "o")["splits"] == {c: {"train": 5, "validation": 2, "test": 3} for c in "xy"}
    test_y = load_split(tmp_path / "o", "y", "test")
    assert all(int(i[1:]) % 2 == 1 for i in test_y["id"])
    assert all(t.startswith("sample ") for t in test_y["text"])


def test_token_counter_needs_the_base_tokenizer(tmp_path):
    """Label lengths are counted with the base model's tokenizer; a directory without one is named in the error."""
    from fedwhisper.data.prepare import load_token_counter
    from fedwhisper.errors import CheckpointError

    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no tokenizer files; run the base stage first"):
        load_token_counter(tmp_path)


def test_hostile_sample_rate_is_dropped_as_too_long_before_resampling(tmp_path, monkeypatch):
    """A 200 kB WAV declaring 1 Hz is 100000 s long by its header: dropped, never resampled to 1.6e9 samples."""
    import fedwhisper.audio

    resample = fedwhisper.audio.to_16k_mono

    def refuse_hostile(data, rate):
        assert rate > 1, "the 1 Hz file reached the resampler"
        return resample(data, rate)

    monkeypatch.setattr(fedwhisper.audio, "to_16k_mono", refuse_hostile)
    corpus = tmp_path / "corpus"
    rows = good_corpus(corpus, per_client=2)
    sf.write(corpus / "train" / "hostile.wav", np.zeros(100_000, np.int16), 1, subtype="PCM_16")
    (corpus / "train" / "hostile.txt").write_text("one hertz")
    write_metadata(corpus, rows + [("train/hostile.wav", "a")])
    run_prepare(make_params(corpus, max_drop_fraction=0.5), count_words, tmp_path / "o", tmp_path / "m")
    (drop,) = read_drops(tmp_path / "m" / "prepare_drops.csv")
    assert (drop["id"], drop["reason"]) == ("train/hostile", "too_long")
    assert drop["origin"].endswith("train/hostile.wav")
    assert drop["detail"] == "100000.00 s > prepare.max_duration_s 2.0"


def test_invisible_transcript_is_empty(tmp_path):
    corpus = tmp_path / "corpus"
    rows = good_corpus(corpus, per_client=2)
    rows.append((write_clip(corpus / "train", "zwsp", "\u200b\u200b \u2060\ufeff\n"), "a"))
    write_metadata(corpus, rows)
    run_prepare(make_params(corpus, max_drop_fraction=0.5), count_words, tmp_path / "o", tmp_path / "m")
    (drop,) = read_drops(tmp_path / "m" / "prepare_drops.csv")
    assert (drop["id"], drop["reason"]) == ("train/zwsp", "empty_transcript")
    assert json.loads((tmp_path / "m" / "prepare.json").read_text())["drops/empty_transcript"] == 1


def test_hf_audio_path_outside_root_is_dropped(tmp_path):
    """Path-only audio in an HF dataset is read from inside the dataset folder, and refused (counted) elsewhere."""
    from datasets import Dataset, DatasetDict, Features, Value

    ds_dir = tmp_path / "ds"
    sf.write(tmp_path / "secret.wav", np.full(3200, 0.1, np.float32), 16000)
    features = Features({"audio": {"bytes": Value("binary"), "path": Value("string")}, "text": Value("string"),
                         "accent": Value("string")})

    def split(n, paths):
        rows = {"audio": [{"bytes": None, "path": p} for p in paths], "text": [f"utt {i}" for i in range(n)],
                "accent": ["a"] * n}
        return Dataset.from_dict(rows, features=features)  # the shape of an undecoded Audio column

    inside = [f"clips/{i}.wav" for i in range(4)]
    dd = DatasetDict({"train": split(6, inside + ["../secret.wav", str(tmp_path / "secret.wav")]),
                      "test": split(2, inside[:2])})
    dd.save_to_disk(str(ds_dir))
    (ds_dir / "clips").mkdir()
    for p in inside:
        sf.write(ds_dir / p, np.full(3200 + int(p[6]) * 160, 0.1, np.float32), 16000)
    params = params_from_dict({"data": {"source": "hf_disk", "path": str(ds_dir), "columns": {"client": "accent"}},
                               "prepare": {"max_drop_fraction": 0.5, "split": {"validation": 0.25}},
                               "clients": ["a"]})
    run_prepare(params, count_words, tmp_path / "o", tmp_path / "m")
    drops = read_drops(tmp_path / "m" / "prepare_drops.csv")
    assert [(d["id"], d["reason"]) for d in drops] == [("train/0000004", "audio_outside_root"),
                                                     ("train/0000005", "audio_outside_root")]
    assert "audio path '../secret.wav' has no bytes and is outside the dataset folder" in drops[0]["detail"]
    m = json.loads((tmp_path / "m" / "prepare.json").read_text())
    assert (m["drops/audio_outside_root"], m["items/total"]) == (2, 6)
