"""End to end: the real `dvc repro` on reduced params in a temporary copy of the repo, then the federated pipeline
(`dvc repro pipelines/federated/dvc.yaml`: 1 round of 1 local step, and the centralised upper bound).

Checks the stage outputs and metrics keys, that a second repro does nothing, that changing `federated.rounds`
re-runs only the federated branch and `aggregation.*` only the aggregation stages, and that a fresh clone restores
every output of both pipelines from a DVC remote with nothing recomputed.
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
FEDERATED = "pipelines/federated/dvc.yaml"
FED_STAGES = {f"{FEDERATED}:{s}" for s in ("federate", "centralise", "evaluate@federated", "evaluate@centralised",
                                            "compare")}
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
        # outputs and locks of the real runs (dvc.lock, pipelines/federated/dvc.lock) stay behind: built here anew
        if not src.is_file() or rel.startswith(("metrics/", "models/")) or Path(rel).name == "dvc.lock":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _reduce_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["prepare"]["max_items_per_client"] = 4
    params["finetune"].update(max_steps=2, batch_size=2, eval_max_items=2, save_steps=1)
    params["evaluate"].update(batch_size=8, max_new_tokens=48)
    params["federated"].update(rounds=1, local_steps=1)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> tuple[Path, str, str]:
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    _copy_repo(repo)
    _reduce_params(repo / "params.yaml")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "e2e"], repo)
    output = run(["dvc", "repro"], repo, timeout=1500)
    federated = run(["dvc", "repro", FEDERATED], repo, timeout=1500)
    return repo, output, federated


def test_repro_runs_every_stage_and_writes_outputs(pipeline_repo):
    repo, output, _ = pipeline_repo
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


def test_federated_pipeline_runs_its_stages_and_writes_the_four_way_report(pipeline_repo):
    repo, _, output = pipeline_repo
    assert stages_run(output) == FED_STAGES  # the root stages were up to date
    for model in ("federated", "centralised"):
        assert (repo / f"models/{model}/model.safetensors").is_file()
        metrics = json.loads((repo / f"metrics/federated/eval/{model}.json").read_text())
        assert all(isinstance(metrics[k], (int, float)) for k in ["wer", "wer_ci_low", *[f"wer_{c}" for c in CLIENTS]])
    # written like a client's model: the base's generation config with the trained language/task (if multilingual)
    assert json.loads((repo / "models/centralised/generation_config.json").read_text()) == json.loads(
        (repo / f"models/clients/{CLIENTS[0]}/generation_config.json").read_text())
    fed = json.loads((repo / "metrics/federated/metrics.json").read_text())
    assert fed["rounds_done"] == 1 and len(fed["clients_per_round"][0]) == len(CLIENTS)
    wer_curve = (repo / "metrics/federated/live/plots/metrics/global/eval_wer.tsv").read_text().splitlines()
    assert wer_curve[0].split("\t")[:2] == ["step", "eval_wer"] and len(wer_curve) == 2
    for c in CLIENTS:
        assert (repo / f"metrics/federated/live/plots/metrics/client/{c}/train_loss.tsv").is_file()
    # "same total steps": the centralised run takes as many optimizer steps as the four one-shot clients together
    central = json.loads((repo / "metrics/federated/centralise.json").read_text())
    one_shot = {c: json.loads((repo / f"metrics/finetune/{c}.json").read_text())["global_step"] for c in CLIENTS}
    assert central["one_shot_steps_per_client"] == one_shot
    assert central["global_step"] == sum(one_shot.values()) and central["train_samples"] == sum(
        central["train_samples_per_client"].values())
    report = (repo / "metrics/federated/report.md").read_text()
    for label in ("| local-only |", "| one-shot merge |", "| federated rounds |", "| centralised |",
                  "federated rounds vs one-shot merge", "federated rounds vs centralised", "Gap to centralised"):
        assert label in report, label
    comparison = json.loads((repo / "metrics/federated/comparison.json").read_text())
    assert comparison["federated/gap_to_centralised"] == pytest.approx(
        comparison["federated/wer"] - comparison["centralised/wer"], abs=1e-3)


def test_second_repro_does_nothing(pipeline_repo):
    repo, _, _ = pipeline_repo
    assert stages_run(run(["dvc", "repro"], repo)) == set()
    assert stages_run(run(["dvc", "repro", FEDERATED], repo)) == set()


def test_federated_rounds_change_reruns_only_the_federated_branch(pipeline_repo):
    """`dvc exp run pipelines/federated/dvc.yaml -S federated.rounds=2`: the second round continues from the
    first (the resume point), and neither the centralised model nor any root stage runs again."""
    repo, _, _ = pipeline_repo
    output = run(["dvc", "exp", "run", FEDERATED, "-S", "federated.rounds=2"], repo)
    assert stages_run(output) == {f"{FEDERATED}:{s}" for s in ("federate", "evaluate@federated", "compare")}
    fed = json.loads((repo / "metrics/federated/metrics.json").read_text())
    assert fed["rounds_done"] == 2 and fed["resumed_after_round"] == 1
    assert len((repo / "metrics/federated/rounds.tsv").read_text().splitlines()) == 3  # header + 2 rounds


def test_aggregation_change_reruns_only_aggregation_stages(pipeline_repo):
    repo, _, _ = pipeline_repo
    output = run(["dvc", "exp", "run", "-S", "aggregation.weights=[0.4,0.3,0.2,0.1]"], repo)
    assert stages_run(output) == {"aggregate", "evaluate@aggregated", "report"}
    aggregate = json.loads((repo / "metrics/aggregate.json").read_text())
    assert aggregate[f"weight/{CLIENTS[0]}"] == pytest.approx(0.4)
    diff = run(["dvc", "metrics", "diff", "--md"], repo)
    assert "metrics/eval/aggregated.json" in diff


def test_fresh_clone_restores_outputs_from_remote(pipeline_repo, tmp_path):
    repo, _, _ = pipeline_repo
    # the one-shot merge changed (previous test): of the federated pipeline only the comparison depends on it
    assert stages_run(run(["dvc", "repro", FEDERATED], repo)) == {f"{FEDERATED}:compare"}
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
    for model in ("federated", "centralised"):
        assert (clone / f"models/{model}/model.safetensors").is_file()
    assert stages_run(run(["dvc", "repro"], clone)) == set()
    assert stages_run(run(["dvc", "repro", FEDERATED], clone)) == set()
