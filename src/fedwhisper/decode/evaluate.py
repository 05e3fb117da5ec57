"""Evaluate one model: decode a test set, score it pooled and per client group, write metrics JSON + predictions CSV.

Two inputs: the prepared test split of every client (the DVC stages), or an HF dataset streamed row by row
(seed 000's use: ``--dataset_name i4ds/spc_r --split test``), never materialised.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from fedwhisper.decode.backends import Backend, DecodeOptions, open_backend
from fedwhisper.decode.metrics import normalize_texts, score_corpus, utterance_counts
from fedwhisper.decode.significance import COUNT_COLUMNS, BootstrapSettings, counts_from_texts, interval_metrics
from fedwhisper.decode.transcribe import transcribe_audios, transcribe_indexed
from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.errors import DataError
from fedwhisper.params import EvaluateParams
from fedwhisper.single_model import same_model_as, same_model_metrics

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "id", "client", "duration_s", "reference", "hypothesis", "reference_normalized", "hypothesis_normalized",
    "scored", *COUNT_COLUMNS, "language",
)
GROUP_KEYS = ("wer", "cer", "bleu", "n_samples")


@dataclass(frozen=True)
class StreamSpec:
    """An HF dataset (hub id or local data directory) streamed with ``load_dataset(..., streaming=True)``."""

    dataset: str
    split: str = "test"
    config: Optional[str] = None
    audio_column: str = "audio"
    text_column: str = "text"
    id_column: Optional[str] = None
    group_column: Optional[str] = None
    max_items: Optional[int] = None


@dataclass
class Predictions:
    ids: list[str]
    clients: list[str]
    durations: list[float]
    references: list[str]
    hypotheses: list[str]
    audio_seconds: float = 0.0
    decode_seconds: float = 0.0
    reference_source: str = ""  # where the references came from, for error messages
    languages: list[str] = field(default_factory=list)  # per clip, the language decoded in (detected when auto)

    def extend(self, other: "Predictions") -> None:
        for name in ("ids", "clients", "durations", "references", "hypotheses", "languages"):
            getattr(self, name).extend(getattr(other, name))
        self.audio_seconds += other.audio_seconds
        self.decode_seconds += other.decode_seconds


def decode_options(params: EvaluateParams) -> DecodeOptions:
    return DecodeOptions(
        beam_size=params.beam_size, language=params.language, task=params.task,
        max_new_tokens=params.max_new_tokens, device=params.device,
        compute_type=getattr(params, "compute_type", "default"),
    )


def open_eval_backend(model_dir: str | Path, params: EvaluateParams) -> Backend:
    return open_backend(params.backend, model_dir, decode_options(params))


# --------------------------------------------------------------------------- inputs


def _audio_lengths(table: pa.Table) -> list[int]:
    return pc.list_value_length(table.column("audio")).to_pylist()


def decode_prepared(backend: Backend, prepared_root: str | Path, batch_size: int, desc: str = "decode") -> Predictions:
    """Decode the pooled prepared test split (all clients), longest clips first, audio read from the memory map."""
    from fedwhisper.data.prepared import load_test_pooled

    ds = load_test_pooled(prepared_root)
    if len(ds) == 0:
        raise DataError(f"{prepared_root}: the prepared test splits are empty; check prepare.split.test and re-run prepare")
    table = ds.data.table
    audio = table.column("audio")

    def load(idx: list[int]) -> list[np.ndarray]:
        taken = audio.take(pa.array(idx, pa.int64()))
        return [np.asarray(taken[j].values.to_numpy(zero_copy_only=False), np.float32) for j in range(len(idx))]

    result = transcribe_indexed(backend, _audio_lengths(table), load, batch_size, desc)
    return Predictions(
        table.column("id").to_pylist(), table.column("client").to_pylist(), table.column("duration_s").to_pylist(),
        table.column("text").to_pylist(), result.texts, result.audio_seconds, result.decode_seconds,
        languages=result.languages,
    )


TEXT_COLUMN_FALLBACK = {"text": "sentence"}  # seed 000 reads `text`, else `sentence` (Swiss Parliaments Corpus)


def resolve_text_column(columns: Iterable[str], requested: str, where: str) -> str:
    """``requested`` when the dataset has it; ``sentence`` when ``text`` was asked for and only ``sentence`` exists
    (seed 000's rule, said in one line); otherwise DataError naming the columns present."""
    columns = list(columns)
    if requested in columns:
        return requested
    fallback = TEXT_COLUMN_FALLBACK.get(requested)
    if fallback in columns:
        log.info("%s: no reference column %r; using %r as seed 000 does", where, requested, fallback)
        return fallback
    also = f" (nor {fallback!r})" if fallback else ""
    raise DataError(
        f"{where}: no reference column {requested!r}{also}; columns: {', '.join(columns)}. Set --text_column to the "
        "column holding the transcripts"
    )


def _stream_rows(
    spec: StreamSpec, resolved: Optional[dict[str, str]] = None
) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """(id, group, text, audio 16 kHz) per streamed row; audio bytes decoded with soundfile, not torchcodec.

    The reference column is checked on the first row (see ``resolve_text_column``) and stored in
    ``resolved["text_column"]``."""
    from fedwhisper.audio import load_16k_mono, to_16k_mono
    from fedwhisper.data.sources import MISSING, HFHubSource, lookup
    from fedwhisper.params import ColumnsParams, DataParams

    columns = ColumnsParams(audio=spec.audio_column, text=spec.text_column, id=spec.id_column,
                            client=spec.group_column)
    local = is_local_layout(spec.dataset)
    if local:
        source, split = _local_split(spec, columns)
    else:
        data = DataParams(source="hf", path=spec.dataset, hf_config=spec.config, columns=columns)
        source, split = HFHubSource(spec.dataset, data, spec.max_items), spec.split
    if split not in source.split_names():
        raise DataError(
            f"--split: dataset {spec.dataset!r} has no split {spec.split!r} (splits: {', '.join(source.split_names())})"
        )
    text_column = spec.text_column
    for i, item in enumerate(source.iter_split(split)):
        if item.drop_reason:
            raise DataError(f"{item.origin}: {item.problem}")
        if i == 0 and not local:  # the local layout reads references from sidecars (or metadata's text column)
            present = [spec.audio_column.split(".")[0], *item.extra]
            if lookup(item.extra, spec.text_column, MISSING) is not MISSING:
                present.append(spec.text_column)  # a dotted column (`meta.text`) is present though not a key
            text_column = resolve_text_column(dict.fromkeys(present), spec.text_column, f"{spec.dataset}:{spec.split}")
            if resolved is not None:
                resolved["text_column"] = text_column
        raw_text = item.text
        if text_column != spec.text_column:
            raw_text = lookup(item.extra, text_column, None)
            if raw_text is not None and not isinstance(raw_text, str):
                raise DataError(f"{item.origin}: column {text_column!r} holds {type(raw_text).__name__}, not text")
        if item.audio is None:
            raise DataError(f"{item.origin}: no audio in column {spec.audio_column!r}; set --audio_column")
        if isinstance(item.audio, tuple):
            audio = to_16k_mono(*item.audio)
        else:
            audio = load_16k_mono(item.audio, name=item.origin)
        text = raw_text.decode("utf-8", "replace") if isinstance(raw_text, bytes) else (raw_text or "")
        group = lookup(item.extra, spec.group_column, "all") if spec.group_column else "all"
        yield item.id, str(group), text, audio


HF_DATA_EXTENSIONS = (".parquet", ".arrow")


def is_local_layout(dataset: str) -> bool:
    """Whether ``dataset`` is a folder in the project's own layout (seed 003's): audio files with ``.txt``/``.json``
    sidecars or a ``metadata.csv``, in split subfolders or not, rather than an HF dataset folder (one holding
    ``dataset_dict.json``/``dataset_info.json`` or parquet/arrow data files, whose audio paths point at files)."""
    from fedwhisper.audio import AUDIO_EXTENSIONS

    root = Path(dataset)
    if not root.is_dir() or any((root / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")):
        return False
    files = [p for p in root.rglob("*") if p.is_file()]
    if any(p.suffix.lower() in HF_DATA_EXTENSIONS for p in files):  # parquet/arrow shards: an HF dataset folder
        return False
    return any(p.suffix.lower() in AUDIO_EXTENSIONS for p in files)


def _local_split(spec: StreamSpec, columns) -> tuple[Any, str]:
    """The local folder's split folder for ``spec.split`` (``validation`` also finds ``valid``/``val``/``dev``, as
    prepare does); a folder without split subfolders is one split, used whatever ``--split`` says."""
    from fedwhisper.data.partition import SPLIT_ALIASES
    from fedwhisper.data.sources import LocalFolderSource
    from fedwhisper.params import DataParams

    data = DataParams(source="local", path=spec.dataset, columns=columns)
    source = LocalFolderSource(Path(spec.dataset), data, spec.max_items)
    names = source.split_names()
    if names == [""]:
        log.info("evaluate: %s has no split folders; evaluating all of it as %r", spec.dataset, spec.split)
        return source, ""
    aliases = SPLIT_ALIASES.get(spec.split, (spec.split,))
    match = next((n for n in names if n == spec.split), None) or next((n for n in names if n.lower() in aliases), None)
    return source, match or spec.split


def decode_stream(backend: Backend, spec: StreamSpec, batch_size: int, chunk_batches: int = 8) -> Predictions:
    """Decode a streamed dataset in chunks of ``batch_size * chunk_batches`` rows, each chunk sorted by length."""
    out = Predictions([], [], [], [], [])
    chunk: list[tuple[str, str, str, np.ndarray]] = []
    resolved: dict[str, str] = {}
    rows = _stream_rows(spec, resolved)
    with tqdm(desc=f"decode {spec.dataset}:{spec.split}", unit="clip") as bar:
        while True:
            chunk.clear()
            for row in rows:
                chunk.append(row)
                if len(chunk) == batch_size * chunk_batches:
                    break
            if not chunk:
                break
            result = transcribe_audios(backend, [r[3] for r in chunk], batch_size, progress=False)
            out.extend(Predictions(
                [r[0] for r in chunk], [r[1] for r in chunk], [len(r[3]) / 16000 for r in chunk],
                [r[2] for r in chunk], result.texts, result.audio_seconds, result.decode_seconds,
                languages=result.languages,
            ))
            bar.update(len(chunk))
    if not out.ids:
        raise DataError(f"{spec.dataset}:{spec.split}: the stream yielded no rows")
    out.reference_source = f"{spec.dataset}:{spec.split} column {resolved.get('text_column', spec.text_column)!r}"
    return out


# --------------------------------------------------------------------------- scoring and outputs


def score_predictions(
    pred: Predictions, normalizer: str, bootstrap: Optional[BootstrapSettings] = None,
) -> dict[str, Any]:
    """Flat metrics: pooled scores, then ``<key>_<group>`` for every client group (each corpus-level); with
    ``bootstrap``, also the WER/CER confidence intervals (``wer_ci_low``, ``wer_ci_high_<group>``, ...)."""
    pooled = score_corpus(pred.references, pred.hypotheses, normalizer)
    metrics: dict[str, Any] = {
        key: pooled[key] for key in (
            "wer", "cer", "bleu", "substitutions", "deletions", "insertions", "hits", "ref_words",
            "n_samples", "n_empty_refs",
        )
    }
    metrics["audio_hours"] = pred.audio_seconds / 3600.0
    metrics["decode_seconds"] = pred.decode_seconds
    metrics["rtfx"] = pred.audio_seconds / pred.decode_seconds if pred.decode_seconds > 0 else None
    for group in dict.fromkeys(pred.clients):
        idx = [i for i, c in enumerate(pred.clients) if c == group]
        scores = score_corpus([pred.references[i] for i in idx], [pred.hypotheses[i] for i in idx], normalizer)
        for key in GROUP_KEYS:
            metrics[f"{key}_{group}"] = scores[key]
    if bootstrap is not None:
        metrics.update(interval_metrics(
            counts_from_texts("predictions", pred.ids, pred.clients, pred.references, pred.hypotheses, normalizer),
            bootstrap,
        ))
    metrics["normalizer"] = normalizer
    metrics["bleu_signature"] = pooled["bleu_signature"]
    return metrics


def prediction_rows(pred: Predictions, normalizer: str) -> Iterator[dict[str, Any]]:
    """One CSV row per prediction, with the per-utterance counts that redo every corpus statistic
    (``sum(word_errors) / sum(ref_words)`` is the WER); empty for unscored rows (empty reference)."""
    norm_refs = normalize_texts(pred.references, normalizer)
    norm_hyps = normalize_texts(pred.hypotheses, normalizer)
    for i in range(len(pred.ids)):
        scored = bool(norm_refs[i])
        counts: tuple = ("", "", "", "")
        if scored:
            counts = utterance_counts(norm_refs[i], norm_hyps[i])
        yield {
            "id": pred.ids[i], "client": pred.clients[i], "duration_s": round(pred.durations[i], 3),
            "reference": pred.references[i], "hypothesis": pred.hypotheses[i],
            "reference_normalized": norm_refs[i], "hypothesis_normalized": norm_hyps[i],
            "scored": scored, **dict(zip(COUNT_COLUMNS, counts)),
            "language": pred.languages[i] if i < len(pred.languages) else "",
        }


def _tmp(path: Path) -> Path:
    """``<path>.tmp-<pid>``, after removing the temporary siblings of ``path`` that killed runs left."""
    remove_stale_siblings(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_predictions_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")


def evaluate_model(
    model_dir: str | Path,
    name: str,
    params: EvaluateParams,
    out_dir: str | Path = "metrics/eval",
    prepared_root: str | Path = "data/prepared",
    stream: Optional[StreamSpec] = None,
) -> dict[str, Any]:
    """Decode (prepared test splits, or ``stream``), score, write ``<out_dir>/<name>.json`` and
    ``<out_dir>/<name>_predictions.csv``; return the metrics."""
    out_dir = Path(out_dir)
    language, task = decoding_language_task(model_dir, params)
    same_as = same_model_as(model_dir) if stream is None else None
    if same_as is not None and same_as != name:
        return _record_same_model(out_dir, name, same_as, language, task, params.backend)
    with open_eval_backend(model_dir, params) as backend:
        if stream is None:
            pred = decode_prepared(backend, prepared_root, params.batch_size, desc=f"evaluate {name}")
        else:
            pred = decode_stream(backend, stream, params.batch_size)
    bootstrap = BootstrapSettings.from_params(params.bootstrap)
    metrics = {"model": name, "backend": params.backend, "language": language, "task": task,
               **score_predictions(pred, params.normalizer, bootstrap)}
    if metrics["n_samples"] == 0:  # every reference empty: WER would be null, which must never pass silently
        source = pred.reference_source or f"{prepared_root} (prepared test splits, column 'text')"
        raise DataError(
            f"{source}: all {len(pred.ids)} references are empty after the {params.normalizer!r} normaliser, so "
            "WER/CER/BLEU cannot be computed; point --text_column at the transcripts or check evaluate.normalizer"
        )
    write_predictions_csv(out_dir / f"{name}_predictions.csv", prediction_rows(pred, params.normalizer))
    write_metrics_json(out_dir / f"{name}.json", metrics)
    log.info(
        "evaluate %s: WER %s CER %s BLEU %s on %d clips (%.3f h) with %s, RTFx %.1f",
        name, _fmt(metrics["wer"]), _fmt(metrics["cer"]), _fmt(metrics["bleu"]), metrics["n_samples"],
        metrics["audio_hours"], params.backend, metrics["rtfx"] or 0.0,
    )
    return metrics


def decoding_language_task(model_dir: str | Path, params: EvaluateParams) -> tuple[Optional[str], str]:
    """The language and task the model decodes with: ``evaluate.language`` / ``task`` for a multilingual model; an
    English-only model (vocabulary under 51865, openai-whisper's rule) has no such tokens and transcribes English."""
    try:
        vocab_size = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return params.language, params.task
    if isinstance(vocab_size, int) and vocab_size < 51865:
        return "en", "transcribe"
    return params.language, params.task


def _record_same_model(out_dir: Path, name: str, client: str, language: Optional[str], task: str,
                       backend: str) -> dict[str, Any]:
    """One client, nothing merged: point at the client's scores instead of decoding the same model again."""
    metrics = same_model_metrics(name, client, language, task, backend)
    write_predictions_csv(out_dir / f"{name}_predictions.csv", [])
    write_metrics_json(out_dir / f"{name}.json", metrics)
    log.info("evaluate %s: the model of client %s itself (one client, nothing merged); not decoded again; "
             "see %s.json", name, client, client)
    return metrics


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"

