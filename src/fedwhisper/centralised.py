"""The centralised upper bound: one model fine-tuned on every client's train split pooled, with the ``finetune``
params and the same total optimizer steps as the one-shot clients together.

"Same total steps": each client's ``finetune`` run takes ``one_shot_steps(ft, n_c)`` optimizer steps on its
``n_c`` train items (HF Trainer's count on one process: ``ceil(epochs * max(ceil(ceil(n_c / batch_size) /
grad_accum), 1))``, or ``max_steps`` when that is positive). The centralised run trains ``max_steps = sum_c
one_shot_steps(ft, n_c)`` on the pooled rows, so it sees as many batches as the clients did, and (up to rounding
of each client's last batch) every item ``epochs`` times. Everything else (learning rate, schedule, batch size,
seed, frozen layers, language, task) is ``finetune``'s.

It lives outside ``train/`` so that changing it does not re-run the clients' ``finetune`` stages (their dep).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Sequence

from fedwhisper.errors import ParamsError
from fedwhisper.params import FinetuneParams, to_dict
from fedwhisper.train.client_data import load_client_splits
from fedwhisper.train.collator import label_prefix
from fedwhisper.train.curves import DVCLiveCurves
from fedwhisper.train.model_setup import load_base
from fedwhisper.train.resume import file_digest, prune_checkpoints, resume_point, run_fingerprint
from fedwhisper.train.trainer import _last_eval, build_trainer, export_client_model, run_figures, write_json_atomic

log = logging.getLogger(__name__)

NAME = "centralised"


def one_shot_steps(ft: FinetuneParams, n_train: int) -> int:
    """Optimizer steps of one client's ``finetune`` run on ``n_train`` items, as HF Trainer counts them on one
    process."""
    if ft.max_steps > 0:
        return ft.max_steps
    batches = math.ceil(n_train / ft.batch_size)
    per_epoch = max(math.ceil(batches / ft.grad_accum), 1)
    return math.ceil(ft.epochs * per_epoch)


def pooled_splits(ft: FinetuneParams, clients: Sequence[str], data_root: Path, tokenizer, prefix, eot, config):
    """(train rows of every client concatenated, their validation rows concatenated or None, per-client train
    counts, rows dropped for long labels); each client's rows filtered exactly as its own finetune run filters
    them (``load_client_splits``, so validation keeps ``eval_max_items`` rows per client)."""
    from datasets import concatenate_datasets

    trains, evals, counts, dropped = [], [], {}, 0
    for client in clients:
        train_ds, eval_ds, n_dropped = load_client_splits(ft, client, data_root, tokenizer, prefix, eot, config)
        trains.append(train_ds)
        counts[client] = len(train_ds)
        dropped += n_dropped
        if eval_ds is not None:
            evals.append(eval_ds)
    train = concatenate_datasets(trains)
    return train, (concatenate_datasets(evals) if evals else None), counts, dropped


def run_centralised(
    ft: FinetuneParams,
    clients: Sequence[str],
    *,
    base_dir: str | Path = "models/base",
    data_root: str | Path = "data/prepared",
    out_dir: str | Path = "models/centralised",
    checkpoint_dir: str | Path = "models/centralised_checkpoints",
    metrics_file: str | Path = "metrics/federated/centralise.json",
    live_dir: str | Path = "metrics/federated/centralise",
) -> dict:
    """Fine-tune ``base_dir`` on the pooled train splits of ``clients``; write the model dir (canonical HF, with
    the trained language/task in its generation config), curves and metrics; return the metrics."""
    from fedwhisper.data.prepared import split_path

    if not clients:
        raise ParamsError("clients: empty; the centralised model pools the clients' train splits, list at least one")
    base_dir, data_root, out_dir = Path(base_dir), Path(data_root), Path(out_dir)
    checkpoint_dir, metrics_file = Path(checkpoint_dir), Path(metrics_file)

    model, tokenizer, multilingual = load_base(base_dir)
    prefix = label_prefix(tokenizer, multilingual, ft.language, ft.task)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    train_ds, eval_ds, counts, dropped = pooled_splits(ft, clients, data_root, tokenizer, prefix, eot, model.config)
    client_steps = {c: one_shot_steps(ft, n) for c, n in counts.items()}
    if ft.num_processes > 1:
        log.warning("centralise: trains in one process; the steps are counted as one process would take them, "
                    "while finetune.num_processes=%d split each client's batches", ft.num_processes)
    total_steps = sum(client_steps.values())
    pooled_ft = dataclasses.replace(ft, max_steps=total_steps)
    normalizer = "english" if ft.language in (None, "en", "english") or ft.task == "translate" else "basic"

    curves = DVCLiveCurves(Path(live_dir))
    trainer = build_trainer(pooled_ft, model, tokenizer, multilingual, train_ds, eval_ds, checkpoint_dir, [curves],
                            normalizer)
    fingerprint = run_fingerprint(pooled_ft, NAME, base_dir, None)
    fingerprint["train_data"] = {c: file_digest(split_path(data_root, c, "train")) for c in clients}
    resume = resume_point(checkpoint_dir, fingerprint)
    if resume:
        log.info("%s: resuming from %s", NAME, resume)

    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_eval = (_last_eval(trainer) or trainer.evaluate()) if eval_ds is not None else None
    seconds = time.monotonic() - t0
    curves.close()

    metrics = {"clients": list(clients), "train_samples_per_client": counts, "one_shot_steps_per_client": client_steps,
               "max_steps": total_steps,
               **run_figures(trainer, result, train_ds, eval_ds, final_eval, resume, seconds, dropped)}
    summary = {k: metrics[k] for k in ("clients", "train_samples", "max_steps", "global_step", "epochs")}
    summary.update(base_model=str(base_dir), multilingual=multilingual, params=to_dict(ft))
    export_client_model(trainer.model, base_dir, out_dir, summary)
    write_json_atomic(metrics_file, metrics)
    prune_checkpoints(checkpoint_dir)
    wer = f"{metrics['eval_wer']:.1f}%" if metrics["eval_wer"] is not None else "n/a"
    log.info("centralise: %d pooled samples of %d clients, %d steps (%.2f epochs), train loss %.3f, validation WER "
             "%s, %.0f s -> %s", metrics["train_samples"], len(clients), metrics["global_step"], metrics["epochs"],
             metrics["train_loss"], wer, seconds, out_dir)
    return metrics
