"""Length-sorted batched transcription over a backend; clips over 30 s go through long-form decoding."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from fedwhisper.decode.backends import Backend
from fedwhisper.decode.features import N_SAMPLES, SAMPLING_RATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transcription:
    texts: list[str]
    audio_seconds: float
    decode_seconds: float
    languages: list[str]  # per clip: detected when auto-detecting, else the language asked for

    @property
    def rtfx(self) -> float:
        return self.audio_seconds / self.decode_seconds if self.decode_seconds > 0 else float("inf")


def plan_batches(n_samples: Sequence[int], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Indices of short clips grouped longest first into batches, and the indices of clips over 30 s."""
    short = [i for i, n in enumerate(n_samples) if n <= N_SAMPLES]
    long = [i for i, n in enumerate(n_samples) if n > N_SAMPLES]
    short.sort(key=lambda i: (-n_samples[i], i))
    return [short[i : i + batch_size] for i in range(0, len(short), batch_size)], long


def transcribe_indexed(
    backend: Backend,
    n_samples: Sequence[int],
    load: Callable[[list[int]], list[np.ndarray]],
    batch_size: int,
    desc: str = "decode",
    progress: bool = True,
) -> Transcription:
    """Transcribe items ``0..len(n_samples)-1``; ``load(indices)`` returns their 16 kHz audio on demand."""
    batches, long = plan_batches(n_samples, batch_size)
    texts: list[str] = [""] * len(n_samples)
    languages: list[str] = [""] * len(n_samples)
    decode_seconds = 0.0
    with tqdm(total=len(n_samples), desc=desc, unit="clip", disable=not progress) as bar:
        for idx in batches:
            audios = load(idx)
            start = time.perf_counter()
            for i, decoded in zip(idx, backend.decode_short(audios)):
                texts[i], languages[i] = decoded
            decode_seconds += time.perf_counter() - start
            bar.update(len(idx))
        for i in long:
            (audio,) = load([i])
            start = time.perf_counter()
            texts[i], languages[i] = backend.decode_long(audio)
            decode_seconds += time.perf_counter() - start
            bar.update(1)
    audio_seconds = float(sum(n_samples)) / SAMPLING_RATE
    return Transcription(texts, audio_seconds, decode_seconds, languages)


def transcribe_audios(
    backend: Backend, audios: Sequence[np.ndarray], batch_size: int, desc: str = "decode", progress: bool = True
) -> Transcription:
    """Transcribe in-memory 16 kHz clips, returning texts in input order."""
    return transcribe_indexed(
        backend, [len(a) for a in audios], lambda idx: [audios[i] for i in idx], batch_size, desc, progress
    )
