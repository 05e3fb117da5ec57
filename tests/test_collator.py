"""Label layout, decoder-start stripping, -100 padding and log-mel features of the training collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperTokenizerFast

from fedwhisper.errors import ParamsError
from fedwhisper.train.collator import (
    IGNORE_INDEX,
    WhisperCollator,
    label_ids,
    label_prefix,
    pad_labels,
    strip_decoder_start,
)


@pytest.fixture(scope="module")
def en_tok(tiny_random_dir):
    return WhisperTokenizerFast.from_pretrained(str(tiny_random_dir))


@pytest.fixture(scope="module")
def ml_tok(tiny_random_multilingual_dir):
    return WhisperTokenizerFast.from_pretrained(str(tiny_random_multilingual_dir))


def tokens(tok, ids):
    return tok.convert_ids_to_tokens([i for i in ids if i != IGNORE_INDEX])


def test_english_only_label_layout(en_tok):
    prefix = label_prefix(en_tok, multilingual=False, language="en", task="transcribe")
    eot = en_tok.convert_tokens_to_ids("<|endoftext|>")
    ids = label_ids(en_tok, "Hello world", prefix, eot)
    toks = tokens(en_tok, ids)
    assert toks[:2] == ["<|startoftranscript|>", "<|notimestamps|>"]
    assert toks[-1] == "<|endoftext|>"
    assert en_tok.decode(ids[2:-1]) == " Hello world"
    assert ids[0] == 50257 and ids[1] == 50362  # openai-whisper's tiny.en ids


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_multilingual_label_layout(ml_tok, task):
    prefix = label_prefix(ml_tok, multilingual=True, language="german", task=task)
    assert tokens(ml_tok, prefix) == ["<|startoftranscript|>", "<|de|>", f"<|{task}|>", "<|notimestamps|>"]
    assert prefix == [50258, 50261, 50359 if task == "transcribe" else 50358, 50363]


def test_prefix_errors_name_the_param(en_tok, ml_tok):
    with pytest.raises(ParamsError, match="finetune.task: 'translate' needs a multilingual"):
        label_prefix(en_tok, multilingual=False, language="en", task="translate")
    with pytest.raises(ParamsError, match="finetune.language: 'klingon' is not a Whisper language"):
        label_prefix(ml_tok, multilingual=True, language="klingon", task="transcribe")
    with pytest.raises(ParamsError, match="finetune.language: null"):
        label_prefix(ml_tok, multilingual=True, language=None, task="transcribe")


def test_strip_uses_decoder_start_not_bos(tiny_random_dir, en_tok):
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(str(tiny_random_dir))
    sot, eot = config.decoder_start_token_id, en_tok.convert_tokens_to_ids("<|endoftext|>")
    assert sot != config.bos_token_id  # the HF blog's strip compares with bos (= <|endoftext|>) and never fires
    rows = [[sot, 50362, 11, eot], [50362, 12, eot]]
    assert strip_decoder_start(rows, sot) == [[50362, 11, eot], [50362, 12, eot]]
    assert strip_decoder_start(rows, config.bos_token_id) == rows


def test_pad_labels_masks_padding_but_keeps_eot():
    eot = 50256
    out = pad_labels([[1, 2, eot], [3, eot]])
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, eot], [3, eot, IGNORE_INDEX]]


def test_collator_batch(tiny_random_dir, en_tok):
    prefix = label_prefix(en_tok, False, "en", "transcribe")
    eot = en_tok.convert_tokens_to_ids("<|endoftext|>")
    sot = en_tok.convert_tokens_to_ids("<|startoftranscript|>")
    collate = WhisperCollator(en_tok, prefix, eot, sot, num_mel_bins=80)
    rng = np.random.default_rng(0)
    rows = [{"audio": rng.standard_normal(16000).astype(np.float32) * 0.1, "text": "one two three four"},
            {"audio": rng.standard_normal(8000).astype(np.float32) * 0.1, "text": "five"}]
    batch = collate(rows)
    assert batch["input_features"].shape == (2, 80, 3000)
    labels = batch["labels"]
    assert labels.shape[0] == 2
    assert labels[0, 0].item() == 50362 and sot not in labels.tolist()[0]  # start token stripped
    short = labels[1].tolist()
    n = short.index(eot) + 1
    assert all(t == IGNORE_INDEX for t in short[n:]) and n < labels.shape[1]
    assert en_tok.decode(short[1 : n - 1]) == " five"
    # same log-mel as the feature extractor (within float tolerance), so training matches evaluation
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    ref = fe(rows[1]["audio"], sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.abs(batch["input_features"][1].numpy() - ref).max() < 1e-3
