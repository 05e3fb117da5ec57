"""Tensor naming: openai-whisper state-dict names <-> Hugging Face WhisperForConditionalGeneration names.

HF is the canonical naming. ``proj_out.weight`` is tied to ``model.decoder.embed_tokens.weight`` in HF and has no
openai counterpart; canonical state dicts never contain it.
"""

from __future__ import annotations

import re

_BLOCK_PARTS = [
    ("attn.query.", "self_attn.q_proj."),
    ("attn.key.", "self_attn.k_proj."),
    ("attn.value.", "self_attn.v_proj."),
    ("attn.out.", "self_attn.out_proj."),
    ("attn_ln.", "self_attn_layer_norm."),
    ("cross_attn.query.", "encoder_attn.q_proj."),
    ("cross_attn.key.", "encoder_attn.k_proj."),
    ("cross_attn.value.", "encoder_attn.v_proj."),
    ("cross_attn.out.", "encoder_attn.out_proj."),
    ("cross_attn_ln.", "encoder_attn_layer_norm."),
    ("mlp.0.", "fc1."),
    ("mlp.2.", "fc2."),
    ("mlp_ln.", "final_layer_norm."),
]

_TOP = {
    "encoder.conv1.weight": "model.encoder.conv1.weight",
    "encoder.conv1.bias": "model.encoder.conv1.bias",
    "encoder.conv2.weight": "model.encoder.conv2.weight",
    "encoder.conv2.bias": "model.encoder.conv2.bias",
    "encoder.positional_embedding": "model.encoder.embed_positions.weight",
    "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
    "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
    "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    "decoder.ln.weight": "model.decoder.layer_norm.weight",
    "decoder.ln.bias": "model.decoder.layer_norm.bias",
}
_TOP_INV = {v: k for k, v in _TOP.items()}

_OPENAI_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")

TIED_HF_KEY = "proj_out.weight"


def openai_to_hf(name: str) -> str:
    """Map one openai-whisper tensor name to its HF name; KeyError for a name Whisper does not have."""
    if name in _TOP:
        return _TOP[name]
    m = _OPENAI_BLOCK.match(name)
    if m:
        side, idx, rest = m.groups()
        for old, new in _BLOCK_PARTS:
            if rest.startswith(old):
                return f"model.{side}.layers.{idx}.{new}{rest[len(old):]}"
    raise KeyError(f"{name!r} is not an openai-whisper tensor name")


def hf_to_openai(name: str) -> str:
    """Map one HF Whisper tensor name to its openai-whisper name; KeyError for names with no counterpart."""
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = _HF_BLOCK.match(name)
    if m:
        side, idx, rest = m.groups()
        for old, new in _BLOCK_PARTS:
            if rest.startswith(new):
                return f"{side}.blocks.{idx}.{old}{rest[len(new):]}"
    raise KeyError(f"{name!r} is not an HF Whisper tensor name with an openai-whisper counterpart")


def is_openai_naming(names) -> bool:
    """True when a state dict uses openai-whisper names (``encoder.blocks.0...``)."""
    return any(n.startswith(("encoder.", "decoder.")) for n in names)


def canonical_name(name: str) -> str | None:
    """Canonical (HF) name for a tensor in either naming; None for the tied ``proj_out.weight``."""
    if name == TIED_HF_KEY:
        return None
    if name.startswith("model."):
        return name
    return openai_to_hf(name)
