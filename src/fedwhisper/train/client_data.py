"""A client's training and validation rows as the trainer reads them: labels that fit the decoder, audio as numpy.

Rows keep their raw 16 kHz audio; the collator computes log-mel features per batch (``collator.py``), and the frozen
encoder part is cached once per item (``encoder_cache.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedwhisper.errors import DataError
from fedwhisper.params import FinetuneParams
from fedwhisper.train.collator import label_ids, strip_decoder_start

log = logging.getLogger(__name__)


def keep_short_labels(ds, tokenizer, prefix: list[int], eot_id: int, decoder_start: int, max_len: int, where: str):
    """Drop rows whose label ids (after the start-token strip) exceed ``max_len``; return (dataset, n_dropped)."""
    lengths = [len(r) for r in strip_decoder_start(
        [label_ids(tokenizer, t, prefix, eot_id) for t in ds["text"]], decoder_start)]
    keep = [i for i, n in enumerate(lengths) if n <= max_len]
    if len(keep) == len(lengths):
        return ds, 0
    log.warning("%s: dropped %d of %d items whose labels exceed %d tokens (finetune.max_label_length)",
                where, len(lengths) - len(keep), len(lengths), max_len)
    return ds.select(keep, keep_in_memory=True), len(lengths) - len(keep)


def as_training_rows(ds):
    """Audio as numpy (no per-sample Python lists); the other columns as Python values."""
    return ds.with_format("numpy", columns=["audio"], output_all_columns=True)


def load_client_splits(ft: FinetuneParams, client: str, data_root: Path, tokenizer, prefix: list[int], eot_id: int,
                       config):
    """(train, validation or None, train rows dropped for long labels) of one client's prepared data.

    Validation keeps its first ``eval_max_items`` rows; rows whose labels exceed ``max_label_length`` (or the
    model's ``max_target_positions``) are dropped from both.
    """
    from fedwhisper.data.prepared import load_split, split_path

    max_len = min(ft.max_label_length, config.max_target_positions)
    start = config.decoder_start_token_id
    train_file = split_path(data_root, client, "train")
    train_ds = load_split(data_root, client, "train")
    if len(train_ds) == 0:
        raise DataError(f"{train_file}: client {client!r} has no training items; "
                        "check the partitioning in params.yaml (prepare.partition) and re-run prepare")
    train_ds, dropped = keep_short_labels(train_ds, tokenizer, prefix, eot_id, start, max_len, str(train_file))
    if len(train_ds) == 0:
        raise DataError(f"{train_file}: every label is longer than "
                        f"finetune.max_label_length={ft.max_label_length}; raise it (at most 448)")
    eval_file = split_path(data_root, client, "validation")
    eval_ds = load_split(data_root, client, "validation")
    eval_ds = eval_ds.select(range(min(len(eval_ds), ft.eval_max_items)))
    eval_ds, _ = keep_short_labels(eval_ds, tokenizer, prefix, eot_id, start, max_len, str(eval_file))
    if len(eval_ds) == 0:
        log.warning("%s: no validation items; validation WER is not computed", eval_file)
        eval_ds = None
    return train_ds, eval_ds, dropped
