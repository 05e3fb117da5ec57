"""Seed 000's average_runner.py drop-in: .pt in, D/model.pt out with no project and no --base; the order that presets
and weights apply in; W&B logging of the aggregate."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedwhisper.formats.naming import hf_to_openai
from fedwhisper.merge.presets import preset_weights
from test_aggregate_stage import client_state, run_stage  # tests/ is on sys.path under pytest
from test_evaluate_seed000 import _wandb_records

ROOT = Path(__file__).resolve().parents[1]
K = "model.decoder.layers.1.fc1.weight"
OK = hf_to_openai(K)
SEED_NAMES = ("wandering-river-4", "smart-smoke-5", "hearty-bee-7", "eager-haze-6")  # the seed's listed order


@pytest.fixture(scope="module")
def states(tiny_random_dir):
    base = load_file(str(tiny_random_dir / "model.safetensors"))
    return [client_state(base, s) for s in range(1, 5)]


def _openai_dims(tiny_random_dir):
    from transformers import WhisperConfig

    from fedwhisper.formats.openai_whisper import hf_config_to_dims

    return hf_config_to_dims(WhisperConfig.from_pretrained(tiny_random_dir))


def _write_pts(folder: Path, states, dims=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, s in zip(SEED_NAMES, states):
        sd = {hf_to_openai(k): v for k, v in s.items()}
        paths.append(folder / f"{name}.pt")
        torch.save(sd if dims is None else {"dims": dims, "model_state_dict": sd}, paths[-1])
    return paths


def _preset_with_distinct_weights(n=4) -> str:
    from fedwhisper.merge.presets import PRESETS

    for name in PRESETS:
        w = preset_weights(name, n)
        if len(set(w)) == n:
            return name
    raise AssertionError("no preset with four distinct weights")


def test_bare_pt_inputs_anywhere_write_a_bare_model_pt_in_listed_order(tmp_path, states, tiny_random_dir):
    """No params.yaml, no models/base, no --base: the seed's four bare state dicts, a preset applied in the listed
    (not sorted) order, and D/model.pt a bare openai-named state dict, as average_runner.py writes it."""
    pts = _write_pts(tmp_path / "checkpoints", states)
    preset = _preset_with_distinct_weights()
    w = preset_weights(preset, 4)
    out = tmp_path / "whisper-aggregated" / "custom"
    proc = run_stage(tmp_path, "--checkpoints", *pts, "--preset", preset, "--save_dir", out,
                     "--metrics", tmp_path / "agg.json", "--disable_wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    merged = torch.load(out / "model.pt", weights_only=True)
    assert "dims" not in merged and "model_state_dict" not in merged
    assert set(merged) == {hf_to_openai(k) for k in states[0]}
    total = sum(w)
    expected = sum(wi / total * s[K] for wi, s in zip(w, states))
    torch.testing.assert_close(merged[OK], expected)
    m = json.loads((tmp_path / "agg.json").read_text())
    assert m["client_order"] == ",".join(SEED_NAMES) and m["client_order_source"] == "--checkpoints"
    assert m["output"] == "model.pt (bare state dict)"
    assert m[f"weight/{SEED_NAMES[0]}"] == pytest.approx(w[0] / total, abs=1e-6)
    assert "client order (--checkpoints): wandering-river-4=" in proc.stderr

    import whisper  # the seed builds the architecture, then loads the bare state dict into it (strict)

    model = whisper.model.Whisper(whisper.model.ModelDimensions(**_openai_dims(tiny_random_dir)))
    model.load_state_dict(merged)
    torch.testing.assert_close(model.decoder.blocks[1].mlp[0].weight, expected)


def test_pt_inputs_with_dims_write_dims_and_load_in_openai_whisper(tmp_path, states, tiny_random_dir):
    dims = _openai_dims(tiny_random_dir)
    pts = _write_pts(tmp_path / "ckpt", states[:2], dims=dims)
    out = tmp_path / "D"
    proc = run_stage(tmp_path, "--checkpoints", *pts, "--weights", 1, 3, "--save_dir", out,
                     "--metrics", tmp_path / "agg.json", "--disable_wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    obj = torch.load(out / "model.pt", weights_only=True)
    assert obj["dims"] == dims
    torch.testing.assert_close(obj["model_state_dict"][OK], 0.25 * states[0][K] + 0.75 * states[1][K])
    import whisper

    model = whisper.load_model(str(out / "model.pt"), device="cpu")
    torch.testing.assert_close(model.decoder.blocks[1].mlp[0].weight, obj["model_state_dict"][OK])


def test_base_strategies_say_base_is_required_and_other_inputs_need_a_tokenizer(tmp_path, states, tiny_random_dir):
    pts = _write_pts(tmp_path / "ckpt", states[:2])
    proc = run_stage(tmp_path, "--checkpoints", *pts, "--strategy", "ties", "--save_dir", tmp_path / "D",
                     "--disable_wandb")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "strategy 'ties' merges deltas from the base, so --base DIR is required" in proc.stderr
    assert "these strategies do not need it: " in proc.stderr and "mean" in proc.stderr
    proc = run_stage(tmp_path, "--checkpoints", *pts, "--strategy", "mean", "--save_dir", tmp_path / "D2",
                     "--disable_wandb", "--params", tmp_path / "p.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"aggregation": {"screening": {"exclude": True}}}))
    proc = run_stage(tmp_path, "--checkpoints", *pts, "--save_dir", tmp_path / "D3", "--params", tmp_path / "p.yaml",
                     "--disable_wandb")
    assert proc.returncode == 2 and "screening.exclude measures each client's update from the base, so --base DIR" \
        " is required" in proc.stderr
    # HF inputs without a base: an HF dir is asked for, so a config and tokenizer are needed from somewhere
    from safetensors.torch import save_file

    st = tmp_path / "a.safetensors"
    save_file(states[0], str(st))
    proc = run_stage(tmp_path, "--checkpoints", st, pts[1], "--save_dir", tmp_path / "D4", "--disable_wandb")
    assert proc.returncode == 2 and "without --base only openai-whisper .pt inputs can be merged" in proc.stderr


def test_folder_with_weights_needs_an_explicit_order(tmp_path, states, tiny_random_dir):
    """External mode: a folder has no order; weights over it are refused with the sorted order and the fix shown, and
    aggregation.checkpoints gives the order, which is recorded."""
    shutil.copytree(tiny_random_dir, tmp_path / "models" / "base")
    pts = _write_pts(tmp_path / "checkpoints", states)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["aggregation"].update({"source": "checkpoints", "preset": _preset_with_distinct_weights()})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage(tmp_path, "--metrics", tmp_path / "agg.json", "--disable_wandb")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    sorted_order = ", ".join(str(Path("checkpoints") / f"{n}.pt") for n in sorted(SEED_NAMES))
    assert (f"aggregation.preset apply per client in order, but aggregation.source: checkpoints is a folder and gives "
            f"no order (sorted by name it would be: {sorted_order}); list the checkpoints") in proc.stderr
    assert "aggregation.checkpoints: [" in proc.stderr
    params["aggregation"]["checkpoints"] = [str(p.relative_to(tmp_path)) for p in pts]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage(tmp_path, "--metrics", tmp_path / "agg.json", "--disable_wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "agg.json").read_text())
    assert m["client_order"] == ",".join(SEED_NAMES) and m["client_order_source"] == "aggregation.checkpoints"
    w = preset_weights(params["aggregation"]["preset"], 4)
    assert [m[f"weight/{n}"] for n in SEED_NAMES] == pytest.approx([x / sum(w) for x in w], abs=1e-6)
    # unweighted over a folder: allowed, the sorted order is printed and recorded as such
    params["aggregation"].update({"checkpoints": None, "preset": None})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage(tmp_path, "--metrics", tmp_path / "agg.json", "--disable_wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "agg.json").read_text())
    assert m["client_order"] == ",".join(sorted(SEED_NAMES))
    assert m["client_order_source"].startswith("aggregation.source folder checkpoints, sorted by name")


def test_wandb_offline_run_holds_the_aggregate_metrics(tmp_path, states):
    pts = _write_pts(tmp_path / "ckpt", states[:2])
    env = dict(os.environ, WANDB_MODE="offline", WANDB_API_KEY="dummy", WANDB_SILENT="true",
               WANDB_DIR=str(tmp_path / "wb"), WANDB_CONFIG_DIR=str(tmp_path / "wb_config"),
               WANDB_CACHE_DIR=str(tmp_path / "wb_cache"), WANDB_DATA_DIR=str(tmp_path / "wb_data"))
    env.pop("WANDB_DISABLED", None)
    (tmp_path / "wb").mkdir()
    args = ["--checkpoints", *pts, "--weights", 1, 3, "--metrics", tmp_path / "agg.json"]
    proc = run_stage(tmp_path, *args, "--save_dir", tmp_path / "D0", "--disable_wandb", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "wb").iterdir())  # --disable_wandb wins over WANDB_API_KEY
    proc = run_stage(tmp_path, *args, "--save_dir", tmp_path / "D", "--wandb_run_name", "seed-agg", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "seed-agg" and runs[0].job_type == "aggregate"
    logged = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for i in r.history.item}
    m = json.loads((tmp_path / "agg.json").read_text())
    assert logged["strategy"] == "mean" and logged["client_order"] == m["client_order"]
    assert logged["weight/smart-smoke-5"] == pytest.approx(0.75)
