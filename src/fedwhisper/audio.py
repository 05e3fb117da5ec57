"""Audio decoding to 16 kHz mono float32 with soundfile (libsndfile), never ffmpeg."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fedwhisper.errors import DataError

SAMPLING_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")


def load_16k_mono(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes (WAV, FLAC, MP3, OGG; any rate, depth, channels) to 16 kHz mono.

    ``name`` labels the audio in error messages (defaults to the path).
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<audio bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DataError(f"{label}: audio is 0 bytes; re-export or remove the file")
        source = bytes(source)
    try:
        data, rate = _read_soundfile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_exc:
        try:
            data, rate = _read_audioread(source)
        except Exception as ar_exc:
            raise DataError(
                f"{label}: cannot decode audio (soundfile: {getattr(sf_exc, 'error_string', sf_exc)}; "
                f"audioread: {str(ar_exc) or type(ar_exc).__name__}); "
                "convert it to WAV/FLAC/MP3/OGG or remove it"
            ) from None
    except FileNotFoundError:
        raise DataError(f"{label}: audio file not found; check the path") from None
    return to_16k_mono(data, rate)


def to_16k_mono(data: np.ndarray, rate: int) -> np.ndarray:
    """Average channels (samples x channels, or 1-D) and resample to 16 kHz with soxr."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float32)
    elif data.ndim != 1:
        raise DataError(f"audio array has shape {data.shape}; expected (samples,) or (samples, channels)")
    if rate <= 0:
        raise DataError(f"audio sampling rate {rate} is not positive")
    if rate != SAMPLING_RATE and data.size:
        data = soxr.resample(data, rate, SAMPLING_RATE, quality="HQ")
    return np.ascontiguousarray(data, dtype=np.float32)


def _read_soundfile(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    data, rate = sf.read(handle, dtype="float32", always_2d=True)
    return data, int(rate)


def _read_audioread(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Fallback through audioread's non-ffmpeg backends (raw WAV/AIFF, GStreamer, MAD, Core Audio)."""
    import audioread

    backends = [b for b in audioread.available_backends() if "ffmpeg" not in b.__name__.lower()]
    if not backends:
        raise RuntimeError("no non-ffmpeg audioread backend available")
    if isinstance(source, bytes):
        fd, tmp = tempfile.mkstemp(suffix=".audio")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source)
            return _read_audioread(tmp)
        finally:
            os.unlink(tmp)
    with audioread.audio_open(str(source), backends=backends) as f:
        rate, channels = int(f.samplerate), int(f.channels)
        pcm = b"".join(f)
    ints = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return ints.reshape(-1, channels), rate
