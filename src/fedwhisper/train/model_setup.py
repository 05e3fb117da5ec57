"""The model a client trains: the base loaded from its canonical directory, the encoder frozen as far as the params ask,
SpecAugment on or off, and the language and task that validation generation uses."""

from __future__ import annotations

from pathlib import Path

import torch

from fedwhisper.errors import CheckpointError, ParamsError
from fedwhisper.params import FinetuneParams


def load_base(base_dir: Path):
    """(model, tokenizer, multilingual) from a canonical HF Whisper directory."""
    from transformers import WhisperTokenizerFast

    from fedwhisper.formats.hf import is_hf_whisper_dir, load_whisper_model, vocab_layout

    if not is_hf_whisper_dir(base_dir):
        raise CheckpointError(
            f"{base_dir}: not an HF Whisper directory (config.json + model.safetensors); "
            "run the base stage first (`dvc repro base` or python stages/base.py)"
        )
    model = load_whisper_model(base_dir, dtype=torch.float32)
    try:
        tokenizer = WhisperTokenizerFast.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{base_dir}: cannot load the Whisper tokenizer ({exc})") from None
    multilingual, _ = vocab_layout(model.config.vocab_size)
    return model, tokenizer, multilingual


def frozen_encoder_depth(model, ft: FinetuneParams) -> int:
    """Encoder layers kept frozen: all of them with ``freeze_encoder``, else ``freeze_encoder_layers``."""
    n = int(model.config.encoder_layers)
    if ft.freeze_encoder:
        return n
    if ft.freeze_encoder_layers > n:
        raise ParamsError(f"finetune.freeze_encoder_layers: {ft.freeze_encoder_layers}, but the base model has {n} "
                          f"encoder layers; use 0..{n}")
    return ft.freeze_encoder_layers


def configure_model(model, ft: FinetuneParams, multilingual: bool) -> None:
    """Encoder freezing, SpecAugment, and the language/task that validation generation uses.

    ``freeze_encoder`` freezes the whole encoder. Otherwise ``freeze_encoder_layers = N > 0`` freezes the
    convolution stem, the positional embedding and the lowest N encoder layers; the layers above, the encoder's final
    layer norm and the decoder train.
    """
    depth = frozen_encoder_depth(model, ft)
    if ft.freeze_encoder:
        model.freeze_encoder()
    elif depth > 0:
        enc = model.get_encoder()
        for module in (enc.conv1, enc.conv2, enc.embed_positions, *enc.layers[:depth]):
            module.requires_grad_(False)
    model.config.apply_spec_augment = ft.spec_augment
    gen = model.generation_config
    gen.forced_decoder_ids = None
    if multilingual:
        gen.language = ft.language
        gen.task = ft.task
