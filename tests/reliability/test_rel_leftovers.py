"""Reliability, leftovers of killed runs: the temporary siblings (`<out>.tmp-<pid>`, `<out>.staging-<pid>`,
`<out>.old-<pid>`, chains of these, report's hidden `.<out>.tmp-<pid>[.png]`) of a process that no longer exists
are removed, with a WARNING naming each, by the next write of that output; a sibling of a live process and every
other name are kept.

The end-to-end case (a real SIGKILLed `stages/aggregate.py`, then a rerun) is in `test_rel_interrupt.py`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import add, randn_like_seeded, tiny_state, write_hf_dir

from fedwhisper.atomic import pid_alive, remove_stale_siblings, stale_siblings


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that ran, exited and was reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    assert not pid_alive(proc.pid)
    return proc.pid


@pytest.fixture(scope="module")
def live_pid():
    """The pid of a running `sleep` (stands for another run writing the same output, e.g. a `dvc exp` worker)."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        assert pid_alive(proc.pid)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)


def make(path: Path, is_dir: bool) -> Path:
    if is_dir:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\x00" * 64)  # a partial file inside
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{")
    return path


def leftovers(d: Path, out: str, dead: int) -> list[Path]:
    """What a killed run writing ``d/out`` (dir) and ``d/out.json`` (file) can leave behind."""
    return [
        make(d / f"{out}.tmp-{dead}", True),
        make(d / f"{out}.staging-{dead}", True),
        make(d / f"{out}.staging-{dead}.tmp-{dead}", True),
        make(d / f"{out}.old-{dead}", True),
        make(d / f"{out}.json.tmp-{dead}", False),
    ]


def keepers(d: Path, out: str, dead: int, live: int) -> list[Path]:
    """Names that must survive: a live writer's siblings, chains with one live pid, and near-miss names."""
    return [
        make(d / f"{out}.tmp-{live}", True),
        make(d / f"{out}.json.tmp-{live}", False),
        make(d / f"{out}.staging-{live}.tmp-{dead}", True),
        make(d / f"{out}.staging-{dead}.tmp-{live}", True),
        make(d / f"{out}2.tmp-{dead}", True),  # another output's leftover
        make(d / f"x{out}.tmp-{dead}", True),
        make(d / f"{out}.tmp-{dead}.bak", False),
        make(d / f"{out}.tmp-abc", True),
        make(d / f"{out}.tmp-", True),
        make(d / f"{out}.tmpx-{dead}", True),
        make(d / f"{out}.partial-{dead}", True),
        make(d / f"{out}-tmp-{dead}", True),
        make(d / f"{out}.TMP-{dead}", True),
        make(d / f"{out}.tmp-0", True),
        make(d / "notes.txt", False),
    ]


def assert_cleaned(logged: set[str], gone: list[Path], kept: list[Path]) -> None:
    for p in gone:
        assert not p.exists() and not p.is_symlink(), p
        assert str(p) in logged, f"no WARNING names {p}"
    for p in kept:
        assert p.exists(), f"{p} was removed"
        assert str(p) not in logged


def logged_removals(caplog) -> set[str]:
    """The paths named by the WARNING records (each removal logs the path it removed)."""
    return {str(r.args[0]) for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "fedwhisper.atomic" and r.msg.startswith("removed ")}


# --------------------------------------------------------------------------- the helper


def test_stale_siblings_dead_removed_live_and_unrelated_kept(tmp_path, dead_pid, live_pid, caplog):
    gone = leftovers(tmp_path, "merged", dead_pid)
    kept = keepers(tmp_path, "merged", dead_pid, live_pid)
    own = make(tmp_path / f"merged.tmp-{os.getpid()}", True)  # this process is alive
    out = make(tmp_path / "merged", True)
    dir_gone = [p for p in gone if not p.name.startswith("merged.json")]
    assert stale_siblings(tmp_path / "merged") == sorted(dir_gone)
    with caplog.at_level(logging.WARNING, logger="fedwhisper.atomic"):
        removed = remove_stale_siblings(tmp_path / "merged")
        removed += remove_stale_siblings(tmp_path / "merged.json")
    assert sorted(removed) == sorted(gone)
    assert_cleaned(logged_removals(caplog), gone, kept + [own, out])
    assert remove_stale_siblings(tmp_path / "merged") == []  # nothing left to do
    assert remove_stale_siblings(tmp_path / "absent-dir" / "merged") == []


def test_hidden_report_siblings(tmp_path, dead_pid, live_pid, caplog):
    gone = [make(tmp_path / f".report.md.tmp-{dead_pid}", False),
            make(tmp_path / f".report.png.tmp-{dead_pid}.png", False)]
    kept = [make(tmp_path / f".report.png.tmp-{live_pid}.png", False),
            make(tmp_path / f".report.png.tmp-{dead_pid}.jpg", False),
            make(tmp_path / f"..report.md.tmp-{dead_pid}", False)]
    with caplog.at_level(logging.WARNING, logger="fedwhisper.atomic"):
        remove_stale_siblings(tmp_path / "report.md")
        remove_stale_siblings(tmp_path / "report.png")
    assert_cleaned(logged_removals(caplog), gone, kept)


def test_symlink_leftover_is_unlinked_not_followed(tmp_path, dead_pid):
    target = make(tmp_path / "elsewhere", True)
    link = tmp_path / f"merged.tmp-{dead_pid}"
    link.symlink_to(target, target_is_directory=True)
    assert remove_stale_siblings(tmp_path / "merged") == [link]
    assert not link.is_symlink() and (target / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the stages' writers


def test_aggregate_rerun_removes_dead_leftovers_and_completes(tmp_path, dead_pid, live_pid, caplog):
    from safetensors.torch import load_file

    from fedwhisper.merge import aggregate
    from fedwhisper.params import params_from_dict

    base = tiny_state(0)
    base_dir = write_hf_dir(tmp_path / "in" / "base", base)
    inputs = [write_hf_dir(tmp_path / "in" / f"c{i}", add(base, randn_like_seeded(base, 30 + i, 0.02)))
              for i in range(2)]
    d = tmp_path / "out"
    gone = leftovers(d, "merged", dead_pid)
    kept = keepers(d, "merged", dead_pid, live_pid)
    make(d / "merged", True)  # the previous output (were it missing, merged.old-<dead> would be moved back)
    params = params_from_dict({"clients": [], "aggregation": {}})
    with caplog.at_level(logging.WARNING, logger="fedwhisper.atomic"):
        metrics = aggregate(params, checkpoints=[str(p) for p in inputs], names=["c0", "c1"], base_dir=base_dir,
                            out_dir=d / "merged", metrics_path=d / "merged.json", manifest=None)
    assert metrics["n_merged"] == 2
    assert set(load_file(str(d / "merged" / "model.safetensors"))) == set(base)
    assert (d / "merged.json").is_file()
    assert_cleaned(logged_removals(caplog), gone, kept)


def test_finetune_export_removes_dead_staging(tmp_path, tiny_random_dir, dead_pid, live_pid, caplog):
    from transformers import WhisperForConditionalGeneration

    from fedwhisper.train.trainer import export_client_model

    d = tmp_path / "models" / "clients"
    make(d / "c1", True)  # the previous output (were it missing, c1.old-<dead> would be moved back)
    gone = leftovers(d, "c1", dead_pid)
    kept = keepers(d, "c1", dead_pid, live_pid)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_random_dir)
    with caplog.at_level(logging.WARNING, logger="fedwhisper.atomic"):
        export_client_model(model, tiny_random_dir, d / "c1", {"global_step": 1})
    assert (d / "c1" / "model.safetensors").is_file() and (d / "c1" / "training_summary.json").is_file()
    gone = [p for p in gone if p.name != f"c1.json.tmp-{dead_pid}"]  # not a sibling this stage writes
    assert_cleaned(logged_removals(caplog), gone, kept)
    assert (d / f"c1.json.tmp-{dead_pid}").exists()


def test_evaluate_prepare_report_writers_remove_dead_leftovers(tmp_path, dead_pid, live_pid, caplog):
    from fedwhisper.atomic import write_text_atomic as prepare_write_text
    from fedwhisper.decode.evaluate import write_metrics_json, write_predictions_csv
    from fedwhisper.report import build_report

    m = tmp_path / "metrics"
    ev = m / "eval"
    gone = [make(ev / f"base.json.tmp-{dead_pid}", False),
            make(ev / f"base_predictions.csv.tmp-{dead_pid}", False),
            make(m / f"prepare.json.tmp-{dead_pid}", False),
            make(m / f".report.md.tmp-{dead_pid}", False),
            make(m / f".report.png.tmp-{dead_pid}.png", False),
            make(m / f".wer_by_group.csv.tmp-{dead_pid}", False)]
    kept = [make(ev / f"base.json.tmp-{live_pid}", False),
            make(m / f".report.png.tmp-{live_pid}.png", False),
            make(m / f"prepare.json.tmp-{dead_pid}.old", False)]
    with caplog.at_level(logging.WARNING, logger="fedwhisper.atomic"):
        write_metrics_json(ev / "base.json", {"wer": 10.0, "wer_a": 10.0})
        write_predictions_csv(ev / "base_predictions.csv", [])
        prepare_write_text(m / "prepare.json", "{}\n")
        build_report(m, ["a"])
    assert (m / "report.md").is_file() and (m / "report.png").is_file()
    assert_cleaned(logged_removals(caplog), gone, kept)


def test_prepare_rerun_removes_dead_leftovers_and_completes(tmp_path, dead_pid, live_pid, caplog):
    import csv

    import numpy as np
    import soundfile as sf

    from fedwhisper.data.prepare import run_prepare
    from fedwhisper.data.prepared import read_manifest
    from fedwhisper.params import params_from_dict

    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    tone = (0.25 * np.sin(2 * np.pi * 220.0 * np.arange(4800) / 16000)).astype(np.float32)
    rows = []
    for i in range(5):
        sf.write(corpus / "train" / f"a{i}.wav", tone, 16000, subtype="PCM_16")
        (corpus / "train" / f"a{i}.txt").write_text(f"item {i}", encoding="utf-8")
        rows.append((f"train/a{i}.wav", "a"))
    with (corpus / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([("file_name", "accent"), *rows])
    d, m = tmp_path / "data", tmp_path / "metrics"
    make(d / "prepared", True)  # the previous output (were it missing, prepared.old-<dead> would be moved back)
    gone = leftovers(d, "prepared", dead_pid) + [make(m / f"prepare_drops.csv.tmp-{dead_pid}", False)]
    kept = keepers(d, "prepared", dead_pid, live_pid) + [make(m / f"prepare.json.tmp-{live_pid}", False)]
    gone.remove(d / f"prepared.json.tmp-{dead_pid}")  # not a sibling this stage writes
    kept.append(d / f"prepared.json.tmp-{dead_pid}")
    params = params_from_dict({"data": {"path": str(corpus)}, "clients": ["a"],
                               "prepare": {"split": {"validation": 0.0, "test": 0.2}}})
    with caplog.at_level(logging.WARNING, logger="fedwhisper.atomic"):
        run_prepare(params, lambda text: len(text.split()) + 3, d / "prepared", m)
    assert read_manifest(d / "prepared")["clients"] == ["a"]
    assert (m / "prepare.json").is_file()
    assert_cleaned(logged_removals(caplog), gone, kept)
