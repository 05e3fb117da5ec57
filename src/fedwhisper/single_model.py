"""Runs with one client: one fine-tuned model (seed 003's captioning), nothing to merge.

dvc.yaml has no conditionals, so the `aggregate` and `evaluate@aggregated` stages still exist. With one client they
cost nothing: `aggregate` hard-links the client's model into ``models/aggregated`` (copies where hard links are not
possible) and marks it with ``single_client.json``; `evaluate@aggregated` sees the mark and records
``same_model_as`` instead of decoding the test set a second time; the report then reads as a single-model report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.params import Params

log = logging.getLogger(__name__)

MARKER = "single_client.json"
DEFAULT_SOURCE = "models/clients"
# Strategies whose result over one client is that client's weights unchanged (weights are normalised to 1).
# The delta strategies (task_arithmetic, ties, dare_*) rescale or sparsify even one delta, and krum refuses n < 2f + 3:
# those still go through the merge.
IDENTITY_ON_ONE = ("mean", "uniform", "fedavg", "median", "trimmed_mean")


def single_client_input(params: Params, checkpoints: Sequence[str] | None = None) -> tuple[str, Path] | None:
    """(client, its model dir) when aggregating would return the one fine-tuned client model unchanged, else None."""
    agg = params.aggregation
    if checkpoints or agg.checkpoints or len(params.clients) != 1 or agg.source.rstrip("/") != DEFAULT_SOURCE:
        return None
    if agg.strategy not in IDENTITY_ON_ONE or agg.module_weights or agg.export_openai or agg.preset:
        return None
    if agg.weights is not None and (len(agg.weights) != 1 or agg.weights[0] <= 0):
        return None
    name = params.clients[0]
    path = Path(agg.source) / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return None
    return name, path


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def pass_through(name: str, model_dir: Path, out_dir: str | Path,
                 metrics_path: str | Path | None = "metrics/aggregate.json") -> dict[str, Any]:
    """``out_dir`` = ``model_dir``'s files (hard links) plus the ``single_client.json`` mark; write the metrics."""
    from fedwhisper.formats.hf import replace_dir

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for src in sorted(model_dir.rglob("*")):
            dst = tmp / src.relative_to(model_dir)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif src.name != MARKER:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, dst)
        write_text_atomic(tmp / MARKER, json.dumps({"client": name, "source": model_dir.as_posix()}, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics = {"strategy": "none (one client)", "n_clients": 1, "n_merged": 1, "single_client": name,
               f"weight/{name}": 1.0}
    if metrics_path:
        write_text_atomic(Path(metrics_path), json.dumps(metrics, indent=2) + "\n")
    log.info("aggregate: one client (%s), nothing to merge: %s is its model (hard links), marked %s",
             name, out, MARKER)
    return metrics


def same_model_as(model_dir: str | Path) -> str | None:
    """The client whose model ``model_dir`` is, when `aggregate` passed one client's model through; else None."""
    marker = Path(model_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        client = json.loads(marker.read_text(encoding="utf-8")).get("client")
    except (json.JSONDecodeError, AttributeError):
        return None
    return client if isinstance(client, str) and client else None


def same_model_metrics(name: str, client: str, language: str | None, task: str, backend: str) -> dict[str, Any]:
    """``metrics/eval/<name>.json`` for a model that is client ``client``'s model: no scores, a pointer to them."""
    return {"model": name, "same_model_as": client, "backend": backend, "language": language, "task": task,
            "note": f"the model of client {client!r} itself (one client, nothing merged); its scores are in "
                    f"{client}.json, not decoded again"}
