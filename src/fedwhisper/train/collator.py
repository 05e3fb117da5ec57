"""Label preparation and the training collator: (audio, text) rows -> log-mel features and label ids.

Label layout (what the decoder must predict after ``decoder_start_token_id``):

    English-only:  <|startoftranscript|> <|notimestamps|> " text" <|endoftext|>
    multilingual:  <|startoftranscript|> <|lang|> <|task|> <|notimestamps|> " text" <|endoftext|>

The model shifts labels right and prepends ``decoder_start_token_id`` itself, so the collator strips a leading
``<|startoftranscript|>``. It compares with ``decoder_start_token_id``; the HF blog compares with ``bos_token_id``,
which for Whisper is ``<|endoftext|>``, so the strip never happens there and the model learns a doubled start token.
Text is encoded with a leading space, as openai-whisper does, so the first word is the token the model already emits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from fedwhisper.decode.features import log_mel_batch
from fedwhisper.errors import ParamsError
from fedwhisper.train.encoder_window import check_window, window_frames

IGNORE_INDEX = -100  # positions the loss skips (torch.nn.CrossEntropyLoss ignore_index)


def language_token(language: str) -> str:
    """``en`` or ``english`` -> ``<|en|>``."""
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    code = language.lower().strip("<|>")
    code = TO_LANGUAGE_CODE.get(code, code)
    if code not in LANGUAGES:
        raise ParamsError(
            f"finetune.language: {language!r} is not a Whisper language; use a code such as 'en' or 'de'"
        )
    return f"<|{code}|>"


def label_prefix(tokenizer, multilingual: bool, language: Optional[str], task: str) -> list[int]:
    """The special tokens every label starts with, ``<|startoftranscript|>`` included."""
    ids = tokenizer.convert_tokens_to_ids
    prefix = [ids("<|startoftranscript|>")]
    if multilingual:
        if language is None:
            raise ParamsError("finetune.language: null, but the base model is multilingual; set a code such as 'en'")
        if task not in ("transcribe", "translate"):
            raise ParamsError(f"finetune.task: got {task!r}; allowed: 'transcribe' | 'translate'")
        prefix += [ids(language_token(language)), ids(f"<|{task}|>")]
    elif task == "translate":
        raise ParamsError(
            "finetune.task: 'translate' needs a multilingual base model (an English-only model has no task tokens); "
            "set finetune.task to transcribe or use a multilingual base"
        )
    prefix.append(ids("<|notimestamps|>"))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in prefix:
        raise ParamsError(f"finetune: the tokenizer lacks one of the prefix tokens {tokenizer.convert_ids_to_tokens(prefix)}")
    return prefix


def label_ids(tokenizer, text: str, prefix: Sequence[int], eot_id: int) -> list[int]:
    """prefix + ``" " + text`` + ``<|endoftext|>``."""
    return [*prefix, *tokenizer.encode(" " + text.strip(), add_special_tokens=False), eot_id]


def strip_decoder_start(labels: Sequence[Sequence[int]], decoder_start_token_id: int) -> list[list[int]]:
    """Drop a leading ``decoder_start_token_id`` from each row (the model prepends it when it shifts labels)."""
    return [list(row[1:]) if row and row[0] == decoder_start_token_id else list(row) for row in labels]


def pad_labels(labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, longest) int64, padded with -100 by length, so a real ``<|endoftext|>`` (= pad id) keeps its loss."""
    out = torch.full((len(labels), max(len(r) for r in labels)), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(labels):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


@dataclass
class WhisperCollator:
    """Rows with ``audio`` (16 kHz float32) and ``text`` -> ``{"input_features", "labels"}``.

    With ``encoder_cache`` (item id -> encoder states, see ``encoder_cache.py``) a batch whose ids are all cached gets
    ``{"encoder_outputs", "labels"}`` instead, the states wrapped in ``cached_states`` (default ``BaseModelOutput``:
    the encoder's final output, so the model skips the encoder).

    ``encoder_window="longest"`` keeps the first ``window_frames`` of the batch's 30 s features: the longest clip's
    frames, rounded up to even (``encoder_window.py``; the model's encoder must take such windows).
    """

    tokenizer: object
    prefix: list[int]
    eot_id: int
    decoder_start_token_id: int
    num_mel_bins: int = 80
    encoder_cache: Optional[dict[str, torch.Tensor]] = None
    cached_states: Optional[type] = None
    encoder_window: str = "full"
    full_frames: int = 3000

    def __post_init__(self):
        check_window(self.encoder_window)

    def __call__(self, rows: Sequence[dict]) -> dict:
        labels = [label_ids(self.tokenizer, str(r["text"]), self.prefix, self.eot_id) for r in rows]
        labels = pad_labels(strip_decoder_start(labels, self.decoder_start_token_id))
        if self.encoder_cache is not None and all(str(r.get("id")) in self.encoder_cache for r in rows):
            from transformers.modeling_outputs import BaseModelOutput

            hidden = torch.stack([self.encoder_cache[str(r["id"])] for r in rows])
            return {"encoder_outputs": (self.cached_states or BaseModelOutput)(last_hidden_state=hidden), "labels": labels}
        audio = [np.array(r["audio"], dtype=np.float32) for r in rows]  # a copy: memory-mapped rows are read-only
        features = log_mel_batch(audio, self.num_mel_bins)
        if self.encoder_window == "longest":
            features = features[..., : window_frames([len(a) for a in audio], self.full_frames)].contiguous()
        return {"input_features": features, "labels": labels}
