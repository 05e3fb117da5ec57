"""Reliability, concurrency: two `dvc exp run` experiments of our aggregate stage, queued and run with
`dvc queue start -j 2`, finish without clobbering each other's outputs.

A temporary git + DVC repo holds our real `stages/aggregate.py`, tiny random base and client models (tracked with
`dvc add`), and a second stage that reads the merged model back. The two experiments use different
`aggregation.weights`, each of which selects exactly one client, so each experiment's merged weights, metrics and
cached output must be its own: the merged model equals the selected client, and its bytes equal an in-process
aggregate with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from reliability_helpers import ROOT, add, randn_like_seeded, subprocess_env, tiny_state, write_hf_dir

from fedwhisper.merge import aggregate
from fedwhisper.params import params_from_dict

CLIENTS = ["a", "b", "c"]
EXPS = {"rel-pick-a": [1.0, 0.0, 0.0], "rel-pick-c": [0.0, 0.0, 1.0]}

DVC_YAML = {
    "stages": {
        "aggregate": {
            "cmd": "python stages/aggregate.py",
            "deps": ["stages/aggregate.py", "models/base", "models/clients"],
            "params": ["aggregation", "clients"],
            "outs": ["models/aggregated"],
            "metrics": [{"metrics/aggregate.json": {"cache": False}}],
        },
        "check": {
            "cmd": "python stages/check.py",
            "deps": ["stages/check.py", "models/aggregated", "models/clients"],
            "params": ["clients"],
            "metrics": [{"metrics/check.json": {"cache": False}}],
        },
    }
}

CHECK_PY = '''"""Read the merged model back: its sha256, and its L2 distance to every client."""
import hashlib, json, sys
from pathlib import Path
import yaml
from safetensors.torch import load_file

clients = yaml.safe_load(open("params.yaml"))["clients"]
merged_file = Path("models/aggregated/model.safetensors")
merged = load_file(str(merged_file))
out = {"sha256": hashlib.sha256(merged_file.read_bytes()).hexdigest()}
for c in clients:
    other = load_file(f"models/clients/{c}/model.safetensors")
    out[f"dist/{c}"] = float(sum(((merged[k].double() - other[k].double()) ** 2).sum() for k in merged) ** 0.5)
Path("metrics").mkdir(exist_ok=True)
Path("metrics/check.json").write_text(json.dumps(out, indent=2) + "\\n")
'''


def sh(cmd: list[str], cwd: Path, timeout: int = 180) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _find_exps(node, found: dict, executors: dict) -> None:
    """Our experiments' result nodes (name + data) and executor records in `dvc exp show --json`."""
    if isinstance(node, dict):
        if node.get("name") in EXPS and isinstance(node.get("data"), dict):
            found[node["name"]] = node
        if node.get("name") in EXPS and isinstance(node.get("executor"), dict):
            executors[node["name"]] = node["executor"]
        for v in node.values():
            _find_exps(v, found, executors)
    elif isinstance(node, list):
        for v in node:
            _find_exps(v, found, executors)


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "stages").mkdir(parents=True)
    shutil.copy2(ROOT / "stages" / "aggregate.py", r / "stages" / "aggregate.py")
    (r / "stages" / "check.py").write_text(CHECK_PY)
    base = tiny_state(0)
    write_hf_dir(r / "models" / "base", base)
    for i, c in enumerate(CLIENTS):
        write_hf_dir(r / "models" / "clients" / c, add(base, randn_like_seeded(base, 40 + i, 0.01)))
    params = {"clients": CLIENTS, "aggregation": {"strategy": "mean", "weights": [1.0, 1.0, 1.0],
                                                  "source": "models/clients"}}
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (r / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    sh(["git", "init", "-q"], r)
    sh(["dvc", "init", "-q"], r)
    sh(["dvc", "config", "core.analytics", "false"], r)
    sh(["dvc", "add", "-q", "models/base", "models/clients"], r)
    sh(["git", "add", "-A"], r)
    sh(["git", "commit", "-qm", "tiny aggregate project"], r)
    yield r
    subprocess.run(["dvc", "queue", "stop"], cwd=r, env=subprocess_env(), capture_output=True, timeout=60)


def test_two_queued_experiments_with_two_workers_keep_their_own_outputs(repo, tmp_path):
    params_before = (repo / "params.yaml").read_bytes()
    for name, weights in EXPS.items():
        sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"aggregation.weights={json.dumps(weights)}"], repo)
    # The workers it spawns inherit its stdout/stderr: send them to a file, not a pipe we would wait on.
    with (tmp_path / "queue-start.log").open("w") as log:
        started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=subprocess_env(), stdout=log,
                                 stderr=subprocess.STDOUT, timeout=120)
    assert started.returncode == 0, (tmp_path / "queue-start.log").read_text()
    deadline = time.monotonic() + 240
    most_running = 0
    while True:
        status = sh(["dvc", "queue", "status"], repo)
        most_running = max(most_running, status.count(" Running"))
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, f"queue did not finish:\n{status}"
        time.sleep(0.5)
    assert status.count("Success") == 2, status
    assert most_running == 2  # both experiments were seen running at the same time

    found: dict = {}
    executors: dict = {}
    _find_exps(json.loads(sh(["dvc", "exp", "show", "--json"], repo)), found, executors)
    assert set(found) == set(EXPS) and set(executors) == set(EXPS)
    for name, weights in EXPS.items():
        node = found[name]
        data = node["data"]
        assert executors[name]["state"] == "success" and executors[name]["local"]["returncode"] == 0, executors[name]
        assert data["params"]["params.yaml"]["data"]["aggregation"]["weights"] == weights
        agg = data["metrics"]["metrics/aggregate.json"]["data"]
        check = data["metrics"]["metrics/check.json"]["data"]
        picked = CLIENTS[weights.index(1.0)]
        assert {c: agg[f"weight/{c}"] for c in CLIENTS} == {c: float(c == picked) for c in CLIENTS}
        assert check[f"dist/{picked}"] == 0.0  # the merged model is exactly the selected client
        assert all(check[f"dist/{c}"] > 0.1 for c in CLIENTS if c != picked)
        # Byte for byte what an uninterrupted, unshared run produces.
        ref = tmp_path / f"ref-{name}"
        aggregate(params_from_dict({"clients": CLIENTS, "aggregation": {"weights": weights}}),
                  checkpoints=[str(repo / "models" / "clients" / c) for c in CLIENTS], names=CLIENTS,
                  base_dir=repo / "models" / "base", out_dir=ref, metrics_path=None, manifest=None)
        assert check["sha256"] == hashlib.sha256((ref / "model.safetensors").read_bytes()).hexdigest()
        out_hash = data["outs"]["models/aggregated"]["hash"]
        assert out_hash and (repo / ".dvc" / "cache" / "files" / "md5" / out_hash[:2] / out_hash[2:]).is_file()
    hashes = {found[n]["data"]["outs"]["models/aggregated"]["hash"] for n in EXPS}
    assert len(hashes) == 2  # two different cached outputs, neither overwritten by the other
    # The workspace was not touched by either experiment.
    assert (repo / "params.yaml").read_bytes() == params_before
    assert not (repo / "models" / "aggregated").exists()
