"""Bad params, numbers and outputs met with one-line errors, and no lost or mismatched output."""

import errno
import importlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedwhisper.atomic import remove_stale_siblings
from fedwhisper.errors import CheckpointError, MergeError, ParamsError
from fedwhisper.merge import run_aggregate_stage
from fedwhisper.params import load_params, params_from_dict
from test_aggregate_stage import K, client_state, project, write_client_dir

aggregate_module = importlib.import_module("fedwhisper.merge.aggregate")
engine_module = importlib.import_module("fedwhisper.merge.engine")
ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "aggregate.py"


@pytest.fixture(scope="module")
def base_state(tiny_random_dir):
    return load_file(str(tiny_random_dir / "model.safetensors"))


@pytest.fixture
def four(tmp_path, tiny_random_dir, base_state, monkeypatch):
    """A project with clients a-d in models/clients and a first merge already in models/aggregated."""
    def make(aggregation=None):
        proj = project(tmp_path, tiny_random_dir, aggregation or {})
        for i, name in enumerate("abcd"):
            write_client_dir(proj / "models" / "clients" / name, tiny_random_dir, client_state(base_state, i))
        monkeypatch.chdir(proj)
        run_aggregate_stage("params.yaml")
        return proj
    return make


def snapshot():
    return (Path("models/aggregated/model.safetensors").read_bytes(), Path("metrics/aggregate.json").read_text())


def no_leftovers():
    return [p.name for d in (Path("models"), Path("metrics")) for p in d.iterdir()
            if ".tmp-" in p.name or ".old-" in p.name]


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def run_stage(cwd, *args, preexec_fn=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(STAGE), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=preexec_fn)


# --------------------------------------------------------------------------- params and numbers


@pytest.mark.parametrize("data, key", [
    ({"aggregation": {"lambda_": float("inf")}}, "aggregation.lambda_"),
    ({"finetune": {"learning_rate": float("inf")}}, "finetune.learning_rate"),
    ({"prepare": {"max_duration_s": float("-inf")}}, "prepare.max_duration_s"),
    ({"aggregation": {"weights": [1.0, float("inf")]}}, r"aggregation.weights\[1\]"),
])
def test_infinite_float_params_are_refused_naming_the_key(data, key):
    with pytest.raises(ParamsError, match=f"{key}: got -?inf; expected a finite number"):
        params_from_dict(data)


def test_infinite_yaml_value_is_refused_at_load(tmp_path):
    (tmp_path / "params.yaml").write_text("aggregation:\n  lambda_: .inf\n")
    with pytest.raises(ParamsError, match="aggregation.lambda_: got inf"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("text, message", [
    ("clients: [a]\naggregation: {}\nclients: [b]\n", "duplicate key 'clients' on line 3 (first on line 1)"),
    ("aggregation:\n  beta: 0.1\n  density: 0.2\n  beta: 0.3\n", "duplicate key 'beta' on line 4 (first on line 2)"),
])
def test_duplicate_keys_in_params_yaml_are_refused_with_key_and_line(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(err.value)


def test_huge_weights_do_not_overflow(four):
    four({"weights": [1e308] * 4})
    m = json.loads(Path("metrics/aggregate.json").read_text())
    assert [m[f"weight/{c}"] for c in "abcd"] == [0.25] * 4


def test_non_finite_merge_output_is_refused_naming_the_tensor_and_keeps_the_old_output(four):
    four()
    before = snapshot()
    with pytest.raises(MergeError, match=r"merged tensor '.+' has \d+ NaN/Inf values \(strategy task_arithmetic\)"):
        run_aggregate_stage("params.yaml", strategy="task_arithmetic", lambda_=1e39)
    assert snapshot() == before and no_leftovers() == []


# --------------------------------------------------------------------------- outputs


def test_out_equal_to_the_base_or_an_input_is_refused(four, tiny_random_dir):
    four()
    base_before = Path("models/base/model.safetensors").read_bytes()
    with pytest.raises(MergeError, match="--out models/base is --base"):
        run_aggregate_stage("params.yaml", out="models/base")
    with pytest.raises(MergeError, match=r"--out models/clients/b is an input \(models/clients/b\)"):
        run_aggregate_stage("params.yaml", out="models/clients/b")
    with pytest.raises(MergeError, match="overlaps"):
        run_aggregate_stage("params.yaml", out="models")
    assert Path("models/base/model.safetensors").read_bytes() == base_before
    assert Path("models/clients/b/model.safetensors").is_file()


def test_out_naming_an_existing_file_is_refused(four):
    four()
    Path("notes.txt").write_text("keep me")
    with pytest.raises(MergeError, match="--out notes.txt exists and is not a directory; it would be replaced"):
        run_aggregate_stage("params.yaml", out="notes.txt")
    assert Path("notes.txt").read_text() == "keep me"


def test_failed_metrics_write_keeps_the_old_model_and_metrics_together(four, monkeypatch):
    four()
    before = snapshot()
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("aggregate.json"):
            raise OSError(errno.EPERM, "Operation not permitted", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(aggregate_module.os, "replace", failing_replace)
    with pytest.raises(MergeError, match="metrics/aggregate.json: cannot write .*Operation not permitted"):
        run_aggregate_stage("params.yaml", weights=[1, 2, 3, 4])
    monkeypatch.setattr(aggregate_module.os, "replace", real_replace)
    assert snapshot() == before and no_leftovers() == []


def test_output_swap_killed_midway_is_restored_not_deleted(four, caplog):
    four()
    before = snapshot()
    pid = dead_pid()
    os.replace("models/aggregated", f"models/aggregated.old-{pid}")  # killed after out -> out.old, before tmp -> out
    with caplog.at_level(logging.WARNING):
        restored = remove_stale_siblings(Path("models/aggregated"))
    assert restored == [] and "restored models/aggregated" in caplog.text
    assert snapshot() == before and no_leftovers() == []
    # and a failing next run (non-finite output) leaves it there too
    os.replace("models/aggregated", f"models/aggregated.old-{pid}")
    with pytest.raises(MergeError):
        run_aggregate_stage("params.yaml", strategy="task_arithmetic", lambda_=1e39)
    assert snapshot() == before and no_leftovers() == []


def test_read_only_output_directory_or_parent_is_refused(four):
    four()
    before = snapshot()
    os.chmod("models/aggregated", 0o555)
    try:
        with pytest.raises(MergeError, match="models/aggregated: read-only directory; make it writable"):
            run_aggregate_stage("params.yaml", weights=[1, 2, 3, 4])
    finally:
        os.chmod("models/aggregated", 0o755)
    Path("ro").mkdir()
    os.chmod("ro", 0o555)
    try:
        with pytest.raises(MergeError, match="ro: read-only directory"):
            run_aggregate_stage("params.yaml", out="ro/merged")
    finally:
        os.chmod("ro", 0o755)
    assert snapshot() == before


def test_model_files_get_the_same_permissions_as_other_files(four):
    old = os.umask(0o022)
    try:
        four()
        modes = {p.name: p.stat().st_mode & 0o777 for p in Path("models/aggregated").iterdir()}
    finally:
        os.umask(old)
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_disk_full_during_the_merge_is_one_line_naming_the_file(four, monkeypatch):
    four()
    before = snapshot()

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(engine_module.SafetensorsStreamWriter, "write", full)
    with pytest.raises(MergeError, match=r"models/aggregated.tmp-\d+/model.safetensors: cannot write .*No space left"):
        run_aggregate_stage("params.yaml", weights=[1, 2, 3, 4])
    assert snapshot() == before and no_leftovers() == []


def test_file_size_limit_ends_in_one_line_error(four):
    proj = four()
    before = snapshot()
    limit = 64 << 10  # far below the merged model, above the small files

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run_stage(proj, "--weights", 1, 2, 3, 4, "--checkpoints", *[f"models/clients/{c}" for c in "abcd"],
                     "--names", *"abcd", preexec_fn=cap)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("aggregate: error: ") and "File too large" in lines[-1], lines[-1]
    assert "model.safetensors" in lines[-1]
    assert snapshot() == before


def test_malformed_index_and_unreadable_checkpoint_are_named(four, monkeypatch):
    four()
    c = Path("models/clients/c")
    (c / "model.safetensors").rename(c / "model-00001-of-00001.safetensors")
    (c / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="models/clients/c/model.safetensors.index.json: malformed shard index"):
        run_aggregate_stage("params.yaml")

    (c / "model.safetensors.index.json").unlink()
    (c / "model-00001-of-00001.safetensors").rename(c / "model.safetensors")
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith("clients/b/model.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointError, match="models/clients/b/model.safetensors: not readable "
                                              r"\(permission denied\)"):
        run_aggregate_stage("params.yaml")


@pytest.mark.parametrize("entry, why", [
    ("dangling", "a dangling symlink"),
    ("d.SAFETENSORS", "suffix '.SAFETENSORS'"),
    ("d.safetensor", "suffix '.safetensor'"),
])
def test_external_source_never_silently_merges_fewer_inputs(tmp_path, tiny_random_dir, base_state, monkeypatch,
                                                           entry, why):
    proj = project(tmp_path, tiny_random_dir, {"source": "checkpoints"}, clients=())
    ck = proj / "checkpoints"
    ck.mkdir()
    for i, name in enumerate("abc"):
        save_file(client_state(base_state, i), str(ck / f"{name}.safetensors"), metadata={"format": "pt"})
    if entry == "dangling":
        (ck / "d.safetensors").symlink_to(tmp_path / "gone.safetensors")
    else:
        save_file(client_state(base_state, 3), str(ck / entry), metadata={"format": "pt"})
    monkeypatch.chdir(proj)
    with pytest.raises(CheckpointError, match=f"checkpoints holds entries that look like checkpoints.*{why}"):
        run_aggregate_stage("params.yaml")


def test_external_source_logs_other_skipped_entries(tmp_path, tiny_random_dir, base_state, monkeypatch, caplog):
    proj = project(tmp_path, tiny_random_dir, {"source": "checkpoints"}, clients=())
    ck = proj / "checkpoints"
    ck.mkdir()
    for i, name in enumerate("ab"):
        save_file(client_state(base_state, i), str(ck / f"{name}.safetensors"), metadata={"format": "pt"})
    (ck / "README.txt").write_text("partners' models")
    (ck / "empty").mkdir()
    monkeypatch.chdir(proj)
    with caplog.at_level(logging.WARNING):
        m = run_aggregate_stage("params.yaml")
    assert m["n_inputs"] == 2
    assert "skipped in checkpoints: README.txt (not a checkpoint); empty/ (no model.safetensors" in caplog.text


def _dvc(cwd, *args, ok=True):
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT / "src"), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(dvc), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_failed_dvc_exp_run_keeps_the_merged_model_and_metrics(tmp_path, tiny_random_dir, base_state, monkeypatch):
    """DVC deletes a stage's outputs before its command runs, unless they persist (dvc.yaml)."""
    proj = project(tmp_path, tiny_random_dir, {"source": "checkpoints"}, clients=())
    shutil.copyfile(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(ROOT / "stages", proj / "stages")
    shutil.copytree(ROOT / "src" / "fedwhisper", proj / "src" / "fedwhisper",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "checkpoints").mkdir()
    for i, name in enumerate("abcd"):
        save_file(client_state(base_state, i), str(proj / "checkpoints" / f"{name}.safetensors"),
                  metadata={"format": "pt"})
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    _dvc(proj, "init", "-q")
    _dvc(proj, "add", "-q", "checkpoints")
    _dvc(proj, "commit", "-f", "-q", "base")  # models/base stands in for the base stage's output
    _dvc(proj, "repro", "-s", "aggregate")
    subprocess.run(["git", "add", "-A"], cwd=proj, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], cwd=proj, check=True)
    monkeypatch.chdir(proj)
    before = snapshot()
    out = _dvc(proj, "exp", "run", "-s", "aggregate", "-S", "aggregation.weights=[0.4,0.3,0.2]", ok=False)
    assert "aggregation.weights apply per client in order, but aggregation.source: checkpoints is a folder" in out
    assert snapshot() == before
