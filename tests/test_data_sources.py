import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, Dataset, DatasetDict, Features, Value

from fedwhisper.audio import load_16k_mono
from fedwhisper.data.partition import assign_clients, assign_splits, resolve_split_map, subsample
from fedwhisper.data.sources import lookup, open_source
from fedwhisper.errors import DataError, ParamsError
from fedwhisper.params import PartitionParams, SplitFractions, params_from_dict


def flac_bytes(seconds: float = 0.25, rate: int = 16000, value: float = 0.1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(int(seconds * rate), value, np.float32), rate, format="FLAC")
    return buf.getvalue()


def data_params(**data):
    return params_from_dict({"data": data}).data


def read_all(source):
    return {split: list(source.iter_split(split)) for split in source.split_names()}


def test_lookup_dotted():
    record = {"json": {"text": "hi", "meta": {"accent": "x"}}, "a.b": 1}
    assert lookup(record, "json.text") == "hi"
    assert lookup(record, "json.meta.accent") == "x"
    assert lookup(record, "a.b") == 1
    assert lookup(record, "json.nope", None) is None


def test_local_folder_splits_sidecars_metadata(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "u1.flac").write_bytes(flac_bytes())
    (tmp_path / "train" / "u1.txt").write_text("hello there\n")
    sf.write(tmp_path / "train" / "u2.wav", np.zeros(800, np.float32), 8000)
    (tmp_path / "train" / "u2.json").write_text(json.dumps({"text": "from json", "speaker": 3}))
    (tmp_path / "test" / "u3.flac").write_bytes(flac_bytes())
    (tmp_path / "test" / "u3.txt").write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    (tmp_path / "metadata.csv").write_text("file_name,accent\ntrain/u1.flac,en-us\ntrain/u2.wav,en-029\n")
    source = open_source(data_params(source="local", path=str(tmp_path)))
    items = read_all(source)
    assert sorted(items) == ["test", "train"] and (source.count("train"), source.count("test")) == (2, 1)
    u1, u2 = items["train"]
    assert (u1.id, u1.text, u1.extra["accent"], u1.split) == ("train/u1", "hello there\n", "en-us", "train")
    assert (u2.id, u2.text, u2.extra["accent"]) == ("train/u2", "from json", "en-029")
    assert u1.origin.endswith("u1.flac") and isinstance(u1.audio, Path)
    (u3,) = items["test"]
    assert u3.text == b"caf\xe9" and u3.extra == {}


def test_local_folder_without_splits_and_text_in_metadata(tmp_path):
    (tmp_path / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "meta.csv").write_text("file_name,transcription,accent\na.flac,from csv,x\n")
    source = open_source(data_params(source="local", path=str(tmp_path), metadata="meta.csv",
                                     columns={"text": "transcription"}))
    assert source.split_names() == [""]
    (item,) = source.iter_split("")
    assert (item.id, item.text, item.split, item.extra["accent"]) == ("a", "from csv", None, "x")


def test_local_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        open_source(data_params(source="local", path=str(tmp_path / "nope")))
    (tmp_path / "metadata.csv").write_text("path,accent\n")
    with pytest.raises(DataError, match="file_name"):
        open_source(data_params(source="local", path=str(tmp_path)))


def seed003_dataset() -> DatasetDict:
    """The seed 003 hub shape: a `flac` audio column and a `json` struct holding `text` and `accent`."""
    features = Features(
        {
            "flac": {"bytes": Value("binary"), "path": Value("string")},
            "json": {"text": Value("string"), "accent": Value("string")},
        }
    )

    def split(n, offset):
        rows = {
            "flac": [{"bytes": flac_bytes(value=0.01 * (i + offset)), "path": None} for i in range(n)],
            "json": [{"text": f"utt {i + offset}", "accent": "ab"[i % 2]} for i in range(n)],
        }
        return Dataset.from_dict(rows, features=features).cast_column("flac", Audio())

    return DatasetDict({"train": split(3, 0), "test": split(2, 10)})


def check_seed003_items(items, where):
    assert sorted(items) == ["test", "train"]
    train = items["train"]
    assert [i.text for i in train] == ["utt 0", "utt 1", "utt 2"]
    assert [i.id for i in train] == ["train/0000000", "train/0000001", "train/0000002"]
    assert [lookup(i.extra, "json.accent") for i in train] == ["a", "b", "a"]
    assert isinstance(train[1].audio, bytes)
    assert abs(load_16k_mono(train[1].audio).mean() - 0.01) < 1e-3
    assert items["test"][0].origin == f"{where}[test] row 0"


def test_hf_streaming_parquet_dir(tmp_path):
    for name, ds in seed003_dataset().items():
        ds.to_parquet(str(tmp_path / f"{name}-00000-of-00001.parquet"))
    source = open_source(
        data_params(source="hf", path=str(tmp_path), columns={"audio": "flac", "text": "json.text"})
    )
    check_seed003_items(read_all(source), str(tmp_path))


def test_hf_save_to_disk(tmp_path):
    seed003_dataset().save_to_disk(str(tmp_path / "ds"))
    source = open_source(
        data_params(source="hf_disk", path=str(tmp_path / "ds"), columns={"audio": "flac", "text": "json.text"})
    )
    check_seed003_items(read_all(source), str(tmp_path / "ds"))
    limited = open_source(
        data_params(source="hf_disk", path=str(tmp_path / "ds"), columns={"audio": "flac"}, max_items=1)
    )
    assert len(list(limited.iter_split("train"))) == 1
    assert (limited.count("train"), source.count("train"), source.count("test")) == (1, 3, 2)


def test_hf_missing_audio_column(tmp_path):
    seed003_dataset().save_to_disk(str(tmp_path / "ds"))
    source = open_source(data_params(source="hf_disk", path=str(tmp_path / "ds"), columns={"audio": "wav"}))
    with pytest.raises(DataError, match="no audio column 'wav'.*data.columns.audio"):
        list(source.iter_split("train"))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    for split, n in [("train", 3), ("test", 1)]:
        (tmp_path / split).mkdir()
        samples = [
            (f"{split}{i:03d}", {"flac": flac_bytes(), "json": json.dumps({"text": f"t{i}", "accent": "x"}).encode()})
            for i in range(n)
        ]
        write_shard(tmp_path / split / "shard-000000.tar", samples[:2])
        if n > 2:
            write_shard(tmp_path / split / "shard-000001.tar", samples[2:])
    source = open_source(
        data_params(source="webdataset", path=str(tmp_path), columns={"audio": "flac", "text": "json.text"})
    )
    items = read_all(source)
    assert [i.id for i in items["train"]] == ["train/train000", "train/train001", "train/train002"]
    assert [i.text for i in items["train"]] == ["t0", "t1", "t2"]
    assert items["train"][2].origin.endswith("shard-000001.tar:train002")
    assert items["test"][0].extra["accent"] == "x" and isinstance(items["test"][0].audio, bytes)
    glob_source = open_source(
        data_params(source="webdataset", path=str(tmp_path / "train" / "*.tar"), columns={"text": "text"})
    )
    assert [i.text for i in glob_source.iter_split("")] == ["t0", "t1", "t2"]
    with pytest.raises(DataError, match="no .tar shards"):
        open_source(data_params(source="webdataset", path=str(tmp_path / "none" / "*.tar")))


def test_resolve_split_map():
    assert resolve_split_map(["train", "dev", "test"], {}) == {"train": "train", "validation": "dev", "test": "test"}
    assert resolve_split_map(["clips"], {}) == {}
    assert resolve_split_map(["a", "b"], {"train": "a", "test": "b"}) == {"train": "a", "test": "b"}
    with pytest.raises(DataError, match=r"data.splits.test: the dataset has no split 'c'"):
        resolve_split_map(["a", "b"], {"train": "a", "test": "c"})
    with pytest.raises(ParamsError, match="data.splits.dev"):
        resolve_split_map(["a"], {"dev": "a"})


IDS = [f"utt{i:03d}" for i in range(200)]
LABELS = ["abcd"[i % 4] for i in range(200)]


def test_column_partition():
    assert assign_clients(["x", "y"], ["en-us", "en-029"], [None, None], PartitionParams(mode="column"), 0) == [
        "en-us",
        "en-029",
    ]


def test_iid_partition_is_seeded_and_balanced():
    part = PartitionParams(mode="iid", num_clients=4)
    a = assign_clients(IDS, LABELS, LABELS, part, seed=1)
    assert a == assign_clients(IDS, LABELS, LABELS, part, seed=1)
    assert a != assign_clients(IDS, LABELS, LABELS, part, seed=2)
    assert sorted(set(a)) == ["client_0", "client_1", "client_2", "client_3"]
    assert [a.count(f"client_{i}") for i in range(4)] == [50, 50, 50, 50]
    # Assignment depends on ids, not on input order.
    rev = assign_clients(IDS[::-1], LABELS[::-1], LABELS[::-1], part, seed=1)
    assert rev[::-1] == a


def label_share(clients, labels, client):
    mine = [lab for c, lab in zip(clients, labels) if c == client]
    return max(mine.count(x) for x in "abcd") / max(len(mine), 1)


def test_dirichlet_partition_is_seeded_and_skewed():
    skewed = PartitionParams(mode="dirichlet", num_clients=4, alpha=0.1)
    even = PartitionParams(mode="dirichlet", num_clients=4, alpha=1000.0)
    a = assign_clients(IDS, LABELS, LABELS, skewed, seed=0)
    assert a == assign_clients(IDS, LABELS, LABELS, skewed, seed=0)
    assert a != assign_clients(IDS, LABELS, LABELS, skewed, seed=3)
    assert sorted(set(a)) == ["client_0", "client_1", "client_2", "client_3"]

    def mean_skew(part):
        shares = []
        for seed in range(5):
            clients = assign_clients(IDS, LABELS, LABELS, part, seed=seed)
            shares += [label_share(clients, LABELS, f"client_{i}") for i in range(4)]
        return np.mean(shares)

    assert mean_skew(skewed) > 0.6 and mean_skew(even) < 0.3
    b = assign_clients(IDS, LABELS, LABELS, even, seed=0)
    assert all(abs(b.count(f"client_{i}") - 50) <= 4 for i in range(4))
    strata = ["train"] * 150 + ["test"] * 50
    c = assign_clients(IDS, LABELS, LABELS, skewed, seed=0, strata=strata)
    assert all(len(set(c[lo:hi])) == 4 for lo, hi in [(0, 150), (150, 200)])


def test_assign_splits_pooled_and_carved():
    clients = ["a"] * 100 + ["b"] * 50
    ids = [f"{c}{i:03d}" for i, c in enumerate(clients)]
    pooled = assign_splits(ids, clients, [None] * 150, SplitFractions(validation=0.1, test=0.2), seed=0)
    assert pooled == assign_splits(ids, clients, [None] * 150, SplitFractions(validation=0.1, test=0.2), seed=0)
    count = lambda c, s: sum(1 for cl, sp in zip(clients, pooled) if cl == c and sp == s)  # noqa: E731
    assert (count("a", "test"), count("a", "validation"), count("a", "train")) == (20, 10, 70)
    assert (count("b", "test"), count("b", "validation"), count("b", "train")) == (10, 5, 35)
    roles = ["train"] * 120 + ["test"] * 30
    carved = assign_splits(ids, clients, roles, SplitFractions(validation=0.25, test=0.2), seed=0)
    assert carved[120:] == ["test"] * 30
    assert carved[:100].count("validation") == 25 and carved[100:120].count("validation") == 5
    assert "test" not in carved[:120]


def test_subsample_seeded_sorted():
    ids = [f"x{i:02d}" for i in range(30)]
    idx = list(range(29, -1, -1))
    a = subsample(idx, ids, 5, 0, "c", "train")
    assert a == subsample(idx, ids, 5, 0, "c", "train") and len(a) == 5 and a == sorted(a)
    assert subsample(idx, ids, 5, 0, "c", "test") != a or subsample(idx, ids, 5, 1, "c", "train") != a
    assert subsample(idx, ids, None, 0, "c", "train") == list(range(30))


def test_item_problems_are_reported(tmp_path):
    (tmp_path / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "a.json").write_text("{not json")
    (item,) = open_source(data_params(source="local", path=str(tmp_path), metadata=None)).iter_split("")
    assert item.text is None and "a.json: invalid JSON" in item.problem
    write_shard(tmp_path / "s.tar", [("k1", {"json": b'{"text": "t"}', "txt": b"x"})])
    (item,) = open_source(data_params(source="webdataset", path=str(tmp_path / "s.tar"))).iter_split("")
    assert item.audio is None and item.text == "t"
    assert item.problem == "no audio member 'audio' (members: json, txt)"


def test_hub_id_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.path: cannot stream dataset 'i4ds/spc_r' \(config None\)"):
        open_source(data_params(source="hf", path="i4ds/spc_r"))


def test_metadata_file_names_are_resolved_not_stripped(tmp_path):
    """`.x.wav` is its own file (not `x.wav`), `./x.wav` is `x.wav`, and a split's metadata names its own files."""
    for stem in ("x", ".x"):
        (tmp_path / f"{stem}.flac").write_bytes(flac_bytes())
        (tmp_path / f"{stem}.txt").write_text(f"text of {stem}")
    (tmp_path / "metadata.csv").write_text("file_name,accent\n./x.flac,plain\n.x.flac,hidden\n")
    items = {i.id: i for i in open_source(data_params(source="local", path=str(tmp_path))).iter_split("")}
    assert (items["x"].extra["accent"], items[".x"].extra["accent"]) == ("plain", "hidden")
    assert not any(i.drop_reason for i in items.values())


@pytest.mark.parametrize("name", ["../outside.flac", "/etc/passwd", "sub/../../outside.flac"])
def test_metadata_path_escaping_the_data_root_is_refused(tmp_path, name):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "outside.flac").write_bytes(flac_bytes())
    (root / "metadata.csv").write_text(f"file_name,accent\na.flac,x\n{name},y\n")
    with pytest.raises(DataError, match=rf"metadata.csv line 3: file_name '{name}' points outside {root}"):
        open_source(data_params(source="local", path=str(root)))


def test_split_metadata_cannot_move_a_file_to_another_split(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "train" / "metadata.csv").write_text("file_name,accent\n../test/a.flac,x\n")
    source = open_source(data_params(source="local", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"train/metadata.csv line 2: file_name '../test/a.flac' points outside "):
        list(source.iter_split("train"))


def test_metadata_rows_for_missing_files_and_duplicates_become_drop_items(tmp_path):
    for split, stem in (("train", "a"), ("train", "b"), ("test", "c")):
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / f"{stem}.flac").write_bytes(flac_bytes())
    (tmp_path / "train" / "notes.m4a").write_bytes(b"x")
    (tmp_path / "metadata.csv").write_text(
        "file_name,accent\ntrain/a.flac,x\ntrain/ghost.flac,x\ntrain/b.flac,x\ntrain/b.flac,y\n"
        "train/notes.m4a,x\nelsewhere/lost.flac,z\ntest/c.flac,x\n"
    )
    (tmp_path / "test" / "metadata.csv").write_text("file_name,accent\nc.flac,y\n")  # c listed twice, across files
    source = open_source(data_params(source="local", path=str(tmp_path)))
    items = read_all(source)
    by_id = {i.id: i for split in items.values() for i in split}
    assert {k: v.drop_reason for k, v in by_id.items()} == {
        "train/a": "", "train/b": "duplicate_metadata", "train/ghost": "missing_audio",
        "train/notes": "missing_audio", "test/c": "duplicate_metadata", "elsewhere/lost": "missing_audio",
    }
    assert "does not exist" in by_id["train/ghost"].problem and by_id["train/ghost"].audio is None
    assert by_id["train/ghost"].origin == f"{tmp_path / 'metadata.csv'} line 3"
    assert "not a supported audio file" in by_id["train/notes"].problem
    assert by_id["train/b"].problem.startswith("listed 2 times in metadata") and "line 4; " in by_id["train/b"].problem
    assert "test/metadata.csv line 2" in by_id["test/c"].problem
    # Rows outside every split folder are reported with the first split (test); counts include the drop items.
    assert [i.id for i in items["test"]] == ["test/c", "elsewhere/lost"]
    assert (source.count("train"), source.count("test")) == (4, 2)


def test_metadata_encoding_bom_and_latin1(tmp_path):
    (tmp_path / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "metadata.csv").write_bytes("file_name,accent\na.flac,x\n".encode("utf-8-sig"))  # Excel "CSV UTF-8"
    (item,) = open_source(data_params(source="local", path=str(tmp_path))).iter_split("")
    assert item.extra == {"accent": "x"}
    (tmp_path / "metadata.csv").write_bytes("file_name,accent\na.flac,x\na.flac,Zürich\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"metadata.csv: not UTF-8 \(byte 0xfc on line 3\); re-save it as UTF-8"):
        open_source(data_params(source="local", path=str(tmp_path)))


def test_sidecar_bom_is_stripped(tmp_path):
    (tmp_path / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "a.txt").write_bytes("\ufeffhello".encode("utf-8"))
    (tmp_path / "b.flac").write_bytes(flac_bytes())
    (tmp_path / "b.json").write_bytes(json.dumps({"text": "from json"}).encode("utf-8-sig"))
    a, b = open_source(data_params(source="local", path=str(tmp_path))).iter_split("")
    assert (a.text, b.text) == ("hello", "from json")
    write_shard(tmp_path / "s.tar", [("k", {"flac": flac_bytes(), "txt": "\ufeffbonjour".encode()})])
    (item,) = open_source(data_params(source="webdataset", path=str(tmp_path / "s.tar"), columns={"text": "txt"})
                          ).iter_split("")
    assert item.text == "bonjour"


@pytest.mark.parametrize("raw,shown", [('{"a": 1}', "dict"), ("42", "int (42)"), ("NaN", "float (nan)"),
                                       ("true", "bool (True)"), ('["x"]', "list")])
def test_non_string_transcript_is_a_drop_not_its_repr(tmp_path, raw, shown):
    (tmp_path / "a.flac").write_bytes(flac_bytes())
    (tmp_path / "a.json").write_text('{"text": %s}' % raw)
    (item,) = open_source(data_params(source="local", path=str(tmp_path))).iter_split("")
    assert (item.text, item.drop_reason) == (None, "non_string_transcript")
    assert f"a.json: transcript 'text' is a {shown}" in item.problem
    write_shard(tmp_path / "s.tar", [("k", {"flac": flac_bytes(), "json": ('{"text": %s}' % raw).encode()})])
    (item,) = open_source(data_params(source="webdataset", path=str(tmp_path / "s.tar"), columns={"audio": "flac",
                                      "text": "json.text"})).iter_split("")
    assert (item.text, item.drop_reason) == (None, "non_string_transcript")


def test_hf_path_outside_the_dataset_folder_is_refused_when_streaming(tmp_path):
    """Streaming a local data directory: path-only audio outside it is refused (evaluate names the row)."""
    from fedwhisper.decode.evaluate import StreamSpec, _stream_rows

    (tmp_path / "data").mkdir()
    sf.write(tmp_path / "data" / "in.wav", np.full(1600, 0.1, np.float32), 16000)
    sf.write(tmp_path / "out.wav", np.full(1600, 0.1, np.float32), 16000)
    features = Features({"audio": {"bytes": Value("binary"), "path": Value("string")}, "text": Value("string")})
    Dataset.from_dict({"audio": [{"bytes": None, "path": "in.wav"}, {"bytes": None, "path": "../out.wav"}],
                       "text": ["inside", "outside"]}, features=features).to_parquet(
        str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    source = open_source(data_params(source="hf", path=str(tmp_path / "data")))
    inside, outside = source.iter_split("test")
    assert inside.audio == tmp_path / "data" / "in.wav" and not inside.drop_reason
    assert (outside.audio, outside.drop_reason) == (None, "audio_outside_root")
    rows = _stream_rows(StreamSpec(str(tmp_path / "data")))
    assert next(rows)[2] == "inside"
    with pytest.raises(DataError, match=r"\[test\] row 1: audio path '../out.wav' has no bytes and is outside"):
        next(rows)
