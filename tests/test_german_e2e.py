"""The German profile end to end, reduced for CI: the real `dvc repro` on params-de.yaml in a scratch copy of the
project, with only what cannot run in CI cut down.

Reductions: the base is a tiny random multilingual Whisper (language and task tokens, 99 languages) instead of the
bundled whisper-base; the data are 8 of each region's 60 committed data/sample-de clips (6 train, 2 test, their
umlaut and ß transcripts as committed); training stops after 2 steps; decoding stops after a few tokens. Everything
else is params-de.yaml as shipped: column partition by `region`, language `de`, task `transcribe`, the basic
normaliser, the ctranslate2 backend. A random model's WER says nothing, so none is asserted.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedwhisper.params import WHISPER_LANGUAGES

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DE = "data/sample-de"
REGIONS = ["de-m3", "de-f2", "de-klatt3", "de-f4"]
TRAIN_PER_REGION, TEST_PER_REGION = 6, 2  # validation: round(0.1 * 6) = 1 carved from train, as the profile says
MODELS = ["base", "aggregated", *REGIONS]
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


def _german_subset() -> tuple[list[str], list[dict]]:
    """The first TRAIN_PER_REGION train and TEST_PER_REGION test clips of each region (metadata.csv rows)."""
    with (ROOT / SAMPLE_DE / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = list(reader.fieldnames), list(reader)
    keep = []
    for region in REGIONS:
        for split, n in (("train", TRAIN_PER_REGION), ("test", TEST_PER_REGION)):
            keep += sorted((r for r in rows if r["region"] == region and r["split"] == split),
                           key=lambda r: r["file_name"])[:n]
    return fields, keep


def _copy_project(dest: Path) -> list[dict]:
    """The tracked and untracked-not-ignored files, without pipeline outputs and sample corpora; then the German
    subset: its clips, their sidecars, README and a metadata.csv of those rows. Returns the subset's rows."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if (not src.is_file() or rel.startswith(("metrics/", "models/", "data/sample/", f"{SAMPLE_DE}/"))
                or rel == "dvc.lock"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    fields, rows = _german_subset()
    corpus = dest / SAMPLE_DE
    for row in rows:
        audio = ROOT / SAMPLE_DE / row["file_name"]
        for path in [audio, *(audio.with_suffix(s) for s in (".txt", ".json") if audio.with_suffix(s).exists())]:
            (corpus / path.relative_to(ROOT / SAMPLE_DE)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, corpus / path.relative_to(ROOT / SAMPLE_DE))
    shutil.copy2(ROOT / SAMPLE_DE / "README.md", corpus / "README.md")
    with (corpus / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _german_params(profile: Path, base: Path) -> dict:
    """params-de.yaml with the CI reductions only."""
    params = yaml.safe_load(profile.read_text(encoding="utf-8"))
    params["base"]["source"] = str(base)
    params["finetune"].update(max_steps=2)
    params["evaluate"].update(max_new_tokens=8)
    return params


@pytest.fixture(scope="module")
def german_repo(tmp_path_factory, tiny_random_multilingual_dir) -> tuple[Path, str, list[dict], float]:
    repo = tmp_path_factory.mktemp("de_e2e") / "repo"
    repo.mkdir()
    rows = _copy_project(repo)
    params = _german_params(ROOT / "params-de.yaml", tiny_random_multilingual_dir)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "german e2e"], repo)
    t0 = time.monotonic()
    output = run(["dvc", "repro"], repo, timeout=3000)  # 13 stages; 1500 s ran out at load 10-16 on 2 cores
    return repo, output, rows, time.monotonic() - t0


def test_the_subset_is_committed_german_text(german_repo):
    _, _, rows, _ = german_repo
    assert {r["region"] for r in rows} == set(REGIONS) and len(rows) == 4 * (TRAIN_PER_REGION + TEST_PER_REGION)
    texts = []
    for row in rows:
        audio = ROOT / SAMPLE_DE / row["file_name"]
        txt, js = audio.with_suffix(".txt"), audio.with_suffix(".json")
        texts.append(txt.read_text(encoding="utf-8") if txt.exists() else json.loads(js.read_text("utf-8"))["text"])
    joined = " ".join(texts).lower()
    assert any(letter in joined for letter in "äöüß"), joined


def test_repro_runs_every_stage_of_the_german_profile(german_repo):
    repo, output, _, seconds = german_repo
    expected = {"base", "prepare", "aggregate", "evaluate@base", "evaluate@aggregated", "report"}
    expected |= {f"finetune@{c}" for c in REGIONS} | {f"evaluate_client@{c}" for c in REGIONS}
    assert stages_run(output) == expected
    print(f"german e2e: dvc repro took {seconds:.0f} s")


def test_prepare_splits_by_region_into_the_four_regions(german_repo):
    repo, _, _, _ = german_repo
    prepared = json.loads((repo / "metrics/prepare.json").read_text())
    assert sorted(p.name for p in (repo / "data/prepared").iterdir() if p.is_dir()) == sorted(REGIONS)
    for region in REGIONS:
        assert prepared[f"items/{region}/test"] == TEST_PER_REGION
        assert prepared[f"items/{region}/validation"] == 1
        assert prepared[f"items/{region}/train"] == TRAIN_PER_REGION - 1
    assert prepared.get("drops/missing_client", 0) == 0


def test_clients_train_on_german_labels_and_remember_de_transcribe(german_repo):
    repo, _, _, _ = german_repo
    for model in [*(f"clients/{c}" for c in REGIONS), "aggregated"]:
        gen = json.loads((repo / "models" / model / "generation_config.json").read_text())
        assert (gen.get("language"), gen.get("task")) == ("de", "transcribe"), model
    for region in REGIONS:
        summary = json.loads((repo / f"models/clients/{region}/training_summary.json").read_text())
        assert summary["label_prefix"] == ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"]
        assert summary["multilingual"] is True and summary["global_step"] == 2
        assert json.loads((repo / f"metrics/finetune/{region}.json").read_text())["global_step"] == 2


def test_evaluations_record_german_and_the_basic_normaliser(german_repo):
    repo, _, _, _ = german_repo
    for name in MODELS:
        metrics = json.loads((repo / f"metrics/eval/{name}.json").read_text())
        assert (metrics["language"], metrics["task"], metrics["normalizer"]) == ("de", "transcribe", "basic"), name
        assert metrics["backend"] == "ctranslate2" and metrics["n_samples"] == 4 * TEST_PER_REGION
        assert all(f"wer_{c}" in metrics for c in REGIONS), name
        with (repo / f"metrics/eval/{name}_predictions.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 4 * TEST_PER_REGION and {r["language"] for r in rows} == {"de"}, name
        assert any(ch in "".join(r["reference"] for r in rows) for ch in "äöüßÄÖÜ")  # references kept as written


def test_report_names_the_basic_normaliser_and_german(german_repo):
    repo, _, _, _ = german_repo
    report = (repo / "metrics/report.md").read_text(encoding="utf-8")
    assert "Whisper's basic (multilingual) normaliser; decoded with language `de`, task `transcribe`" in report
    assert "English normaliser" not in report
    assert all(f"`{c}`" in report or c in report for c in REGIONS)


def test_second_repro_runs_nothing(german_repo):
    repo, _, _, _ = german_repo
    assert stages_run(run(["dvc", "repro"], repo)) == set()


def test_language_auto_detects_per_clip(german_repo, tmp_path):
    """`--language auto` (evaluate.language null) on the profile's ctranslate2 backend: every clip's detected
    language is a Whisper code in the predictions CSV, and the metrics say the language was detected."""
    repo, _, _, _ = german_repo
    run([sys.executable, "stages/evaluate.py", "--model", "models/clients/de-m3", "--name", "auto", "--language",
         "auto", "--out_dir", str(tmp_path)], repo)
    metrics = json.loads((tmp_path / "auto.json").read_text())
    assert metrics["language"] is None and metrics["task"] == "transcribe"
    with (tmp_path / "auto_predictions.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * TEST_PER_REGION
    assert all(r["language"] in WHISPER_LANGUAGES for r in rows), [r["language"] for r in rows]
