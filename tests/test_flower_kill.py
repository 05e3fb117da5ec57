"""A SuperNode killed mid-round, on Flower's deployment engine for real: a SuperLink and 2-3 SuperNodes as separate
processes on 127.0.0.1, the project's ServerApp and ClientApp (the ClientApp wrapped by tests/flower_pause_client.py,
which pauses one site in round 2 so the test kills it exactly there), a tiny random Whisper, evaluation off.

The killed node's whole process group (the SuperNode, its SuperExec and the paused ClientApp) gets SIGKILL, as
when a site's machine dies. The SuperLink notices when the node misses its heartbeat (Flower's fixed patience:
2 x the 30 s interval, so up to a minute), and answers the node's pending message with an error reply; the
ServerApp then either finishes the round with the clients that answered (min_fit_clients allows) or stops with an
error naming the round, the round-1 resume point untouched, and a second ``flwr run`` resumes after round 1.

Slow (about a minute of it is Flower's heartbeat patience, per kill): marked ``slow``. Every process is started in
its own session and stopped by its pid (process group) in a ``finally``; nothing binds anything but 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow

from test_flower_deployment import free_port, stop, wait_listening  # noqa: E402  (same helpers, same rules)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 420  # one flwr run, the heartbeat wait included


def wait_for(what: str, check, timeout: float, procs_alive=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc, log in procs_alive:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited early ({proc.returncode}):\n"
                                     f"{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout} s")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class Deployment:
    """One SuperLink, SuperNodes started on demand, ``flwr run`` of the app in the background; all by pid."""

    def __init__(self, tmp_path: Path, base_dir: Path, clients: dict[str, int], federated: dict):
        from test_federated import TINY_FT, _rows  # the same tiny sites as the in-process tests

        from fedwhisper.data.prepared import write_manifest, write_split

        self.tmp, self.base_dir = tmp_path, base_dir
        self.data = tmp_path / "data"
        counts = {}
        for i, (c, n_train) in enumerate(clients.items()):
            counts[c] = {split: write_split(self.data / c / f"{split}.arrow", _rows(c, n, i + 10 * k, split))
                         for k, (split, n) in enumerate([("train", n_train), ("validation", 2), ("test", 2)])}
        write_manifest(self.data, counts, list(counts))
        self.params = tmp_path / "params.yaml"
        self.params.write_text(yaml.safe_dump({"clients": list(clients), "finetune": TINY_FT,
                                               "federated": federated}))
        # the project's app descriptor, with the pausing ClientApp
        app = tmp_path / "app"
        app.mkdir()
        text = (ROOT / "flower" / "pyproject.toml").read_text()
        assert 'clientapp = "fedwhisper.federated.flower:client_app"' in text
        (app / "pyproject.toml").write_text(text.replace('clientapp = "fedwhisper.federated.flower:client_app"',
                                                         'clientapp = "flower_pause_client:client_app"'))
        self.app = app
        self.link_port = free_port()
        home = tmp_path / "flwr_home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                          f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.out, self.metrics = tmp_path / "out" / "federated", tmp_path / "out" / "metrics"
        self.resume = tmp_path / "out" / "federated_resume"
        self.journal = tmp_path / "journal.tsv"
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log.open("a"), stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def start_link(self) -> None:
        link, log = self.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                               str(self.link_port), "--disable-runtime-dependency-installation")
        wait_listening(self.link_port, link, log)

    def start_node(self, client: str, *, pause_round: int = 0) -> None:
        port = free_port()
        config = (f"client='{client}' data-root='{self.data}' base-dir='{self.base_dir}' params='{self.params}' "
                  f"journal='{self.journal}'")
        if pause_round:
            config += f" pause-round={pause_round} pause-marker='{self.marker(client)}'"
        node, log = self.start(f"supernode-{client}", "flower-supernode", "--insecure", "--superlink",
                               f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1", "--port", str(port),
                               "--node-config", config)
        wait_listening(port, node, log)
        self.nodes[client] = (node, log)

    def marker(self, client: str) -> Path:
        return self.tmp / f"paused-{client}"

    def kill_node(self, client: str) -> None:
        """SIGKILL the node's process group (SuperNode, SuperExec, the paused ClientApp), as when its machine dies."""
        node, _ = self.nodes.pop(client)
        paused = int(self.marker(client).read_text())
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=10)
        try:
            os.kill(paused, signal.SIGKILL)  # the ClientApp this test's node started, should it be in another group
        except ProcessLookupError:
            pass

    def run(self, name: str) -> tuple[subprocess.Popen, Path]:
        run_config = (f"params='{self.params}' base-dir='{self.base_dir}' out-dir='{self.out}' "
                      f"metrics-dir='{self.metrics}' resume-dir='{self.resume}' evaluate=false wait-for-nodes-s=60")
        return self.start(name, "flwr", "run", str(self.app), "test", "--run-config", run_config, "--stream")

    def finish(self, run: tuple[subprocess.Popen, Path]) -> str:
        proc, log = run
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"flwr run still going after {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}\n"
                                 f"superlink:\n{(self.tmp / 'superlink.log').read_text()[-4000:]}") from None
        return log.read_text()

    def trained(self) -> list[tuple[str, int]]:
        if not self.journal.exists():
            return []
        return [(c, int(r)) for c, r, _ in (line.split("\t") for line in self.journal.read_text().splitlines())]

    def resumed_round(self) -> int:
        """The round of the resume point, 0 when there is none (yet, or for the instant it is swapped)."""
        try:
            return int(json.loads((self.resume / "resume.json").read_text())["round"])
        except (OSError, ValueError, KeyError):
            return 0

    def rounds_tsv(self) -> list[list[str]]:
        return [r.split("\t") for r in (self.metrics / "rounds.tsv").read_text().splitlines()[1:]]


def test_killed_supernodes_lose_nothing_finished(tmp_path, tiny_random_dir):
    """3 sites, min_fit_clients 2, 3 rounds. s3 dies in round 2: round 2 is aggregated from s1 and s2. s2 dies in
    round 3: the run stops naming round 3 and s2, with the round-2 resume point untouched and no final model. s2
    comes back and a second ``flwr run`` trains round 3 only (s3 stays gone; two sites are enough)."""
    from fedwhisper.federated.resume import fingerprint, load_point
    from fedwhisper.formats.hf import is_hf_whisper_dir, read_state_dict
    from fedwhisper.params import load_params

    dep = Deployment(tmp_path, tiny_random_dir, {"s1": 4, "s2": 6, "s3": 4},
                     {"rounds": 3, "local_steps": 1, "min_fit_clients": 2})
    t0 = time.monotonic()
    try:
        dep.start_link()
        dep.start_node("s1")
        dep.start_node("s2", pause_round=3)
        dep.start_node("s3", pause_round=2)
        run = dep.run("run-1")
        wait_for("s3 paused in round 2", dep.marker("s3").exists, RUN_TIMEOUT_S, [run])
        assert json.loads((dep.resume / "resume.json").read_text())["round"] == 1
        dep.kill_node("s3")
        t_kill = time.monotonic()
        # round 2 goes on without s3, once the SuperLink has given up on its heartbeat
        wait_for("round 2 finished", lambda: dep.resumed_round() == 2, RUN_TIMEOUT_S, [run])
        print(f"\nround 2 finished without s3 {time.monotonic() - t_kill:.0f} s after the kill")
        wait_for("s2 paused in round 3", dep.marker("s2").exists, RUN_TIMEOUT_S, [run])
        point = json.loads((dep.resume / "resume.json").read_text())
        assert point["round"] == 2 and point["records"][1]["clients"] == ["s1", "s2"]
        round2 = digests(dep.resume)  # round 3 has started: the point of round 2 is on disk
        assert sorted(round2) == ["global.safetensors", "resume.json", "server_optimizer.safetensors"]
        dep.kill_node("s2")
        t_kill = time.monotonic()
        failed = dep.finish(run)
        print(f"round 3 failed {time.monotonic() - t_kill:.0f} s after the kill")
        # `flwr run --stream` itself exits 0 here (Flower 1.42); the stream says the ServerApp failed, and why
        assert "ServerApp raised an exception" in failed and "Exit Code: 201" in failed, failed[-4000:]
        assert ("round 3: 1 client model(s) came back, fewer than federated.min_fit_clients=2; the global model of "
                "round 2 is kept unchanged (s2: Error: Node Unavailable") in failed, failed[-4000:]
        assert "round 2: 1 client(s) failed: s3: Error: Node Unavailable" in failed
        # nothing finished was lost, nothing unfinished looks finished
        assert digests(dep.resume) == round2
        assert not dep.out.exists() and not is_hf_whisper_dir(dep.out)
        assert sorted(p.name for p in dep.out.parent.iterdir()) == ["federated_resume", "metrics"]  # no temp files
        assert [r[0] for r in dep.rounds_tsv()] == ["1", "2"]
        params = load_params(dep.params, stage="federate")
        fp = fingerprint(params.federated, params.finetune, params.clients, tiny_random_dir)
        done, state, _, records = load_point(dep.resume, fp, 3)
        assert done == 2 and [r.server_round for r in records] == [1, 2]
        base = read_state_dict(tiny_random_dir)
        assert set(state) <= set(base) and any(not (state[k] == base[k]).all() for k in state)
        trained_before = dep.trained()

        dep.start_node("s2")  # the site comes back (a new node id; the server asks its client name again)
        second_run = dep.run("run-2")
        second = dep.finish(second_run)
        assert second_run[0].returncode == 0, second[-4000:]
        print(f"test {time.monotonic() - t0:.0f} s")
    finally:
        stop(dep.procs)
    assert "Strategy execution finished" in second
    assert "resuming after round 2 of 3" in second and "round 3: training s1, s2" in second
    assert sorted(trained_before) == [("s1", 1), ("s1", 2), ("s1", 3), ("s2", 1), ("s2", 2), ("s2", 3),
                                      ("s3", 1), ("s3", 2)]
    assert sorted(dep.trained()[len(trained_before):]) == [("s1", 3), ("s2", 3)]  # rounds 1-2 not trained again
    assert is_hf_whisper_dir(dep.out)
    assert json.loads((dep.metrics / "metrics.json").read_text())["resumed_after_round"] == 2
    assert [r[0] for r in dep.rounds_tsv()] == ["1", "2", "3"]
    clients = [r.split("\t")[:2] for r in (dep.metrics / "client_loss.tsv").read_text().splitlines()[1:]]
    assert sorted(map(tuple, clients)) == [("1", "s1"), ("1", "s2"), ("1", "s3"), ("2", "s1"), ("2", "s2"),
                                           ("3", "s1"), ("3", "s2")]
    point = json.loads((dep.resume / "resume.json").read_text())
    assert point["round"] == 3 and point["records"][2]["clients"] == ["s1", "s2"]
    key = "model.decoder.embed_tokens.weight"
    assert not torch.equal(read_state_dict(dep.out)[key], state[key])  # round 3 moved the round-2 model
