"""Seed 000's ``evaluate_model.py`` options and outputs, in the project's terms.

- ``--precision float16|float32|fp32`` is a compute type: float16 on CUDA, float32 otherwise (float16 on a CPU
  decodes in float32, as the seed does).
- ``--examples_csv``: the first ``--max_saved_examples`` rows in dataset order, with the seed's columns.
- ``--metrics_csv``: ``metric,value`` rows for the seed's two metrics, WER as a fraction (``evaluate.load("wer")``)
  and sacrebleu's corpus BLEU; the project's JSON keeps every metric, WER in percent.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from fedwhisper.atomic import write_text_atomic
from fedwhisper.errors import DataError, ParamsError

log = logging.getLogger(__name__)

PRECISIONS = ("float16", "float32", "fp32")
EXAMPLE_COLUMNS = ("index", "prediction_raw", "reference_raw", "prediction_normalized", "reference_normalized")
# the project's predictions CSV column for each of the seed's example columns
_FROM_PREDICTIONS = {"prediction_raw": "hypothesis", "reference_raw": "reference",
                     "prediction_normalized": "hypothesis_normalized", "reference_normalized": "reference_normalized"}


def compute_type_for_precision(precision: str, device: str) -> str:
    """The evaluate.compute_type that ``--precision`` means on ``device`` (``cpu`` or ``cuda``)."""
    value = precision.lower()
    if value not in PRECISIONS:
        raise ParamsError(
            f"--precision: got {precision!r}; seed 000 takes {', '.join(PRECISIONS)}. For other compute types "
            "(bfloat16, int8, ...) use --compute_type"
        )
    return "float16" if value == "float16" and device == "cuda" else "float32"


def seed_metrics(metrics: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """``{"wer": fraction, "bleu": score}`` from the project's metrics (WER in percent)."""
    wer = metrics.get("wer")
    return {"wer": None if wer is None else wer / 100.0, "bleu": metrics.get("bleu")}


def _csv_text(header: list[str] | tuple[str, ...], rows: list[list[Any]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_examples_csv(predictions_csv: str | Path, out: str | Path, max_saved: int) -> int:
    """Copy the first ``max_saved`` rows of the project's predictions CSV to ``out`` in the seed's columns; the
    number written. Like the seed, nothing is written when no row is kept."""
    predictions_csv = Path(predictions_csv)
    with predictions_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _FROM_PREDICTIONS.values() if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{predictions_csv}: lacks columns {missing}; cannot write the seed's examples CSV")
        rows = []
        for index, row in enumerate(reader):
            if index >= max_saved:
                break
            rows.append([index, *(row[_FROM_PREDICTIONS[c]] for c in EXAMPLE_COLUMNS[1:])])
    if not rows:
        return 0
    write_text_atomic(out, _csv_text(EXAMPLE_COLUMNS, rows))
    log.info("saved %d examples to %s", len(rows), out)
    return len(rows)


def write_metrics_csv(metrics: Mapping[str, Any], out: str | Path) -> dict[str, Optional[float]]:
    """``metric,value`` rows of ``seed_metrics(metrics)`` to ``out``; those metrics."""
    values = seed_metrics(metrics)
    write_text_atomic(out, _csv_text(["metric", "value"], [[k, v] for k, v in values.items()]))
    log.info("saved metrics to %s", out)
    return values
