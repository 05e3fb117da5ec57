"""Reliability, determinism: two runs of prepare and of aggregate give byte-identical outputs; two CPU runs of the
finetune stage with the same seed give identical weights (same machine, same thread settings; see README.md)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from reliability_helpers import CLIENT, FINETUNE, add, project_copy, randn_like_seeded, run_ok, tiny_state, \
    tree_bytes, write_hf_dir

from fedwhisper.data.partition import client_names
from fedwhisper.data.prepare import run_prepare
from fedwhisper.formats.hf import read_state_dict
from fedwhisper.merge import aggregate
from fedwhisper.params import params_from_dict


def _corpus(root):
    rng = np.random.default_rng(7)
    lines = ["file_name,accent"]
    for split, n in (("train", 24), ("test", 8)):
        for i in range(n):
            accent = ["x", "y", "z"][i % 3]
            stem = f"{accent}{i:02d}"
            audio = (0.1 * rng.standard_normal(int(16000 * rng.uniform(0.1, 0.3)))).astype(np.float32)
            (root / split).mkdir(parents=True, exist_ok=True)
            rate = [16000, 22050, 44100][i % 3]
            if rate != 16000:
                audio = np.interp(np.arange(int(len(audio) * rate / 16000)) * 16000 / rate, np.arange(len(audio)),
                                  audio).astype(np.float32)
            sf.write(root / split / f"{stem}.wav", audio, rate)
            (root / split / f"{stem}.txt").write_text(f"{accent} says {i}" if i != 5 else "", encoding="utf-8")
            lines.append(f"{split}/{stem}.wav,{accent}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("partition", [{"mode": "column"}, {"mode": "dirichlet", "num_clients": 3, "alpha": 0.3},
                                       {"mode": "iid", "num_clients": 2}])
def test_two_prepare_runs_are_byte_identical(tmp_path, partition):
    _corpus(tmp_path / "corpus")
    clients = ["x", "y", "z"] if partition["mode"] == "column" else client_names(partition["num_clients"])
    params = params_from_dict({
        "data": {"path": str(tmp_path / "corpus")}, "clients": clients,
        "prepare": {"seed": 3, "partition": partition, "max_drop_fraction": 0.5, "max_items_per_client": 6,
                    "split": {"validation": 0.2, "test": 0.2}},
    })
    words = lambda text: len(text.split()) + 3  # noqa: E731
    runs = []
    for name in ("one", "two"):
        run_prepare(params, words, tmp_path / name / "prepared", tmp_path / name / "metrics")
        runs.append(tree_bytes(tmp_path / name))
    assert runs[0] == runs[1]
    assert any(k.endswith(".arrow") for k in runs[0]) and "metrics/prepare_drops.csv" in runs[0]
    assert b"empty_transcript" in runs[0]["metrics/prepare_drops.csv"]


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_det_agg")
    base = tiny_state(0)
    write_hf_dir(root / "base", base)
    common = randn_like_seeded(base, 1, 0.01)
    dirs = [write_hf_dir(root / f"c{i}", add(add(base, common), randn_like_seeded(base, 30 + i, 0.005)))
            for i in range(5)]
    return root, dirs


@pytest.mark.parametrize("strategy", ["mean", "median", "trimmed_mean", "krum", "dare_ties"])
def test_two_aggregate_runs_are_byte_identical(tmp_path, merge_inputs, strategy):
    root, dirs = merge_inputs
    params = params_from_dict({"clients": [], "aggregation": {"strategy": strategy, "beta": 0.2, "density": 0.4,
                                                              "screening": {"exclude": False}}})
    metrics = []
    for name in ("one", "two"):
        m = aggregate(params, checkpoints=[str(d) for d in dirs], base_dir=root / "base",
                      out_dir=tmp_path / name / "merged", metrics_path=tmp_path / name / "aggregate.json",
                      manifest=None)
        metrics.append(m)
    a, b = tree_bytes(tmp_path / "one" / "merged"), tree_bytes(tmp_path / "two" / "merged")
    assert a == b and "model.safetensors" in a
    ja = json.loads((tmp_path / "one" / "aggregate.json").read_text())
    jb = json.loads((tmp_path / "two" / "aggregate.json").read_text())
    ja.pop("seconds"), jb.pop("seconds")  # wall time is the only field allowed to differ
    assert ja == jb and ja["strategy"] == strategy


def test_two_cpu_finetune_runs_with_the_same_seed_give_identical_weights(ft_project, clean_run, tmp_path):
    proj = project_copy(ft_project, tmp_path / "p")
    run_ok([sys.executable, *FINETUNE], proj)
    a = read_state_dict(clean_run / "models" / "clients" / CLIENT)
    b = read_state_dict(proj / "models" / "clients" / CLIENT)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    base = read_state_dict(ft_project / "models" / "base")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it did train
    ma = json.loads((clean_run / "metrics" / "finetune" / f"{CLIENT}.json").read_text())
    mb = json.loads((proj / "metrics" / "finetune" / f"{CLIENT}.json").read_text())
    ma.pop("train_seconds"), mb.pop("train_seconds")
    assert ma == mb
