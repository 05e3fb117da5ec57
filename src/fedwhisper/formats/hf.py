"""The canonical model format: a Hugging Face Whisper directory, written atomically.

A directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32 unless the caller passes
other dtypes), the tokenizer files and ``preprocessor_config.json``. ``proj_out.weight`` is tied to the token
embedding and never stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedwhisper.atomic import remove_stale_siblings
from fedwhisper.errors import CheckpointError
from fedwhisper.formats.naming import TIED_HF_KEY

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "normalizer.json", "added_tokens.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
NUM_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 0.02 s steps


# --------------------------------------------------------------------------- tokenizer


def special_tokens(multilingual: bool, num_languages: int = 99) -> list[str]:
    """Whisper's special tokens in id order, ``<|endoftext|>`` first and timestamps last (openai-whisper's order).

    HF's v1/v2 tokenizers call the no-speech token ``<|nocaptions|>``; v3 (100 languages) calls it ``<|nospeech|>``.
    """
    from whisper.tokenizer import LANGUAGES

    if not 1 <= num_languages <= len(LANGUAGES):
        raise CheckpointError(f"num_languages={num_languages}: Whisper has 1..{len(LANGUAGES)} language tokens")
    no_speech = "<|nospeech|>" if num_languages >= 100 else "<|nocaptions|>"
    langs = [f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)]
    return ["<|endoftext|>", "<|startoftranscript|>", *langs, "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", no_speech, "<|notimestamps|>", *stamps]


def vocab_merges_from_tiktoken(multilingual: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges from openai-whisper's bundled tiktoken ranks (offline)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    import whisper.tokenizer

    asset = Path(whisper.tokenizer.__file__).parent / "assets" / ("multilingual.tiktoken" if multilingual else "gpt2.tiktoken")
    return TikTokenConverter().extract_vocab_merges_from_model(str(asset))


def vocab_merges_from_tokenizer_json(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Base BPE vocab (without added tokens) and merges from an HF ``tokenizer.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable HF tokenizer.json ({exc}); supply the model's tokenizer.json") from None
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer model is {model.get('type')!r}; Whisper needs a byte-level BPE")
    added = {t["content"] for t in data.get("added_tokens", [])}
    vocab = {tok: i for tok, i in model["vocab"].items() if tok not in added}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def build_tokenizer(
    multilingual: bool,
    num_languages: int = 99,
    vocab: Optional[dict[str, int]] = None,
    merges: Optional[list[tuple[str, str]]] = None,
):
    """A ``WhisperTokenizer`` with Whisper's full special-token layout (ids match openai-whisper's tokenizer).

    ``vocab``/``merges`` default to openai-whisper's tiktoken assets, so this works offline.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    if vocab is None or merges is None:
        vocab, merges = vocab_merges_from_tiktoken(multilingual)
    specials = special_tokens(multilingual, num_languages)
    tok = WhisperTokenizer(vocab=dict(vocab), merges=list(merges))
    first = len(vocab)
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in specials[:-NUM_TIMESTAMPS]],
                   special_tokens=True)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in specials[-NUM_TIMESTAMPS:]])
    got = tok.convert_tokens_to_ids(["<|endoftext|>", "<|30.00|>"])
    if got != [first, first + len(specials) - 1]:
        raise CheckpointError(f"tokenizer special ids {got} do not follow the base vocab of {first} entries")
    tok.set_prefix_tokens(predict_timestamps=False)
    return tok


def build_feature_extractor(num_mel_bins: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=num_mel_bins)


# --------------------------------------------------------------------------- generation config


def vocab_layout(vocab_size: int) -> tuple[bool, int]:
    """(multilingual, number of language tokens) for a Whisper vocab size: 50256 (+1 if multilingual) BPE tokens,
    then 8 task/context specials, the language tokens and 1501 timestamps."""
    multilingual = vocab_size >= 51865
    num_languages = vocab_size - 50256 - int(multilingual) - 8 - NUM_TIMESTAMPS
    if not 1 <= num_languages <= 100:
        raise CheckpointError(f"vocab_size={vocab_size} is not a Whisper vocabulary (51864, 51865 or 51866)")
    return multilingual, num_languages


def default_alignment_heads(decoder_layers: int, decoder_heads: int) -> list[list[int]]:
    """openai-whisper's fallback: every head in the upper half of the decoder."""
    return [[layer, head] for layer in range(decoder_layers // 2, decoder_layers) for head in range(decoder_heads)]


def default_suppress_tokens(multilingual: bool, num_languages: int = 99) -> list[int]:
    """openai-whisper's ``suppress_tokens="-1"``: non-speech symbols plus the task and context specials."""
    from whisper.tokenizer import get_tokenizer

    t = get_tokenizer(multilingual=multilingual, num_languages=num_languages)
    extra = [t.translate, t.transcribe, t.sot, t.sot_prev, t.sot_lm, t.no_speech]
    return sorted(set(t.non_speech_tokens) | set(extra))


def build_generation_config(
    config,
    tokenizer,
    *,
    suppress_tokens: Optional[Iterable[int]] = None,
    begin_suppress_tokens: Optional[Iterable[int]] = None,
    alignment_heads: Optional[Iterable[Iterable[int]]] = None,
):
    """Whisper generation config for ``config`` with ids taken from ``tokenizer`` (English-only or multilingual)."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    multilingual, num_languages = vocab_layout(config.vocab_size)
    if suppress_tokens is None:
        suppress_tokens = default_suppress_tokens(multilingual, num_languages)
    if begin_suppress_tokens is None:
        begin_suppress_tokens = [ids("Ġ"), eot]
    if alignment_heads is None:
        alignment_heads = default_alignment_heads(config.decoder_layers, config.decoder_attention_heads)
    gen = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=[int(t) for t in suppress_tokens],
        begin_suppress_tokens=[int(t) for t in begin_suppress_tokens],
        alignment_heads=[[int(a), int(b)] for a, b in alignment_heads],
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    if multilingual:
        from whisper.tokenizer import LANGUAGES

        gen.lang_to_id = {f"<|{c}|>": ids(f"<|{c}|>") for c in list(LANGUAGES)[:num_languages]}
        gen.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return gen


# --------------------------------------------------------------------------- writing


def _state_dict_of(weights) -> dict[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"write_whisper_dir: got {type(weights).__name__}; pass a model or a state dict")
    out, seen = {}, set()
    for name, tensor in weights.items():
        if name == TIED_HF_KEY:
            continue
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        tensor = tensor.detach().to("cpu").contiguous()
        key = tensor.untyped_storage().data_ptr()
        if tensor.numel() and key in seen:  # safetensors refuses shared storage (CTranslate2 aliases, views)
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor
    return out


def _check_against_config(state: Mapping[str, torch.Tensor], config) -> None:
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        expected = WhisperForConditionalGeneration(config).state_dict()
    expected.pop(TIED_HF_KEY, None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not match the Whisper config: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); check the model's architecture"
        )
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor {name}: shape {tuple(state[name].shape)} but the config needs {tuple(ref.shape)}"
            )


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished ``tmp`` directory to ``out``, replacing an existing ``out`` only after ``tmp`` is complete."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def tmp_dir_for(out: Path) -> Path:
    """A fresh empty ``<out>.tmp-<pid>``; first removes the temporary siblings of ``out`` that killed runs left."""
    remove_stale_siblings(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _save_processor(tokenizer_from, num_mel_bins: int, dest: Path) -> None:
    from transformers import WhisperProcessor

    if isinstance(tokenizer_from, (str, Path)):
        src = Path(tokenizer_from)
        names = [n for n in TOKENIZER_FILES + PREPROCESSOR_FILES if (src / n).is_file()]
        if "tokenizer.json" not in names and "vocab.json" not in names:
            raise CheckpointError(f"{src}: no tokenizer files (tokenizer.json or vocab.json); pass a Whisper model dir")
        for name in names:
            shutil.copy2(src / name, dest / name)
        if "preprocessor_config.json" not in names:
            build_feature_extractor(num_mel_bins).save_pretrained(dest)
        return
    if not isinstance(tokenizer_from, WhisperProcessor):
        tokenizer_from = WhisperProcessor(feature_extractor=build_feature_extractor(num_mel_bins), tokenizer=tokenizer_from)
    tokenizer_from.save_pretrained(dest)
    if not (dest / "preprocessor_config.json").is_file():  # older readers (CTranslate2, transformers 4) look for it
        tokenizer_from.feature_extractor.save_pretrained(dest)


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_whisper_dir(
    weights,
    config,
    out_dir: str | Path,
    *,
    tokenizer_from,
    generation_config=None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write a canonical Whisper directory atomically (``<out>.tmp-<pid>`` then rename).

    ``weights``: a model or a state dict in HF naming; ``tokenizer_from``: a Whisper model directory (tokenizer and
    preprocessor files are copied), a ``WhisperProcessor`` or a ``WhisperTokenizer``. ``generation_config`` defaults
    to one built from the tokenizer. ``dtype`` casts floating tensors (None keeps them).
    """
    from transformers import GenerationConfig, WhisperTokenizer

    out = Path(out_dir)
    state = _state_dict_of(weights)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    _check_against_config(state, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(out)
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~current_umask())  # safetensors writes 0600; match the other files
        config.save_pretrained(tmp)
        _save_processor(tokenizer_from, config.num_mel_bins, tmp)
        if generation_config is None:
            if isinstance(tokenizer_from, (str, Path)) and (Path(tokenizer_from) / "generation_config.json").is_file():
                generation_config = GenerationConfig.from_pretrained(tokenizer_from)
            else:
                generation_config = build_generation_config(config, WhisperTokenizer.from_pretrained(tmp))
        generation_config.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d tensors)", out, len(state))
    return out


def with_generation_language(generation_config, language: Optional[str], task: Optional[str]):
    """A copy of a multilingual ``generation_config`` that decodes in ``language`` with ``task`` by default (so a
    fine-tuned model used outside the project does not fall back to en/transcribe); English-only configs unchanged."""
    import copy

    if not getattr(generation_config, "is_multilingual", False):
        return generation_config
    out = copy.deepcopy(generation_config)
    out.language, out.task = language, task
    return out


def carry_generation_language(out_dir: str | Path, sources: Iterable[str | Path]) -> Optional[tuple]:
    """Set ``out_dir/generation_config.json``'s language and task to those the ``sources`` (model directories, e.g.
    the merged clients) all carry; when they differ, or none carries any, leave the file as it is. Returns the
    (language, task) written, or None."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    if not (out / "generation_config.json").is_file():
        return None
    pairs = set()
    for src in sources:
        path = Path(src) / "generation_config.json"
        if not path.is_file():
            continue
        gen = json.loads(path.read_text(encoding="utf-8"))
        if gen.get("is_multilingual") and (gen.get("language") or gen.get("task")):
            pairs.add((gen.get("language"), gen.get("task")))
    if len(pairs) != 1:
        if len(pairs) > 1:
            log.warning("%s: the merged models decode with different language/task %s; the generation config "
                        "keeps the base's", out, sorted(pairs, key=str))
        return None
    ((language, task),) = pairs
    gen = GenerationConfig.from_pretrained(out)
    if not getattr(gen, "is_multilingual", False):
        return None
    with_generation_language(gen, language, task).save_pretrained(out)
    return language, task


# --------------------------------------------------------------------------- reading


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names, sorted; each must lie inside the index's directory.

    A shard name that is absolute or has a ``..`` part is refused: joined to the directory, it would read a file
    outside the model directory.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        detail = "no 'weight_map' key" if isinstance(exc, (KeyError, TypeError)) else f"not valid JSON: {exc}"
        raise CheckpointError(f"{index}: malformed shard index ({detail}); re-copy or re-export the model") from None
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read the shard index ({exc.strerror or exc})") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: malformed shard index ('weight_map' must map tensor names to shard file "
                              "names); re-copy or re-export the model")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        name = PurePosixPath(shard.replace("\\", "/"))  # a backslash counts as a separator too
        if not shard or name.is_absolute() or ".." in name.parts:
            raise CheckpointError(f"{index}: shard {shard!r} is outside the model directory; refused (shard names "
                                  "must be file names inside the directory that holds the index)")
    return [index.parent / s for s in shards]


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF model directory (single file or sharded index)."""
    d = Path(model_dir)
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    index = d / WEIGHTS_INDEX_NAME
    if index.is_file():
        return index_shards(index)
    raise CheckpointError(f"{d}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; is this an HF Whisper model directory?")


def load_whisper_model(model_dir: str | Path, **from_pretrained_kwargs):
    """``WhisperForConditionalGeneration.from_pretrained`` of a local directory, with its errors as CheckpointError.

    A sharded model's index is checked first (``index_shards``), so no shard outside the directory is read. A
    ``pytorch_model.bin`` that holds more than tensors is refused, and the error says so.
    """
    import pickle

    from transformers import WhisperForConditionalGeneration

    from fedwhisper.formats.openai_whisper import unpickling_error

    d = Path(model_dir)
    if not (d / WEIGHTS_NAME).is_file() and (d / WEIGHTS_INDEX_NAME).is_file():
        index_shards(d / WEIGHTS_INDEX_NAME)
    try:
        return WhisperForConditionalGeneration.from_pretrained(str(d), **from_pretrained_kwargs)
    except pickle.UnpicklingError as exc:
        raise unpickling_error(d / "pytorch_model.bin", exc) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{d}: cannot load the HF Whisper model ({exc})") from None


def read_state_dict(model_dir: str | Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF Whisper directory, canonical names, without the tied ``proj_out.weight``."""
    state = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name == TIED_HF_KEY:
                    continue
                t = f.get_tensor(name)
                state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def is_hf_whisper_dir(path: str | Path) -> bool:
    d = Path(path)
    return d.is_dir() and (d / "config.json").is_file() and (
        (d / WEIGHTS_NAME).is_file() or (d / WEIGHTS_INDEX_NAME).is_file() or (d / "pytorch_model.bin").is_file()
    )


def load_config(model_dir: str | Path):
    from transformers import WhisperConfig

    try:
        return WhisperConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: cannot read a Whisper config.json ({exc})") from None

