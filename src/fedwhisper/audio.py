"""Audio decoding to 16 kHz mono float32 with soundfile (libsndfile), never ffmpeg."""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fedwhisper.errors import DataError

SAMPLING_RATE = 16000
MIN_SAMPLING_RATE = 1000  # below this a header is broken or hostile (resampling 1 Hz to 16 kHz multiplies by 16000)
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")
_COMPRESSED_FRAME_SLACK = 1152  # one MPEG audio frame: encoder padding may differ from the header's count by that


class AudioTooLongError(DataError):
    """The header's duration exceeds the caller's limit; raised before decoding or resampling."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


class TruncatedAudioError(DataError):
    """The file decodes to fewer frames than its header declares (data cut short)."""


def load_16k_mono(source: str | Path | bytes, name: str | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes (WAV, FLAC, MP3, OGG; any rate, depth, channels) to 16 kHz mono.

    ``name`` labels the audio in error messages (defaults to the path). The header is read first: a duration over
    ``max_seconds`` raises AudioTooLongError and a sampling rate under MIN_SAMPLING_RATE a DataError, both before
    anything is decoded; fewer decoded frames than the header declares raises TruncatedAudioError.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<audio bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DataError(f"{label}: audio is 0 bytes; re-export or remove the file")
        source = bytes(source)
    elif not os.path.isfile(source):
        raise DataError(f"{label}: audio file not found; check the path")
    try:
        data, rate = _read_soundfile(source, label, max_seconds)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_exc:
        try:
            data, rate = _read_audioread(source, label, max_seconds)
        except DataError:
            raise
        except Exception as ar_exc:
            raise DataError(
                f"{label}: cannot decode audio (soundfile: {getattr(sf_exc, 'error_string', sf_exc)}; "
                f"audioread: {str(ar_exc) or type(ar_exc).__name__}); "
                "convert it to WAV/FLAC/MP3/OGG or remove it"
            ) from None
    return to_16k_mono(data, rate)


def audio_problem(audio: np.ndarray) -> tuple[str, str] | None:
    """(reason, detail) when decoded audio is unusable (no samples, NaN/Inf samples), else None."""
    if audio.size == 0:
        return "empty_audio", "audio has zero samples"
    bad = int((~np.isfinite(audio)).sum())
    if bad:
        return "non_finite", f"{bad} NaN/Inf samples"
    return None


def to_16k_mono(data: np.ndarray, rate: int) -> np.ndarray:
    """Average channels (samples x channels, or 1-D) and resample to 16 kHz with soxr."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float32)
    elif data.ndim != 1:
        raise DataError(f"audio array has shape {data.shape}; expected (samples,) or (samples, channels)")
    if rate < MIN_SAMPLING_RATE:
        raise DataError(f"audio sampling rate {rate} Hz is below {MIN_SAMPLING_RATE} Hz; the header is broken")
    if rate != SAMPLING_RATE and data.size:
        data = soxr.resample(data, rate, SAMPLING_RATE, quality="HQ")
    return np.ascontiguousarray(data, dtype=np.float32)


def _check_header(label: str, frames: float, rate: float, max_seconds: float | None) -> None:
    if max_seconds is not None and rate > 0 and frames / rate > max_seconds:
        raise AudioTooLongError(f"{label}: {frames / rate:.2f} s by its header > {max_seconds} s", frames / rate)
    if rate < MIN_SAMPLING_RATE:
        raise DataError(f"{label}: sampling rate {rate:g} Hz is below {MIN_SAMPLING_RATE} Hz; the header is broken")


def _read_soundfile(source: str | Path | bytes, label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with sf.SoundFile(handle) as f:
        _check_header(label, f.frames, f.samplerate, max_seconds)
        declared, slack = f.frames, _COMPRESSED_FRAME_SLACK
        if f.format in ("WAV", "WAVEX"):  # libsndfile sizes WAV by the file, not by the data chunk's header
            declared, slack = _wav_declared_frames(source), 0
        data = f.read(dtype="float32", always_2d=True)
        rate = f.samplerate
    if declared is not None and len(data) + slack < declared:
        raise TruncatedAudioError(
            f"{label}: truncated audio ({len(data)} of the {declared} frames its header declares); "
            "re-export or remove the file"
        )
    return data, int(rate)


def _wav_declared_frames(source: str | Path | bytes) -> int | None:
    """Frames the RIFF ``data`` chunk header declares, or None when unknown (streamed WAVs write 0 or 0xFFFFFFFF)."""
    if isinstance(source, bytes):
        head = source[:1 << 16]
    else:
        with open(source, "rb") as f:
            head = f.read(1 << 16)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = struct.unpack("<H", head[pos + 20 : pos + 22])[0]
        elif chunk == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _read_audioread(source: str | Path | bytes, label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
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
            return _read_audioread(tmp, label, max_seconds)
        finally:
            os.unlink(tmp)
    with audioread.audio_open(str(source), backends=backends) as f:
        rate, channels = int(f.samplerate), int(f.channels)
        _check_header(label, f.duration * rate, rate, max_seconds)
        pcm = b"".join(f)
    ints = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return ints.reshape(-1, channels), rate
