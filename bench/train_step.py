"""Where a CPU training step goes, and what a shorter encoder window would save (issue 16, item 1: profile first).

Times full fine-tuning steps of a Whisper model (default: the pipeline's base, models/base) on random log-mel input
and random labels, as `finetune` trains (AdamW, encoder and decoder trained, batch 8, fp32):
- the step on Whisper's full 30 s window (3000 frames), split into encoder forward, decoder forward + loss,
  backward and optimizer step: the baseline;
- the same step on shorter encoder windows (``--frames``), as ``finetune.encoder_window: longest`` trains on a
  window cut to its batch's longest clip (the library's ``WindowedWhisperEncoder``). The encoder's positional
  embeddings are fixed sinusoids (not trained), so a shorter window only uses their first rows.

Prints medians and each window's speed-up against the 30 s baseline measured in the same run. This measures speed
only; what the windows do to the trained models' WER is in the README ("Speed").

    python bench/train_step.py [--model models/base] [--batch 8] [--label_tokens 20] [--frames 1000 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

FULL_FRAMES = 3000  # Whisper's 30 s window: 100 log-mel frames per second


def windowed_copy(model, frames: int):
    """A copy of ``model`` whose encoder takes ``frames`` log-mel frames, as ``finetune.encoder_window: longest``
    trains (``fedwhisper.train.encoder_window``: the first ``frames // 2`` positional embeddings)."""
    from fedwhisper.train.encoder_window import enable_encoder_windows

    if frames % 2 or not 2 <= frames <= FULL_FRAMES:
        raise SystemExit(f"train_step: --frames {frames}: give an even number from 2 to {FULL_FRAMES}")
    model = copy.deepcopy(model)
    enable_encoder_windows(model)
    return model


def timed_steps(model, frames: int, batch: int, label_tokens: int, repeats: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    for _ in range(repeats + 1):  # the first step warms up allocators and kernels; not counted
        features = torch.randn(batch, model.config.num_mel_bins, frames)
        labels = torch.randint(0, vocab - 1, (batch, label_tokens))
        t0 = time.perf_counter()
        encoded = model.model.encoder(features).last_hidden_state
        t1 = time.perf_counter()
        loss = model(encoder_outputs=(encoded,), labels=labels).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        times.append({"encoder forward": t1 - t0, "decoder forward + loss": t2 - t1, "backward": t3 - t2,
                      "optimizer": t4 - t3, "step": t4 - t0})
    return times[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--label_tokens", type=int, default=20)
    parser.add_argument("--frames", type=int, nargs="*", default=[1000, 600])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"train_step: {args.model}: no config.json; run `dvc repro base` or give --model DIR")
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(args.model)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, batch {args.batch}, "
          f"{args.label_tokens} label tokens, {torch.get_num_threads()} threads, {args.repeats} timed steps each")
    runs = {FULL_FRAMES: timed_steps(model, FULL_FRAMES, args.batch, args.label_tokens, args.repeats, args.seed)}
    for frames in args.frames:
        runs[frames] = timed_steps(windowed_copy(model, frames), frames, args.batch, args.label_tokens,
                                   args.repeats, args.seed)
    parts = list(runs[FULL_FRAMES][0])
    baseline = statistics.median(t["step"] for t in runs[FULL_FRAMES])
    print("| encoder window | " + " | ".join(parts) + " | x the 30 s step |")
    print("|---|" + "---:|" * (len(parts) + 1))
    for frames, times in runs.items():
        cells = [f"{statistics.median(t[part] for t in times):.2f} s" for part in parts]
        speedup = baseline / statistics.median(t["step"] for t in times)
        print(f"| {frames} frames ({frames / 100:g} s) | " + " | ".join(cells) + f" | {speedup:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
