"""Seed 000's evaluation command run unchanged: a folder holding only its model.pt, its flags, its CSVs, its W&B
logging, and its `text` -> `sentence` reference fallback."""

import csv
import json
import time
import struct
from pathlib import Path

import pytest
import torch
from test_evaluate_stage import _stage, _write_parquet_dataset  # tests/ is on sys.path under pytest

from fedwhisper.decode.seed000 import EXAMPLE_COLUMNS, compute_type_for_precision
from fedwhisper.errors import CheckpointError, ParamsError
from fedwhisper.formats.base_model import canonical_model_dir
from fedwhisper.formats.hf import load_config, read_state_dict
from fedwhisper.formats.openai_whisper import export_openai_pt
from fedwhisper.wandb_logging import wandb_wanted


def _seed_model_dir(hf_dir: Path, folder: Path, bare: bool) -> Path:
    """``folder/model.pt`` as seed 000 writes it (bare state dict) or as whisper.load_model reads it (dims + state)."""
    folder.mkdir(parents=True)
    pt = export_openai_pt(hf_dir, folder / "model.pt")
    if bare:
        obj = torch.load(pt, map_location="cpu", weights_only=True)
        torch.save(obj["model_state_dict"], pt)
    return folder


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _wandb_records(run_file: Path) -> list:
    """Records of an offline ``run-*.wandb`` file: a 7-byte header, then LevelDB-log chunks (crc32, uint16 length,
    type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def test_precision_means_what_it_means_in_the_seed():
    assert compute_type_for_precision("float16", "cuda") == "float16"
    assert compute_type_for_precision("FLOAT16", "cpu") == "float32"  # the seed decodes float32 on a CPU
    assert compute_type_for_precision("fp32", "cuda") == "float32"
    with pytest.raises(ParamsError, match="--precision: got 'bf16'; seed 000 takes float16, float32, fp32"):
        compute_type_for_precision("bf16", "cuda")


def test_wandb_is_on_only_with_a_key_and_not_disabled(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_wanted()
    monkeypatch.setenv("WANDB_API_KEY", "dummy")
    assert wandb_wanted() and not wandb_wanted(disabled=True)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not wandb_wanted()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert not wandb_wanted()


def test_model_pt_with_dims_converts_and_bare_unknown_shapes_are_refused(tiny_random_dir, tmp_path):
    with_dims = _seed_model_dir(tiny_random_dir, tmp_path / "with_dims", bare=False)
    with canonical_model_dir(with_dims) as converted:
        assert load_config(converted).d_model == 64 and (converted / "tokenizer.json").is_file()
        ours, theirs = read_state_dict(converted), read_state_dict(tiny_random_dir)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not converted.exists()  # the temporary directory is removed
    with canonical_model_dir(tiny_random_dir) as same:
        assert same == tiny_random_dir
    bare = _seed_model_dir(tiny_random_dir, tmp_path / "bare", bare=True)
    with pytest.raises(CheckpointError, match=r"model\.pt: bare state dict .* matches no openai-whisper architecture"):
        with canonical_model_dir(bare):
            pass


def test_bare_large_v3_turbo_state_dict_needs_no_architecture():
    """Seed 000's checkpoints are bare large-v3-turbo state dicts: the shapes alone pick the model (meta tensors)."""
    from fedwhisper.formats.openai_whisper import ARCHITECTURES, resolve_dims

    def empty(*shape):
        return torch.empty(*shape, device="meta")

    state = {"encoder.conv1.weight": empty(1280, 128, 3), "decoder.token_embedding.weight": empty(51866, 1280),
             "encoder.positional_embedding": empty(1500, 1280), "decoder.positional_embedding": empty(448, 1280)}
    state.update({f"encoder.blocks.{i}.attn.query.weight": empty(1280, 1280) for i in range(32)})
    state.update({f"decoder.blocks.{i}.attn.query.weight": empty(1280, 1280) for i in range(4)})
    assert resolve_dims(state, None, "model.pt") == ARCHITECTURES["large-v3-turbo"]
    state["decoder.token_embedding.weight"] = empty(51865, 1280)  # large-v2's vocabulary on turbo's layers
    with pytest.raises(CheckpointError, match="matches no openai-whisper architecture"):
        resolve_dims(state, None, "model.pt")


def test_seed_command_runs_unchanged_on_a_bare_model_pt(tiny_en_dir, sample_items, tmp_path, monkeypatch, caplog):
    """Seed 000's documented command plus its flags, on a folder holding only a bare state dict of tiny.en: the
    architecture and tokenizer come from the shapes, references fall back to `sentence`, and the seed's CSVs are
    written where the seed writes them, with the same transcripts as the HF directory gives."""
    items = [it for it in sample_items if it["accent"] == "en-us"][:3]  # the accent tiny.en does not hallucinate on
    data = _write_parquet_dataset(tmp_path / "spc_like", items)
    model = _seed_model_dir(tiny_en_dir, tmp_path / "whisper-aggregated" / "custom", bare=True)
    assert [p.name for p in model.iterdir()] == ["model.pt"]
    (tmp_path / "params.yaml").write_text("evaluate:\n  normalizer: basic\n  batch_size: 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "dummy")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    caplog.set_level("INFO")
    seed_args = ["--model_dir", "whisper-aggregated/custom", "--dataset_name", str(data), "--split", "test",
                 "--precision", "float16", "--max_saved_examples", "2", "--disable_wandb",
                 "--wandb_run_name", "seed-run"]
    assert _stage()([*seed_args, "--out_dir", "eval"]) == 0
    assert "no reference column 'text'; using 'sentence' as seed 000 does" in caplog.text
    assert not (tmp_path / "wb").exists()  # --disable_wandb wins over WANDB_API_KEY
    metrics = json.loads((tmp_path / "eval" / "custom_spc_like_test.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["wer"] < 60.0

    examples = _csv_rows(tmp_path / "evaluation_examples.csv")
    assert examples[0] == list(EXAMPLE_COLUMNS) and len(examples) == 3
    assert [r[0] for r in examples[1:]] == ["0", "1"]
    assert [r[2] for r in examples[1:]] == [it["text"] for it in items[:2]]
    assert all(r[4] == r[4].lower() and "," not in r[4] for r in examples[1:])
    assert _csv_rows(tmp_path / "evaluation_metrics.csv") == [
        ["metric", "value"], ["wer", repr(metrics["wer"] / 100.0)], ["bleu", repr(metrics["bleu"])],
    ]

    assert _stage()(["--model_dir", str(tiny_en_dir), "--dataset_name", str(data), "--out_dir", "eval",
                     "--name", "hf", "--examples_csv", "", "--metrics_csv", "", "--disable_wandb"]) == 0
    with (tmp_path / "eval" / "hf_predictions.csv").open(newline="") as f:
        from_hf = [r["hypothesis"] for r in csv.DictReader(f)]
    assert [r[1] for r in examples[1:]] == from_hf[:2]
    assert json.loads((tmp_path / "eval" / "hf.json").read_text())["wer"] == metrics["wer"]


def test_wandb_offline_run_holds_the_seed_metrics(tiny_random_dir, sample_items, tmp_path, monkeypatch):
    data = _write_parquet_dataset(tmp_path / "ds", sample_items[:2], text_column="text")
    (tmp_path / "params.yaml").write_text("evaluate:\n  max_new_tokens: 4\n  normalizer: basic\n")
    monkeypatch.chdir(tmp_path)
    for key, value in {"WANDB_MODE": "offline", "WANDB_API_KEY": "dummy", "WANDB_SILENT": "true",
                       "WANDB_DIR": tmp_path / "wb", "WANDB_CONFIG_DIR": tmp_path / "wb_config",
                       "WANDB_CACHE_DIR": tmp_path / "wb_cache", "WANDB_DATA_DIR": tmp_path / "wb_data"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    (tmp_path / "wb").mkdir()
    assert _stage()(["--model_dir", str(tiny_random_dir), "--dataset_name", str(data), "--out_dir", "eval",
                     "--precision", "fp32", "--wandb_run_name", "seed-eval", "--metrics_csv", "m.csv"]) == 0
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60  # wandb's service process may still be flushing the offline file
    while True:
        records = _wandb_records(run_file)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        if runs and any(r.WhichOneof("record_type") == "history" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert runs and runs[0].display_name == "seed-eval"
    logged = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for i in r.history.item}
    seed = dict(_csv_rows(tmp_path / "m.csv")[1:])
    assert logged["wer"] == pytest.approx(float(seed["wer"])) and logged["bleu"] == pytest.approx(float(seed["bleu"]))
    assert logged["dataset"] == str(data) and logged["split"] == "test" and logged["samples"] == 2
    assert logged["precision"] == "fp32" and logged["model_dir"] == str(tiny_random_dir)


def test_reference_column_errors_name_the_columns(tiny_random_dir, sample_items, tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("evaluate:\n  max_new_tokens: 4\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    other = _write_parquet_dataset(tmp_path / "other", sample_items[:1], text_column="transcript")
    base = ["--model_dir", str(tiny_random_dir), "--out_dir", "eval"]
    assert _stage()([*base, "--dataset_name", str(other)]) == 1
    assert "no reference column 'text' (nor 'sentence'); columns: audio, transcript, accent" in capsys.readouterr().err
    assert _stage()([*base, "--dataset_name", str(other), "--text_column", "words"]) == 1
    assert "no reference column 'words'; columns: audio, transcript, accent" in capsys.readouterr().err
    empty = _write_parquet_dataset(tmp_path / "empty", sample_items[:2], text_column="text", texts=["", " "])
    assert _stage()([*base, "--dataset_name", str(empty)]) == 1
    assert "column 'text': all 2 references are empty" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "evaluation_metrics.csv").exists()


def test_seed_flags_that_cannot_mean_the_same_are_refused(tiny_random_dir, tmp_path, capsys):
    base = ["--model_dir", str(tiny_random_dir), "--prepared", str(tmp_path / "none"), "--out_dir", str(tmp_path),
            "--params", str(tmp_path / "absent" / "params.yaml")]
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "params.yaml").write_text("evaluate: {}\n")
    assert _stage()([*base, "--precision", "bf16"]) == 1
    assert "--precision: got 'bf16'" in capsys.readouterr().err
    assert _stage()([*base, "--precision", "float16", "--compute_type", "int8"]) == 1
    assert "--precision and --compute_type both set the compute type" in capsys.readouterr().err
    assert _stage()([*base, "--max_saved_examples", "-1"]) == 1
    assert "--max_saved_examples: got -1" in capsys.readouterr().err
