"""``finetune`` params -> ``Seq2SeqTrainingArguments``: the one place where precision and ``finetune.trainer``
overrides are checked."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from fedwhisper.errors import ParamsError
from fedwhisper.params import FinetuneParams

log = logging.getLogger(__name__)

# Seq2SeqTrainingArguments fields that a named finetune param sets; finetune.trainer may not set them.
CONTROLLED_ARGS = {
    "output_dir": "the stage's --checkpoints path",
    "learning_rate": "finetune.learning_rate",
    "num_train_epochs": "finetune.epochs",
    "max_steps": "finetune.max_steps",
    "per_device_train_batch_size": "finetune.batch_size",
    "gradient_accumulation_steps": "finetune.grad_accum",
    "warmup_steps": "finetune.warmup_steps",
    "weight_decay": "finetune.weight_decay",
    "lr_scheduler_type": "finetune.scheduler",
    "seed": "finetune.seed",
    "data_seed": "finetune.seed",
    "bf16": "finetune.precision",
    "fp16": "finetune.precision",
    "use_cpu": "finetune.precision (and the device)",
    "gradient_checkpointing": "finetune.gradient_checkpointing",
    "activation_checkpointing": "finetune.gradient_checkpointing",
    "eval_strategy": "finetune.eval_steps",
    "eval_steps": "finetune.eval_steps",
    "save_strategy": "finetune.save_steps",
    "save_steps": "finetune.save_steps",
    "save_total_limit": "finetune.save_total_limit",
    "report_to": "finetune.wandb (DVCLive is always on)",
    "predict_with_generate": "nothing: validation WER is always computed from generated text",
    "remove_unused_columns": "nothing: the collator needs the audio and text columns",
    "resume_from_checkpoint": "nothing: resuming is automatic",
}


def check_precision(precision: str, cuda: Optional[bool] = None) -> None:
    """bf16 needs a CUDA device that supports it; fp16 needs CUDA."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision == "fp16" and not cuda:
        raise ParamsError("finetune.precision: 'fp16' needs a CUDA GPU and torch sees none; set it to fp32 on CPU")
    if precision == "bf16":
        if not cuda:
            raise ParamsError("finetune.precision: 'bf16' needs a CUDA GPU and torch sees none; set it to fp32 on CPU")
        if not torch.cuda.is_bf16_supported():
            raise ParamsError(
                f"finetune.precision: 'bf16' is not supported by {torch.cuda.get_device_name()}; use fp16 or fp32"
            )


def check_trainer_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate ``finetune.trainer`` keys against ``Seq2SeqTrainingArguments`` and the named finetune params."""
    from transformers import Seq2SeqTrainingArguments

    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    for key in overrides:
        if key in CONTROLLED_ARGS:
            raise ParamsError(f"finetune.trainer.{key}: set by {CONTROLLED_ARGS[key]}; remove it from finetune.trainer")
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            raise ParamsError(
                f"finetune.trainer.{key}: not a Seq2SeqTrainingArguments field"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; see transformers.Seq2SeqTrainingArguments for the allowed keys"
            )
    return dict(overrides)


def report_to(use_wandb: bool) -> list[str]:
    """Extra Trainer loggers: W&B only when asked for, installed, and WANDB_API_KEY is set. Never required."""
    if not use_wandb:
        return []
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        log.warning("finetune.wandb is true but wandb is not installed; logging to DVCLive only")
        return []
    if not os.environ.get("WANDB_API_KEY"):
        log.warning("finetune.wandb is true but WANDB_API_KEY is not set; logging to DVCLive only")
        return []
    return ["wandb"]


def training_arguments(ft: FinetuneParams, output_dir: Path, evaluate_every: int, generation_max_length: int):
    """Checkpoints every ``save_steps`` into ``output_dir``, a loss per step, validation every ``evaluate_every``
    steps (0: only at the end, by the caller)."""
    from transformers import Seq2SeqTrainingArguments

    check_precision(ft.precision)
    overrides = check_trainer_overrides(ft.trainer)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=ft.learning_rate,
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps,
        per_device_train_batch_size=ft.batch_size,
        per_device_eval_batch_size=ft.batch_size,
        gradient_accumulation_steps=ft.grad_accum,
        warmup_steps=ft.warmup_steps,
        weight_decay=ft.weight_decay,
        lr_scheduler_type=ft.scheduler,
        seed=ft.seed,
        data_seed=ft.seed,
        bf16=ft.precision == "bf16",
        fp16=ft.precision == "fp16",
        use_cpu=not cuda,
        activation_checkpointing=ft.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if ft.gradient_checkpointing else None,
        eval_strategy="steps" if evaluate_every > 0 else "no",
        eval_steps=evaluate_every if evaluate_every > 0 else None,
        save_strategy="steps",
        save_steps=ft.save_steps,
        save_total_limit=ft.save_total_limit,
        logging_strategy="steps",
        logging_steps=1,
        report_to=report_to(ft.wandb),
        predict_with_generate=True,
        generation_max_length=generation_max_length,
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,  # frozen parameters are not registered with DDP; every other one is used
    )
    kwargs.update(overrides)
    return Seq2SeqTrainingArguments(**kwargs)
