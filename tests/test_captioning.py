"""Seed 003's use: one model trained on a folder of clips with .txt/.json captions, no client column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedwhisper.data.prepare import run_prepare
from fedwhisper.errors import ParamsError
from fedwhisper.params import params_from_dict


def count_words(text: str) -> int:
    return len(text.split()) + 3


def write_captioned(folder: Path, stem: str, caption: str, seconds: float = 0.4, freq: float = 440.0,
                    sidecar: str = "json") -> Path:
    """A tone clip with its caption in a ``.json`` (``{"text": ...}``) or ``.txt`` sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    path = folder / f"{stem}.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    if sidecar == "json":
        (folder / f"{stem}.json").write_text(json.dumps({"text": caption, "tags": ["x"]}), encoding="utf-8")
    else:
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return path


def caption_folder(root: Path, splits: dict[str, int]) -> Path:
    for split, n in splits.items():
        for i in range(n):
            write_captioned(root / split, f"{split}_{i:02d}", f"a tone at {440 + 20 * i} hertz",
                            freq=440 + 20 * i, sidecar="json" if i % 2 == 0 else "txt")
    return root


def caption_params(root: Path, clients=("captions",), **over):
    data = {"data": {"path": str(root), "columns": {"client": None}}, "clients": list(clients),
            "prepare": {"split": {"validation": 0.2, "test": 0.25}}}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return params_from_dict(data)


def test_no_client_column_is_one_implicit_client_named_in_clients(tmp_path):
    root = caption_folder(tmp_path / "clips", {"train": 8, "validation": 3, "test": 2})
    summary = run_prepare(caption_params(root), count_words, tmp_path / "prepared", tmp_path / "metrics")
    assert summary.drops["missing_client"] == 0 and summary.kept == 13
    m = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    # The folder's own validation/ and test/ are those splits; nothing is carved out of train/.
    assert (m["items/captions/train"], m["items/captions/validation"], m["items/captions/test"]) == (8, 3, 2)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir() if p.is_dir()) == ["captions"]


def test_validation_folder_is_used_and_test_carved_from_train_when_absent(tmp_path):
    root = caption_folder(tmp_path / "clips", {"train": 8, "validation": 3})
    run_prepare(caption_params(root), count_words, tmp_path / "prepared", tmp_path / "metrics")
    m = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert (m["items/captions/train"], m["items/captions/validation"], m["items/captions/test"]) == (6, 3, 2)


def test_long_clips_are_dropped_counted_and_warned_about(tmp_path, caplog):
    root = caption_folder(tmp_path / "clips", {"train": 8})
    write_captioned(root / "train", "lecture", "a long talk", seconds=31.0)
    with caplog.at_level("WARNING"):
        summary = run_prepare(caption_params(root), count_words, tmp_path / "prepared", tmp_path / "metrics")
    assert summary.drops["too_long"] == 1 and summary.kept == 8
    assert "dropped 1 clip(s) longer than prepare.max_duration_s 30 s" in caplog.text
    drops = (tmp_path / "metrics" / "prepare_drops.csv").read_text()
    assert "train/lecture" in drops and "31.00 s > prepare.max_duration_s 30.0" in drops


def test_no_client_column_with_several_clients_listed_says_list_one(tmp_path):
    root = caption_folder(tmp_path / "clips", {"train": 4})
    with pytest.raises(ParamsError, match=r"data.columns.client is null.*lists 2 names.*`clients: \[captions\]`"):
        run_prepare(caption_params(root, clients=("a", "b")), count_words, tmp_path / "p", tmp_path / "m")
    assert not (tmp_path / "p").exists()


def _stage(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "stages" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_translate_labels_on_a_multilingual_base(tiny_random_multilingual_dir):
    from transformers import WhisperTokenizerFast

    from fedwhisper.train.collator import label_ids, label_prefix

    tok = WhisperTokenizerFast.from_pretrained(str(tiny_random_multilingual_dir))
    prefix = label_prefix(tok, True, "en", "translate")
    ids = label_ids(tok, "a dog barks", prefix, tok.convert_tokens_to_ids("<|endoftext|>"))
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<|startoftranscript|>", "<|en|>", "<|translate|>",
                                                  "<|notimestamps|>"]
    assert tok.decode(ids[4:-1]) == " a dog barks"


@pytest.mark.slow
def test_seed_003_flow_prepare_train_one_model_and_caption_a_folder(tiny_random_multilingual_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """A folder of clips with JSON/TXT captions and no client column: prepare -> one fine-tuned model (translate
    task, multilingual base) -> aggregate passes it through -> evaluation -> single-model report -> batched
    captions of a folder with {file, pred_caption, gt_caption}."""
    import yaml

    from fedwhisper.__main__ import main as cli

    monkeypatch.chdir(tmp_path)
    caption_folder(tmp_path / "clips", {"train": 6, "validation": 2, "test": 3})
    (tmp_path / "clips" / "test" / "unlabelled.wav").write_bytes((tmp_path / "clips" / "test" / "test_00.wav")
                                                                 .read_bytes())
    params = {
        "data": {"path": "clips", "columns": {"client": None}},
        "base": {"source": str(tiny_random_multilingual_dir)},
        "clients": ["captions"],
        "finetune": {"max_steps": 2, "batch_size": 2, "eval_max_items": 2, "save_steps": 1, "language": "en",
                     "task": "translate"},
        "evaluate": {"backend": "transformers", "language": "en", "task": "translate", "max_new_tokens": 6,
                     "normalizer": "basic", "batch_size": 4},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert _stage("base")([]) == 0
    assert _stage("prepare")([]) == 0
    prepared = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert (prepared["items/captions/train"], prepared["items/captions/validation"],
            prepared["items/captions/test"]) == (6, 2, 3)
    assert prepared["drops/missing_transcript"] == 1  # the unlabelled clip
    assert _stage("finetune")(["--client", "captions"]) == 0
    model = tmp_path / "models" / "clients" / "captions"
    assert (model / "model.safetensors").is_file()

    assert _stage("aggregate")([]) == 0
    aggregated = tmp_path / "models" / "aggregated"
    assert json.loads((aggregated / "single_client.json").read_text())["client"] == "captions"
    assert (aggregated / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "metrics" / "aggregate.json").read_text())["single_client"] == "captions"

    evaluate = _stage("evaluate")
    for path, name in (("models/base", "base"), ("models/clients/captions", "captions"),
                       ("models/aggregated", "aggregated")):
        assert evaluate(["--model", path, "--name", name]) == 0
    ft = json.loads((tmp_path / "metrics" / "eval" / "captions.json").read_text())
    assert (ft["language"], ft["task"], ft["normalizer"], ft["n_samples"]) == ("en", "translate", "basic", 3)
    agg = json.loads((tmp_path / "metrics" / "eval" / "aggregated.json").read_text())
    assert agg["same_model_as"] == "captions" and "wer" not in agg  # not decoded a second time

    assert _stage("report")([]) == 0
    report = (tmp_path / "metrics" / "report.md").read_text()
    assert report.startswith("# fedwhisper single-model run report")
    assert "Whisper's basic (multilingual) normaliser; decoded with language `en`, task `translate`" in report
    assert "| client `captions` |" in report and "aggregated**" not in report
    assert "- Pooled WER: base " in report and "-> fine-tuned `captions` " in report
    assert "nothing was merged; `models/aggregated` is the model of `captions`" in report

    # evaluation straight from the folder's own validation/ split (the project's local layout, no HF dataset)
    assert evaluate(["--model", "models/clients/captions", "--dataset_name", "clips", "--split", "validation",
                     "--name", "val"]) == 0
    with (tmp_path / "metrics" / "eval" / "val_predictions.csv").open(newline="") as f:
        import csv

        refs = [r["reference"] for r in csv.DictReader(f)]
    assert sorted(refs) == ["a tone at 440 hertz", "a tone at 460 hertz"]

    capsys.readouterr()
    rc = cli(["transcribe", "--model", "models/clients/captions", "clips/test", "--out", "captions.jsonl"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["test_00.wav", "test_01.wav", "test_02.wav", "unlabelled.wav"]
    assert [r.get("gt_caption") for r in rows] == ["a tone at 440 hertz", "a tone at 460 hertz",
                                                   "a tone at 480 hertz", None]
    assert all(isinstance(r["pred_caption"], str) for r in rows)
    assert "skipped 3 sidecar file(s)" in capsys.readouterr().err
    # dir/* names the sidecars too: they are skipped, not decoded; CSV has an empty gt_caption where unknown
    files = sorted(str(p) for p in (tmp_path / "clips" / "test").iterdir())
    assert cli(["transcribe", "--model", "models/clients/captions", *files, "--out", "captions.csv"]) == 0
    import csv

    with (tmp_path / "captions.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["gt_caption"] for r in table] == ["a tone at 440 hertz", "a tone at 460 hertz",
                                                "a tone at 480 hertz", ""]
    assert [r["pred_caption"] for r in table] == [r["pred_caption"] for r in rows]


def test_sweep_skips_four_client_presets_and_everything_for_one_client(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).resolve().parents[1] / "scripts" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    runs = sweep.experiments()
    four, notes = sweep.applicable(runs, 4)
    assert four == runs and notes == []
    three, notes = sweep.applicable(runs, 3)
    assert not any("aggregation.preset=" in o for overrides in three.values() for o in overrides)
    assert "sweep-krum" in three and len(runs) - len(three) == len(sweep.PRESETS)
    assert notes == [f"skipped the {len(sweep.PRESETS)} preset experiments: the seed's presets weight 4 clients and "
                     "clients: lists 3; set aggregation.weights for your own weighting"]
    two, notes = sweep.applicable(runs, 2)
    assert "sweep-krum" not in two and "sweep-multi-krum" not in two and "sweep-ties" in two
    assert notes[1].startswith("skipped krum, multi-krum: with f = 0 they need at least 3 clients")
    one, notes = sweep.applicable(runs, 1)
    assert one == {} and "nothing to merge" in notes[0]
    (tmp_path / "params.yaml").write_text("clients: [captions]\n")
    assert sweep.client_count(tmp_path / "params.yaml") == 1


def test_one_client_passes_through_only_where_merging_one_model_is_the_identity(tiny_random_dir, tmp_path,
                                                                                 monkeypatch):
    import shutil

    from fedwhisper.merge import run_aggregate_stage
    from fedwhisper.single_model import MARKER

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_random_dir, tmp_path / "models" / "clients" / "solo")
    shutil.copytree(tiny_random_dir, tmp_path / "models" / "base")
    (tmp_path / "params.yaml").write_text("clients: [solo]\n")
    m = run_aggregate_stage("params.yaml")
    assert m["single_client"] == "solo" and (tmp_path / "models" / "aggregated" / MARKER).is_file()
    src, dst = (tmp_path / "models" / p / "model.safetensors" for p in ("clients/solo", "aggregated"))
    assert src.stat().st_ino == dst.stat().st_ino  # a hard link: no copy of the weights
    # ties with density 0.5 changes even one model: it is merged as before, with no mark
    (tmp_path / "params.yaml").write_text("clients: [solo]\naggregation: {strategy: ties, density: 0.5}\n")
    m = run_aggregate_stage("params.yaml")
    assert "single_client" not in m and not (tmp_path / "models" / "aggregated" / MARKER).exists()


def test_report_names_the_normaliser_language_and_task_used(tmp_path):
    from fedwhisper.decode.evaluate import Predictions, prediction_rows, score_predictions, write_predictions_csv
    from fedwhisper.report import build_report

    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    refs = [f"satz nummer {i} über straße" for i in range(10)]
    for name, hyps in (("base", [r.replace("über", "uber") for r in refs]), ("a", refs), ("aggregated", refs)):
        pred = Predictions([f"u{i}" for i in range(10)], ["a"] * 5 + ["b"] * 5, [1.0] * 10, refs, hyps, 10.0, 1.0)
        metrics = {"model": name, "language": "de", "task": "transcribe", **score_predictions(pred, "basic")}
        (eval_dir / f"{name}.json").write_text(json.dumps(metrics))
        write_predictions_csv(eval_dir / f"{name}_predictions.csv", prediction_rows(pred, "basic"))
    markdown = build_report(tmp_path, ["a", "b"])
    assert markdown.startswith("# fedwhisper run report\n")
    assert ("Test-set WER (%) after Whisper's basic (multilingual) normaliser; decoded with language `de`, task "
            "`transcribe`, corpus-level") in markdown
    assert "English normaliser" not in markdown


@pytest.mark.parametrize("backend", ["transformers", "openai-whisper", "ctranslate2"])
def test_every_backend_prompts_translate_on_a_multilingual_model(tiny_random_multilingual_dir, backend):
    """The decoder prompt each backend builds is <|startoftranscript|><|en|><|translate|><|notimestamps|>."""
    from fedwhisper.decode.backends import DecodeOptions, open_backend

    options = DecodeOptions(language="en", task="translate", max_new_tokens=3, device="cpu")
    expected = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|notimestamps|>"]
    clip = (0.1 * np.sin(np.arange(8000) / 10)).astype(np.float32)
    with open_backend(backend, tiny_random_multilingual_dir, options) as b:
        if backend == "transformers":  # the decoder's first call receives the whole prompt
            seen = []
            hook = b.model.model.decoder.register_forward_pre_hook(
                lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
            b.decode_short([clip])
            hook.remove()
            prompt = b.tokenizer.convert_ids_to_tokens(seen[0])
        elif backend == "openai-whisper":
            from whisper.decoding import DecodingTask

            task = DecodingTask(b.model, b.decoding)
            prompt = [task.tokenizer.decode_with_timestamps([t]) for t in task.initial_tokens]
        else:
            tokenizer, _ = b._transcription_options()
            ids = b.model.get_prompt(tokenizer, [], without_timestamps=True)
            prompt = [b.model.hf_tokenizer.id_to_token(i) for i in ids]
        assert prompt == expected
        assert isinstance(b.decode_short([clip])[0].text, str)
