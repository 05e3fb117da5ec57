"""Short fine-tuning runs on tiny random Whisper models: outputs, determinism, resume, translate, param checks."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedwhisper.data.prepared import write_manifest, write_split
from fedwhisper.errors import ParamsError
from fedwhisper.formats.hf import read_state_dict
from fedwhisper.params import FinetuneParams
from fedwhisper.train.launch import launcher_command
from fedwhisper.train.resume import resume_point
from fedwhisper.train.trainer import run_finetune
from fedwhisper.train.training_args import check_precision, check_trainer_overrides

CLIENT = "c1"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
FAST = dict(max_steps=4, batch_size=2, eval_max_items=2, save_steps=2, learning_rate=1e-3, eval_steps=0,
            freeze_encoder=True)


def _rows(n: int, seed: int, split: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        samples = int(16000 * rng.uniform(0.5, 1.0))
        t = np.arange(samples) / 16000
        audio = (0.1 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * rng.standard_normal(samples)).astype(np.float32)
        text = " ".join(rng.choice(WORDS, size=3))
        rows.append({"id": f"{split}-{i:03d}", "client": CLIENT, "text": text, "audio": audio,
                     "duration_s": samples / 16000})
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    counts = {}
    for split, n, seed in [("train", 8, 0), ("validation", 2, 1), ("test", 2, 2)]:
        counts[split] = write_split(root / CLIENT / f"{split}.arrow", _rows(n, seed, split))
    write_manifest(root, {CLIENT: counts}, [CLIENT])
    return root


def finetune(tmp: Path, base: Path, data: Path, callbacks=(), **overrides) -> dict:
    ft = FinetuneParams(**{**FAST, **overrides})
    return run_finetune(ft, CLIENT, base_dir=base, data_root=data, out_root=tmp / "clients",
                        checkpoint_root=tmp / "checkpoints", metrics_root=tmp / "metrics", callbacks=callbacks)


def curve(tmp: Path, name: str) -> list[tuple[int, float]]:
    path = tmp / "metrics" / CLIENT / "plots" / "metrics" / f"{name}.tsv"
    with path.open() as f:
        return [(int(r["step"]), float(r[Path(name).name])) for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_random_dir, prepared):
    tmp = tmp_path_factory.mktemp("run_a")
    return tmp, finetune(tmp, tiny_random_dir, prepared)


def test_short_run_trains_decoder_and_writes_loadable_dir(run_a, tiny_random_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    tmp, metrics = run_a
    out = tmp / "clients" / CLIENT
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "preprocessor_config.json"]:
        assert (out / name).is_file(), name
    model = WhisperForConditionalGeneration.from_pretrained(str(out))
    WhisperProcessor.from_pretrained(str(out))
    assert model.config.d_model == 64
    base, tuned = read_state_dict(tiny_random_dir), read_state_dict(out)
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(k.startswith("model.decoder.") for k in changed)
    assert not any(k.startswith("model.encoder.") for k in changed)  # freeze_encoder: true
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["client"] == CLIENT and summary["train_samples"] == 8
    assert summary["global_step"] == 4 and summary["epochs"] == pytest.approx(1.0)
    on_disk = json.loads((tmp / "metrics" / f"{CLIENT}.json").read_text())
    assert on_disk == metrics
    assert isinstance(metrics["eval_wer"], float) and metrics["eval_items"] == 2
    assert not list((tmp / "clients").glob("*.tmp-*")) and not list((tmp / "clients").glob("*.staging-*"))


@pytest.mark.parametrize("frozen_layers", [0, 1])
def test_encoder_training_changes_exactly_the_unfrozen_layers(tmp_path, tiny_random_dir, prepared, frozen_layers):
    tmp = tmp_path / "run"
    finetune(tmp, tiny_random_dir, prepared, freeze_encoder=False, freeze_encoder_layers=frozen_layers)
    base, tuned = read_state_dict(tiny_random_dir), read_state_dict(tmp / "clients" / CLIENT)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    lower = {k for k in base if k.startswith(("model.encoder.conv", "model.encoder.layers.0."))}
    assert {k for k in base if k.startswith(("model.encoder.layers.1.", "model.encoder.layer_norm."))} <= changed
    assert any(k.startswith("model.decoder.") for k in changed)
    assert (lower <= changed) if frozen_layers == 0 else not (lower & changed)


def test_curves_are_logged_per_step_without_dvc_yaml(run_a):
    tmp, metrics = run_a
    assert [s for s, _ in curve(tmp, "train/loss")] == [1, 2, 3, 4]
    lr = curve(tmp, "train/learning_rate")
    assert lr[0][1] == pytest.approx(1e-3) and lr[-1][1] < lr[0][1]  # linear decay
    assert curve(tmp, "eval/wer") == [(4, pytest.approx(metrics["eval_wer"]))]
    assert not list(tmp.rglob("dvc.yaml"))


def test_same_seed_gives_identical_weights(run_a, tmp_path, tiny_random_dir, prepared):
    tmp_a, _ = run_a
    finetune(tmp_path, tiny_random_dir, prepared)
    a, b = read_state_dict(tmp_a / "clients" / CLIENT), read_state_dict(tmp_path / "clients" / CLIENT)
    assert all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def test_resume_continues_from_last_checkpoint(run_a, tmp_path, tiny_random_dir, prepared):
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Interrupt("killed")

    with pytest.raises(Interrupt):
        finetune(tmp_path, tiny_random_dir, prepared, callbacks=[StopAt3()])
    assert not (tmp_path / "clients" / CLIENT).exists()  # nothing half-written looks finished
    assert (tmp_path / "checkpoints" / CLIENT / "checkpoint-2").is_dir()
    metrics = finetune(tmp_path, tiny_random_dir, prepared)
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    assert [s for s, _ in curve(tmp_path, "train/loss")] == [1, 2, 3, 4]
    tmp_a, full = run_a
    a, b = read_state_dict(tmp_a / "clients" / CLIENT), read_state_dict(tmp_path / "clients" / CLIENT)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert metrics["train_samples"] == full["train_samples"]
    # A finished run keeps no trainer checkpoints (only the fingerprint), so the DVC output stays small.
    assert [p.name for p in (tmp_path / "checkpoints" / CLIENT).iterdir()] == ["fingerprint.json"]
    again = finetune(tmp_path, tiny_random_dir, prepared)  # re-run after a finished run: trains again, same result
    assert again["resumed_from_step"] == 0 and again["global_step"] == 4
    assert again["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)
    assert [s for s, _ in curve(tmp_path, "eval/wer")] == [4]  # the repeated final evaluation is not doubled
    assert not (tmp_path / "metrics" / CLIENT / "metrics.json").exists()  # no DVCLive summary next to the curves


def test_changed_params_do_not_resume_stale_checkpoints(tmp_path):
    ckpt = tmp_path / "ck"
    (ckpt / "checkpoint-2").mkdir(parents=True)
    (ckpt / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (ckpt / "checkpoint-4").mkdir()  # cut short: no trainer_state.json
    assert resume_point(ckpt, {"lr": 1}) is None  # no fingerprint on disk: not ours
    (ckpt / "checkpoint-2").mkdir()
    (ckpt / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (ckpt / "checkpoint-4").mkdir()
    assert resume_point(ckpt, {"lr": 1}) == ckpt / "checkpoint-2"
    assert not (ckpt / "checkpoint-4").exists()
    assert resume_point(ckpt, {"lr": 2}) is None and not (ckpt / "checkpoint-2").exists()


def test_translate_task_on_multilingual_model(tmp_path, tiny_random_multilingual_dir, prepared):
    from transformers import GenerationConfig, WhisperTokenizerFast

    from fedwhisper.data.prepared import load_split
    from fedwhisper.train.model_setup import load_base
    from fedwhisper.train.trainer import build_trainer

    ft = FinetuneParams(**{**FAST, "max_steps": 2, "language": "de", "task": "translate"})
    model, tok, multilingual = load_base(tiny_random_multilingual_dir)
    assert multilingual
    train = load_split(prepared, CLIENT, "train")
    trainer = build_trainer(ft, model, tok, multilingual, train, None, tmp_path / "ck")
    labels = trainer.data_collator([train.with_format("numpy")[0]])["labels"][0].tolist()
    assert tok.convert_ids_to_tokens(labels[:3]) == ["<|de|>", "<|translate|>", "<|notimestamps|>"]
    assert model.generation_config.task == "translate" and model.generation_config.language == "de"

    metrics = finetune(tmp_path, tiny_random_multilingual_dir, prepared, max_steps=2, language="de", task="translate")
    out = tmp_path / "clients" / CLIENT
    assert metrics["global_step"] == 2 and isinstance(metrics["eval_wer"], float)
    assert json.loads((out / "training_summary.json").read_text())["multilingual"] is True
    assert WhisperTokenizerFast.from_pretrained(str(out)).convert_tokens_to_ids("<|translate|>") == 50358
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.is_multilingual and (gen.language, gen.task) == ("de", "translate")  # decodes so outside the repo


def test_translate_on_english_only_model_is_refused(tmp_path, tiny_random_dir, prepared):
    with pytest.raises(ParamsError, match="finetune.task: 'translate' needs a multilingual base model"):
        finetune(tmp_path, tiny_random_dir, prepared, task="translate")


def test_param_checks():
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="finetune.precision: 'fp16' needs a CUDA GPU"):
            check_precision("fp16")
        with pytest.raises(ParamsError, match="finetune.precision: 'bf16' needs a CUDA GPU"):
            check_precision("bf16")
    check_precision("fp32")
    assert check_trainer_overrides({"dataloader_num_workers": 2, "push_to_hub": False}) == {
        "dataloader_num_workers": 2, "push_to_hub": False}
    with pytest.raises(ParamsError, match=r"finetune.trainer.dataloader_num_worker: .*did you mean dataloader_num_workers"):
        check_trainer_overrides({"dataloader_num_worker": 2})
    with pytest.raises(ParamsError, match="finetune.trainer.learning_rate: set by finetune.learning_rate"):
        check_trainer_overrides({"learning_rate": 1e-5})


def test_launcher_command():
    ft = FinetuneParams()
    assert launcher_command(ft, "stages/finetune.py", ["--client", "a"], env={}) is None
    acc = dataclasses.replace(ft, launcher="accelerate", num_processes=4)
    cmd = launcher_command(acc, "stages/finetune.py", ["--client", "a"], env={"FEDWHISPER_LAUNCH_ARGS": "--num_machines 2"})
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu",
                   "--num_machines", "2", "stages/finetune.py", "--client", "a"]
    tr = dataclasses.replace(ft, launcher="torchrun", num_processes=2)
    assert launcher_command(tr, "s.py", [], env={})[:5] == [sys.executable, "-m", "torch.distributed.run",
                                                           "--nproc_per_node", "2"]
    assert launcher_command(tr, "s.py", [], env={"LOCAL_RANK": "0"}) is None  # already a launched worker
    assert launcher_command(acc, "s.py", [], env={"FEDWHISPER_LAUNCHED": "1"}) is None  # 1-process accelerate worker


def test_accelerate_launch_runs_once(tmp_path, tiny_random_dir, prepared):
    """The stage under `accelerate launch` (one CPU process) trains once and does not launch itself again."""
    import subprocess
    import yaml

    root = Path(__file__).resolve().parents[1]
    params = {"clients": [CLIENT], "finetune": {**FAST, "max_steps": 1, "launcher": "accelerate", "num_processes": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(root / "stages" / "finetune.py"), "--client", CLIENT, "--params", "params.yaml",
           "--base", str(tiny_random_dir), "--data", str(prepared), "--out", "clients", "--checkpoints", "ck",
           "--metrics", "m"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "FEDWHISPER_LAUNCHED")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("finetune c1:") == 1
    assert json.loads((tmp_path / "m" / f"{CLIENT}.json").read_text())["global_step"] == 1


def test_encoder_cache_gives_the_same_loss(tiny_random_dir, prepared):
    from fedwhisper.data.prepared import load_split
    from fedwhisper.train.collator import WhisperCollator, label_prefix
    from fedwhisper.train.encoder_cache import cache_encoder_outputs, encoder_is_constant
    from fedwhisper.train.model_setup import load_base

    model, tok, _ = load_base(tiny_random_dir)
    ft = FinetuneParams(freeze_encoder=True)
    assert encoder_is_constant(model, ft)
    assert not encoder_is_constant(model, dataclasses.replace(ft, spec_augment=True))
    assert not encoder_is_constant(model, dataclasses.replace(ft, freeze_encoder=False))
    train = load_split(prepared, CLIENT, "train")
    cache = cache_encoder_outputs(model, train, batch_size=3)
    assert sorted(cache) == sorted(train["id"]) and cache_encoder_outputs(model, train, 3, max_bytes=1) is None
    prefix = label_prefix(tok, False, "en", "transcribe")
    collate = WhisperCollator(tok, prefix, 50256, model.config.decoder_start_token_id)
    rows = [train.with_format("numpy")[i] for i in (0, 5)]
    plain = collate(rows)
    collate.encoder_cache = cache
    cached = collate(rows)
    assert set(cached) == {"encoder_outputs", "labels"} and torch.equal(cached["labels"], plain["labels"])
    with torch.no_grad():
        a, b = model(**plain).loss, model(**cached).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_partly_frozen_encoder_cache_gives_the_same_loss_and_gradients(tiny_random_dir, prepared):
    """freeze_encoder_layers=N: the lower N layers' cached output + the upper layers equals the full encoder."""
    from fedwhisper.data.prepared import load_split
    from fedwhisper.errors import ParamsError
    from fedwhisper.train.collator import WhisperCollator, label_prefix
    from fedwhisper.train.encoder_cache import (LowerEncoderStates, cache_encoder_outputs, cacheable_encoder_depth,
                                                encoder_is_constant, finish_lower_encoder_states)
    from fedwhisper.train.model_setup import configure_model, load_base

    model, tok, _ = load_base(tiny_random_dir)
    ft = FinetuneParams(freeze_encoder=False, freeze_encoder_layers=1)
    assert cacheable_encoder_depth(model, ft) == 1 and not encoder_is_constant(model, ft)
    assert cacheable_encoder_depth(model, dataclasses.replace(ft, spec_augment=True)) == 0
    assert cacheable_encoder_depth(model, dataclasses.replace(ft, freeze_encoder_layers=0)) == 0
    with pytest.raises(ParamsError, match=r"finetune\.freeze_encoder_layers: 9, but the base model has 2 encoder"):
        configure_model(model, dataclasses.replace(ft, freeze_encoder_layers=9), False)
    configure_model(model, ft, False)
    enc = model.model.encoder
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert not any(n.startswith(("model.encoder.conv", "model.encoder.layers.0.")) for n in trainable)
    assert any(n.startswith("model.encoder.layers.1.") for n in trainable)
    assert "model.encoder.layer_norm.weight" in trainable and any(n.startswith("model.decoder.") for n in trainable)

    train = load_split(prepared, CLIENT, "train")
    cache = cache_encoder_outputs(model, train, batch_size=3, depth=1)
    assert sorted(cache) == sorted(train["id"])
    assert cache[str(train["id"][0])].shape == (model.config.max_source_positions, model.config.d_model)
    collate = WhisperCollator(tok, label_prefix(tok, False, "en", "transcribe"), 50256,
                              model.config.decoder_start_token_id)
    rows = [train.with_format("numpy")[i] for i in (0, 5)]
    plain = collate(rows)
    collate.encoder_cache, collate.cached_states = cache, LowerEncoderStates
    cached = collate(rows)
    assert set(cached) == {"encoder_outputs", "labels"} and isinstance(cached["encoder_outputs"], LowerEncoderStates)
    assert cached["encoder_outputs"].last_hidden_state.shape[1:] == (model.config.max_source_positions,
                                                                      model.config.d_model)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    a, grads_a = loss_and_grads(plain)
    hook = finish_lower_encoder_states(model, 1)
    b, grads_b = loss_and_grads(cached)
    assert a == pytest.approx(b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("model.encoder.layers.1.") for n in grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    # log-mel input still takes the whole encoder (validation generation)
    c, _ = loss_and_grads(plain)
    assert c == pytest.approx(a, rel=1e-6)
    # EncoderTop shares the encoder's modules and is not registered on the model: saved weights keep their names
    assert model.state_dict().keys() == load_base(tiny_random_dir)[0].state_dict().keys()
    hook.remove()


def test_encoder_cache_gives_the_same_validation_wer(tmp_path, tiny_random_dir, prepared):
    from fedwhisper.data.prepared import load_split
    from fedwhisper.train.model_setup import load_base
    from fedwhisper.train.trainer import build_trainer

    ft = FinetuneParams(**FAST)
    train, val = load_split(prepared, CLIENT, "train"), load_split(prepared, CLIENT, "validation")
    scores = []
    for cache in (False, True):
        model, tok, ml = load_base(tiny_random_dir)
        trainer = build_trainer(ft, model, tok, ml, train, val, tmp_path / str(cache), cache_encoder=cache)
        assert (trainer.data_collator.encoder_cache is not None) == cache
        if cache:
            assert set(val["id"]) <= set(trainer.data_collator.encoder_cache)
        scores.append(trainer.evaluate())
    assert scores[0]["eval_wer"] == scores[1]["eval_wer"]
    assert scores[0]["eval_loss"] == pytest.approx(scores[1]["eval_loss"], rel=1e-5)


def test_wandb_is_optional(monkeypatch):
    import importlib.util

    from fedwhisper.train.training_args import report_to

    real_find_spec = importlib.util.find_spec
    assert report_to(False) == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert report_to(True) == []  # not installed: DVCLive only, no error
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "wandb" else real_find_spec(name))
    assert report_to(True) == ["wandb"]
    monkeypatch.delenv("WANDB_API_KEY")
    assert report_to(True) == []  # installed but no key


def test_lower_encoder_cache_trains_to_the_same_weights(tmp_path, tiny_random_dir, prepared):
    """freeze_encoder_layers=1 through the Trainer: cached lower layers + EncoderTop train like the whole encoder."""
    from fedwhisper.data.prepared import load_split
    from fedwhisper.train.model_setup import load_base
    from fedwhisper.train.trainer import build_trainer

    ft = FinetuneParams(**{**FAST, "max_steps": 2, "freeze_encoder": False, "freeze_encoder_layers": 1})
    train = load_split(prepared, CLIENT, "train")
    runs = []
    for cache in (True, False):
        model, tok, ml = load_base(tiny_random_dir)
        trainer = build_trainer(ft, model, tok, ml, train, None, tmp_path / str(cache), cache_encoder=cache)
        assert (trainer.data_collator.encoder_cache is not None) == cache
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (cached_losses, cached), (plain_losses, plain) = runs
    assert len(cached_losses) == 2 and cached_losses == pytest.approx(plain_losses, rel=1e-6)
    base = read_state_dict(tiny_random_dir)
    upper = [k for k in base if k.startswith("model.encoder.layers.1.")]
    assert all(not torch.equal(cached[k], base[k]) for k in upper)  # the layer above the cache trained
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=0, atol=1e-6, msg=name)
