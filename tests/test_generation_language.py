"""Fine-tuned and merged multilingual models remember the language and task they decode in
(generation_config.json), so that decoding them outside the project does not fall back to en/transcribe."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from fedwhisper.formats.hf import carry_generation_language, with_generation_language

ROOT = Path(__file__).resolve().parents[1]


def _client(path: Path, model_dir: Path, seed: int, language, task) -> Path:
    """A client directory: ``model_dir``'s files, perturbed weights, generation config with language/task."""
    shutil.copytree(model_dir, path)
    state = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    gen = GenerationConfig.from_pretrained(model_dir)
    with_generation_language(gen, language, task).save_pretrained(path)
    return path


def test_with_generation_language_sets_multilingual_and_keeps_english_only(tiny_random_dir,
                                                                            tiny_random_multilingual_dir):
    ml = GenerationConfig.from_pretrained(tiny_random_multilingual_dir)
    out = with_generation_language(ml, "de", "translate")
    assert (out.language, out.task) == ("de", "translate")
    assert getattr(ml, "language", None) is None  # a copy: the input is untouched
    en = GenerationConfig.from_pretrained(tiny_random_dir)
    assert with_generation_language(en, "de", "translate") is en


def test_carry_generation_language_only_when_all_sources_agree(tmp_path, tiny_random_multilingual_dir):
    a = _client(tmp_path / "a", tiny_random_multilingual_dir, 1, "de", "transcribe")
    b = _client(tmp_path / "b", tiny_random_multilingual_dir, 2, "de", "transcribe")
    c = _client(tmp_path / "c", tiny_random_multilingual_dir, 3, "fr", "transcribe")
    out = tmp_path / "out"
    shutil.copytree(tiny_random_multilingual_dir, out)
    before = (out / "generation_config.json").read_text()
    assert carry_generation_language(out, [a, c]) is None
    assert (out / "generation_config.json").read_text() == before  # the clients disagree: the base's is kept
    assert carry_generation_language(out, [a, b]) == ("de", "transcribe")
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["language"], gen["task"]) == ("de", "transcribe")


def test_aggregate_writes_the_clients_language_and_task(tmp_path, tiny_random_multilingual_dir):
    """The merged model gets the config files from the base (which has no language) and the clients' language and
    task in its generation config; the weights are still the merge."""
    a = _client(tmp_path / "a", tiny_random_multilingual_dir, 1, "de", "translate")
    b = _client(tmp_path / "b", tiny_random_multilingual_dir, 2, "de", "translate")
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "aggregate.py"), "--checkpoints", str(a), str(b), "--weights", "1",
         "1", "--save_dir", str(out), "--base", str(tiny_random_multilingual_dir), "--metrics",
         str(tmp_path / "agg.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = GenerationConfig.from_pretrained(out)
    assert gen.is_multilingual and (gen.language, gen.task) == ("de", "translate")
    key = "model.decoder.layers.1.fc1.weight"
    merged = load_file(str(out / "model.safetensors"))[key]
    torch.testing.assert_close(merged, 0.5 * (load_file(str(a / "model.safetensors"))[key]
                                              + load_file(str(b / "model.safetensors"))[key]))


def test_english_only_export_keeps_the_base_generation_config(tmp_path, tiny_random_dir):
    """An English-only client (no language/task attributes on its generation config) exports with the base's
    generation config unchanged, and its weights as trained."""
    from fedwhisper.params import FinetuneParams
    from fedwhisper.train.model_setup import configure_model, load_base
    from fedwhisper.train.trainer import export_client_model

    model, _, multilingual = load_base(tiny_random_dir)
    configure_model(model, FinetuneParams(), multilingual)
    out = export_client_model(model, tiny_random_dir, tmp_path / "client", {"train_samples": 1})
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((tiny_random_dir / "generation_config.json").read_text())
    assert (out / "model.safetensors").read_bytes() == (tiny_random_dir / "model.safetensors").read_bytes()
