"""Decoding backends for a canonical HF Whisper directory: transformers, openai-whisper, ctranslate2.

Every backend offers ``decode_short`` (a batch of clips of at most 30 s, one padded window each) and
``decode_long`` (one clip over 30 s, transcribed window by window with timestamps, never truncated), each giving
``Decoded(text, language)``: the language decoded in, detected per clip when ``language`` is None (auto-detect) on a
multilingual model, else the one asked for (``en`` for English-only models).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from fedwhisper.decode.features import SAMPLING_RATE, log_mel_batch
from fedwhisper.errors import CheckpointError, DecodeError

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "openai-whisper", "ctranslate2")
COMPUTE_TYPES = ("default", "float32", "int8", "int8_float32", "float16", "int8_float16", "bfloat16")


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1
    language: Optional[str] = "en"
    task: str = "transcribe"
    max_new_tokens: int = 128
    device: str = "auto"
    compute_type: str = "default"


class Decoded(NamedTuple):
    text: str
    language: str  # Whisper code such as ``de``: detected when auto-detecting, else the one asked for


def _language_code(token: str) -> str:
    """``<|de|>`` -> ``de``."""
    return token[2:-2] if token.startswith("<|") and token.endswith("|>") else token


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DecodeError("evaluate.device: 'cuda' requested but torch sees no CUDA device; set it to auto or cpu")
    return device


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{model_dir}: not an HF Whisper directory (no config.json); pass a canonical model directory "
            "such as models/base, or convert the model with stages/base.py"
        )


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Backend:
    name = ""

    def __init__(self, model_dir: str | Path, options: DecodeOptions):
        self.model_dir = Path(model_dir)
        _check_model_dir(self.model_dir)
        self.options = options
        self.device = resolve_device(options.device)

    def decode_short(self, audios: Sequence[np.ndarray]) -> list[Decoded]:
        raise NotImplementedError

    def decode_long(self, audio: np.ndarray) -> Decoded:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TransformersBackend(Backend):
    """``WhisperForConditionalGeneration.generate`` with SDPA attention and torch log-mel features."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, options: DecodeOptions):
        super().__init__(model_dir, options)
        from transformers import AutoTokenizer

        from fedwhisper.formats.hf import load_whisper_model

        dtype = _TORCH_DTYPES.get(options.compute_type, torch.float16 if self.device == "cuda" else torch.float32)
        if options.compute_type not in _TORCH_DTYPES and options.compute_type != "default":
            raise DecodeError(
                f"evaluate.compute_type: {options.compute_type!r} is for the ctranslate2 backend; the transformers "
                f"backend takes default, {', '.join(_TORCH_DTYPES)}"
            )
        has_bpe = (self.model_dir / "vocab.json").is_file() and (self.model_dir / "merges.txt").is_file()
        if not (self.model_dir / "tokenizer.json").is_file() and not has_bpe:
            raise CheckpointError(
                f"{self.model_dir}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt), so every "
                "transcript would be empty; re-write the model directory with fedwhisper.formats.hf (stages/base.py)"
            )
        try:
            self.model = load_whisper_model(self.model_dir, attn_implementation="sdpa", dtype=dtype).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.model_dir}: cannot load the HF Whisper model ({exc})") from None
        self.n_mels = self.model.config.num_mel_bins
        self.dtype = dtype
        self.generate_kwargs = dict(max_new_tokens=options.max_new_tokens, num_beams=options.beam_size, do_sample=False)
        self.multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))
        self.language = options.language if self.multilingual else "en"
        if self.multilingual:
            self.generate_kwargs.update(task=options.task)

    def _languages(self, features: torch.Tensor) -> list[str]:
        """The language of each clip: detected on its first 30 s window when auto-detecting, else the fixed one."""
        if self.language is not None:
            return [self.language] * features.shape[0]
        ids = self.model.detect_language(features[..., :3000]).reshape(-1).tolist()
        return [_language_code(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]

    def _language_kwargs(self, languages: list[str]) -> dict:
        return {"language": languages} if self.multilingual else {}

    @torch.inference_mode()
    def decode_short(self, audios: Sequence[np.ndarray]) -> list[Decoded]:
        features = log_mel_batch(audios, self.n_mels, self.device).to(self.dtype)
        languages = self._languages(features)
        ids = self.model.generate(features, return_timestamps=False, **self.generate_kwargs,
                                  **self._language_kwargs(languages))
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [Decoded(t.strip(), lang) for t, lang in zip(texts, languages)]

    @torch.inference_mode()
    def decode_long(self, audio: np.ndarray) -> Decoded:
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor.from_pretrained(self.model_dir)
        inputs = extractor(audio, sampling_rate=SAMPLING_RATE, truncation=False, padding="longest",
                           return_attention_mask=True, return_tensors="pt")
        features = inputs.input_features.to(self.device, self.dtype)
        languages = self._languages(features)  # auto-detect: on the first 30 s, as openai-whisper and faster-whisper
        ids = self.model.generate(
            features,
            attention_mask=inputs.attention_mask.to(self.device),
            return_timestamps=True,
            condition_on_prev_tokens=False,
            **self.generate_kwargs,
            **self._language_kwargs(languages),
        )
        return Decoded(self.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip(), languages[0])


class OpenAIWhisperBackend(Backend):
    """openai-whisper on an in-memory export: batched ``whisper.decode``; ``whisper.transcribe`` for long audio."""

    name = "openai-whisper"

    def __init__(self, model_dir: str | Path, options: DecodeOptions):
        super().__init__(model_dir, options)
        import whisper

        from fedwhisper.formats.openai_whisper import load_openai_model

        self.model = load_openai_model(self.model_dir).to(self.device).eval()
        fp16 = self.device == "cuda"
        if fp16:
            self.model = self.model.half()
        language = options.language if self.model.is_multilingual else "en"
        beam = options.beam_size if options.beam_size > 1 else None
        self.decoding = whisper.DecodingOptions(
            task=options.task, language=language, temperature=0.0, sample_len=options.max_new_tokens,
            beam_size=beam, without_timestamps=True, fp16=fp16,
        )
        self.transcribe_kwargs = dict(
            task=options.task, language=language, temperature=0.0, beam_size=beam, fp16=fp16,
            condition_on_previous_text=False, verbose=None,
        )

    @torch.inference_mode()
    def decode_short(self, audios: Sequence[np.ndarray]) -> list[Decoded]:
        import whisper

        mel = log_mel_batch(audios, self.model.dims.n_mels, self.device)
        if self.decoding.fp16:
            mel = mel.half()
        # language None: whisper.decode detects each clip's language and reports it in DecodingResult.language
        return [Decoded(r.text.strip(), r.language) for r in whisper.decode(self.model, mel, self.decoding)]

    def decode_long(self, audio: np.ndarray) -> Decoded:
        import whisper

        result = whisper.transcribe(self.model, torch.from_numpy(np.asarray(audio, np.float32)), **self.transcribe_kwargs)
        return Decoded(result["text"].strip(), result["language"])


class CTranslate2Backend(Backend):
    """CTranslate2's converter (its output cached by the model directory's content, see
    ``formats.ctranslate2.cached_ctranslate2_export``), then faster-whisper's batched pipeline.

    On CPU with N torch threads (N > 1) the model runs as N single-threaded CTranslate2 replicas
    (``inter_threads=N, intra_threads=1``) rather than one N-threaded model: each batch is split round-robin into N
    parts, decoded concurrently from N Python threads (CTranslate2 releases the GIL) and put back in order. The
    decoder's small per-token matrix products scale poorly over threads; a single-threaded replica decoding its own
    part of the batch spends no time waiting on other threads. Every clip is still decoded on its own row, so the
    texts are unchanged (tested).
    """

    name = "ctranslate2"

    def __init__(self, model_dir: str | Path, options: DecodeOptions, replicas: Optional[int] = None):
        """``replicas``: CTranslate2 replicas on CPU; None = one per torch thread, 1 = one model on all threads."""
        super().__init__(model_dir, options)
        import ctranslate2
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from fedwhisper.formats.ctranslate2 import cached_ctranslate2_export, export_ctranslate2

        if self.device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            self.device = "cpu"
        if not (self.model_dir / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{self.model_dir}: no tokenizer.json, which faster-whisper needs; re-write the model directory "
                "with fedwhisper.formats.hf (stages/base.py) or use another evaluate.backend"
            )
        tmp = None
        try:
            ct2_dir = cached_ctranslate2_export(self.model_dir, quantization="float32")  # reused while unchanged
            if ct2_dir is None:  # cache off: convert into a temporary directory
                tmp = Path(tempfile.mkdtemp(prefix="fedwhisper-ct2-"))
                ct2_dir = export_ctranslate2(self.model_dir, tmp / "model", quantization="float32")
            compute_type = options.compute_type
            if compute_type == "default":
                compute_type = "float16" if self.device == "cuda" else "float32"
            torch_threads = torch.get_num_threads()
            self.replicas = (replicas or torch_threads) if self.device == "cpu" else 1
            if self.replicas < 1:
                raise DecodeError(f"CTranslate2 replicas: got {self.replicas}, need at least 1")
            try:
                if self.replicas > 1:  # one single-threaded replica per torch thread (see the class docstring)
                    self.model = WhisperModel(str(ct2_dir), device=self.device, compute_type=compute_type,
                                              cpu_threads=1, num_workers=self.replicas)
                else:
                    self.model = WhisperModel(str(ct2_dir), device=self.device, compute_type=compute_type,
                                              cpu_threads=torch_threads)
            finally:  # CTranslate2 sets the OpenMP thread count it was given, which torch shares: put torch's back
                torch.set_num_threads(torch_threads)
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.model_dir}: CTranslate2 conversion or loading failed ({exc})") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.device == "cpu":  # faster-whisper's pipeline calls model.encode: route it window by window
            self.model.encode = functools.partial(_encode_window_by_window, self.model)
        self.pipeline = BatchedInferencePipeline(self.model)
        self.n_mels = self.model.model.n_mels
        self.multilingual = self.model.model.is_multilingual
        self.language = options.language if self.multilingual else "en"

    def _transcription_options(self):
        """faster-whisper's tokenizer and options. Auto-detect (language None, multilingual model): the tokenizer
        gets ``en`` as a placeholder and ``multilingual=True`` makes ``generate_segment_batched`` replace that
        prompt token with each clip's detected language (CTranslate2's ``detect_language`` on the encoder output)."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import TranscriptionOptions, get_suppressed_tokens

        detect = self.language is None
        tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual, task=self.options.task,
                              language="en" if detect else self.language)
        options = TranscriptionOptions(
            beam_size=self.options.beam_size, best_of=1, patience=1.0, length_penalty=1.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, log_prob_threshold=None, no_speech_threshold=None,
            compression_ratio_threshold=None, condition_on_previous_text=False, prompt_reset_on_temperature=0.5,
            temperatures=[0.0], initial_prompt=None, prefix=None, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]), without_timestamps=True,
            max_initial_timestamp=0.0, word_timestamps=False, prepend_punctuations="", append_punctuations="",
            multilingual=detect, max_new_tokens=self._ct2_max_new_tokens(tokenizer), clip_timestamps="0",
            hallucination_silence_threshold=None, hotwords=None,
        )
        return tokenizer, options

    def _ct2_max_new_tokens(self, tokenizer) -> int:
        # CTranslate2's Whisper generate stops after (max_length - prompt) / 2 new tokens (measured with 4.8.5),
        # so ask for twice the budget and cut to max_new_tokens, as transformers and openai-whisper do.
        prompt = len(self.model.get_prompt(tokenizer, [], without_timestamps=True))
        return min(2 * self.options.max_new_tokens, self.model.max_length - prompt)

    def decode_short(self, audios: Sequence[np.ndarray]) -> list[Decoded]:
        if self.replicas == 1 or len(audios) == 1:
            return self._decode_batch(audios)
        from concurrent.futures import ThreadPoolExecutor

        parts = [list(range(r, len(audios), self.replicas)) for r in range(min(self.replicas, len(audios)))]
        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="fedwhisper-ct2") as pool:
            futures = [pool.submit(self._decode_batch, [audios[i] for i in part]) for part in parts]
            results = [f.result() for f in futures]  # re-raises a replica's error here, in the caller's thread
        decoded: list[Decoded] = [None] * len(audios)  # type: ignore[list-item]
        for part, result in zip(parts, results):
            if len(result) != len(part):
                raise DecodeError(f"{self.model_dir}: a CTranslate2 replica returned {len(result)} results for "
                                  f"{len(part)} clips")
            for i, d in zip(part, result):
                decoded[i] = d
        return decoded

    def _decode_batch(self, audios: Sequence[np.ndarray]) -> list[Decoded]:
        """One batch on one replica (whichever CTranslate2 finds free): features, encoder, greedy or beam decoding."""
        features = log_mel_batch(audios, self.n_mels, "cpu").numpy()
        tokenizer, options = self._transcription_options()
        encoder_output, outputs = self.pipeline.generate_segment_batched(features, tokenizer, options)
        if options.multilingual:  # the same top language the prompt got (one decoder step per clip)
            languages = [_language_code(r[0][0]) for r in self.model.model.detect_language(encoder_output)]
        else:
            languages = [self.language] * len(outputs)
        return [
            Decoded(tokenizer.decode(o["tokens"][: self.options.max_new_tokens]).strip(), lang)
            for o, lang in zip(outputs, languages)
        ]

    def decode_long(self, audio: np.ndarray) -> Decoded:
        segments, info = self.model.transcribe(
            np.asarray(audio, np.float32), beam_size=self.options.beam_size, language=self.language,
            task=self.options.task, temperature=0.0, condition_on_previous_text=False, vad_filter=False,
        )  # no max_new_tokens: with timestamps faster-whisper then loops on repeats (openai's transcribe has none)
        text = " ".join(s.text.strip() for s in segments).strip()  # language None: detected on the first 30 s
        return Decoded(text, info.language)


def _encode_window_by_window(model, features: np.ndarray):
    """faster-whisper's ``WhisperModel.encode`` for CPU: CTranslate2's encoder run on one 30 s window at a time, the
    outputs stacked into one batch for ``generate``.

    The outputs are bit-identical to a batched ``encode`` (checked on 8 clips), and on CPU this is faster: a batch of
    16 windows makes the attention over 1500 frames memory-bound (tiny.en, 2 cores: 213 ms per window batched, 184
    ms one at a time; whole sample evaluation 269 -> 236 ms per clip). On CUDA the batched encoder stays.
    """
    import ctranslate2

    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 2:
        features = features[None]
    outputs = [
        np.asarray(model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(f[None])), to_cpu=True))
        for f in features
    ]
    return ctranslate2.StorageView.from_array(np.concatenate(outputs))


_CLASSES = {cls.name: cls for cls in (TransformersBackend, OpenAIWhisperBackend, CTranslate2Backend)}


def open_backend(name: str, model_dir: str | Path, options: DecodeOptions = DecodeOptions()) -> Backend:
    """Load ``model_dir`` (canonical HF Whisper directory) into the named backend."""
    if name not in _CLASSES:
        raise DecodeError(f"evaluate.backend: unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if options.compute_type not in COMPUTE_TYPES:
        raise DecodeError(f"evaluate.compute_type: got {options.compute_type!r}; use one of {', '.join(COMPUTE_TYPES)}")
    _warn_if_language_ignored(Path(model_dir), options.language)
    return _CLASSES[name](model_dir, options)


def _warn_if_language_ignored(model_dir: Path, language: Optional[str]) -> None:
    """English-only Whisper (vocab under 51865, openai-whisper's rule) has no language tokens: say so, once."""
    try:
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the backend reports an unreadable config
    if vocab_size < 51865 and language and language.lower() not in ("en", "english"):
        log.warning(
            "%s is an English-only model: language %r is ignored and it transcribes English; use a multilingual "
            "model for %r", model_dir, language, language,
        )
