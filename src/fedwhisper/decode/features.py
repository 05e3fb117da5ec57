"""Batched Whisper log-mel features in torch (one STFT call per batch, no per-clip feature-extractor overhead)."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import whisper.audio

SAMPLING_RATE = 16000
N_SAMPLES = whisper.audio.N_SAMPLES  # 30 s window
N_FRAMES = whisper.audio.N_FRAMES  # 3000 mel frames per window


@functools.lru_cache(maxsize=8)
def _mel_filters(n_mels: int, device: str) -> torch.Tensor:
    return whisper.audio.mel_filters(device, n_mels)


@functools.lru_cache(maxsize=4)
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(whisper.audio.N_FFT, device=device)


def log_mel_batch(audios: Sequence[np.ndarray], n_mels: int = 80, device: str = "cpu") -> torch.Tensor:
    """(B, n_mels, 3000) log-mel of clips of at most 30 s, each zero-padded to 30 s.

    Same formula as ``whisper.log_mel_spectrogram`` (and HF's WhisperFeatureExtractor), but the
    dynamic-range clamp (max - 8) is taken per clip rather than over the whole batch.

    The STFT runs only over the frames that overlap the longest clip: every later frame windows zeros, so its
    power spectrum is exactly zero, and it is filled in as such (a 4 s clip needs 14% of the 30 s window's FFTs).
    Everything after the STFT runs on the whole window as before, so the values are bit-identical to the STFT of
    the fully padded window (tested).
    """
    hop, n_fft = whisper.audio.HOP_LENGTH, whisper.audio.N_FFT
    longest = max((min(len(a), N_SAMPLES) for a in audios), default=0)
    # frame t (centre t * hop) reads samples [t * hop - n_fft / 2, t * hop + n_fft / 2): it is non-zero only while
    # t * hop - n_fft / 2 < longest, and exact in a truncated signal while t * hop + n_fft / 2 <= its length.
    active = min(N_FRAMES, -(-(longest + n_fft // 2) // hop))
    length = active * hop + n_fft
    if length >= N_SAMPLES:
        active, length = N_FRAMES, N_SAMPLES
    padded = np.zeros((len(audios), length), dtype=np.float32)
    for i, a in enumerate(audios):
        a = np.asarray(a, dtype=np.float32)[:N_SAMPLES]
        padded[i, : a.shape[0]] = a
    batch = torch.from_numpy(padded).to(device)
    stft = torch.stft(batch, n_fft, hop, window=_window(str(device)), return_complex=True)
    if active == N_FRAMES:
        magnitudes = stft[..., :-1].abs() ** 2
    else:
        magnitudes = torch.zeros((len(audios), stft.shape[1], N_FRAMES), dtype=torch.float32, device=batch.device)
        magnitudes[..., :active] = stft[..., :active].abs() ** 2
    mel = _mel_filters(n_mels, str(device)) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0
