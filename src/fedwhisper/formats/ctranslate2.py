"""CTranslate2 Whisper models (``model.bin``): read, import to the canonical HF directory, export.

``model.bin`` layout (little-endian)::

    uint32 version; string spec_name; uint32 revision; uint32 n_variables
    n_variables x { string name; uint8 rank; uint32 dims[rank]; uint8 dtype; uint32 n_bytes; bytes[n_bytes] }
    uint32 n_aliases; n_aliases x { string alias; string target }      (version >= 3)

A string is a uint16 length that counts a trailing NUL, then the bytes. dtype: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16,
5 bf16. Imported weights are written as float32: the bundled model is fp16, and fine-tuning and merging run in fp32.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from fedwhisper.errors import CheckpointError

log = logging.getLogger(__name__)

_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


class _Reader:
    """Sequential reads from the file, so peak memory is the tensors themselves, not the file plus copies."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            self._truncated(n, len(data))
        return data

    def take_into(self, n: int) -> bytearray:
        """``n`` bytes read straight into a new writable buffer (no intermediate bytes object)."""
        buf = bytearray(n)
        got = self.f.readinto(buf)
        if got != n:
            self._truncated(n, got or 0)
        return buf

    def _truncated(self, n: int, got: int) -> None:
        raise CheckpointError(
            f"{self.path}: truncated CTranslate2 model.bin (needs {n} bytes at offset {self.f.tell() - got}, "
            "the file ends first); re-convert or re-download the model"
        )

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        return raw[:-1].decode("utf-8") if raw.endswith(b"\0") else raw.decode("utf-8")

    def at_end(self) -> bool:
        return self.f.tell() >= self.size


class ConcatenatedFile(io.RawIOBase):
    """Read-only, forward-only view of several files as one (a ``model.bin`` shipped in parts), streamed part by
    part: no part is held in memory, and a read that crosses a part boundary continues in the next part."""

    def __init__(self, parts: Sequence[Path]):
        super().__init__()
        self.parts = [Path(p) for p in parts]
        self.size = sum(p.stat().st_size for p in self.parts)
        self._index, self._pos, self._f = 0, 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._index < len(self.parts):
            if self._f is None:
                self._f = self.parts[self._index].open("rb")
            got = self._f.readinto(view[done:])
            if not got:
                self._f.close()
                self._f, self._index = None, self._index + 1
                continue
            done += got
        self._pos += done
        return done

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()


def _read_variable(r: _Reader, version: int, path: Path) -> tuple[str, torch.Tensor]:
    name = r.string()
    (rank,) = r.unpack("B")
    dims = r.unpack(f"{rank}I") if rank else ()
    if version >= 4:
        (code,) = r.unpack("B")
    else:  # before version 4 the byte is the item size, and only f32 / i16 / i8 existed
        code = {4: 0, 2: 2, 1: 1}.get(r.unpack("B")[0], -1)
    (nbytes,) = r.unpack("I")
    if code not in _DTYPES:
        raise CheckpointError(f"{path}: variable {name!r} has unknown dtype code {code}")
    dtype = _DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if nbytes != expected:
        raise CheckpointError(
            f"{path}: variable {name!r} holds {nbytes} bytes but shape {tuple(dims)} of {dtype} needs {expected}"
        )
    if not nbytes:
        return name, torch.empty(dims, dtype=dtype)
    return name, torch.frombuffer(r.take_into(nbytes), dtype=dtype).reshape(dims)


def read_ct2_model_bin(
    path: str | Path, parts: Optional[Sequence[Path]] = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """Parse a CTranslate2 ``model.bin``: (spec name, {variable name: tensor}); aliases resolve to their target.

    ``parts``: the file is shipped split; these files are read in order as one stream, and ``path`` only names it in
    errors.
    """
    path = Path(path)
    try:
        if parts is None:
            f = io.BufferedReader(io.FileIO(path, "rb"))
            size = os.fstat(f.fileno()).st_size
        else:
            f = ConcatenatedFile(parts)
            size = f.size
    except OSError as exc:
        raise CheckpointError(f"{exc.filename or path}: cannot read CTranslate2 model.bin ({exc.strerror})") from None
    out: dict[str, torch.Tensor] = {}
    with f:
        r = _Reader(f, path, size)
        (version,) = r.unpack("I")
        if not 1 <= version <= 6:
            raise CheckpointError(
                f"{path}: CTranslate2 binary version {version} is not supported (1-6); is this a model.bin?"
            )
        spec = r.string() if version >= 2 else ""
        if version >= 2:
            r.unpack("I")  # spec revision
        (count,) = r.unpack("I")
        for _ in tqdm(range(count), desc=f"read {path.name}", unit="var", leave=False):
            name, tensor = _read_variable(r, version, path)
            out[name] = tensor
        if version >= 3 and not r.at_end():
            (n_alias,) = r.unpack("I")
            for _ in range(n_alias):
                alias, target = r.string(), r.string()
                if target not in out:
                    raise CheckpointError(f"{path}: alias {alias!r} points to missing variable {target!r}")
                out[alias] = out[target]
    return spec, out


def _dequantize(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8/int16 weights come with ``<name>_scale`` (CTranslate2 stores ``w_q = round(w * scale)`` per row)."""
    out = {}
    for name, t in variables.items():
        if name.endswith("_scale"):
            continue
        scale = variables.get(f"{name}_scale")
        if scale is not None and not t.is_floating_point():
            t = t.float() / scale.float().reshape(-1, *([1] * (t.dim() - 1)))
        out[name] = t
    return out


def _scalar(variables: dict[str, torch.Tensor], name: str, path: Path) -> int:
    if name not in variables:
        raise CheckpointError(f"{path}: missing {name!r}; is this a CTranslate2 Whisper model?")
    return int(variables[name].reshape(-1)[0])


def ct2_dims(variables: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """openai-whisper dims of a CTranslate2 WhisperSpec."""
    def layers(side: str) -> int:
        return len({n.split("/")[1] for n in variables if re.match(rf"{side}/layer_\d+/", n)})

    try:
        conv1, emb = variables["encoder/conv1/weight"], variables["decoder/embeddings/weight"]
        enc_pos = variables["encoder/position_encodings/encodings"]
        dec_pos = variables["decoder/position_encodings/encodings"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing variable {exc.args[0]!r}; is this a CTranslate2 Whisper model?") from None
    return dict(n_mels=conv1.shape[1], n_audio_ctx=enc_pos.shape[0], n_audio_state=conv1.shape[0],
                n_audio_head=_scalar(variables, "encoder/num_heads", path), n_audio_layer=layers("encoder"),
                n_vocab=emb.shape[0], n_text_ctx=dec_pos.shape[0], n_text_state=emb.shape[1],
                n_text_head=_scalar(variables, "decoder/num_heads", path), n_text_layer=layers("decoder"))


def ct2_to_hf_state(variables: dict[str, torch.Tensor], path: Path, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec variables -> canonical HF tensors (float32), splitting fused projections.

    Self-attention ``linear_0`` is [q; k; v], cross-attention ``linear_0`` is q and ``linear_1`` is [k; v]; the key
    bias CTranslate2 stores is all zeros (Whisper's key projection has none).
    """
    v = {k: t.float() for k, t in _dequantize(variables).items() if t.is_floating_point()}
    hf: dict[str, torch.Tensor] = {}
    d = dims["n_audio_state"]

    def take(name: str) -> torch.Tensor:
        if name not in v:
            raise CheckpointError(f"{path}: missing variable {name!r}; is this a CTranslate2 Whisper model?")
        return v[name]

    def norm(src: str, dst: str) -> None:
        hf[f"{dst}.weight"], hf[f"{dst}.bias"] = take(f"{src}/gamma"), take(f"{src}/beta")

    def linear(src: str, dst: str, bias: bool = True) -> None:
        hf[f"{dst}.weight"] = take(f"{src}/weight")
        if bias:
            hf[f"{dst}.bias"] = take(f"{src}/bias")

    def fused(src: str, dst: str, parts: list[str]) -> None:
        w, b = take(f"{src}/weight"), take(f"{src}/bias")
        if w.shape[0] != d * len(parts):
            raise CheckpointError(f"{path}: {src}/weight has {w.shape[0]} rows; expected {len(parts)} x {d} (fused {parts})")
        for i, part in enumerate(parts):
            hf[f"{dst}.{part}.weight"] = w[i * d:(i + 1) * d].clone()
            bias = b[i * d:(i + 1) * d].clone()
            if part == "k_proj":
                if bias.abs().max() > 0:
                    raise CheckpointError(f"{path}: {src}/bias has a non-zero key bias, which Whisper cannot hold")
                continue
            hf[f"{dst}.{part}.bias"] = bias

    for side in ("encoder", "decoder"):
        hf[f"model.{side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        n_layers = dims["n_audio_layer" if side == "encoder" else "n_text_layer"]
        for i in tqdm(range(n_layers), desc=f"CTranslate2 {side} layers", unit="layer", leave=False):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ["k_proj", "v_proj"])
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    hf["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    proj = v.get("decoder/projection/weight")
    if proj is not None and not torch.equal(proj, hf["model.decoder.embed_tokens.weight"]):
        raise CheckpointError(f"{path}: decoder/projection differs from the token embedding; HF Whisper ties them")
    return {k: t.contiguous() for k, t in hf.items()}


def _lang_to_id(lang_ids: list[int], tokenizer, where: Path) -> dict[str, int]:
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in lang_ids])
    bad = [(i, t) for i, t in zip(lang_ids, tokens) if not re.fullmatch(r"<\|[a-z]{2,3}(_[A-Za-z]+)?\|>", t or "")]
    if bad:
        raise CheckpointError(f"{where}: lang_ids {bad[:3]} are not language tokens of the model's tokenizer")
    return {t: int(i) for i, t in zip(lang_ids, tokens)}


def import_ctranslate2(
    ct2_dir: str | Path, out_dir: str | Path, model_bin_parts: Optional[Sequence[Path]] = None
) -> Path:
    """Convert a CTranslate2 / faster-whisper directory to the canonical HF directory (float32 weights).

    The generation config takes suppress ids, begin-suppress ids and alignment heads from the model's
    ``config.json``; the tokenizer is built from its ``tokenizer.json`` (or openai-whisper's assets when absent).
    ``model_bin_parts``: ``model.bin`` is shipped split; these files, in order, are streamed as one.
    """
    from fedwhisper.formats import hf
    from fedwhisper.formats.openai_whisper import dims_to_hf_config

    src = Path(ct2_dir)
    model_bin = src / "model.bin"
    if model_bin_parts:  # errors name the parts: ".../model.bin.part1+model.bin.part2"
        first, *rest = (Path(part) for part in model_bin_parts)
        model_bin = Path("+".join([str(first)] + [part.name for part in rest]))
    spec, variables = read_ct2_model_bin(model_bin, parts=model_bin_parts)
    if spec and spec != "WhisperSpec":
        raise CheckpointError(f"{model_bin}: CTranslate2 spec is {spec!r}, not a Whisper model")
    dims = ct2_dims(variables, model_bin)
    state = ct2_to_hf_state(variables, model_bin, dims)
    config = dims_to_hf_config(dims)
    multilingual, num_languages = hf.vocab_layout(dims["n_vocab"])
    tok_json = src / "tokenizer.json"
    if tok_json.is_file():
        vocab, merges = hf.vocab_merges_from_tokenizer_json(tok_json)
    else:
        log.info("%s has no tokenizer.json; using openai-whisper's tokenizer assets", src)
        vocab, merges = hf.vocab_merges_from_tiktoken(multilingual)
    tokenizer = hf.build_tokenizer(multilingual, num_languages, vocab=vocab, merges=merges)
    ct2_config = {}
    if (src / "config.json").is_file():
        try:
            ct2_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{src / 'config.json'}: not valid JSON ({exc})") from None
    gen = hf.build_generation_config(
        config, tokenizer,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        alignment_heads=ct2_config.get("alignment_heads"),
    )
    if multilingual and ct2_config.get("lang_ids"):
        gen.lang_to_id = _lang_to_id(ct2_config["lang_ids"], tokenizer, src / "config.json")
    out = hf.write_whisper_dir(state, config, out_dir, tokenizer_from=tokenizer, generation_config=gen,
                               dtype=torch.float32)
    log.info("imported CTranslate2 %s -> %s (%d tensors, float32)", src, out, len(state))
    return out


def export_ctranslate2(hf_dir: str | Path, out_dir: str | Path, quantization: str = "float32") -> Path:
    """Convert a canonical directory to CTranslate2 with its own converter (offline), written atomically."""
    from ctranslate2.converters import TransformersConverter

    from fedwhisper.atomic import remove_stale_siblings
    from fedwhisper.formats.hf import replace_dir

    src, out = Path(hf_dir), Path(out_dir)
    remove_stale_siblings(out)
    copy = [n for n in ("tokenizer.json", "preprocessor_config.json") if (src / n).is_file()]
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        TransformersConverter(str(src), copy_files=copy, low_cpu_mem_usage=True).convert(
            str(tmp), quantization=quantization, force=True
        )
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> CTranslate2 %s (%s)", src, out, quantization)
    return out


# Bump when export_ctranslate2 changes what it writes, so that older cached conversions are not reused.
CT2_CACHE_FORMAT = 1
CT2_CACHE_ENV = "FEDWHISPER_CT2_CACHE"
CT2_CACHE_KEEP = 3  # base and merged model of a pipeline run, plus one; each is a full fp32 copy of a model


def ct2_cache_root() -> Path | None:
    """Where converted models are kept: ``$FEDWHISPER_CT2_CACHE`` (``off`` disables), else ``ctranslate2/`` next to
    the sha256 cache (``~/.cache/fedwhisper/ctranslate2``)."""
    from fedwhisper.hash_cache import user_cache_dir

    env = os.environ.get(CT2_CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("off", "0", "none", "") else Path(env).expanduser()
    return user_cache_dir() / "ctranslate2"


def ct2_cache_key(hf_dir: str | Path, quantization: str) -> str:
    """sha256 over every file of ``hf_dir`` (names and contents, from the hash cache when unchanged), the
    quantization and the CTranslate2 version: the same key means the same conversion."""
    import ctranslate2

    from fedwhisper.formats.checkpoints import sha256_file
    from fedwhisper.hash_cache import cached_sha256

    src = Path(hf_dir)
    files = sorted(p for p in src.iterdir() if p.is_file())
    parts = {"format": CT2_CACHE_FORMAT, "ctranslate2": ctranslate2.__version__, "quantization": quantization,
             "files": [[p.name, cached_sha256(p, sha256_file)] for p in files]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_ctranslate2_export(hf_dir: str | Path, quantization: str = "float32") -> Path | None:
    """The CTranslate2 conversion of ``hf_dir``, converted once and then reused while the directory's files are
    unchanged (keyed by ``ct2_cache_key``); None when the cache is off.

    Each conversion is written to a temporary sibling and renamed into place; when another process got there first,
    its copy is kept and ours dropped (a rename onto a non-empty directory fails), so a reader never sees a
    directory replaced under it. The ``CT2_CACHE_KEEP`` most recently used conversions are kept, older ones removed.
    """
    root = ct2_cache_root()
    if root is None:
        return None
    out = root / ct2_cache_key(hf_dir, quantization)
    if (out / "model.bin").is_file():
        log.info("CTranslate2 conversion of %s: reused %s", hf_dir, out)
    else:
        from fedwhisper.atomic import remove_stale_siblings

        root.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        export_ctranslate2(hf_dir, tmp, quantization=quantization)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "model.bin").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted the same model first
    os.utime(out)  # most recently used
    entries = sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{64}", p.name)),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[CT2_CACHE_KEEP:]:
        shutil.rmtree(stale, ignore_errors=True)
    return out
