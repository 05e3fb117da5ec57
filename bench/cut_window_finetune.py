"""Experiment harness (issue 16, item 1): `stages/finetune.py` with every batch's encoder window cut to CUT frames.

Not part of the pipeline: it patches two functions for one process, then runs the real finetune stage unchanged.
- `WhisperCollator.__call__`: the log-mel features keep their first CUT frames (100 per second) instead of
  Whisper's 3000 (30 s). Set CUT at or above the longest training clip, or clips are truncated.
- `WhisperEncoder.forward`: for a window shorter than 3000 frames, the encoder uses the first CUT / 2 rows of its
  positional embeddings (fixed sinusoids, never trained) for that call; 3000-frame input runs unchanged.
The saved model is an ordinary Whisper directory with all 1500 positions, decoded on 30 s windows as usual.

    CUT_FRAMES=640 python bench/cut_window_finetune.py --client en-us --out DIR --checkpoints DIR --metrics DIR

bench/README.md ("train_step.py") gives what this measured on the default data.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
import transformers.models.whisper.modeling_whisper as modeling_whisper

from fedwhisper.train import collator

FULL_FRAMES = 3000
CUT = int(os.environ.get("CUT_FRAMES", "640"))
if CUT % 2 or not 2 <= CUT <= FULL_FRAMES:
    raise SystemExit(f"cut_window_finetune: CUT_FRAMES={CUT}: give an even number from 2 to {FULL_FRAMES}")

_collate = collator.WhisperCollator.__call__
_encode = modeling_whisper.WhisperEncoder.forward


def _cut_collate(self, rows):
    batch = _collate(self, rows)
    batch["input_features"] = batch["input_features"][..., :CUT].contiguous()
    return batch


def _short_encode(self, input_features, *args, **kwargs):
    frames = input_features.shape[-1]
    if frames == FULL_FRAMES:
        return _encode(self, input_features, *args, **kwargs)
    full, positions = self.embed_positions, self.config.max_source_positions
    short = torch.nn.Embedding(frames // 2, full.weight.shape[1])
    short.weight = torch.nn.Parameter(full.weight[: frames // 2], requires_grad=False)
    self.embed_positions, self.config.max_source_positions = short, frames // 2
    try:
        return _encode(self, input_features, *args, **kwargs)
    finally:
        self.embed_positions, self.config.max_source_positions = full, positions


collator.WhisperCollator.__call__ = _cut_collate
modeling_whisper.WhisperEncoder.forward = _short_encode

if __name__ == "__main__":
    stage = Path("stages/finetune.py")
    if not stage.is_file():
        raise SystemExit("cut_window_finetune: run it from the project root (stages/finetune.py not found)")
    sys.argv = [str(stage), *sys.argv[1:]]
    runpy.run_path(str(stage), run_name="__main__")
