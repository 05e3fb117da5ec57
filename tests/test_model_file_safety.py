"""Model files as a partner or a download may hand them over: a shard index that points outside the model directory or
is malformed, a ``.pt`` re-zipped with compression, and a ``pytorch_model.bin`` that holds code."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedwhisper.errors import CheckpointError
from fedwhisper.formats import hf
from fedwhisper.formats.base_model import materialize_base
from fedwhisper.formats.checkpoints import open_checkpoint
from fedwhisper.formats.openai_whisper import read_openai_pt
from fedwhisper.train.model_setup import load_base


def _copy_without_weights(model_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    return out


def _sharded(model_dir: Path, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of ``model_dir`` with its weights in two shards and a model.safetensors.index.json."""
    state = load_file(str(model_dir / "model.safetensors"))
    _copy_without_weights(model_dir, out)
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(out / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (out / hf.WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out, state


def test_sharded_dir_reads_inside_and_refuses_shards_outside(tiny_random_dir, tmp_path):
    model_dir, state = _sharded(tiny_random_dir, tmp_path / "model")
    index = model_dir / hf.WEIGHTS_INDEX_NAME
    with open_checkpoint(model_dir) as reader:  # control: the index itself is fine
        assert torch.equal(reader.read("model.decoder.layer_norm.weight"), state["model.decoder.layer_norm.weight"])
    assert hf.load_whisper_model(model_dir).config.d_model == 64

    second = "model-00002-of-00002.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.move(model_dir / second, outside)  # a real shard: only the name check keeps the reader away from it
    weight_map = json.loads(index.read_text())["weight_map"]
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        renamed = {k: (name if v == second else v) for k, v in weight_map.items()}
        index.write_text(json.dumps({"weight_map": renamed}))
        message = rf"{index}: shard '{name}' is outside the model directory; refused"
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(model_dir)
        with pytest.raises(CheckpointError, match=message):
            hf.weight_files(model_dir)
        with pytest.raises(CheckpointError, match=message):  # checked before transformers joins the names
            hf.load_whisper_model(model_dir)
        with pytest.raises(CheckpointError, match=message):
            load_base(model_dir)


@pytest.mark.parametrize("text, detail", [
    ('{"weight_map": {"a": "x.safetensors"', "not valid JSON"),
    ('{"metadata": {}}', "no 'weight_map' key"),
    ('["model-1.safetensors"]', "no 'weight_map' key"),
    ('{"weight_map": ["model-1.safetensors"]}', "'weight_map' must map tensor names to shard file names"),
    ('{"weight_map": {"a": 3}}', "'weight_map' must map tensor names to shard file names"),
    (b'\xff\xfe{', "not valid JSON"),
])
def test_malformed_shard_index_is_one_line_naming_the_file(tiny_random_dir, tmp_path, text, detail):
    model_dir = _copy_without_weights(tiny_random_dir, tmp_path / "model")
    index = model_dir / hf.WEIGHTS_INDEX_NAME
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    for read in (open_checkpoint, hf.weight_files, hf.load_whisper_model):
        with pytest.raises(CheckpointError) as err:
            read(model_dir)
        assert str(err.value).startswith(f"{index}: malformed shard index (") and detail in str(err.value)
        assert "\n" not in str(err.value)


def _deflate(src: Path, dst: Path) -> Path:
    """``src`` (a torch.save zip) re-zipped with every member DEFLATE-compressed, as a zip tool would."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with zipfile.ZipFile(dst) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    return dst


@pytest.mark.parametrize("size", ["small", "whole_model"])
def test_deflated_pt_reads_the_right_tensors(tiny_random_dir, tmp_path, size):
    state = load_file(str(tiny_random_dir / "model.safetensors"))
    if size == "small":  # a few small tensors: memory-mapping these silently gave garbage
        state = {k: state[k] for k in ("model.encoder.conv1.bias", "model.decoder.layer_norm.weight")}
    stored = tmp_path / "stored.pt"
    torch.save(state, stored)
    deflated = _deflate(stored, tmp_path / "deflated.pt")
    # The hazard is real: a memory-mapped load of the compressed members does not give the tensors back.
    try:
        mapped = torch.load(deflated, weights_only=True, mmap=True)
        assert not all(torch.equal(mapped[k], state[k]) for k in state)
    except RuntimeError:
        pass

    with open_checkpoint(deflated) as reader:
        assert reader.names() == sorted(state)
        for name in state:
            assert torch.equal(reader.read(name), state[name]), name
            assert torch.equal(reader.read_flat(name, 1, 5), state[name].reshape(-1)[1:5]), name
    _, loaded = read_openai_pt(deflated)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    legacy = tmp_path / "legacy.pt"  # the pre-zip format cannot be memory-mapped either
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with open_checkpoint(legacy) as reader:
        assert all(torch.equal(reader.read(k), state[k]) for k in state)


class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (str(self.sentinel),)


def test_pytorch_model_bin_holding_code_is_refused_without_torch_hint(tiny_random_dir, tmp_path):
    model_dir = _copy_without_weights(tiny_random_dir, tmp_path / "model")
    sentinel = tmp_path / "payload_ran"
    state = load_file(str(tiny_random_dir / "model.safetensors"))
    torch.save({**state, "model.encoder.conv1.weight": _Payload(sentinel)}, model_dir / "pytorch_model.bin")
    bin_file = model_dir / "pytorch_model.bin"
    expected = rf"{bin_file}: refused to load: the pickle references code or objects beyond plain tensors \(posix\.mkdir\)"
    for load in (open_checkpoint, hf.load_whisper_model, load_base,
                 lambda d: materialize_base(str(d), tmp_path / "out", fmt="hf")):
        with pytest.raises(CheckpointError, match=expected) as err:
            load(model_dir)
        message = str(err.value)
        assert "weights_only" not in message and "will likely succeed" not in message and "\n" not in message
    assert not sentinel.exists() and not (tmp_path / "out").exists()
