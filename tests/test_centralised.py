"""The centralised upper bound on a tiny random Whisper: the clients' train splits pooled, finetune's params, and as
many optimizer steps as the clients' one-shot finetune runs took together."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedwhisper.centralised import one_shot_steps, run_centralised
from fedwhisper.data.prepared import write_manifest, write_split
from fedwhisper.errors import ParamsError
from fedwhisper.params import FinetuneParams
from fedwhisper.train.trainer import run_finetune
from test_finetune import _rows

TRAIN = {"c1": 5, "c2": 3}
FT = FinetuneParams(epochs=1.0, max_steps=-1, batch_size=2, eval_max_items=1, save_steps=100, learning_rate=1e-3,
                    freeze_encoder=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    counts = {}
    for k, (client, n) in enumerate(TRAIN.items()):
        counts[client] = {}
        for split, rows, seed in [("train", n, 10 * k), ("validation", 2, 10 * k + 1), ("test", 1, 10 * k + 2)]:
            items = [{**r, "id": f"{client}-{r['id']}", "client": client} for r in _rows(rows, seed, split)]
            counts[client][split] = write_split(root / client / f"{split}.arrow", items)
    write_manifest(root, counts, list(TRAIN))
    return root


@pytest.mark.parametrize("overrides, n, steps", [
    ({}, 65, 9),  # ceil(65 / 8)
    ({"epochs": 2.0}, 65, 18),  # the default data's 18 steps per client
    ({"grad_accum": 2}, 65, 5),  # ceil(9 / 2)
    ({"epochs": 1.5}, 65, 14),  # ceil(1.5 * 9)
    ({"max_steps": 7}, 65, 7),
    ({"batch_size": 64}, 3, 1),
])
def test_one_shot_steps(overrides, n, steps):
    assert one_shot_steps(dataclasses.replace(FinetuneParams(epochs=1.0), **overrides), n) == steps


def test_pooled_run_takes_the_clients_steps_summed(tmp_path, tiny_random_multilingual_dir, prepared):
    ft = dataclasses.replace(FT, language="de")
    metrics = run_centralised(ft, list(TRAIN), base_dir=tiny_random_multilingual_dir, data_root=prepared,
                              out_dir=tmp_path / "centralised", checkpoint_dir=tmp_path / "ck",
                              metrics_file=tmp_path / "m/centralise.json", live_dir=tmp_path / "m/centralise")
    assert metrics["train_samples_per_client"] == TRAIN and metrics["train_samples"] == 8
    assert metrics["one_shot_steps_per_client"] == {"c1": 3, "c2": 2}  # ceil(5 / 2), ceil(3 / 2)
    assert metrics["global_step"] == metrics["max_steps"] == 5
    assert metrics["eval_items"] == 2 and isinstance(metrics["eval_wer"], float)  # eval_max_items per client
    assert json.loads((tmp_path / "m/centralise.json").read_text()) == metrics
    generation = json.loads((tmp_path / "centralised/generation_config.json").read_text())
    assert generation["language"] == "de" and generation["task"] == "transcribe"  # as finetune writes it
    assert (tmp_path / "m/centralise/plots/metrics/train/loss.tsv").is_file()
    assert not list((tmp_path / "ck").glob("checkpoint-*"))  # pruned once the model is out

    # HF Trainer's own count for one client's one-shot run is the one the pooled run summed
    one_shot = run_finetune(ft, "c1", base_dir=tiny_random_multilingual_dir, data_root=prepared,
                            out_root=tmp_path / "clients", checkpoint_root=tmp_path / "ck1",
                            metrics_root=tmp_path / "mf")
    assert one_shot["global_step"] == metrics["one_shot_steps_per_client"]["c1"]


def test_no_clients_is_refused(tmp_path, tiny_random_dir, prepared):
    with pytest.raises(ParamsError, match="clients: empty"):
        run_centralised(FT, [], base_dir=tiny_random_dir, data_root=prepared, out_dir=tmp_path / "c")
