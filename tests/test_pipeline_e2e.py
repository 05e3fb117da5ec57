"""End to end: the real `dvc repro` on reduced params in a temporary copy of the repo.

Checks the stage outputs and metrics keys, that a second repro does nothing, that changing `aggregation.*` re-runs
only the aggregation stages, and that a fresh clone restores every output from a DVC remote with nothing recomputed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["en-us", "en-gb-scotland", "en-029", "en-gb-x-gbcwmd"]
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("metrics/", "models/")) or rel == "dvc.lock":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _reduce_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["prepare"]["max_items_per_client"] = 4
    params["finetune"].update(max_steps=2, batch_size=2, eval_max_items=2, save_steps=1)
    params["evaluate"].update(batch_size=8, max_new_tokens=48)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> tuple[Path, str]:
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    _copy_repo(repo)
    _reduce_params(repo / "params.yaml")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "e2e"], repo)
    output = run(["dvc", "repro"], repo, timeout=1500)
    return repo, output


def test_repro_runs_every_stage_and_writes_outputs(pipeline_repo):
    repo, output = pipeline_repo
    expected = {"base", "prepare", "aggregate", "evaluate@base", "evaluate@aggregated", "report"}
    expected |= {f"finetune@{c}" for c in CLIENTS} | {f"evaluate_client@{c}" for c in CLIENTS}
    assert stages_run(output) == expected
    assert (repo / "models/base/model.safetensors").is_file()
    assert (repo / "data/prepared/manifest.json").is_file()
    for c in CLIENTS:
        assert (repo / f"models/clients/{c}/model.safetensors").is_file()
        assert (repo / f"metrics/finetune/{c}.json").is_file()
    assert (repo / "models/aggregated/model.safetensors").is_file()
    for name in ["base", "aggregated", *CLIENTS]:
        metrics = json.loads((repo / f"metrics/eval/{name}.json").read_text())
        for key in ["wer", "cer", "bleu", *[f"wer_{c}" for c in CLIENTS]]:
            assert isinstance(metrics[key], (int, float)), f"{name}: {key} missing"
    aggregate = json.loads((repo / "metrics/aggregate.json").read_text())
    assert any(k.startswith("weight/") for k in aggregate)
    report = (repo / "metrics/report.md").read_text()
    assert "| base |" in report and "**aggregated**" in report


def test_second_repro_does_nothing(pipeline_repo):
    repo, _ = pipeline_repo
    output = run(["dvc", "repro"], repo)
    assert stages_run(output) == set()


def test_aggregation_change_reruns_only_aggregation_stages(pipeline_repo):
    repo, _ = pipeline_repo
    output = run(["dvc", "exp", "run", "-S", "aggregation.weights=[0.4,0.3,0.2,0.1]"], repo)
    assert stages_run(output) == {"aggregate", "evaluate@aggregated", "report"}
    aggregate = json.loads((repo / "metrics/aggregate.json").read_text())
    assert aggregate[f"weight/{CLIENTS[0]}"] == pytest.approx(0.4)
    diff = run(["dvc", "metrics", "diff", "--md"], repo)
    assert "metrics/eval/aggregated.json" in diff


def test_fresh_clone_restores_outputs_from_remote(pipeline_repo, tmp_path):
    repo, _ = pipeline_repo
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], repo)
    run(["dvc", "push"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    for c in CLIENTS:
        assert (clone / f"models/clients/{c}/model.safetensors").is_file()
    assert (clone / "models/aggregated/model.safetensors").is_file()
    assert stages_run(run(["dvc", "repro"], clone)) == set()
