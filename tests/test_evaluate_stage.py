import csv
import importlib.util
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from fedwhisper.audio import load_16k_mono
from fedwhisper.data.prepared import write_manifest, write_split
from fedwhisper.decode.evaluate import Predictions, score_predictions

ROOT = Path(__file__).resolve().parents[1]


def _stage():
    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "stages" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _picks(sample_items, per_accent=2):
    by_accent = {}
    for it in sample_items:
        by_accent.setdefault(it["accent"], []).append(it)
    return {acc: items[:per_accent] for acc, items in list(by_accent.items())[:2]}


@pytest.fixture()
def prepared(tmp_path, sample_items):
    """Two clients with two sample clips each, plus one clip whose reference is empty."""
    root = tmp_path / "prepared"
    picks = _picks(sample_items)
    for client, items in picks.items():
        rows = []
        for it in items:
            audio = load_16k_mono(it["path"])
            rows.append({"id": Path(it["path"]).stem, "client": client, "text": it["text"], "audio": audio,
                         "duration_s": len(audio) / 16000})
        if client == list(picks)[0]:
            rows.append({**rows[0], "id": rows[0]["id"] + "_noref", "text": ""})
        write_split(root / client / "test.arrow", sorted(rows, key=lambda r: r["id"]))
    write_manifest(root, {c: {"test": len(v) + (i == 0)} for i, (c, v) in enumerate(picks.items())}, list(picks))
    return root, picks


def test_per_group_scores_are_corpus_level():
    pred = Predictions(
        ids=["1", "2", "3"], clients=["a", "a", "b"], durations=[1.0, 1.0, 1.0],
        references=["one", "two three four five six seven eight nine ten eleven", "x y"],
        hypotheses=["wrong", "two three four five six seven eight nine ten eleven", "x y"],
        audio_seconds=3.0, decode_seconds=1.5,
    )
    m = score_predictions(pred, "none")
    assert m["wer_a"] == pytest.approx(100 / 11)  # 1 error / 11 words, not the utterance mean (50)
    assert m["wer_b"] == 0.0 and m["n_samples_a"] == 2
    assert m["wer"] == pytest.approx(100 / 13)
    assert m["rtfx"] == pytest.approx(2.0) and m["audio_hours"] == pytest.approx(3 / 3600)


def test_stage_writes_flat_metrics_and_every_prediction(tiny_en_dir, prepared, tmp_path):
    root, picks = prepared
    out = tmp_path / "eval"
    params = tmp_path / "p.yaml"
    params.write_text("evaluate:\n  batch_size: 4\n")
    rc = _stage()(["--model", str(tiny_en_dir), "--name", "base", "--params", str(params), "--prepared", str(root),
                   "--out_dir", str(out)])
    assert rc == 0
    metrics = json.loads((out / "base.json").read_text())
    for key in ("wer", "cer", "bleu", "substitutions", "deletions", "insertions", "audio_hours", "decode_seconds",
                "rtfx", "bleu_signature"):
        assert key in metrics
    assert metrics["n_samples"] == 4 and metrics["n_empty_refs"] == 1
    for client in picks:
        assert isinstance(metrics[f"wer_{client}"], float) and metrics[f"n_samples_{client}"] == 2
    assert 0.0 <= metrics["wer"] < 100.0 and metrics["rtfx"] > 0
    for suffix in ["", *[f"_{client}" for client in picks]]:  # 95% bootstrap intervals, pooled and per group
        assert metrics[f"wer_ci_low{suffix}"] <= metrics[f"wer{suffix}"] <= metrics[f"wer_ci_high{suffix}"]
        assert metrics[f"cer_ci_low{suffix}"] <= metrics[f"cer{suffix}"] <= metrics[f"cer_ci_high{suffix}"]
    assert (metrics["ci_confidence"], metrics["ci_resamples"]) == (0.95, 1000)
    with (out / "base_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    noref = [r for r in rows if r["id"].endswith("_noref")]
    assert noref[0]["scored"] == "False" and noref[0]["hypothesis"] and noref[0]["char_errors"] == ""
    scored = [r for r in rows if r["scored"] == "True"]
    assert 100 * sum(int(r["word_errors"]) for r in scored) / sum(int(r["ref_words"]) for r in scored) == \
        pytest.approx(metrics["wer"])
    assert 100 * sum(int(r["char_errors"]) for r in scored) / sum(int(r["ref_chars"]) for r in scored) == \
        pytest.approx(metrics["cer"])
    assert all(r["reference_normalized"] == r["reference_normalized"].lower() for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["base.json", "base_predictions.csv"]
    assert [r["language"] for r in rows] == ["en"] * 5  # an English-only model decodes English
    assert list(rows[0])[-1] == "language"  # the new column comes last; the others keep their order


def test_stage_language_auto_writes_each_clips_detected_language(tiny_random_multilingual_dir, prepared, tmp_path):
    """--language auto (evaluate.language null) on a multilingual model with the default ctranslate2 backend: the
    predictions CSV holds each clip's detected language, the same as the backend reports for the clip."""
    from fedwhisper.decode.backends import DecodeOptions, open_backend
    from fedwhisper.decode.transcribe import transcribe_audios
    from fedwhisper.params import WHISPER_LANGUAGES

    root, _ = prepared
    out = tmp_path / "eval"
    params = tmp_path / "p.yaml"
    params.write_text("evaluate:\n  batch_size: 4\n  max_new_tokens: 4\n  device: cpu\n")
    rc = _stage()(["--model", str(tiny_random_multilingual_dir), "--name", "ml", "--params", str(params),
                   "--prepared", str(root), "--out_dir", str(out), "--language", "auto", "--normalizer", "basic"])
    assert rc == 0
    with (out / "ml_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(r["language"] in WHISPER_LANGUAGES for r in rows), rows
    first = next(r for r in rows if not r["id"].endswith("_noref"))
    audio = load_16k_mono(next(Path(it["path"]) for c in prepared[1].values() for it in c
                               if Path(it["path"]).stem == first["id"]))
    with open_backend("ctranslate2", tiny_random_multilingual_dir,
                      DecodeOptions(language=None, device="cpu", max_new_tokens=4)) as backend:
        assert transcribe_audios(backend, [audio], 1, progress=False).languages == [first["language"]]


def test_stage_reports_missing_prepared_data(tiny_random_dir, tmp_path, capsys):
    args = ["--model", str(tiny_random_dir), "--name", "x", "--prepared", str(tmp_path / "none"),
            "--out_dir", str(tmp_path / "eval")]
    assert _stage()([*args, "--params", str(tmp_path / "absent.yaml")]) == 1
    assert "absent.yaml: params file not found" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("evaluate:\n  max_new_tokens: 4\n")
    assert _stage()([*args, "--params", str(tmp_path / "p.yaml")]) == 1
    assert "none/manifest.json: prepared data not found" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def _write_parquet_dataset(folder: Path, items: list[dict], text_column: str = "sentence",
                           texts: list[str] | None = None) -> Path:
    """A local HF dataset directory: audio as encoded FLAC bytes (Audio feature), the transcripts (``texts``, else
    each item's text) in ``text_column``, accent; split `test`."""
    import datasets

    audio = []
    for it in items:
        buf = io.BytesIO()
        sf.write(buf, load_16k_mono(it["path"]), 16000, format="FLAC")
        audio.append({"bytes": buf.getvalue(), "path": Path(it["path"]).with_suffix(".flac").name})
    features = datasets.Features({"audio": datasets.Audio(sampling_rate=16000),
                                  text_column: datasets.Value("string"), "accent": datasets.Value("string")})
    table = pa.table({"audio": audio, text_column: texts if texts is not None else [it["text"] for it in items],
                      "accent": [it["accent"] for it in items]})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    (folder / "data").mkdir(parents=True)
    pq.write_table(table, folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_streaming_evaluation_from_dataset_directory(tiny_en_dir, sample_items, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # streaming also writes seed 000's evaluation_{examples,metrics}.csv here
    items = [it for group in _picks(sample_items).values() for it in group]
    data = tmp_path / "hub_like"
    _write_parquet_dataset(data, items)
    out = tmp_path / "eval"
    (tmp_path / "params.yaml").write_text("evaluate:\n  normalizer: english\n")
    rc = _stage()(["--model_dir", str(tiny_en_dir), "--dataset_name", str(data), "--split", "test",
                   "--text_column", "sentence", "--group_column", "accent", "--max_samples", "3",
                   "--out_dir", str(out), "--name", "streamed", "--params", str(tmp_path / "params.yaml"),
                   "--batch_size", "2"])
    assert rc == 0
    metrics = json.loads((out / "streamed.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["wer"] < 80.0
    first, second = list(_picks(sample_items))
    assert metrics[f"n_samples_{first}"] == 2 and metrics[f"n_samples_{second}"] == 1
    with (out / "streamed_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["reference"] for r in rows] == [it["text"] for it in items[:3]]
    assert (tmp_path / "evaluation_examples.csv").is_file() and (tmp_path / "evaluation_metrics.csv").is_file()


def test_streaming_evaluation_names_a_missing_split(tiny_random_dir, sample_items, tmp_path, capsys):
    data = tmp_path / "hub_like"
    _write_parquet_dataset(data, sample_items[:1])
    (tmp_path / "params.yaml").write_text("evaluate: {}\n")
    rc = _stage()(["--model_dir", str(tiny_random_dir), "--dataset_name", str(data), "--split", "validation",
                   "--out_dir", str(tmp_path / "eval"), "--params", str(tmp_path / "params.yaml")])
    assert rc == 1
    assert "no split 'validation'" in capsys.readouterr().err


def test_streaming_output_name_keeps_the_pipeline_metrics(tmp_path):
    """Without --name, a streamed evaluation of models/aggregated must not overwrite metrics/eval/aggregated.json."""
    from fedwhisper.decode.evaluate import StreamSpec

    spec = importlib.util.spec_from_file_location("evaluate_stage_names", ROOT / "stages" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = tmp_path / "models" / "aggregated"
    assert module.default_name(str(model), None) == "aggregated"
    assert module.default_name(str(model), StreamSpec("i4ds/spc_r", "test")) == "aggregated_i4ds-spc_r_test"
    local = tmp_path / "my data"
    local.mkdir()
    assert module.default_name(str(model), StreamSpec(str(local), "validation")) == "aggregated_my-data_validation"
