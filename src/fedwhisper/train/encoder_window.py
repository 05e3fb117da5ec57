"""Training on encoder windows that end with the batch's longest clip, instead of Whisper's fixed 30 s.

Whisper's encoder always sees 3000 log-mel frames (30 s); a 4 s clip is 87% padding. Training time on CPU is mostly
the encoder's forward and backward passes, and they scale with the window: a tiny.en step at batch 8 takes 9.1 s on
the 30 s window and 1.5 s on a 6 s one (bench/train_step.py). With ``finetune.encoder_window: longest`` each training
batch keeps the first ``window_frames(batch)`` frames of its 30 s features (the longest clip's frames, rounded up to
an even number), so no clip loses audio, and the encoder runs on that window:

- The features are Whisper's own, cut: the first N frames of the 30 s window, bit for bit.
- The encoder adds its first N / 2 positional embeddings (fixed sinusoids, never trained) instead of all 1500.
  ``WindowedWhisperEncoder`` does that by lending HF's ``WhisperEncoder.forward`` a view of those rows for the call;
  everything else in the forward pass is HF's, unchanged.
- Only training batches are cut. Validation generation, the frozen-encoder cache and the saved model use 30 s
  windows, as every decoder of the exported model does.

The saved model is an ordinary Whisper checkpoint. On the default data this kept the merged model's pooled test WER
(5.1 vs 5.2 with 30 s windows) at a quarter of the training time (README, "Speed").
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from fedwhisper.errors import ParamsError

HOP_LENGTH = 160  # samples per log-mel frame at 16 kHz
WINDOWS = ("full", "longest")


def full_frames(config) -> int:
    """Log-mel frames of the encoder's full window: 2 per position (conv2 has stride 2), 3000 for every Whisper."""
    return 2 * int(config.max_source_positions)


def window_frames(lengths: Sequence[int], full: int) -> int:
    """Frames that hold the longest of ``lengths`` (samples at 16 kHz): ceil(longest / hop), rounded up to even,
    at least 2 and at most ``full``."""
    longest = max((int(n) for n in lengths), default=0)
    frames = -(-longest // HOP_LENGTH)
    frames += frames % 2
    return max(2, min(full, frames))


def check_window(window: str) -> str:
    if window not in WINDOWS:
        raise ParamsError(f"finetune.encoder_window: got {window!r}; allowed: " + " | ".join(repr(w) for w in WINDOWS))
    return window


class WindowedWhisperEncoder(WhisperEncoder):
    """``WhisperEncoder`` that also takes a shorter, even number of frames than its 30 s window.

    A full window runs HF's forward untouched. A window of N frames runs it with ``embed_positions`` lent as the first
    N / 2 rows of the real table (a view: same storage, no gradient) and ``config.max_source_positions`` = N / 2 for
    that call; both are put back when the call returns or raises. Installed on a model by ``enable_encoder_windows``.
    """

    def forward(self, input_features: torch.Tensor, *args, **kwargs):
        full = self.embed_positions.num_embeddings * 2
        frames = int(input_features.shape[-1])
        if frames == full:
            return super().forward(input_features, *args, **kwargs)
        if frames % 2 or not 2 <= frames < full:
            raise ValueError(f"encoder window: {frames} log-mel frames; give an even number from 2 to {full}")
        table, positions = self.embed_positions, self.config.max_source_positions
        window = torch.nn.Embedding(frames // 2, table.embedding_dim, _weight=table.weight.detach()[: frames // 2],
                                    _freeze=True)
        self.embed_positions, self.config.max_source_positions = window, frames // 2
        try:
            return super().forward(input_features, *args, **kwargs)
        finally:
            self.embed_positions, self.config.max_source_positions = table, positions


def enable_encoder_windows(model) -> None:
    """Let ``model``'s encoder (a ``WhisperForConditionalGeneration`` or ``WhisperModel``) take short windows.

    Changes the encoder's class in place, so copies of the model keep it; weights, state dict and saving are
    unchanged."""
    encoder = model.get_encoder()
    if isinstance(encoder, WindowedWhisperEncoder):
        return
    if type(encoder) is not WhisperEncoder:
        raise TypeError(f"finetune.encoder_window: expected HF's WhisperEncoder, got {type(encoder).__name__}")
    encoder.__class__ = WindowedWhisperEncoder
