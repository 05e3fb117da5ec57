import io

import numpy as np
import pytest
import soundfile as sf

from fedwhisper.audio import AudioTooLongError, TruncatedAudioError, load_16k_mono, to_16k_mono
from fedwhisper.errors import DataError


def tone(rate: int, seconds: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(data: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone_correlation(audio: np.ndarray, freq: float = 440.0) -> float:
    ref = tone(16000, len(audio) / 16000, freq)[: len(audio)]
    return float(np.corrcoef(audio[2000:-2000], ref[2000:-2000])[0, 1])


@pytest.mark.parametrize(
    "fmt,subtype,rate,tolerance",
    [
        ("WAV", "PCM_U8", 8000, 0.02),
        ("WAV", "PCM_16", 16000, 1e-3),
        ("WAV", "PCM_24", 22050, 1e-3),
        ("WAV", "FLOAT", 48000, 1e-3),
        ("FLAC", "PCM_16", 44100, 1e-3),
        ("MP3", "MPEG_LAYER_III", 44100, 0.05),
        ("OGG", "VORBIS", 32000, 0.05),
    ],
)
def test_decodes_formats_to_16k_mono(fmt, subtype, rate, tolerance):
    audio = load_16k_mono(encode(tone(rate), rate, fmt, subtype))
    assert audio.dtype == np.float32 and audio.ndim == 1
    # MP3 encoders pad a few ms; every other format keeps the exact duration.
    assert abs(len(audio) - 8000) <= (1200 if fmt == "MP3" else 2)
    if fmt != "MP3":
        assert abs(np.abs(audio).max() - 0.5) < 0.02 + tolerance
        assert tone_correlation(audio) > 0.99
    else:
        assert 0.4 < np.abs(audio).max() < 0.6


def test_stereo_44k1_is_averaged(tmp_path):
    left = tone(44100)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 44100, subtype="PCM_16")
    audio = load_16k_mono(path)
    assert len(audio) == 8000
    assert abs(np.abs(audio).max() - 0.25) < 0.01
    assert tone_correlation(audio) > 0.99


def test_file_path_and_string_path(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, tone(16000), 16000)
    np.testing.assert_allclose(load_16k_mono(path), load_16k_mono(str(path)))
    np.testing.assert_allclose(load_16k_mono(path), tone(16000), atol=1e-4)


def test_undecodable_bytes_name_the_file():
    with pytest.raises(DataError, match=r"clip_7\.wav: cannot decode audio"):
        load_16k_mono(b"RIFF not really a wave file" * 4, name="clip_7.wav")


def test_empty_bytes_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="x.ogg: audio is 0 bytes"):
        load_16k_mono(b"", name="x.ogg")
    with pytest.raises(DataError, match="missing.wav"):
        load_16k_mono(tmp_path / "missing.wav")


def test_array_resampling():
    out = to_16k_mono(np.stack([tone(8000)] * 3, axis=1), 8000)
    assert len(out) == 8000 and out.dtype == np.float32
    with pytest.raises(DataError, match="shape"):
        to_16k_mono(np.zeros((2, 2, 2)), 16000)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("MP3", "MPEG_LAYER_III")])
def test_truncated_file_is_refused_with_frame_counts(fmt, subtype):
    """A data chunk cut in half decodes to about half the frames the header declares: refused, not kept short."""
    full = encode(tone(16000, seconds=2.0), 16000, fmt, subtype)
    assert len(load_16k_mono(full)) == 32000
    with pytest.raises(TruncatedAudioError, match=r"cut\.bin: truncated audio \(\d+ of the 32000 frames its header"):
        load_16k_mono(full[: len(full) // 2], name="cut.bin")


def test_wav_with_unknown_data_size_is_not_called_truncated():
    """Streamed WAVs write 0 or 0xFFFFFFFF as the data size: no header count, nothing to compare."""
    full = bytearray(encode(tone(16000), 16000, "WAV", "PCM_16"))
    pos = full.index(b"data")
    full[pos + 4 : pos + 8] = b"\xff\xff\xff\xff"
    assert len(load_16k_mono(bytes(full))) == 8000


def test_duration_and_rate_are_checked_from_the_header_before_decoding():
    hostile = encode(np.zeros(50_000, np.float32), 1, "WAV", "PCM_16")  # 100 kB declaring 1 Hz: 50000 s
    with pytest.raises(AudioTooLongError, match=r"h\.wav: 50000\.00 s by its header > 30 s") as info:
        load_16k_mono(hostile, name="h.wav", max_seconds=30)
    assert info.value.seconds == 50000
    with pytest.raises(DataError, match=r"h\.wav: sampling rate 1 Hz is below 1000 Hz"):
        load_16k_mono(hostile, name="h.wav")
    with pytest.raises(DataError, match="below 1000 Hz"):
        to_16k_mono(np.zeros(10, np.float32), 1)
