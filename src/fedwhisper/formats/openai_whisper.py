"""openai-whisper checkpoints: safe reading, dims <-> HF config, export to ``.pt``, in-memory ``whisper.model.Whisper``.

A ``.pt`` is either ``{"dims": {...}, "model_state_dict": {...}}`` (what ``whisper.load_model`` reads) or a bare
state dict (what federated clients and i4Ds/whisper-finetune write); a bare one needs dims from ``ARCHITECTURES``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from fedwhisper.atomic import remove_stale_siblings
from fedwhisper.errors import CheckpointError
from fedwhisper.formats.naming import canonical_name, hf_to_openai

log = logging.getLogger(__name__)

DIM_KEYS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
            "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


def _dims(n_mels, state, head, audio_layers, text_layers, vocab) -> dict[str, int]:
    return dict(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=state, n_audio_head=head, n_audio_layer=audio_layers,
                n_vocab=vocab, n_text_ctx=448, n_text_state=state, n_text_head=head, n_text_layer=text_layers)


ARCHITECTURES: dict[str, dict[str, int]] = {
    "tiny.en": _dims(80, 384, 6, 4, 4, 51864),
    "tiny": _dims(80, 384, 6, 4, 4, 51865),
    "base.en": _dims(80, 512, 8, 6, 6, 51864),
    "base": _dims(80, 512, 8, 6, 6, 51865),
    "small.en": _dims(80, 768, 12, 12, 12, 51864),
    "small": _dims(80, 768, 12, 12, 12, 51865),
    "medium.en": _dims(80, 1024, 16, 24, 24, 51864),
    "medium": _dims(80, 1024, 16, 24, 24, 51865),
    "large-v1": _dims(80, 1280, 20, 32, 32, 51865),
    "large-v2": _dims(80, 1280, 20, 32, 32, 51865),
    "large-v3": _dims(128, 1280, 20, 32, 32, 51866),
    "large": _dims(128, 1280, 20, 32, 32, 51866),
    "large-v3-turbo": _dims(128, 1280, 20, 32, 4, 51866),
    "turbo": _dims(128, 1280, 20, 32, 4, 51866),
}


# --------------------------------------------------------------------------- reading


def unpickling_error(path: Path, exc: Exception) -> CheckpointError:
    """The error for a PyTorch file that ``torch.load(weights_only=True)`` did not load.

    A pickle the weights-only unpickler stops on is refused as holding more than tensors: code it names (``GLOBAL
    module.name``), or opcodes a plain ``torch.save`` of tensors does not write. torch's own hint to retry with
    ``weights_only=False`` is never passed on.
    """
    text = str(exc)
    ask = "Nothing was executed. Ask its author for a safetensors file or a plain state dict saved with " \
          "torch.save(model.state_dict())"
    blocked = re.search(r"GLOBAL (\S+)", text)
    if blocked:
        return CheckpointError(f"{path}: refused to load: the pickle references code or objects beyond plain tensors "
                               f"({blocked.group(1)}). {ask}")
    if isinstance(exc, pickle.UnpicklingError):
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = unpickler.group(1).strip() if unpickler else "weights-only unpickling failed"
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint of plain tensors; refused to load "
                               f"({detail}). {ask}")
    first = text.strip().splitlines()
    return CheckpointError(f"{path}: unreadable or truncated checkpoint ({first[0] if first else type(exc).__name__}); "
                           "re-copy or re-export it")


def _compressed_zip_members(path: Path) -> list[str]:
    """Members of a zip-format torch file stored compressed (``torch.save`` stores them uncompressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError):
        return []  # legacy (non-zip) format, or damaged: torch.load reports it


def load_torch_checkpoint(path: str | Path) -> tuple[Any, bool]:
    """``torch.load(weights_only=True)`` of a ``.pt``/``.bin``: (object, memory-mapped?). CheckpointError otherwise.

    The file is memory-mapped when it is a zip whose members are stored uncompressed, as ``torch.save`` writes it. A
    legacy (non-zip) file, or one re-zipped with compression, is read into memory: mapping a compressed member
    would hand back its compressed bytes as tensor data.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; check the checkpoint path")
    compressed = _compressed_zip_members(path)
    if compressed:
        log.info("%s: %d zip members are compressed (e.g. %s); reading it into memory, not memory-mapped",
                 path, len(compressed), compressed[0])
    use_mmap = zipfile.is_zipfile(path) and not compressed
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap), use_mmap
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, struct.error) as exc:
        raise unpickling_error(path, exc) from None


def read_openai_pt(path: str | Path) -> tuple[Optional[dict[str, int]], dict[str, torch.Tensor]]:
    """Load a ``.pt`` without running code from it: (dims or None for a bare state dict, state dict).

    A pickle that needs anything beyond tensors and plain containers is refused with CheckpointError.
    """
    path = Path(path)
    obj, _ = load_torch_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or {{dims, model_state_dict}}")
    dims = None
    if "model_state_dict" in obj:
        state, dims = obj["model_state_dict"], obj.get("dims")
        if dims is not None:
            dims = _check_dims(dims, f"{path}: dims")
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: the state dict is empty or not a mapping")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:3]} are not tensors; is this a Whisper state dict?")
    return dims, dict(state)


def _check_dims(dims, where: str) -> dict[str, int]:
    if hasattr(dims, "__dataclass_fields__"):
        dims = {k: getattr(dims, k) for k in DIM_KEYS}
    if not isinstance(dims, Mapping):
        raise CheckpointError(f"{where}: got {type(dims).__name__}; expected a mapping of {', '.join(DIM_KEYS)}")
    missing = [k for k in DIM_KEYS if k not in dims]
    if missing:
        raise CheckpointError(f"{where}: missing {missing}")
    return {k: int(dims[k]) for k in DIM_KEYS}


def dims_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Every dim but the head counts, read from tensor shapes (openai or HF naming); heads are returned as 0."""
    canon = {}
    for name, t in state.items():
        try:
            c = canonical_name(name)
        except KeyError:
            continue
        if c is not None:
            canon[c] = t
    try:
        conv1 = canon["model.encoder.conv1.weight"]
        emb = canon["model.decoder.embed_tokens.weight"]
        enc_pos = canon["model.encoder.embed_positions.weight"]
        dec_pos = canon["model.decoder.embed_positions.weight"]
    except KeyError as exc:
        raise CheckpointError(f"state dict lacks {exc.args[0]}; is this a Whisper checkpoint?") from None

    def layers(side: str) -> int:
        idx = {int(n.split(".")[3]) for n in canon if n.startswith(f"model.{side}.layers.")}
        return max(idx) + 1 if idx else 0

    return dict(n_mels=conv1.shape[1], n_audio_ctx=enc_pos.shape[0], n_audio_state=conv1.shape[0], n_audio_head=0,
                n_audio_layer=layers("encoder"), n_vocab=emb.shape[0], n_text_ctx=dec_pos.shape[0],
                n_text_state=emb.shape[1], n_text_head=0, n_text_layer=layers("decoder"))


def resolve_dims(state: Mapping[str, torch.Tensor], architecture: Optional[str], where: str) -> dict[str, int]:
    """Dims for a bare state dict: from ``architecture`` (checked against the shapes), or the one table entry that
    matches the shapes."""
    seen = dims_from_state_dict(state)
    shape_keys = [k for k in DIM_KEYS if not k.endswith("_head")]
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"base.architecture={architecture!r} is not an openai-whisper model; use one of {', '.join(ARCHITECTURES)}"
            )
        dims = ARCHITECTURES[architecture]
        diff = {k: (seen[k], dims[k]) for k in shape_keys if seen[k] != dims[k]}
        if diff:
            raise CheckpointError(f"{where}: shapes do not match architecture {architecture!r}: {diff} (found, expected)")
        return dict(dims)
    matches = [n for n, d in ARCHITECTURES.items() if all(seen[k] == d[k] for k in shape_keys)]
    if not matches:
        raise CheckpointError(
            f"{where}: bare state dict with shapes {seen} matches no openai-whisper architecture; "
            f"set base.architecture (--architecture) to the model it was trained from"
        )
    return dict(ARCHITECTURES[matches[0]])


def openai_state_to_hf(state: Mapping[str, torch.Tensor], where: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename to canonical HF names; drops the tied ``proj_out.weight`` and openai's ``alignment_heads`` buffer."""
    out = {}
    for name, t in state.items():
        if name == "alignment_heads":
            continue
        try:
            c = canonical_name(name)
        except KeyError:
            raise CheckpointError(f"{where}: tensor {name!r} is not a Whisper tensor; is this a Whisper checkpoint?") from None
        if c is not None:
            out[c] = t
    return out


# --------------------------------------------------------------------------- dims <-> HF config


def dims_to_hf_config(dims: Mapping[str, int]):
    from transformers import WhisperConfig

    from fedwhisper.formats.hf import vocab_layout

    dims = _check_dims(dims, "dims")
    if dims["n_audio_state"] != dims["n_text_state"]:
        raise CheckpointError(f"dims: n_audio_state {dims['n_audio_state']} != n_text_state {dims['n_text_state']}; "
                              "HF Whisper needs one width")
    multilingual, _ = vocab_layout(dims["n_vocab"])
    eot = 50257 if multilingual else 50256
    return WhisperConfig(
        vocab_size=dims["n_vocab"],
        num_mel_bins=dims["n_mels"],
        d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"],
        encoder_attention_heads=dims["n_audio_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"],
        decoder_layers=dims["n_text_layer"],
        decoder_attention_heads=dims["n_text_head"],
        decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"],
        max_target_positions=dims["n_text_ctx"],
        decoder_start_token_id=eot + 1,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
    )


def hf_config_to_dims(config) -> dict[str, int]:
    for side in ("encoder", "decoder"):
        ffn = getattr(config, f"{side}_ffn_dim")
        if ffn != 4 * config.d_model:
            raise CheckpointError(f"config {side}_ffn_dim={ffn}: openai-whisper needs 4 * d_model = {4 * config.d_model}")
    if config.activation_function != "gelu" or config.scale_embedding:
        raise CheckpointError("config: openai-whisper needs activation_function='gelu' and scale_embedding=false")
    return dict(n_mels=config.num_mel_bins, n_audio_ctx=config.max_source_positions, n_audio_state=config.d_model,
                n_audio_head=config.encoder_attention_heads, n_audio_layer=config.encoder_layers,
                n_vocab=config.vocab_size, n_text_ctx=config.max_target_positions, n_text_state=config.d_model,
                n_text_head=config.decoder_attention_heads, n_text_layer=config.decoder_layers)


# --------------------------------------------------------------------------- HF dir -> openai


def hf_dir_to_openai_state(hf_dir: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from fedwhisper.formats.hf import load_config, read_state_dict

    config = load_config(hf_dir)
    dims = hf_config_to_dims(config)
    state = {}
    for name, t in read_state_dict(hf_dir).items():
        try:
            state[hf_to_openai(name)] = t
        except KeyError:
            raise CheckpointError(f"{hf_dir}: tensor {name!r} has no openai-whisper counterpart") from None
    return dims, state


def export_openai_pt(hf_dir: str | Path, out_path: str | Path) -> Path:
    """Write ``{"dims", "model_state_dict"}`` so that ``whisper.load_model(out_path)`` loads it (written atomically)."""
    dims, state = hf_dir_to_openai_state(hf_dir)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        torch.save({"dims": dims, "model_state_dict": state}, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("exported %s -> %s (%d tensors)", hf_dir, out, len(state))
    return out


def load_openai_model(hf_dir: str | Path, device: str | torch.device = "cpu"):
    """A ``whisper.model.Whisper`` built in memory from a canonical directory, alignment heads from its generation
    config."""
    import json

    from whisper.model import ModelDimensions, Whisper

    dims, state = hf_dir_to_openai_state(hf_dir)
    model = Whisper(ModelDimensions(**dims))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{hf_dir}: openai-whisper model mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    gen_path = Path(hf_dir) / "generation_config.json"
    heads = json.loads(gen_path.read_text()).get("alignment_heads") if gen_path.is_file() else None
    if heads:
        mask = torch.zeros(dims["n_text_layer"], dims["n_text_head"], dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.to(device).eval()
