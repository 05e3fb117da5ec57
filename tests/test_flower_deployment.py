"""Flower's deployment engine for real: one SuperLink and two SuperNodes as separate processes on 127.0.0.1, the
project's Flower app (flower/pyproject.toml) run on them for 2 rounds with a tiny random Whisper.

Slow (each message starts a ClientApp process that imports torch and transformers): marked ``slow``. Every process
is started in its own session and stopped by its pid (process group) in a ``finally``; nothing binds anything but
127.0.0.1, on ports the OS reports free."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # the process group this test started (start_new_session)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def test_superlink_and_two_supernodes_run_two_rounds(tmp_path, tiny_random_dir):
    from test_federated import TINY_FT, _rows  # the same tiny sites as the in-process tests

    from fedwhisper.data.prepared import write_manifest, write_split

    data = tmp_path / "data"
    counts = {}
    for c, (n_train, seed) in {"s1": (4, 0), "s2": (6, 1)}.items():
        counts[c] = {split: write_split(data / c / f"{split}.arrow", _rows(c, n, seed + 10 * k, split))
                     for k, (split, n) in enumerate([("train", n_train), ("validation", 2), ("test", 2)])}
    write_manifest(data, counts, list(counts))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"clients": ["s1", "s2"], "finetune": TINY_FT,
                                      "federated": {"rounds": 2, "local_steps": 1, "min_fit_clients": 2}}))
    link_port = free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           # the SuperLink starts flower-superexec by name: the venv's bin must be on PATH however pytest was started
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path, start_new_session=True)
        procs.append(proc)
        return proc, log

    out, metrics = tmp_path / "out" / "federated", tmp_path / "out" / "metrics"
    try:
        link, link_log = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                               str(link_port), "--disable-runtime-dependency-installation")
        wait_listening(link_port, link, link_log)
        for c in ("s1", "s2"):
            port = free_port()
            node, node_log = start(f"supernode-{c}", "flower-supernode", "--insecure", "--superlink",
                                   f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(port),
                                   "--node-config", f"client='{c}' data-root='{data}' "
                                   f"base-dir='{tiny_random_dir}' params='{params}'")
            wait_listening(port, node, node_log)
        run_config = (f"params='{params}' base-dir='{tiny_random_dir}' out-dir='{out}' metrics-dir='{metrics}' "
                      f"resume-dir='{tmp_path / 'resume'}' evaluate=false wait-for-nodes-s=60")
        run = subprocess.run([str(BIN / "flwr"), "run", str(ROOT / "flower"), "test", "--run-config", run_config,
                              "--stream"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert "Strategy execution finished" in run.stdout + run.stderr
    finally:
        stop(procs)
    assert all(p.poll() is not None for p in procs)
    from fedwhisper.formats.hf import is_hf_whisper_dir, read_state_dict

    assert is_hf_whisper_dir(out)
    assert json.loads((tmp_path / "resume" / "resume.json").read_text())["round"] == 2  # the server's resume point
    rounds = (metrics / "rounds.tsv").read_text().splitlines()
    assert len(rounds) == 3 and [r.split("\t")[0] for r in rounds[1:]] == ["1", "2"]
    clients = (metrics / "client_loss.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[1] for r in clients) == ["s1", "s1", "s2", "s2"]
    before, after = read_state_dict(tiny_random_dir), read_state_dict(out)
    assert any(not (before[k] == after[k]).all() for k in before)
