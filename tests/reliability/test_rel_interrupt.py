"""Reliability, interruption: SIGKILL the real stage scripts mid-write / mid-training, then rerun.

aggregate: after the kill nothing at the output path looks finished (absent, or the previous complete output
byte for byte), the partial file is detectably incomplete, and the next run removes the killed run's
`merged.tmp-<pid>` (logging it) and completes with the expected bytes.
finetune: after the kill no client model exists; the rerun resumes from the last complete checkpoint and ends at
the same total step count as an uninterrupted run, with the same weights.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_helpers import CLIENT, FINETUNE, FT, HERE, STAGES, add, project_copy, randn_like_seeded, run_ok, \
    subprocess_env, tiny_state, tree_bytes, wait_for, write_hf_dir

from fedwhisper.formats.hf import read_state_dict

HOOK = HERE / "pause_hook.py"


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# --------------------------------------------------------------------------- aggregate


@pytest.fixture(scope="module")
def agg_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_kill_agg")
    base = tiny_state(0)
    write_hf_dir(root / "base", base)
    for i in range(3):
        write_hf_dir(root / f"c{i}", add(base, randn_like_seeded(base, 20 + i, 0.02)))
    return root


def agg_cmd(root: Path, weights: list[float], out: str = "merged") -> list[str]:
    return [str(STAGES / "aggregate.py"), "--checkpoints", *(str(root / f"c{i}") for i in range(3)),
            "--weights", *map(str, weights), "--base", str(root / "base"), "--out", out,
            "--metrics", f"{out}.json"]


def test_sigkill_during_aggregate_write_leaves_nothing_finished(agg_inputs, tmp_path):
    from safetensors import safe_open

    root, w_old, w_new = agg_inputs, [0.6, 0.2, 0.2], [0.2, 0.3, 0.5]
    # A finished run with other weights: the killed run must not damage it.
    run_ok([sys.executable, *agg_cmd(root, w_old)], tmp_path)
    finished = tree_bytes(tmp_path / "merged")
    finished_metrics = (tmp_path / "merged.json").read_bytes()

    marker = tmp_path / "PAUSED"
    proc = start([sys.executable, str(HOOK), "aggregate-write", str(marker), "20", "--",
                  *agg_cmd(root, w_new)], tmp_path)
    wait_for(marker, proc, 180)
    kill9(proc)
    partial = tmp_path / marker.read_text().splitlines()[0]
    assert partial.is_file() and partial.parent.name.startswith("merged.tmp-")

    assert tree_bytes(tmp_path / "merged") == finished  # the output path still holds the old, complete model
    assert (tmp_path / "merged.json").read_bytes() == finished_metrics
    with pytest.raises(Exception):  # the cut-off file is detectably incomplete
        with safe_open(str(partial), framework="pt"):
            pass

    # The next run removes the killed run's temporary dir (its pid is dead), says so, and completes with exactly
    # what an uninterrupted run gives.
    assert (tmp_path / f"merged.tmp-{proc.pid}") == partial.parent
    out = run_ok([sys.executable, *agg_cmd(root, w_new)], tmp_path)
    assert f"removed merged.tmp-{proc.pid}, left by a killed run" in out
    assert not partial.parent.exists()
    run_ok([sys.executable, *agg_cmd(root, w_new, out="reference")], tmp_path)
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "model.safetensors").read_bytes()
    metrics = json.loads((tmp_path / "merged.json").read_text())
    assert [metrics[f"weight/c{i}"] for i in range(3)] == pytest.approx(w_new)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_sigkill_during_first_aggregate_leaves_no_output(agg_inputs, tmp_path):
    root = agg_inputs
    marker = tmp_path / "PAUSED"
    proc = start([sys.executable, str(HOOK), "aggregate-write", str(marker), "1", "--",
                  *agg_cmd(root, [1, 1, 1])], tmp_path)
    wait_for(marker, proc, 180)
    kill9(proc)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.json").exists()


# --------------------------------------------------------------------------- finetune

def test_sigkill_during_finetune_then_resume_reaches_same_step_count(ft_project, clean_run, tmp_path):
    proj = project_copy(ft_project, tmp_path / "p")
    marker = tmp_path / "PAUSED"
    proc = start([sys.executable, str(HOOK), "finetune-step", str(marker), "3", "--", *FINETUNE], proj)
    wait_for(marker, proc, 240)
    kill9(proc)

    ckpts = proj / "models" / "checkpoints" / CLIENT
    assert (ckpts / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (proj / "models" / "clients" / CLIENT).exists()  # nothing half-written looks finished
    assert not (proj / "metrics" / "finetune" / f"{CLIENT}.json").exists()
    # A save cut short by the kill would look like this: no trainer_state.json. It must not be resumed from.
    cut = ckpts / "checkpoint-3"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"\x00" * 100)

    out = run_ok([sys.executable, *FINETUNE], proj)
    assert "resuming from" in out and "checkpoint-2" in out
    assert not cut.exists()
    resumed = json.loads((proj / "metrics" / "finetune" / f"{CLIENT}.json").read_text())
    clean = json.loads((clean_run / "metrics" / "finetune" / f"{CLIENT}.json").read_text())
    assert resumed["resumed_from_step"] == 2 and clean["resumed_from_step"] == 0
    assert resumed["global_step"] == clean["global_step"] == FT["max_steps"]
    assert resumed["train_samples"] == clean["train_samples"] == 8
    summary = json.loads((proj / "models" / "clients" / CLIENT / "training_summary.json").read_text())
    assert summary["global_step"] == FT["max_steps"]
    a = read_state_dict(proj / "models" / "clients" / CLIENT)
    b = read_state_dict(clean_run / "models" / "clients" / CLIENT)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with (proj / "metrics" / "finetune" / CLIENT / "plots" / "metrics" / "train" / "loss.tsv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")]
    assert steps == [1, 2, 3, 4]  # the steps after the checkpoint are logged once, not twice
