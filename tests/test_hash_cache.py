"""The sha256 cache: unchanged files are not hashed again; touched, rewritten or replaced files always are."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedwhisper import hash_cache
from fedwhisper.formats.checkpoints import sha256_file


class CountingHash:
    """sha256_file that counts the files it hashed."""

    def __init__(self):
        self.files = 0

    def __call__(self, paths):
        self.files += len(paths)
        return sha256_file(paths)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    db = tmp_path / "cache" / "sha256.sqlite"
    monkeypatch.setenv(hash_cache.ENV, str(db))
    return db


@pytest.fixture
def later_clock(monkeypatch):
    """Hash as if 10 s had passed since the files were written, so that fresh files are past the racy window."""
    monkeypatch.setattr(hash_cache, "_now_ns", lambda: time.time_ns() + 10_000_000_000)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def digest(*datas: bytes) -> str:
    return hashlib.sha256(b"".join(datas)).hexdigest()


def wait_past_ctime(path: Path) -> None:
    """Wait until the clock is 50 ms past the file's ctime, so that the next write gets a later ctime."""
    ctime = path.stat().st_ctime_ns
    while time.time_ns() < ctime + 50_000_000:
        time.sleep(0.01)


def test_unchanged_files_are_hashed_once(cache, later_clock, tmp_path):
    a, b = write(tmp_path / "a.bin", b"a" * 5000), write(tmp_path / "b.bin", b"b" * 300)
    h = CountingHash()
    first = hash_cache.cached_sha256([a, b], h)
    assert first == digest(b"a" * 5000, b"b" * 300)
    assert h.files == 2
    assert hash_cache.cached_sha256([a, b], h) == first
    assert hash_cache.cached_sha256([a, b], h) == first
    assert h.files == 2  # both later calls came from the cache
    assert hash_cache.cached_sha256(a, h) == digest(b"a" * 5000)  # another set of paths is its own entry
    assert h.files == 3


def test_touched_file_is_hashed_again(cache, later_clock, tmp_path):
    a = write(tmp_path / "a.bin", b"x" * 4096)
    h = CountingHash()
    hash_cache.cached_sha256(a, h)
    wait_past_ctime(a)
    os.utime(a)  # content unchanged, times changed
    assert hash_cache.cached_sha256(a, h) == digest(b"x" * 4096)
    assert h.files == 2


def test_same_size_rewrite_with_the_old_mtime_is_hashed_again(cache, later_clock, tmp_path):
    """Rewritten in place with the same size and its mtime set back to the old one: only ctime tells it apart."""
    a = write(tmp_path / "a.bin", b"1" * 4096)
    h = CountingHash()
    assert hash_cache.cached_sha256(a, h) == digest(b"1" * 4096)
    st = a.stat()
    wait_past_ctime(a)
    with open(a, "r+b") as f:  # same inode, same size
        f.write(b"2" * 4096)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_ino, a.stat().st_size, a.stat().st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert hash_cache.cached_sha256(a, h) == digest(b"2" * 4096)
    assert h.files == 2


def test_same_size_replacement_with_the_old_times_is_hashed_again(cache, later_clock, tmp_path):
    """Replaced by a rename (how checkpoints are written), same size and mtime: the inode tells it apart."""
    a = write(tmp_path / "a.bin", b"1" * 4096)
    h = CountingHash()
    hash_cache.cached_sha256(a, h)
    st = a.stat()
    new = write(tmp_path / "a.bin.tmp", b"2" * 4096)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, a)
    assert hash_cache.cached_sha256(a, h) == digest(b"2" * 4096)
    assert h.files == 2


def test_recently_written_file_is_not_cached(cache, tmp_path):
    """Racy rule, with the real clock: a file written within the racy window is not stored, so a rewrite within
    the same timestamp tick (same size, same mtime, possibly the same ctime) cannot be served stale."""
    a = write(tmp_path / "a.bin", b"1" * 4096)
    h = CountingHash()
    assert hash_cache.cached_sha256(a, h) == digest(b"1" * 4096)
    st = a.stat()
    with open(a, "r+b") as f:
        f.write(b"2" * 4096)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hash_cache.cached_sha256(a, h) == digest(b"2" * 4096)
    assert h.files == 2
    with sqlite3.connect(cache) as con:
        assert con.execute("SELECT COUNT(*) FROM sha256").fetchone() == (0,)


def test_file_changed_while_hashed_is_not_cached(cache, later_clock, tmp_path):
    a = write(tmp_path / "a.bin", b"1" * 4096)

    def hash_then_append(paths):
        value = sha256_file(paths)
        with open(a, "ab") as f:
            f.write(b"more")
        return value

    hash_cache.cached_sha256(a, hash_then_append)
    h = CountingHash()
    assert hash_cache.cached_sha256(a, h) == digest(b"1" * 4096, b"more")
    assert h.files == 1


def test_cache_off_hashes_every_time(tmp_path, later_clock, monkeypatch):
    monkeypatch.setenv(hash_cache.ENV, "off")
    a = write(tmp_path / "a.bin", b"a")
    h = CountingHash()
    hash_cache.cached_sha256(a, h)
    hash_cache.cached_sha256(a, h)
    assert h.files == 2


def test_unusable_cache_warns_once_and_still_hashes(tmp_path, later_clock, monkeypatch, caplog):
    blocker = write(tmp_path / "not-a-dir", b"")
    monkeypatch.setenv(hash_cache.ENV, str(blocker / "sha256.sqlite"))
    a = write(tmp_path / "a.bin", b"a" * 10)
    h = CountingHash()
    with caplog.at_level(logging.WARNING, logger="fedwhisper.hash_cache"):
        assert hash_cache.cached_sha256(a, h) == digest(b"a" * 10)
        assert hash_cache.cached_sha256(a, h) == digest(b"a" * 10)
    assert h.files == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not-a-dir" in warnings[0] and "hashing without it" in warnings[0]


def _hash_many(args):
    db, paths = args
    os.environ[hash_cache.ENV] = db
    hash_cache._now_ns = lambda: time.time_ns() + 10_000_000_000
    return [hash_cache.cached_sha256(Path(p), sha256_file) for _ in range(10) for p in paths]


def test_concurrent_processes_share_the_cache_without_corrupting_it(cache, tmp_path):
    files = [write(tmp_path / f"f{i}.bin", bytes([i]) * 2000) for i in range(6)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_hash_many, [(str(cache), [str(p) for p in files])] * 4)
    expected = [digest(bytes([i]) * 2000) for i in range(6)] * 10
    assert results == [expected] * 4
    with sqlite3.connect(cache) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(con.execute("SELECT paths, digest FROM sha256"))
    assert len(rows) == 6 and sorted(rows.values()) == sorted(expected[:6])


def test_oldest_entries_go_beyond_the_limit(cache, later_clock, tmp_path, monkeypatch):
    monkeypatch.setattr(hash_cache, "MAX_ENTRIES", 3)
    files = [write(tmp_path / f"f{i}.bin", bytes([i])) for i in range(5)]
    for p in files:
        hash_cache.cached_sha256(p, sha256_file)
    with sqlite3.connect(cache) as con:
        kept = {row[0] for row in con.execute("SELECT paths FROM sha256")}
    assert kept == {f'["{p}"]' for p in files[2:]}


def test_second_merge_over_unchanged_inputs_hashes_nothing(cache, later_clock, tmp_path, monkeypatch):
    """The engine's input hashes (sha256/<name> in the metrics, the duplicate-input check) come from the cache on
    the second merge over the same files, and are the same; a client rewritten in between is hashed again."""
    from fedwhisper.formats import checkpoints
    from fedwhisper.formats.checkpoints import open_checkpoint
    from fedwhisper.merge.engine import MergePlan, merge_checkpoints
    from fedwhisper.merge.strategies import WeightedMean

    h = CountingHash()
    monkeypatch.setattr(checkpoints, "sha256_file", h)
    g = torch.Generator().manual_seed(0)
    base = {"model.encoder.conv1.weight": torch.randn(8, 4, 3, generator=g), "model.decoder.embed_tokens.weight":
            torch.randn(10, 8, generator=g)}
    paths = []
    for name, scale in (("base", 0.0), ("a", 0.01), ("b", 0.02)):
        state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(state, str(paths[-1]), metadata={"format": "pt"})

    def merge():
        readers = [open_checkpoint(p) for p in paths[1:]]
        plan = MergePlan(strategy=WeightedMean(), weights=[0.5, 0.5])
        return merge_checkpoints(["a", "b"], readers, open_checkpoint(paths[0]), plan, tmp_path / "out.safetensors",
                                 {"format": "pt"}).sha256

    first = merge()
    assert h.files == 3
    assert first == {"a": sha256_file(paths[1]), "b": sha256_file(paths[2]), "base": sha256_file(paths[0])}
    assert merge() == first
    assert h.files == 3  # nothing hashed
    wait_past_ctime(paths[2])
    save_file({k: v + 1 for k, v in base.items()}, str(paths[2]), metadata={"format": "pt"})
    third = merge()
    assert h.files == 4 and third["b"] == sha256_file(paths[2]) != first["b"] and third["a"] == first["a"]
