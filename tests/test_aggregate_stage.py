"""The aggregate stage: seed CLI parity, params-driven runs (weights, presets, fedavg), external mode with DVC."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fedwhisper.errors import MergeError
from fedwhisper.formats.naming import hf_to_openai
from fedwhisper.merge import run_aggregate_stage

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "aggregate.py"
K = "model.decoder.layers.1.fc1.weight"
EMB = "model.decoder.embed_tokens.weight"


@pytest.fixture(scope="module")
def base_state(tiny_random_dir):
    return load_file(str(tiny_random_dir / "model.safetensors"))


def client_state(base, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def write_client_dir(path: Path, base_dir: Path, state, train_samples=None):
    path.mkdir(parents=True)
    shutil.copyfile(base_dir / "config.json", path / "config.json")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if train_samples is not None:
        (path / "training_summary.json").write_text(json.dumps({"train_samples": train_samples}))
    return path


def project(tmp_path, tiny_random_dir, aggregation, clients=("a", "b", "c", "d")):
    """A project dir: params.yaml, models/base and (for names in clients) nothing else yet."""
    shutil.copytree(tiny_random_dir, tmp_path / "models" / "base")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["clients"] = list(clients)
    params["aggregation"].update(aggregation)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run_stage(cwd, *args, env=None):
    return subprocess.run([sys.executable, str(STAGE), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_seed_cli_parity_pt_inputs_to_hf_dir_and_openai_export(tmp_path, tiny_random_dir, base_state):
    states = [client_state(base_state, s) for s in (1, 2)]
    pts = []
    for name, s in zip(("wandering-river-4", "smart-smoke-5"), states):  # seed 000: bare openai-named state dicts
        pts.append(tmp_path / f"{name}.pt")
        torch.save({hf_to_openai(k): v for k, v in s.items()}, pts[-1])
    out = tmp_path / "whisper-aggregated" / "custom"
    proc = run_stage(tmp_path, "--checkpoints", *pts, "--weights", 1, 3, "--save_dir", out,
                     "--base", tiny_random_dir, "--export-openai", "--metrics", tmp_path / "agg.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aggregate: mean (weights) over 2/2 clients" in proc.stderr
    for f in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json", "model.pt"):
        assert (out / f).is_file(), f
    assert not list(out.parent.glob("custom.tmp-*"))
    merged = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(merged[K], 0.25 * states[0][K] + 0.75 * states[1][K])

    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(model.proj_out.weight, merged[EMB])  # tied weights re-tied on load

    import whisper

    ow = whisper.load_model(str(out / "model.pt"), device="cpu")
    torch.testing.assert_close(ow.decoder.blocks[1].mlp[0].weight, merged[K])
    metrics = json.loads((tmp_path / "agg.json").read_text())
    assert metrics["weight/wandering-river-4"] == 0.25 and metrics["weight/smart-smoke-5"] == 0.75
    assert len(metrics["sha256/smart-smoke-5"]) == 64


def test_cli_errors_are_clean(tmp_path, tiny_random_dir, base_state):
    a = tmp_path / "a.safetensors"
    save_file(base_state, str(a))
    proc = run_stage(tmp_path, "--checkpoints", a, a, "--names", "x", "y", "--weights", 0.5, -0.5,
                     "--base", tiny_random_dir)
    assert proc.returncode == 2
    assert "aggregate: error: aggregation.weights[1]: got -0.5; weights must be non-negative" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_params_weights_and_presets_and_unread_zero_weight_client(tmp_path, tiny_random_dir, base_state, monkeypatch):
    proj = project(tmp_path, tiny_random_dir, {"weights": [0.4, 0.3, 0.2, 0.1]})
    states = [client_state(base_state, s) for s in range(4)]
    for name, s in zip("abcd", states):
        write_client_dir(proj / "models" / "clients" / name, tiny_random_dir, s)
    monkeypatch.chdir(proj)
    m = run_aggregate_stage("params.yaml")
    assert [m[f"weight/{c}"] for c in "abcd"] == [0.4, 0.3, 0.2, 0.1]
    merged = load_file("models/aggregated/model.safetensors")
    torch.testing.assert_close(merged[K], sum(w * s[K] for w, s in zip([0.4, 0.3, 0.2, 0.1], states)))
    assert json.loads(Path("metrics/aggregate.json").read_text())["weight_source"] == "weights"

    # split_cluster_A = [.5, .5, 0, 0]: c and d are never opened, so a broken file there does not matter
    (proj / "models" / "clients" / "d" / "model.safetensors").write_bytes(b"garbage")
    m = run_aggregate_stage("params.yaml", preset="split_cluster_A")
    assert m["read/d"] is False and m["weight/d"] == 0.0 and "sha256/d" not in m
    torch.testing.assert_close(load_file("models/aggregated/model.safetensors")[K], (states[0][K] + states[1][K]) / 2)

    with pytest.raises(MergeError, match="aggregation.preset: unknown preset 'nope'"):
        run_aggregate_stage("params.yaml", preset="nope")


def test_fedavg_weights_by_train_samples(tmp_path, tiny_random_dir, base_state, monkeypatch):
    proj = project(tmp_path, tiny_random_dir, {"strategy": "fedavg"}, clients=("a", "b", "c"))
    states = [client_state(base_state, s) for s in range(3)]
    for name, s, n in zip("abc", states, (10, 30, 60)):
        write_client_dir(proj / "models" / "clients" / name, tiny_random_dir, s, train_samples=n)
    monkeypatch.chdir(proj)
    m = run_aggregate_stage("params.yaml")
    assert [m[f"weight/{c}"] for c in "abc"] == [0.1, 0.3, 0.6]
    torch.testing.assert_close(load_file("models/aggregated/model.safetensors")[K],
                               0.1 * states[0][K] + 0.3 * states[1][K] + 0.6 * states[2][K])
    os.remove(proj / "models" / "clients" / "b" / "training_summary.json")
    with pytest.raises(MergeError, match="fedavg needs the train sample count of client 'b'"):
        run_aggregate_stage("params.yaml", metrics=None)
    # prepare's manifest is the fallback
    (proj / "data" / "prepared").mkdir(parents=True)
    (proj / "data" / "prepared" / "manifest.json").write_text(json.dumps({"splits": {"b": {"train": 130}}}))
    m = run_aggregate_stage("params.yaml")
    assert m["weight/b"] == 0.65


def test_screening_metrics_and_exclusion_of_a_seeded_bad_client(tmp_path, tiny_random_dir, base_state, monkeypatch):
    proj = project(tmp_path, tiny_random_dir, {"screening": {"exclude": True}})
    states = [client_state(base_state, s) for s in range(3)] + [client_state(base_state, 99, scale=1.0)]
    for name, s in zip("abcd", states):
        write_client_dir(proj / "models" / "clients" / name, tiny_random_dir, s)
    monkeypatch.chdir(proj)
    m = run_aggregate_stage("params.yaml")
    assert m["excluded/d"] is True and m["weight/d"] == 0.0 and "norm" in m["flag_reason/d"]
    assert [m[f"excluded/{c}"] for c in "abc"] == [False] * 3
    assert m["l2_to_base/d"] > 10 * m["l2_to_base/a"] and m["nonfinite/a"] == 0
    assert -1.0 <= m["cosine_to_mean/a"] <= 1.0
    torch.testing.assert_close(load_file("models/aggregated/model.safetensors")[K],
                               sum(s[K] for s in states[:3]) / 3)


def _dvc(cwd, *args):
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(dvc), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_external_mode_with_dvc_add_and_no_finetune(tmp_path, tiny_random_dir, base_state):
    """A user holding only partners' checkpoints (seed 000's checkpoints/ folder) runs aggregate under DVC."""
    names = ["wandering-river-4", "smart-smoke-5", "hearty-bee-7", "eager-haze-6"]  # the seed's order, not sorted
    proj = project(tmp_path, tiny_random_dir, {"source": "checkpoints", "preset": "bias_best_light",
                                               "checkpoints": [f"checkpoints/{n}.pt" for n in names]})
    shutil.copyfile(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(ROOT / "stages", proj / "stages")
    shutil.copytree(ROOT / "src" / "fedwhisper", proj / "src" / "fedwhisper",
                    ignore=shutil.ignore_patterns("__pycache__"))  # the stage's deps
    states = [client_state(base_state, s) for s in range(4)]
    (proj / "checkpoints").mkdir()
    for name, s in zip(names, states):
        torch.save({hf_to_openai(k): v for k, v in s.items()}, proj / "checkpoints" / f"{name}.pt")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    _dvc(proj, "init", "-q")
    _dvc(proj, "add", "-q", "checkpoints")
    dag = _dvc(proj, "dag", "--md", "aggregate")
    assert "finetune" not in dag and "prepare" not in dag and "base" in dag
    # models/base stands in for the base stage's output here; -s runs only aggregate
    _dvc(proj, "repro", "-s", "aggregate")
    m = json.loads((proj / "metrics" / "aggregate.json").read_text())
    assert [m[f"weight/{n}"] for n in names] == [0.4, 0.3, 0.2, 0.1]
    assert m["client_order"] == ",".join(names) and m["client_order_source"] == "aggregation.checkpoints"
    torch.testing.assert_close(load_file(str(proj / "models" / "aggregated" / "model.safetensors"))[K],
                               sum(w * s[K] for w, s in zip([0.4, 0.3, 0.2, 0.1], states)))
    shown = _dvc(proj, "metrics", "show", "--json")
    assert "weight/eager-haze-6" in shown
