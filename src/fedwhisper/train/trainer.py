"""Fine-tune one client: HF ``Seq2SeqTrainer`` on the client's train split, generated-text WER on its validation split.

Read top to bottom: ``run_finetune`` loads the base model (``model_setup``) and the client's rows (``client_data``),
builds the trainer (``build_trainer``: our collator, the frozen-encoder cache of ``encoder_cache``, the arguments of
``training_args``), resumes from the client's last checkpoint when the run's fingerprint matches (``resume``), trains
with DVCLive curves (``curves``), evaluates, and writes ``models/clients/<client>/`` (canonical HF dir +
``training_summary.json``) and ``metrics/finetune/<client>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.params import FinetuneParams, to_dict
from fedwhisper.train.client_data import as_training_rows, load_client_splits
from fedwhisper.train.collator import IGNORE_INDEX, WhisperCollator, label_ids, label_prefix
from fedwhisper.train.curves import DVCLiveCurves
from fedwhisper.train.encoder_cache import attach_encoder_cache
from fedwhisper.train.encoder_window import enable_encoder_windows, full_frames
from fedwhisper.train.model_setup import configure_model, load_base
from fedwhisper.train.resume import checkpoint_step, prune_checkpoints, resume_point, run_fingerprint
from fedwhisper.train.training_args import training_arguments

log = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"


def wer_metric(tokenizer, normalizer: str) -> Callable:
    """``compute_metrics`` for generated ids: corpus WER/CER (percent) of decoded text against decoded labels."""
    from fedwhisper.decode.metrics import score_corpus

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def compute(pred) -> dict[str, float]:
        hyp_ids = np.where(pred.predictions == IGNORE_INDEX, pad, pred.predictions)
        ref_ids = np.where(pred.label_ids == IGNORE_INDEX, pad, pred.label_ids)
        hyps = tokenizer.batch_decode(hyp_ids, skip_special_tokens=True)
        refs = tokenizer.batch_decode(ref_ids, skip_special_tokens=True)
        scores = score_corpus(refs, hyps, normalizer)
        return {"wer": scores["wer"], "cer": scores["cer"]}

    return compute


def build_trainer(ft: FinetuneParams, model, tokenizer, multilingual: bool, train_ds, eval_ds, output_dir: Path,
                  callbacks: Sequence = (), normalizer: str = "english", cache_encoder: bool = True,
                  trainer_cls: Optional[type] = None):
    """A ``Seq2SeqTrainer`` with our collator and generated-text WER; ``train_ds``/``eval_ds`` have audio + text.

    ``trainer_cls`` replaces ``Seq2SeqTrainer`` by a subclass (federated rounds: the FedProx loss)."""
    from transformers import Seq2SeqTrainer

    configure_model(model, ft, multilingual)
    prefix = label_prefix(tokenizer, multilingual, ft.language, ft.task)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    collator = WhisperCollator(tokenizer, prefix, eot, model.config.decoder_start_token_id, model.config.num_mel_bins,
                               full_frames=full_frames(model.config))
    gen_max = model.config.max_target_positions
    if eval_ds is not None and len(eval_ds):
        longest = max(len(label_ids(tokenizer, t, prefix, eot)) for t in eval_ds["text"])
        gen_max = min(gen_max, 2 * longest + 8)  # room for a model that over-generates, without 448-token stalls
    args = training_arguments(ft, output_dir, ft.eval_steps if eval_ds is not None else 0, gen_max)
    if cache_encoder:
        attach_encoder_cache(model, ft, collator, train_ds, eval_ds, args.device)
    train_collator = collator
    if ft.encoder_window != "full":  # training batches on shorter windows; validation keeps 30 s (encoder_window.py)
        enable_encoder_windows(model)
        train_collator = dataclasses.replace(collator, encoder_window=ft.encoder_window)
        trainer_cls = train_collator_class(trainer_cls or Seq2SeqTrainer)
    trainer = (trainer_cls or Seq2SeqTrainer)(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=as_training_rows(train_ds),
        eval_dataset=as_training_rows(eval_ds) if eval_ds is not None else None,
        processing_class=tokenizer,
        compute_metrics=wer_metric(tokenizer, normalizer) if eval_ds is not None else None,
        callbacks=list(callbacks),
    )
    if train_collator is not collator:
        trainer.train_collator = train_collator
    return trainer


def train_collator_class(base: type) -> type:
    """``base`` (a ``Seq2SeqTrainer`` class) whose training batches come from ``self.train_collator`` when it is set;
    evaluation and prediction keep ``data_collator`` (30 s windows for validation generation)."""

    class TrainCollatorTrainer(base):
        train_collator = None

        def get_train_dataloader(self):
            if self.train_collator is None:
                return super().get_train_dataloader()
            evaluation, self.data_collator = self.data_collator, self.train_collator
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = evaluation

    TrainCollatorTrainer.__name__ = TrainCollatorTrainer.__qualname__ = f"TrainCollator{base.__name__}"
    return TrainCollatorTrainer


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_client_model(model, base_dir: Path, out_dir: Path, summary: dict) -> Path:
    """Canonical HF dir (base config, tokenizer, preprocessor, generation config) + training_summary.json, atomically.

    The generation config is the base's; a multilingual model's also records the language and task it was trained
    for (``model.generation_config``, set by ``configure_model``), so that decoding it elsewhere uses them."""
    from transformers import GenerationConfig

    from fedwhisper.formats.hf import load_config, replace_dir, with_generation_language, write_whisper_dir

    remove_stale_siblings(out_dir)  # also <out>.staging-<pid>.tmp-<pid> and <out>.old-<pid>
    staging = out_dir.with_name(f"{out_dir.name}.staging-{os.getpid()}")
    try:
        generation = None
        if (Path(base_dir) / "generation_config.json").is_file():
            trained = model.generation_config  # English-only configs have no language/task attributes
            generation = with_generation_language(GenerationConfig.from_pretrained(base_dir),
                                                  getattr(trained, "language", None), getattr(trained, "task", None))
        write_whisper_dir(model.state_dict(), load_config(base_dir), staging, tokenizer_from=base_dir,
                          generation_config=generation)
        write_json_atomic(staging / SUMMARY_NAME, summary)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def mean_train_loss(log_history: list[dict], fallback: float) -> float:
    """Mean of the per-step losses of the whole run, so a resumed run reports the steps before the checkpoint too."""
    losses = [float(e["loss"]) for e in log_history if "loss" in e]
    return sum(losses) / len(losses) if losses else float(fallback)


def _last_eval(trainer) -> Optional[dict]:
    """Metrics of an evaluation already run at the final step (so it is not repeated)."""
    for entry in reversed(trainer.state.log_history):
        if "eval_wer" in entry:
            return entry if entry.get("step") == trainer.state.global_step else None
    return None


def run_figures(trainer, result, train_ds, eval_ds, final_eval: Optional[dict], resume: Optional[Path],
                seconds: float, dropped: int) -> dict:
    """A finished run's figures for its metrics JSON: items, steps, epochs, mean train loss, validation WER/CER."""
    state = trainer.state
    return {
        "train_samples": len(train_ds),
        "dropped_long_labels": dropped,
        "global_step": state.global_step,
        "epochs": round(float(state.epoch or 0.0), 4),
        "train_loss": round(mean_train_loss(state.log_history, result.training_loss), 6),
        "eval_items": len(eval_ds) if eval_ds is not None else 0,
        "eval_wer": round(final_eval["eval_wer"], 4) if final_eval and final_eval["eval_wer"] is not None else None,
        "eval_cer": round(final_eval["eval_cer"], 4) if final_eval and final_eval["eval_cer"] is not None else None,
        "resumed_from_step": checkpoint_step(resume),
        "train_seconds": round(seconds, 2),
    }


def run_finetune(
    ft: FinetuneParams,
    client: str,
    *,
    base_dir: str | Path = "models/base",
    data_root: str | Path = "data/prepared",
    out_root: str | Path = "models/clients",
    checkpoint_root: str | Path = "models/checkpoints",
    metrics_root: str | Path = "metrics/finetune",
    callbacks: Sequence = (),
) -> dict:
    """Fine-tune ``base_dir`` on one client's train split; write its model dir, curves and final metrics.

    Returns the final metrics (also in ``<metrics_root>/<client>.json``).
    """
    from fedwhisper.data.prepared import split_path

    base_dir, data_root = Path(base_dir), Path(data_root)
    out_dir, checkpoint_dir = Path(out_root) / client, Path(checkpoint_root) / client
    metrics_file, live_dir = Path(metrics_root) / f"{client}.json", Path(metrics_root) / client

    model, tokenizer, multilingual = load_base(base_dir)
    prefix = label_prefix(tokenizer, multilingual, ft.language, ft.task)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    train_ds, eval_ds, dropped = load_client_splits(ft, client, data_root, tokenizer, prefix, eot, model.config)
    normalizer = "english" if ft.language in (None, "en", "english") or ft.task == "translate" else "basic"

    curves = DVCLiveCurves(live_dir)
    trainer = build_trainer(ft, model, tokenizer, multilingual, train_ds, eval_ds, checkpoint_dir,
                            [*callbacks, curves], normalizer)
    fingerprint = run_fingerprint(ft, client, base_dir, split_path(data_root, client, "train"))
    with trainer.args.main_process_first(local=False, desc="checkpoint check"):
        resume = resume_point(checkpoint_dir, fingerprint)
    if resume:
        log.info("%s: resuming from %s", client, resume)

    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_eval = None
    if eval_ds is not None:
        final_eval = _last_eval(trainer) or trainer.evaluate()
    seconds = time.monotonic() - t0
    curves.close()

    metrics = {"client": client, **run_figures(trainer, result, train_ds, eval_ds, final_eval, resume, seconds,
                                                dropped)}
    if trainer.is_world_process_zero():
        summary = {k: metrics[k] for k in ("client", "train_samples", "global_step", "epochs")}
        summary.update(base_model=str(base_dir), multilingual=multilingual, params=to_dict(ft),
                       label_prefix=tokenizer.convert_ids_to_tokens(prefix))  # what every label starts with
        export_client_model(trainer.model, base_dir, out_dir, summary)
        write_json_atomic(metrics_file, metrics)
        prune_checkpoints(checkpoint_dir)
    wer = f"{metrics['eval_wer']:.1f}%" if metrics["eval_wer"] is not None else "n/a"
    log.info("finetune %s: %d samples, %d steps (%.2f epochs), train loss %.3f, validation WER %s, %.0f s -> %s",
             client, metrics["train_samples"], metrics["global_step"], metrics["epochs"], metrics["train_loss"],
             wer, seconds, out_dir)
    return metrics
