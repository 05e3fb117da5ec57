"""Lazy checkpoint readers in canonical (HF) tensor naming, used by the streaming merge engine.

``open_checkpoint(path)`` accepts an HF Whisper directory, a ``.safetensors`` file, or an openai-whisper / PyTorch
``.pt`` / ``.bin`` file (``{"dims", "model_state_dict"}``, ``{"state_dict"}`` or a bare state dict, in either naming).
A reader lists names, shapes and dtypes without reading tensor data, and reads one tensor at a time into private
memory:

- safetensors: the header is validated with ``safetensors.safe_open``; tensor bytes are then read with ``pread``
  (not through a memory map), so pages of the input never count toward the process's resident memory.
- ``.pt``: ``openai_whisper.load_torch_checkpoint`` (weights only; memory-mapped unless the file is a legacy pickle
  or its zip members are compressed); after a tensor is copied out, its mapped pages are released with
  ``madvise(MADV_DONTNEED)``, so reading a whole file does not leave the whole file resident.

The tied ``proj_out.weight`` is skipped (HF re-ties it on load). Nothing here unpickles code.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from fedwhisper.errors import CheckpointError
from fedwhisper.formats.hf import index_shards
from fedwhisper.formats.naming import canonical_name
from fedwhisper.formats.openai_whisper import load_torch_checkpoint
from fedwhisper.hash_cache import cached_sha256

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# openai-whisper ModelDimensions field -> HF WhisperConfig field.
_DIMS_FROM_CONFIG = {
    "n_mels": "num_mel_bins", "n_vocab": "vocab_size", "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model", "n_audio_head": "encoder_attention_heads", "n_audio_layer": "encoder_layers",
    "n_text_ctx": "max_target_positions", "n_text_state": "d_model", "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


def arch_from_config(config: dict) -> dict[str, int]:
    """openai-style dims from an HF WhisperConfig dict (keys it lacks are left out)."""
    return {k: int(config[v]) for k, v in _DIMS_FROM_CONFIG.items() if isinstance(config.get(v), int)}


def sha256_file(paths: Path | Iterable[Path], chunk: int = 1 << 20) -> str:
    """sha256 of one file, or of several files concatenated in the given order.

    A reader thread fills a ring of three ``chunk``-byte buffers while this thread hashes (both release the GIL),
    so reading from disk and hashing overlap: from a cold page cache this takes about max(read, hash), not their
    sum. Memory stays at three buffers (3 MiB by default: 8 MiB buffers were no faster, and they showed in the
    merge's peak memory).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(3):
        free.put(bytearray(chunk))
    stop = threading.Event()

    def produce() -> None:
        try:
            for path in paths:
                with open(path, "rb", buffering=0) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while True:
                        buf = free.get()
                        if stop.is_set():
                            return
                        n = f.readinto(buf)
                        if not n:
                            free.put(buf)
                            break
                        full.put((buf, n))
            full.put(None)
        except BaseException as exc:  # handed to the hashing thread, which re-raises it
            full.put(exc)

    reader = threading.Thread(target=produce, name="sha256-read", daemon=True)
    reader.start()
    h = hashlib.sha256()
    try:
        while (item := full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            h.update(memoryview(buf)[:n])
            free.put(buf)
    finally:
        stop.set()
        free.put(bytearray(0))  # wakes the reader if it waits for a buffer
        reader.join()
    return h.hexdigest()


class CheckpointReader:
    """Base class: ``names()``, ``info(name)``, ``read(name)`` in canonical naming; ``arch``, ``metadata``."""

    kind: str = ""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.arch: dict[str, int] | None = None
        self.metadata: dict[str, Any] = {}
        self.weight_files: list[Path] = []
        self._info: dict[str, TensorInfo] = {}

    def names(self) -> list[str]:
        return sorted(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def read(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a 1-D tensor in private memory."""
        return self.read(name).reshape(-1)[start:stop].clone()

    def sha256(self) -> str:
        """sha256 of the weight files concatenated; from the hash cache while their path and stat are unchanged."""
        return cached_sha256(self.weight_files, sha256_file)

    def close(self) -> None:
        pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _add(self, raw_name: str, info: TensorInfo, where: Path) -> str | None:
        try:
            name = canonical_name(raw_name)
        except KeyError:
            raise CheckpointError(
                f"{where}: tensor '{raw_name}' is not a Whisper tensor name (neither HF "
                "WhisperForConditionalGeneration nor openai-whisper naming); export the model with one of those"
            ) from None
        if name is None:
            return None
        if name in self._info:
            raise CheckpointError(
                f"{where}: tensor '{name}' appears twice (under two namings, or in two shards); "
                "keep one copy of each tensor"
            )
        self._info[name] = info
        return name


class SafetensorsReader(CheckpointReader):
    """One or several ``.safetensors`` files (an HF dir may be sharded); data read with pread."""

    kind = "safetensors"

    def __init__(self, files: list[Path], path: Path | None = None):
        super().__init__(path or files[0])
        self.weight_files = list(files)
        self._loc: dict[str, tuple[int, int, int, tuple[int, ...], torch.dtype]] = {}
        self._fds: list[int] = []
        try:
            for fi, file in enumerate(files):
                self._index(fi, file)
        except BaseException:
            self.close()
            raise

    def _index(self, fi: int, file: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:  # validates header, offsets and file length
                meta = f.metadata() or {}
        except FileNotFoundError:
            raise CheckpointError(f"{file}: file not found; check the checkpoint path") from None
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(
                f"{file}: unreadable or truncated safetensors file ({exc}); re-copy or re-export it"
            ) from None
        fd = os.open(file, os.O_RDONLY)
        self._fds.append(fd)
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, n, 8))
        data_start = 8 + n
        for raw, entry in header.items():
            if raw == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(
                    f"{file}: tensor '{raw}' has dtype {entry['dtype']}, which fedwhisper does not merge; "
                    "convert it to F32/F16/BF16"
                )
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = entry["data_offsets"]
            name = self._add(raw, TensorInfo(shape, dtype), file)
            if name is not None:
                self._loc[name] = (fi, data_start + begin, end - begin, shape, dtype)
        for key in ("train_samples", "num_train_samples"):
            if key in meta:
                try:
                    self.metadata["train_samples"] = int(meta[key])
                except ValueError:
                    pass

    def _pread(self, name: str, begin: int, nbytes: int) -> torch.Tensor:
        fi, offset, _, _, _ = self._loc[name]
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy())
        got = 0
        fd = self._fds[fi]
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + begin + got)
            if n <= 0:
                raise CheckpointError(
                    f"{self.weight_files[fi]}: tensor '{name}' ends past the end of the file (truncated?); "
                    "re-copy the checkpoint"
                )
            got += n
        return out

    def read(self, name: str) -> torch.Tensor:
        _, _, nbytes, shape, dtype = self._loc[name]
        return self._pread(name, 0, nbytes).view(dtype).reshape(shape)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        _, _, _, _, dtype = self._loc[name]
        size = torch.empty((), dtype=dtype).element_size()
        return self._pread(name, start * size, (stop - start) * size).view(dtype)

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


_libc = None


def _release_pages(t: torch.Tensor) -> None:
    """Drop the (clean, file-backed) pages under a memory-mapped tensor from this process's RSS."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        page = mmap.PAGESIZE
        start = ptr - ptr % page
        end = -(-(ptr + nbytes) // page) * page
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):  # not Linux: pages stay mapped until the file closes
        pass


class TorchReader(CheckpointReader):
    """A PyTorch pickle (``.pt``/``.bin``): openai-whisper ``{"dims", "model_state_dict"}`` or a bare state dict."""

    kind = "pt"

    def __init__(self, path: Path):
        super().__init__(path)
        self.weight_files = [self.path]
        obj, self._mmap = load_torch_checkpoint(self.path)
        state = obj
        if isinstance(obj, dict) and "model_state_dict" in obj:
            state = obj["model_state_dict"]
        elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            state = obj["state_dict"]
        if not isinstance(state, dict) or not state:
            raise CheckpointError(
                f"{path}: not a state dict (got {type(state).__name__}); expected a mapping of tensor names to "
                "tensors, or {'dims', 'model_state_dict'}"
            )
        dims = obj.get("dims") if isinstance(obj, dict) else None
        self.openai_dims = dict(dims) if isinstance(dims, dict) else None  # None: a bare state dict
        if isinstance(dims, dict):
            self.arch = {k: int(v) for k, v in dims.items() if k in _DIMS_FROM_CONFIG}
        if isinstance(obj, dict):
            for key in ("train_samples", "num_train_samples"):
                if isinstance(obj.get(key), int):
                    self.metadata["train_samples"] = obj[key]
        self._tensors: dict[str, torch.Tensor] = {}
        for raw, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry '{raw}' is a {type(t).__name__}, not a tensor")
            name = self._add(str(raw), TensorInfo(tuple(t.shape), t.dtype), self.path)
            if name is not None:
                self._tensors[name] = t

    def read(self, name: str) -> torch.Tensor:
        src = self._tensors[name]
        out = torch.empty(src.shape, dtype=src.dtype)
        out.copy_(src)
        if self._mmap and src.is_contiguous():
            _release_pages(src)
        return out

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        src = self._tensors[name]
        if not src.is_contiguous():
            return super().read_flat(name, start, stop)
        part = src.reshape(-1)[start:stop]
        out = part.clone()
        if self._mmap:
            _release_pages(part)
        return out

    def close(self) -> None:
        self._tensors = {}


def _hf_dir_reader(path: Path) -> CheckpointReader:
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        reader: CheckpointReader = SafetensorsReader([path / "model.safetensors"], path)
    elif index.is_file():
        reader = SafetensorsReader(index_shards(index), path)
    elif (path / "pytorch_model.bin").is_file():
        reader = TorchReader(path / "pytorch_model.bin")
        reader.path = path
    else:
        raise CheckpointError(
            f"{path}: directory has no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
            "point at an HF Whisper model directory or a checkpoint file"
        )
    reader.kind = "hf_dir"
    config = path / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config}: not valid JSON ({exc})") from None
        if cfg.get("model_type") not in (None, "whisper"):
            raise CheckpointError(f"{config}: model_type is {cfg.get('model_type')!r}, not 'whisper'")
        reader.arch = arch_from_config(cfg)
    summary = path / "training_summary.json"
    if summary.is_file():
        try:
            n = json.loads(summary.read_text()).get("train_samples")
        except ValueError:
            n = None
        if isinstance(n, int):
            reader.metadata["train_samples"] = n
    return reader


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open an HF dir, ``.safetensors`` or ``.pt`` checkpoint lazily, in canonical (HF) naming."""
    path = Path(path)
    if path.is_dir():
        return _hf_dir_reader(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; check the checkpoint path")
    if path.suffix == ".safetensors":
        return SafetensorsReader([path])
    if path.suffix in WEIGHT_SUFFIXES:
        return TorchReader(path)
    with open(path, "rb") as f:
        head = f.read(2)
    # A zip-format torch file starts with "PK", a legacy pickle with the protocol byte 0x80.
    if head == b"PK" or head[:1] == b"\x80":
        return TorchReader(path)
    return SafetensorsReader([path])
