"""Temporary siblings of atomically written outputs, and clean-up of the ones a killed run left behind.

Every output is written under a temporary sibling name and renamed into place. The sibling names in use:

- ``<name>.tmp-<pid>``: a file or directory being written (every writer);
- ``<name>.staging-<pid>``: a client model directory being assembled (``train.trainer.export_client_model``),
  and ``<name>.staging-<pid>.tmp-<pid>`` inside that (``formats.hf.write_whisper_dir`` writing the staging dir);
- ``<name>.old-<pid>``: the previous output, moved aside for the instant of the swap (``formats.hf.replace_dir``,
  ``data.prepare``);
- ``.<name>.tmp-<pid>`` and ``.<name>.tmp-<pid><suffix>``, hidden (``report``; the chart keeps its ``.png`` suffix so
  matplotlib picks the format).

A process killed with SIGKILL between creating such a sibling and renaming it cannot remove it, and the next run
uses its own pid, so the sibling would stay forever. ``remove_stale_siblings(out)``, called by the writers before
they write ``out``, removes the siblings of ``out`` whose every pid is a process that no longer exists (or, when
``out`` is missing, moves a dead run's ``out.old-<pid>`` back to ``out``). A sibling of
a live process (another run writing the same output, e.g. a ``dvc exp`` queue worker, or this process) is kept, and
so is every name that does not match the patterns above exactly.

The pid check is local: a writer on another machine (a shared network directory) or in another PID namespace looks
dead. A pid reused by an unrelated live process makes its sibling look alive; it is then kept until that pid ends.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_TAGS = ("tmp", "staging", "old")
_PID = re.compile(r"\.(?:" + "|".join(TEMP_TAGS) + r")-(\d+)")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts as alive; so does anything that cannot be checked)."""
    if pid <= 0:
        return True  # not a pid a writer could have had; never treat it as dead
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except (OverflowError, OSError):
        return True
    return True


def _sibling_pattern(path: Path) -> re.Pattern[str]:
    name = path.name
    suffix = f"(?:{re.escape(path.suffix)})?" if path.suffix else ""
    return re.compile(r"\.?" + re.escape(name) + r"((?:" + _PID.pattern + r")+)" + suffix)


def stale_siblings(path: str | Path) -> list[Path]:
    """The temporary siblings of ``path`` (see the module doc) whose every pid is a process that no longer exists."""
    path = Path(path)
    if os.name != "posix":  # os.kill(pid, 0) is not an existence check on Windows
        return []
    parent = path.parent
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    pattern = _sibling_pattern(path)
    stale = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        pids = [int(p) for p in _PID.findall(m.group(1))]
        if not any(pid_alive(pid) for pid in pids):
            stale.append(parent / entry.name)
    return sorted(stale)


def remove_stale_siblings(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by processes that no longer exist; log each at WARNING.

    Returns the removed paths. A sibling that cannot be removed is logged and left; the caller's write goes on.

    When ``path`` itself is missing and a dead process left ``<name>.old-<pid>`` (killed inside a swap, after
    moving the previous output aside and before renaming the new one into place), that previous output is moved
    back to ``path`` rather than deleted.
    """
    path = Path(path)
    removed = []
    stale_list = stale_siblings(path)
    if not path.exists() and not path.is_symlink():
        olds = [p for p in stale_list if re.fullmatch(re.escape(path.name) + r"\.old-\d+", p.name)]
        if olds:
            newest = max(olds, key=lambda p: p.lstat().st_mtime)
            try:
                os.replace(newest, path)
                log.warning("restored %s from %s, left by a run killed inside the output swap", path, newest.name)
                stale_list.remove(newest)
            except OSError as exc:
                log.warning("could not restore %s from %s: %s", path, newest, exc)
    for stale in stale_list:
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except FileNotFoundError:  # another run removed it first
            continue
        except OSError as exc:
            log.warning("could not remove %s, left by a killed run: %s", stale, exc)
            continue
        log.warning("removed %s, left by a killed run (its process no longer exists)", stale)
        removed.append(stale)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``<path>.tmp-<pid>`` and a rename, after removing the stale
    siblings of ``path``; a failed write leaves no temporary file and the old ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
