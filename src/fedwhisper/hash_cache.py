"""A cache of input sha256s keyed on each file's path and stat, so that unchanged inputs are not hashed again.

Like DVC's own state database, an entry is keyed on the file's absolute path and is valid only while the file's
device, inode, size, mtime and ctime (both in nanoseconds) are what they were when it was hashed. Any write changes
mtime and ctime; replacing the file (write a temp file, rename) changes the inode; ``touch`` changes both times.
Only a write that the clock cannot tell apart from the one before it (within one timestamp tick) could keep every
field, and such "racy" entries are never stored: an entry is stored only when the file's mtime and ctime were at
least ``RACY_WINDOW_S`` in the past when it was stat-ed, and only when the stat taken after hashing equals the one
taken before (so a file written while it was hashed is not cached either). This is git's "racy clean" rule.

The cache is an sqlite database (one row per set of paths hashed together), so concurrent writers such as queued
``dvc exp`` runs cannot corrupt it. It lives outside the repository, where it is neither a DVC output nor tracked by
git, and is shared by every workspace of the user (entries are keyed on absolute paths):

- ``$FEDWHISPER_HASH_CACHE``: the database file; ``off`` disables the cache;
- otherwise ``$XDG_CACHE_HOME/fedwhisper/sha256.sqlite`` (``~/.cache/fedwhisper/sha256.sqlite``).

A cache that cannot be opened or written (read-only home, locked for too long) is logged once and bypassed: the
file is then hashed as without a cache. The table keeps at most ``MAX_ENTRIES`` rows, the least recently used go.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

RACY_WINDOW_S = 2.0  # covers filesystems with 1-2 s timestamps (ext3, FAT) and small clock skew
MAX_ENTRIES = 4096
ENV = "FEDWHISPER_HASH_CACHE"

_now_ns = time.time_ns  # the clock the racy rule compares file times with (tests move it)
_lock = threading.Lock()
_counts = {"hits": 0, "misses": 0}
_warned: set[str] = set()


def cache_path() -> Path | None:
    """The database file, or None when ``$FEDWHISPER_HASH_CACHE=off``."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("off", "0", "none", "") else Path(env).expanduser()
    return user_cache_dir() / "sha256.sqlite"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedwhisper`` (``~/.cache/fedwhisper``): per-user caches, outside any repository."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fedwhisper"


def counts() -> dict[str, int]:
    """Cache hits and misses (files hashed) in this process so far."""
    with _lock:
        return dict(_counts)


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db, timeout=30.0, isolation_level=None)  # autocommit; each statement is atomic
    try:
        con.execute("CREATE TABLE IF NOT EXISTS sha256 (paths TEXT PRIMARY KEY, stats TEXT NOT NULL, "
                    "digest TEXT NOT NULL, used REAL NOT NULL)")
        yield con
    finally:
        con.close()


def _warn_once(db: Path, exc: Exception) -> None:
    with _lock:
        if str(db) in _warned:
            return
        _warned.add(str(db))
    log.warning("hash cache %s unusable (%s); hashing without it (set %s=off to silence)", db, exc, ENV)


def cached_sha256(paths: Path | Iterable[Path], compute: Callable[[list[Path]], str]) -> str:
    """``compute(paths)`` (the sha256 of the files concatenated), or its cached value when every file's path and
    stat are unchanged since it was stored."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    db = cache_path()
    if db is None:
        return compute(paths)
    key = json.dumps([os.path.abspath(p) for p in paths])
    now = _now_ns()
    before = [_stat_key(p) for p in paths]
    try:
        with _connect(db) as con:
            row = con.execute("SELECT stats, digest FROM sha256 WHERE paths = ?", (key,)).fetchone()
            if row is not None and json.loads(row[0]) == before:
                con.execute("UPDATE sha256 SET used = ? WHERE paths = ?", (time.time(), key))
                with _lock:
                    _counts["hits"] += 1
                log.debug("sha256 of %s: from the hash cache", key)
                return row[1]
    except (sqlite3.Error, OSError, ValueError) as exc:
        _warn_once(db, exc)
        return compute(paths)

    digest = compute(paths)
    with _lock:
        _counts["misses"] += 1
    after = [_stat_key(p) for p in paths]
    newest = max((max(s[3], s[4]) for s in before), default=0)
    if after != before or now - newest < RACY_WINDOW_S * 1e9:
        return digest  # changed while hashed, or too recent to tell a later same-tick write apart
    try:
        with _connect(db) as con:
            con.execute("INSERT OR REPLACE INTO sha256 (paths, stats, digest, used) VALUES (?, ?, ?, ?)",
                        (key, json.dumps(before), digest, time.time()))
            con.execute("DELETE FROM sha256 WHERE paths IN (SELECT paths FROM sha256 ORDER BY used DESC "
                        "LIMIT -1 OFFSET ?)", (MAX_ENTRIES,))
    except (sqlite3.Error, OSError) as exc:
        _warn_once(db, exc)
    return digest
