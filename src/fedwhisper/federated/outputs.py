"""What a federated run leaves behind: the final global model as a canonical HF Whisper directory, per-round
curves (global validation WER and loss, client losses) as plain TSV tables and as DVCLive plots, and a metrics
JSON, each written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.federated.rounds import RoundRecord
from fedwhisper.params import FederatedParams, to_dict

log = logging.getLogger(__name__)

ROUND_COLUMNS = ("round", "train_loss", "eval_loss", "eval_wer", "seconds")


def _cell(v) -> str:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def write_round_curves(records: Sequence[RoundRecord], metrics_dir: str | Path) -> None:
    """``rounds.tsv`` (one row per round) and ``client_loss.tsv`` (one row per round and client)."""
    d = Path(metrics_dir)
    rows = ["\t".join(ROUND_COLUMNS)] + ["\t".join(_cell(v) for v in (
        r.server_round, r.train_loss, r.eval_loss, r.eval_wer, round(r.seconds, 2))) for r in records]
    write_text_atomic(d / "rounds.tsv", "\n".join(rows) + "\n")
    rows = ["round\tclient\ttrain_loss\tnum_examples"] + [
        f"{r.server_round}\t{c}\t{_cell(r.client_loss[c])}\t{r.client_examples[c]}" for r in records
        for c in r.clients]
    write_text_atomic(d / "client_loss.tsv", "\n".join(rows) + "\n")


def write_live_curves(records: Sequence[RoundRecord], live_dir: str | Path) -> None:
    """The same curves as DVCLive plots, x = ``step`` = round: ``<live_dir>/plots/metrics/global/eval_wer.tsv``,
    ``global/eval_loss.tsv``, ``train/loss.tsv`` (mean client loss) and ``client/<name>/train_loss.tsv``.

    Rewritten whole from ``records`` (a resumed run's earlier rounds included) in a staging dir swapped in after.
    DVCLive writes only the TSVs here: no dvc.yaml, no DVC experiment, no summary (see ``metrics.json``)."""
    from dvclive import Live

    from fedwhisper.formats.hf import replace_dir

    out = Path(live_dir)
    remove_stale_siblings(out)
    staging = out.with_name(f"{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        live = Live(str(staging), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
        for r in records:
            live.step = r.server_round
            live.log_metric("train/loss", float(r.train_loss))
            if r.eval_loss is not None:
                live.log_metric("global/eval_loss", float(r.eval_loss))
            if r.eval_wer is not None:
                live.log_metric("global/eval_wer", float(r.eval_wer))
            for c in r.clients:
                live.log_metric(f"client/{c}/train_loss", float(r.client_loss[c]))
        (staging / "plots" / "metrics").mkdir(parents=True, exist_ok=True)  # no round yet: an empty plot dir
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def federated_metrics(fed: FederatedParams, records: Sequence[RoundRecord]) -> dict:
    last = records[-1] if records else None
    return {
        "rounds_done": len(records),
        "final_eval_wer": None if last is None or last.eval_wer is None else round(last.eval_wer, 4),
        "final_eval_loss": None if last is None or last.eval_loss is None else round(last.eval_loss, 6),
        "final_train_loss": None if last is None else round(last.train_loss, 6),
        "seconds_per_round": [round(r.seconds, 2) for r in records],
        "clients_per_round": [r.clients for r in records],
        "params": to_dict(fed),
    }


def write_global_model(state: Mapping[str, torch.Tensor], base_dir: str | Path, out_dir: str | Path,
                       summary: dict) -> Path:
    """``out_dir`` as a canonical HF Whisper dir (config/tokenizer from ``base_dir``) + ``federated_summary.json``,
    assembled under a staging name and swapped in whole."""
    from fedwhisper.formats.hf import load_config, replace_dir, write_whisper_dir

    out = Path(out_dir)
    remove_stale_siblings(out)
    staging = out.with_name(f"{out.name}.staging-{os.getpid()}")
    try:
        write_whisper_dir(dict(state), load_config(base_dir), staging, tokenizer_from=Path(base_dir))
        write_text_atomic(staging / "federated_summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
