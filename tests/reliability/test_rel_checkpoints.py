"""Reliability, checkpoints: unsafe, damaged, mismatched or non-finite inputs give an error naming the file (and
tensor or param key), or a counted exclusion; mixed dtypes merge in fp32; nothing is written on failure."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import add, randn_like_seeded, tiny_config, tiny_state, tree_bytes, write_hf_dir, \
    write_safetensors
from safetensors.torch import load_file

from fedwhisper.errors import CheckpointError, MergeError
from fedwhisper.formats.checkpoints import open_checkpoint
from fedwhisper.formats.naming import hf_to_openai
from fedwhisper.merge import aggregate
from fedwhisper.params import params_from_dict

K = "model.decoder.layers.1.fc1.weight"


class CodePayload:
    """Unpickling this runs code: it creates ``sentinel``."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_ckpt")
    base = tiny_state(0)
    clients = [add(base, randn_like_seeded(base, 10 + i, 0.01)) for i in range(3)]
    base_dir = write_hf_dir(root / "base", base)
    dirs = [write_hf_dir(root / f"c{i}", s) for i, s in enumerate(clients)]
    return root, base, clients, base_dir, dirs


def run_agg(tmp: Path, base_dir: Path, inputs, names=None, **aggregation):
    params = params_from_dict({"clients": [], "aggregation": aggregation})
    names = names or [f"c{i}" for i in range(len(inputs))]
    metrics = aggregate(params, checkpoints=[str(p) for p in inputs], names=names, base_dir=base_dir,
                        out_dir=tmp / "merged", metrics_path=tmp / "aggregate.json", manifest=None)
    return metrics, load_file(str(tmp / "merged" / "model.safetensors"))


def assert_nothing_written(tmp: Path) -> None:
    assert not (tmp / "merged").exists()
    assert not list(tmp.glob("merged.tmp-*")) and not list(tmp.glob("merged.old-*"))
    assert not (tmp / "aggregate.json").exists()


# --------------------------------------------------------------------------- unsafe pickles


@pytest.mark.parametrize("container", ["torch_zip", "legacy_pickle", "bare_pickle_no_suffix"])
def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path, models, container):
    _, _, clients, base_dir, dirs = models
    sentinel = tmp_path / "SENTINEL"
    evil = {"model_state_dict": {hf_to_openai(K): clients[0][K]}, "extra": CodePayload(sentinel)}
    if container == "torch_zip":
        path = tmp_path / "evil.pt"
        torch.save(evil, path)
    elif container == "legacy_pickle":
        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        path = tmp_path / "evil_noext"
        path.write_bytes(pickle.dumps(evil, protocol=2))
    # The payload is live: a plain unpickle would run it.
    probe = tmp_path / "PROBE"
    pickle.loads(pickle.dumps(CodePayload(probe)))
    assert probe.read_text() == "pwned"

    with pytest.raises(CheckpointError, match=rf"{path.name}: refused to load: the pickle references code.*"
                                              r"Nothing was executed"):
        open_checkpoint(path)
    assert not sentinel.exists()
    with pytest.raises(CheckpointError, match=rf"{path.name}: refused to load"):
        run_agg(tmp_path, base_dir, [dirs[0], path])
    assert not sentinel.exists()
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- damaged and mismatched files


@pytest.mark.parametrize("keep", [0.5, 0.999, 12, 4])
def test_truncated_safetensors_names_the_file(tmp_path, models, keep):
    _, _, clients, base_dir, dirs = models
    path = write_safetensors(tmp_path / "trunc.safetensors", clients[1])
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors: unreadable or truncated safetensors file"):
        open_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors"):
        run_agg(tmp_path, base_dir, [dirs[0], path])
    assert_nothing_written(tmp_path)


def test_truncated_pt_names_the_file(tmp_path, models):
    _, _, clients, base_dir, dirs = models
    path = tmp_path / "trunc.pt"
    torch.save({hf_to_openai(k): v for k, v in clients[1].items()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: unreadable or truncated checkpoint"):
        run_agg(tmp_path, base_dir, [dirs[0], path])
    assert_nothing_written(tmp_path)


def test_different_d_model_is_refused(tmp_path, models):
    _, _, _, base_dir, dirs = models
    other = write_hf_dir(tmp_path / "d32", tiny_state(1, d_model=32), tiny_config(d_model=32))
    with pytest.raises(CheckpointError, match=r"d32: architecture differs from the base .*n_audio_state=32 vs 64"):
        run_agg(tmp_path, base_dir, [dirs[0], other])
    # Without config.json (a bare safetensors file) the shapes still give it away, naming a tensor.
    bare = write_safetensors(tmp_path / "d32.safetensors", tiny_state(1, d_model=32))
    with pytest.raises(CheckpointError, match=r"d32\.safetensors: tensor '[\w.]+' has shape \[.*\] but the base"):
        run_agg(tmp_path, base_dir, [dirs[0], bare])
    assert_nothing_written(tmp_path)


def test_missing_and_extra_keys_are_listed(tmp_path, models):
    _, _, clients, base_dir, dirs = models
    missing = dict(clients[1])
    del missing["model.encoder.layers.0.fc2.bias"]
    p_missing = write_safetensors(tmp_path / "missing.safetensors", missing)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: tensor names differ .*"
                                              r"missing 1: model\.encoder\.layers\.0\.fc2\.bias"):
        run_agg(tmp_path, base_dir, [dirs[0], p_missing])
    extra = dict(clients[1])
    extra["model.decoder.layers.2.fc1.bias"] = torch.zeros(128)  # a Whisper name, but a third layer
    p_extra = write_safetensors(tmp_path / "extra.safetensors", extra)
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: tensor names differ .*"
                                              r"extra 1: model\.decoder\.layers\.2\.fc1\.bias"):
        run_agg(tmp_path, base_dir, [dirs[0], p_extra])
    foreign = dict(clients[1])
    foreign["classifier.weight"] = torch.zeros(3)
    p_foreign = write_safetensors(tmp_path / "foreign.safetensors", foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors: tensor 'classifier\.weight' is not a Whisper"):
        run_agg(tmp_path, base_dir, [dirs[0], p_foreign])
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_error_or_counted_exclusion(tmp_path, models, value):
    _, _, clients, base_dir, dirs = models
    bad = {k: v.clone() for k, v in clients[2].items()}
    bad[K][3, 5] = value
    bad["model.encoder.conv1.bias"][0] = value
    p_bad = write_hf_dir(tmp_path / "bad", bad)
    with pytest.raises(CheckpointError, match=r"bad: tensor '[\w.]+' has 1 NaN/Inf values.*screening\.exclude"):
        run_agg(tmp_path, base_dir, [dirs[0], dirs[1], p_bad])
    assert_nothing_written(tmp_path)
    metrics, merged = run_agg(tmp_path, base_dir, [dirs[0], dirs[1], p_bad], screening={"exclude": True})
    assert metrics["excluded/c2"] is True and metrics["nonfinite/c2"] == 2 and metrics["weight/c2"] == 0.0
    assert metrics["n_merged"] == 2 and metrics["weight/c0"] == metrics["weight/c1"] == 0.5
    for k in (K, "model.encoder.conv1.bias"):
        torch.testing.assert_close(merged[k], (clients[0][k] + clients[1][k]) / 2)
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_nonfinite_base_is_an_error_even_with_screening(tmp_path, models):
    _, base, _, _, dirs = models
    bad = {k: v.clone() for k, v in base.items()}
    bad[K][0, 0] = float("nan")
    bad_base = write_hf_dir(tmp_path / "badbase", bad)
    with pytest.raises(CheckpointError, match=r"badbase: tensor '[\w.]+' has 1 NaN/Inf values"):
        run_agg(tmp_path, bad_base, dirs, screening={"exclude": True})
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- dtypes


def test_mixed_fp16_bf16_fp32_merge_accumulates_in_fp32(tmp_path, models):
    _, _, clients, base_dir, _ = models
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    paths = [write_safetensors(tmp_path / f"m{i}.safetensors", {k: v.to(dt) for k, v in s.items()})
             for i, (s, dt) in enumerate(zip(clients, dtypes))]
    w = [0.5, 0.3, 0.2]
    metrics, merged = run_agg(tmp_path, base_dir, paths, weights=w)
    assert metrics["n_merged"] == 3
    for k, t in merged.items():
        assert t.dtype == torch.float32, k
        inputs = [s[k].to(dt).double() for s, dt in zip(clients, dtypes)]
        ref = sum(wi * x for wi, x in zip(w, inputs))
        torch.testing.assert_close(t.double(), ref, rtol=0, atol=2e-6)
    # All-fp16 inputs: fp16 out, but each output is the fp32 sum rounded once (no fp16 accumulation error).
    half = [write_safetensors(tmp_path / f"h{i}.safetensors", {k: v.half() for k, v in s.items()})
            for i, s in enumerate(clients)]
    _, merged = run_agg(tmp_path, base_dir, half, weights=w)
    ref32 = torch.zeros(clients[0][K].shape, dtype=torch.float32)
    for wi, s in zip(w, clients):
        ref32.add_(s[K].half(), alpha=wi)
    assert merged[K].dtype == torch.float16
    assert torch.equal(merged[K], ref32.half())


# --------------------------------------------------------------------------- same input twice


def test_same_checkpoint_twice(tmp_path, models):
    _, _, clients, base_dir, dirs = models
    with pytest.raises(MergeError, match=r"client names are not unique: \['c0', 'c0'\]"):
        params = params_from_dict({"clients": [], "aggregation": {}})
        aggregate(params, checkpoints=[str(dirs[0]), str(dirs[0])], base_dir=base_dir, out_dir=tmp_path / "merged",
                  metrics_path=tmp_path / "aggregate.json", manifest=None)
    assert_nothing_written(tmp_path)
    # The same bytes under two names would double that client's weight: refused, by content hash.
    copy = tmp_path / "copy_of_c0"
    shutil.copytree(dirs[0], copy)
    with pytest.raises(MergeError, match=r"clients 'a' and 'b' are the same file \(sha256 "):
        run_agg(tmp_path, base_dir, [dirs[0], copy, dirs[1]], names=["a", "b", "c"])
    assert not (tmp_path / "merged").exists()
    assert not any(p.name.startswith("merged.tmp-") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5, 0.5], r"aggregation\.weights: got 2 weights for 3 clients"),
        ([0.2, 0.3, 0.3, 0.2], r"aggregation\.weights: got 4 weights for 3 clients"),
        ([0.5, -0.1, 0.6], r"aggregation\.weights\[1\]: got -0\.1; weights must be non-negative"),
        ([0.0, 0.0, 0.0], r"aggregation\.weights: all weights are zero"),
        ([1.0, -1.0, 0.0], r"aggregation\.weights\[1\]: got -1\.0; weights must be non-negative"),
    ],
)
def test_bad_weight_lists_name_the_key(tmp_path, models, weights, message):
    _, _, _, base_dir, dirs = models
    with pytest.raises(MergeError, match=message):
        run_agg(tmp_path, base_dir, dirs, weights=weights)
    assert_nothing_written(tmp_path)


def test_failed_merge_leaves_previous_output_intact(tmp_path, models):
    _, _, clients, base_dir, dirs = models
    run_agg(tmp_path, base_dir, dirs)
    before = tree_bytes(tmp_path / "merged")
    metrics_before = (tmp_path / "aggregate.json").read_bytes()
    bad = {k: v.clone() for k, v in clients[0].items()}
    bad[K][0, 0] = float("nan")
    p_bad = write_hf_dir(tmp_path / "nan", bad)
    with pytest.raises(CheckpointError, match=r"nan: tensor"):
        run_agg(tmp_path, base_dir, [dirs[0], p_bad])
    with pytest.raises(MergeError, match=r"aggregation\.weights"):
        run_agg(tmp_path, base_dir, dirs, weights=[1, 2])
    assert tree_bytes(tmp_path / "merged") == before
    assert (tmp_path / "aggregate.json").read_bytes() == metrics_before
    assert not list(tmp_path.glob("merged.tmp-*"))
    assert json.loads(metrics_before)["n_merged"] == 3
