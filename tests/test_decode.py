import json

import numpy as np
import pytest
import torch
import whisper

from fedwhisper.__main__ import main as cli_main
from fedwhisper.audio import load_16k_mono
from fedwhisper.decode.backends import BACKENDS, DecodeOptions, open_backend
from fedwhisper.decode.features import log_mel_batch
from fedwhisper.decode.metrics import score_corpus
from fedwhisper.decode.transcribe import plan_batches, transcribe_audios
from fedwhisper.errors import CheckpointError, DecodeError

N_AGREE = 12  # sample test clips decoded by every backend (3 per accent)


@pytest.fixture(scope="module")
def agree_items(sample_items):
    by_accent = {}
    for it in sample_items:
        by_accent.setdefault(it["accent"], []).append(it)
    items = [it for group in by_accent.values() for it in group[: N_AGREE // len(by_accent)]]
    return items, [load_16k_mono(it["path"]) for it in items]


def test_plan_batches_sorts_longest_first_and_separates_long_clips():
    lengths = [16000, 48000, 500000, 32000, 480000, 8000]
    batches, long = plan_batches(lengths, batch_size=2)
    assert batches == [[4, 1], [3, 0], [5]]
    assert long == [2]


def test_log_mel_batch_matches_whisper_per_clip():
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16000 * s).astype(np.float32) * a for s, a in ((3, 0.1), (7, 0.5))]
    batch = log_mel_batch(clips)
    assert batch.shape == (2, 80, 3000)
    for i, clip in enumerate(clips):
        ref = whisper.log_mel_spectrogram(torch.from_numpy(clip), padding=whisper.audio.N_SAMPLES)[:, :3000]
        torch.testing.assert_close(batch[i], ref, atol=1e-4, rtol=1e-4)


def _log_mel_full_window(audios, n_mels=80):
    """The features computed the plain way: the STFT of every clip zero-padded to the whole 30 s window."""
    padded = torch.zeros(len(audios), whisper.audio.N_SAMPLES)
    for i, a in enumerate(audios):
        a = torch.from_numpy(np.asarray(a, np.float32)[: whisper.audio.N_SAMPLES])
        padded[i, : a.shape[0]] = a
    stft = torch.stft(padded, whisper.audio.N_FFT, whisper.audio.HOP_LENGTH, window=torch.hann_window(400),
                      return_complex=True)
    mel = whisper.audio.mel_filters("cpu", n_mels) @ (stft[..., :-1].abs() ** 2)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def test_log_mel_batch_is_bit_identical_to_the_full_window_stft():
    """The STFT runs only over the frames that overlap the audio; the result must not change by a single bit, for
    lengths at frame and window edges, alone and in mixed batches, with 80 and 128 mels."""
    rng = np.random.default_rng(2)
    lengths = [0, 1, 159, 160, 200, 201, 401, 16000 * 3 + 77, 479_599, 479_800, 479_999, 480_000, 500_000]
    clips = [rng.standard_normal(n).astype(np.float32) * 0.3 for n in lengths]
    for n_mels in (80, 128):
        for group in [[c] for c in clips] + [clips[:7], clips[6:10], clips]:
            assert torch.equal(log_mel_batch(group, n_mels), _log_mel_full_window(group, n_mels)), \
                [len(c) for c in group]


def test_log_mel_batch_matches_hf_feature_extractor(tiny_en_dir):
    from transformers import WhisperFeatureExtractor

    clip = np.random.default_rng(1).standard_normal(16000 * 4).astype(np.float32) * 0.2
    hf = WhisperFeatureExtractor.from_pretrained(tiny_en_dir)(clip, sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(log_mel_batch([clip])[0], hf.input_features[0], atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def backend_outputs(tiny_en_dir, agree_items):
    items, audios = agree_items
    out = {}
    for name in BACKENDS:
        with open_backend(name, tiny_en_dir, DecodeOptions()) as backend:
            out[name] = transcribe_audios(backend, audios, batch_size=8, progress=False).texts
    return out


def test_backends_agree_within_one_wer_point_on_sample(backend_outputs, agree_items):
    items, _ = agree_items
    refs = [it["text"] for it in items]
    wers = {name: score_corpus(refs, hyps)["wer"] for name, hyps in backend_outputs.items()}
    assert max(wers.values()) - min(wers.values()) <= 1.0, wers
    assert wers["transformers"] < 80.0, wers  # tiny.en really transcribes the clips


def test_batched_equals_one_at_a_time(tiny_en_dir, agree_items, backend_outputs):
    _, audios = agree_items
    with open_backend("transformers", tiny_en_dir, DecodeOptions()) as backend:
        single = [backend.decode_short([a])[0].text for a in audios[:3]]
    assert single == backend_outputs["transformers"][:3]


def test_ctranslate2_encodes_window_by_window_on_cpu_with_batched_results(tiny_en_dir, agree_items):
    """On CPU the ctranslate2 backend encodes one 30 s window at a time (faster there) and stacks the outputs: they
    must equal CTranslate2's batched encoder output, so the transcripts do not depend on the batch size."""
    import ctranslate2

    _, audios = agree_items
    with open_backend("ctranslate2", tiny_en_dir, DecodeOptions(device="cpu")) as backend:
        features = log_mel_batch(audios[:3], backend.n_mels).numpy()
        assert backend.model.encode.func.__name__ == "_encode_window_by_window"
        stacked = np.asarray(ctranslate2.StorageView.to_device(backend.model.encode(features), ctranslate2.Device.cpu))
        batched = np.asarray(backend.model.model.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
        assert stacked.shape == batched.shape == (3, 1500, 384)
        np.testing.assert_array_equal(stacked, batched)
        single = [backend.decode_short([a])[0].text for a in audios[:3]]
        assert [d.text for d in backend.decode_short(audios[:3])] == single


def _ct2_backend(model_dir, threads: int):
    """A ctranslate2 backend opened under ``threads`` torch threads (1: one model; more: one replica per thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backend = open_backend("ctranslate2", model_dir, DecodeOptions(device="cpu", compute_type="float32"))
        assert torch.get_num_threads() == threads  # opening CTranslate2 leaves torch's thread count alone
    finally:
        torch.set_num_threads(before)
    return backend


def test_ctranslate2_replicas_give_the_single_model_texts_in_input_order(tiny_en_dir, agree_items):
    """On CPU with 2 threads the batch is split round-robin over 2 single-threaded replicas: the texts must equal one
    single-threaded model's, clip for clip, for batch sizes that do and do not divide by the replica count."""
    _, audios = agree_items
    single, replicas = _ct2_backend(tiny_en_dir, 1), _ct2_backend(tiny_en_dir, 2)
    assert (single.replicas, replicas.replicas) == (1, 2)
    reference = [single.decode_short([a])[0].text for a in audios[:7]]
    assert len(set(reference)) == 7  # distinct clips, so a mix-up of the order would show
    for n in (1, 2, 5, 7):
        assert [d.text for d in replicas.decode_short(audios[:n])] == reference[:n], n
    shuffled = [6, 0, 3, 5, 1]
    assert [d.text for d in replicas.decode_short([audios[i] for i in shuffled])] == [reference[i] for i in shuffled]


def test_ctranslate2_replica_error_reaches_the_caller(tiny_en_dir, agree_items, monkeypatch):
    """An error inside one replica's thread is raised in the caller, not lost or hung on."""
    _, audios = agree_items
    backend = _ct2_backend(tiny_en_dir, 2)
    calls = []

    def failing(batch):
        calls.append(len(batch))
        raise RuntimeError("replica failed")

    monkeypatch.setattr(backend, "_decode_batch", failing)
    with pytest.raises(RuntimeError, match="replica failed"):
        backend.decode_short(audios[:4])
    assert sorted(calls) == [2, 2]


@pytest.mark.parametrize("name", BACKENDS)
def test_long_audio_is_transcribed_in_full(tiny_en_dir, sample_items, name):
    four = [sample_items[0], sample_items[40], sample_items[80], sample_items[119]]
    picks = four * 2 + four[:2]
    gap = np.zeros(8000, np.float32)
    audio = np.concatenate([x for it in picks for x in (load_16k_mono(it["path"]), gap)])
    assert len(audio) > 30 * 16000
    with open_backend(name, tiny_en_dir, DecodeOptions()) as backend:
        text = transcribe_audios(backend, [audio], batch_size=4, progress=False).texts[0]
    ref = " ".join(it["text"] for it in picks)
    scores = score_corpus([ref], [text])
    assert scores["deletions"] < 0.2 * scores["ref_words"], (text, scores)  # nothing after 30 s is dropped
    first_window = score_corpus([ref], [text[: len(text) // 3]])
    assert scores["hits"] > first_window["hits"] + 15


def test_open_backend_errors(tmp_path, tiny_random_dir):
    with pytest.raises(DecodeError, match="evaluate.backend.*'whisperx'"):
        open_backend("whisperx", tiny_random_dir)
    with pytest.raises(CheckpointError, match="no config.json"):
        open_backend("transformers", tmp_path)


def test_transcribe_cli_prints_text_and_json(tiny_en_dir, sample_items, capsys, tmp_path):
    paths = [str(sample_items[0]["path"]), str(sample_items[1]["path"])]
    params = tmp_path / "none.yaml"
    params.write_text("evaluate:\n  batch_size: 2\n")
    assert cli_main(["transcribe", "--model", str(tiny_en_dir), "--params", str(params), "--json", *paths]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == paths
    refs = [it["text"] for it in sample_items[:2]]
    assert score_corpus(refs, [r["text"] for r in results])["wer"] < 80.0
    assert cli_main(["transcribe", "--model", str(tiny_en_dir), "--params", str(params), paths[0]]) == 0
    assert capsys.readouterr().out.strip() == results[0]["text"]


def test_transcribe_cli_reports_missing_audio(tiny_random_dir, capsys, tmp_path):
    assert cli_main(["transcribe", "--model", str(tiny_random_dir), str(tmp_path / "nope.wav")]) == 1
    assert "nope.wav" in capsys.readouterr().err


def test_transformers_backend_refuses_a_model_dir_without_tokenizer(tiny_random_dir, tmp_path):
    """Without tokenizer files AutoTokenizer builds an empty tokenizer and every transcript is ''; refuse instead."""
    import shutil

    from fedwhisper.formats.hf import TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(tiny_random_dir, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    with pytest.raises(CheckpointError, match=rf"{bare}: no tokenizer files \(tokenizer.json, or vocab.json and"):
        open_backend("transformers", bare, DecodeOptions(device="cpu"))


def test_language_on_an_english_only_model_warns_once(tiny_random_dir, tiny_random_multilingual_dir, caplog):
    with caplog.at_level("WARNING", logger="fedwhisper.decode.backends"):
        open_backend("transformers", tiny_random_dir, DecodeOptions(language="de", device="cpu")).close()
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{tiny_random_dir} is an English-only model: language 'de' is ignored and it transcribes English; use a "
        "multilingual model for 'de'"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedwhisper.decode.backends"):
        open_backend("transformers", tiny_random_dir, DecodeOptions(language="en", device="cpu")).close()
        open_backend("transformers", tiny_random_multilingual_dir, DecodeOptions(language="de", device="cpu")).close()
    assert caplog.records == []


def write_bad_clips(folder):
    import soundfile as sf

    nan = np.full(1600, 0.1, np.float32)
    nan[3] = np.nan
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    (folder / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 8)
    return folder / "nan.wav", folder / "empty.wav", folder / "garbage.wav"


FAST = ["--backend", "transformers", "--device", "cpu", "--max_new_tokens", "3"]


def test_transcribe_refuses_nan_and_empty_audio_naming_the_file(tiny_random_dir, tmp_path, capsys):
    nan, empty, _ = write_bad_clips(tmp_path)
    assert cli_main(["transcribe", "--model", str(tiny_random_dir), *FAST, str(nan)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"transcribe: error: {nan}: 1 NaN/Inf samples; re-export or remove the file"
    assert cli_main(["transcribe", "--model", str(tiny_random_dir), *FAST, str(empty), str(nan)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"transcribe: error: {empty}: audio has zero samples; re-export or remove the file; or pass "
                   "--skip-bad to transcribe the other files")


def test_transcribe_skip_bad_transcribes_the_rest_and_reports(tiny_random_dir, sample_items, tmp_path, capsys):
    nan, empty, garbage = write_bad_clips(tmp_path)
    good = str(sample_items[0]["path"])
    files = [str(nan), good, str(tmp_path / "missing.wav"), str(empty), str(garbage)]
    assert cli_main(["transcribe", "--model", str(tiny_random_dir), *FAST, "--skip-bad", *files]) == 1
    out = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.out.splitlines()] == [good]
    err = [line for line in out.err.splitlines() if "skipped" in line]  # not the progress bars
    assert len(err) == 5, out.err
    assert err[:4] == [
        f"transcribe: skipped {nan}: 1 NaN/Inf samples; re-export or remove the file",
        f"transcribe: skipped {tmp_path / 'missing.wav'}: audio file not found; check the path",
        f"transcribe: skipped {empty}: audio has zero samples; re-export or remove the file",
        f"transcribe: skipped {garbage}: cannot decode audio" + err[3].split("cannot decode audio")[1],
    ]
    assert err[4] == "transcribe: 4 of 5 files skipped, 1 transcribed"
    assert cli_main(["transcribe", "--model", str(tiny_random_dir), *FAST, "--skip-bad", "--json", good]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["file"] == good and result["duration_s"] > 0


# --------------------------------------------------------------------------- language auto-detect


def _noise_clips(seconds=(2, 3)):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(16000 * s).astype(np.float32) * 0.1 for s in seconds]


def test_auto_detect_runs_on_every_backend_and_they_detect_the_same_language(tiny_random_multilingual_dir):
    """language None on a multilingual model: every backend decodes (ctranslate2 used to raise "'None' is not a
    valid language code"), reports a Whisper language per clip, short and long, and all three agree on it."""
    from fedwhisper.params import WHISPER_LANGUAGES

    clips = _noise_clips() + [np.random.default_rng(1).standard_normal(16000 * 31).astype(np.float32) * 0.1]
    detected = {}
    for name in BACKENDS:
        with open_backend(name, tiny_random_multilingual_dir,
                          DecodeOptions(language=None, device="cpu", max_new_tokens=4)) as backend:
            result = transcribe_audios(backend, clips, batch_size=4, progress=False)
        assert len(result.texts) == len(result.languages) == 3
        assert all(lang in WHISPER_LANGUAGES for lang in result.languages), (name, result.languages)
        detected[name] = result.languages
    assert detected["openai-whisper"] == detected["transformers"] == detected["ctranslate2"], detected


@pytest.mark.parametrize("name", BACKENDS)
def test_fixed_language_is_reported_as_given(tiny_random_multilingual_dir, tiny_random_dir, name):
    with open_backend(name, tiny_random_multilingual_dir,
                      DecodeOptions(language="de", device="cpu", max_new_tokens=4)) as backend:
        assert [d.language for d in backend.decode_short(_noise_clips())] == ["de", "de"]
    # an English-only model has no language tokens: null (auto) means English
    with open_backend(name, tiny_random_dir, DecodeOptions(language=None, device="cpu", max_new_tokens=4)) as backend:
        assert [d.language for d in backend.decode_short(_noise_clips())] == ["en", "en"]


def test_transcribe_cli_language_auto_detects_per_clip_with_the_real_multilingual_base(tmp_path, sample_items,
                                                                                       capsys):
    """`--language auto` on the bundled whisper-base with the default ctranslate2 backend: a German and an English
    clip in one batch are detected as de and en, and transcribed in their own language."""
    from pathlib import Path

    from fedwhisper.formats.base_model import BUNDLED_MULTILINGUAL, materialize_base

    model = materialize_base(BUNDLED_MULTILINGUAL, tmp_path / "base")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  batch_size: 4\n")
    german = Path(__file__).resolve().parents[1] / "data" / "sample-de" / "test" / "de-m3_test_009.mp3"
    english = sample_items[0]["path"]
    assert cli_main(["transcribe", "--model", str(model), "--params", str(params), "--backend",
                     "ctranslate2", "--device", "cpu", "--language", "auto", "--json", str(german),
                     str(english)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["language"] for r in results] == ["de", "en"], results
    assert results[0]["text"].lower().startswith("ich möchte"), results[0]
    assert score_corpus([sample_items[0]["text"]], [results[1]["text"]])["wer"] < 50.0, results[1]


def test_language_flag_refuses_invalid_codes(tmp_path, tiny_random_multilingual_dir, capsys):
    from fedwhisper.decode.settings import evaluate_params_with_overrides
    from fedwhisper.errors import ParamsError

    none = tmp_path / "params.yaml"
    none.write_text("evaluate:\n  batch_size: 4\n")
    assert evaluate_params_with_overrides(none, {"language": "auto"}).language is None
    assert evaluate_params_with_overrides(none, {"language": "de"}).language == "de"
    with pytest.raises(ParamsError, match=r"evaluate.language: got 'german' \(did you mean 'de'\?\)"):
        evaluate_params_with_overrides(none, {"language": "german"})
    clip = tmp_path / "clip.wav"
    import soundfile

    soundfile.write(clip, _noise_clips((1,))[0], 16000)
    assert cli_main(["transcribe", "--model", str(tiny_random_multilingual_dir), "--params", str(none),
                     "--language", "xx", str(clip)]) == 1
    assert "evaluate.language: got 'xx'" in capsys.readouterr().err
