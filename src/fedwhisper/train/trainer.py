"""Fine-tune one client: HF ``Seq2SeqTrainer`` on the client's train split, generated-text WER on its validation split.

Read top to bottom: ``run_finetune`` loads the base model and data, builds the trainer (``build_trainer``), resumes
from the client's last checkpoint when the run's fingerprint matches, trains, evaluates, and writes
``models/clients/<client>/`` (canonical HF dir + ``training_summary.json``) and ``metrics/finetune/<client>.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.errors import CheckpointError, DataError, ParamsError
from fedwhisper.params import FinetuneParams, to_dict
from fedwhisper.train.collator import IGNORE_INDEX, WhisperCollator, label_ids, label_prefix, strip_decoder_start

log = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"
FINGERPRINT_NAME = "fingerprint.json"
ENCODER_CACHE_MAX_BYTES = 4 << 30
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

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
# Params that do not change the training trajectory, so changing them keeps the checkpoints.
_NOT_IN_FINGERPRINT = ("eval_steps", "eval_max_items", "save_steps", "save_total_limit", "launcher", "wandb")


# --------------------------------------------------------------------------- params checks


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


# --------------------------------------------------------------------------- model and data


def load_base(base_dir: Path):
    """(model, tokenizer, multilingual) from a canonical HF Whisper directory."""
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from fedwhisper.formats.hf import is_hf_whisper_dir, vocab_layout

    if not is_hf_whisper_dir(base_dir):
        raise CheckpointError(
            f"{base_dir}: not an HF Whisper directory (config.json + model.safetensors); "
            "run the base stage first (`dvc repro base` or python stages/base.py)"
        )
    try:
        model = WhisperForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
        tokenizer = WhisperTokenizerFast.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{base_dir}: cannot load the Whisper model or tokenizer ({exc})") from None
    multilingual, _ = vocab_layout(model.config.vocab_size)
    return model, tokenizer, multilingual


def frozen_encoder_depth(model, ft: FinetuneParams) -> int:
    """Encoder layers kept frozen: all of them with ``freeze_encoder``, else ``freeze_encoder_layers``."""
    n = int(model.config.encoder_layers)
    if ft.freeze_encoder:
        return n
    if ft.freeze_encoder_layers > n:
        raise ParamsError(f"finetune.freeze_encoder_layers: {ft.freeze_encoder_layers}, but the base model has {n} "
                          f"encoder layers; use 0..{n}")
    return ft.freeze_encoder_layers


def configure_model(model, ft: FinetuneParams, multilingual: bool) -> None:
    """Encoder freezing, SpecAugment, and the language/task that validation generation uses.

    ``freeze_encoder`` freezes the whole encoder. Otherwise ``freeze_encoder_layers = N > 0`` freezes the
    convolution stem, the positional embedding and the lowest N encoder layers; the layers above, the encoder's final
    layer norm and the decoder train.
    """
    depth = frozen_encoder_depth(model, ft)
    if ft.freeze_encoder:
        model.freeze_encoder()
    elif depth > 0:
        enc = model.model.encoder
        for module in (enc.conv1, enc.conv2, enc.embed_positions, *enc.layers[:depth]):
            module.requires_grad_(False)
    model.config.apply_spec_augment = ft.spec_augment
    gen = model.generation_config
    gen.forced_decoder_ids = None
    if multilingual:
        gen.language = ft.language
        gen.task = ft.task


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


def cacheable_encoder_depth(model, ft: FinetuneParams) -> int:
    """How many of the lowest encoder layers give the same output for an item every epoch (0 = none).

    That needs them frozen, and no dropout, layer drop or SpecAugment anywhere in the encoder. With
    ``freeze_encoder`` it is every layer, and the cache then holds the encoder's final output.
    """
    c = model.config
    drops = (c.dropout, c.attention_dropout, c.activation_dropout, c.encoder_layerdrop)
    if ft.spec_augment or any(float(d or 0.0) != 0.0 for d in drops):
        return 0
    return frozen_encoder_depth(model, ft)


def encoder_is_constant(model, ft: FinetuneParams) -> bool:
    """The whole encoder is frozen and deterministic, so its final output can be cached."""
    return ft.freeze_encoder and cacheable_encoder_depth(model, ft) > 0


def encoder_lower(encoder, features: torch.Tensor, depth: int) -> torch.Tensor:
    """The convolution stem, positional embedding and lowest ``depth`` layers of a Whisper encoder (as in
    ``WhisperEncoder.forward``, with dropout and layer drop, which the cache requires to be off, left out)."""
    hidden = torch.nn.functional.gelu(encoder.conv1(features))
    hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    for layer in encoder.layers[:depth]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def encoder_upper(encoder, hidden: torch.Tensor, depth: int) -> torch.Tensor:
    """The encoder layers above ``depth`` and the final layer norm."""
    for layer in encoder.layers[depth:]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(hidden)


def use_cached_lower_encoder(model, depth: int) -> None:
    """Let the encoder take the cached output of its frozen lower ``depth`` layers in place of log-mel features.

    The collator sends ``input_features`` of shape (batch, max_source_positions, d_model) for cached items; the
    encoder then runs only its trainable upper layers. Log-mel features, shape (batch, num_mel_bins, frames), take the
    usual full path (validation generation, uncached items). Only the bound ``forward`` of this model instance
    changes; the weights and the saved model do not.
    """
    from transformers.modeling_outputs import BaseModelOutput

    encoder = model.model.encoder
    original = encoder.forward
    cached_shape = (int(model.config.max_source_positions), int(model.config.d_model))

    def forward(input_features, *args, **kwargs):
        if input_features.dim() == 3 and tuple(input_features.shape[1:]) == cached_shape:
            return BaseModelOutput(last_hidden_state=encoder_upper(encoder, input_features, depth))
        return original(input_features, *args, **kwargs)

    encoder.forward = forward


def cache_encoder_outputs(model, ds, batch_size: int, max_bytes: int = ENCODER_CACHE_MAX_BYTES,
                          depth: Optional[int] = None):
    """Encoder output per item id, computed once, or None when the cache would exceed ``max_bytes``.

    ``depth=None`` caches the whole encoder's output (frozen encoder: about half the work of a 2-epoch run);
    ``depth=N`` caches the output of the convolution stem and the lowest N layers (see ``use_cached_lower_encoder``).
    """
    from tqdm.auto import tqdm

    from fedwhisper.decode.features import log_mel_batch

    c = model.config
    need = len(ds) * c.max_source_positions * c.d_model * 4
    if need > max_bytes:
        log.info("encoder cache would need %.1f GiB; running the frozen encoder every step instead", need / 2**30)
        return None
    device = str(next(model.parameters()).device)
    encoder = model.model.encoder
    cache: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    rows = ds.with_format("numpy", columns=["audio"], output_all_columns=True)
    with torch.no_grad():  # not inference_mode: the decoder's backward reads these tensors
        for start in tqdm(range(0, len(ds), batch_size), desc="encoder cache", unit="batch"):
            batch = rows[start : start + batch_size]
            features = log_mel_batch([np.array(a, dtype=np.float32) for a in batch["audio"]], c.num_mel_bins, device)
            if depth is None:
                hidden = encoder(features).last_hidden_state
            else:
                hidden = encoder_lower(encoder, features, depth)
            hidden = hidden.float().cpu()
            cache.update({str(i): h.clone() for i, h in zip(batch["id"], hidden)})
    model.train(was_training)
    return cache


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


# --------------------------------------------------------------------------- curves


class DVCLiveCurves(TrainerCallback):
    """Training loss, learning rate and validation WER per global step, as DVCLive plots.

    Only the TSV curves under ``<dir>/plots/metrics/`` are written: no dvc.yaml (``dvc.yaml`` is kept by hand), no
    DVC experiment, no summary (final figures go to ``metrics/finetune/<client>.json``).
    """

    CURVES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "eval_wer": "eval/wer"}

    def __init__(self, live_dir: Path):
        self.live_dir = Path(live_dir)
        self.live = None
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.live is not None:
            return
        from dvclive import Live

        resume = state.global_step > 0
        if resume:
            tidy_curves(self.live_dir / "plots" / "metrics", state.global_step)
        try:
            self.live = Live(str(self.live_dir), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)
        except Exception as exc:  # e.g. scmrepo's "Empty git repo": lose the curves, not the training run
            log.warning("DVCLive could not start in %s (%s: %s); training curves are not logged; "
                        "commit once (git commit) to fix", self.live_dir, type(exc).__name__, exc)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not logs:
            return
        for key, name in self.CURVES.items():
            if key in logs and logs[key] is not None:
                self.live.step = self.last_step = state.global_step
                self.live.log_metric(name, float(logs[key]))

    def close(self) -> None:
        if self.live is not None:
            tidy_curves(self.live_dir / "plots" / "metrics", self.last_step)
            self.live = None


def tidy_curves(plots_dir: Path, max_step: int) -> None:
    """Keep one point per step (the latest) up to ``max_step``: after a resume, the steps past the checkpoint are
    trained (and logged) again."""
    for tsv in plots_dir.rglob("*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\n").split("\t").index("step")
        by_step = {int(ln.split("\t")[col]): ln for ln in lines[1:] if ln.strip()}
        kept = [lines[0]] + [by_step[k] for k in sorted(by_step) if k <= max_step]
        tsv.write_text("".join(kept), encoding="utf-8")


# --------------------------------------------------------------------------- resume


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def run_fingerprint(ft: FinetuneParams, client: str, base_dir: Path, train_file: Optional[Path]) -> dict:
    """What a checkpoint was trained from; resuming is only allowed when this is unchanged."""
    from fedwhisper.formats.hf import weight_files

    import fedwhisper.decode.features as features

    params = {k: v for k, v in to_dict(ft).items() if k not in _NOT_IN_FINGERPRINT}
    code = sorted(Path(__file__).parent.glob("*.py")) + [Path(features.__file__)]
    return {
        "client": client,
        "params": params,
        "code": hashlib.sha256(b"".join(p.read_bytes() for p in code)).hexdigest(),  # training code changed: retrain
        "base": [file_digest(p) for p in weight_files(base_dir)],
        "train_data": file_digest(train_file) if train_file is not None and train_file.is_file() else None,
    }


def checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of ``checkpoint-N`` dirs, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def resume_point(checkpoint_dir: Path, fingerprint: dict) -> Optional[Path]:
    """The last complete checkpoint of this same run, or None. Checkpoints of a different run are removed."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fp_file = checkpoint_dir / FINGERPRINT_NAME
    previous = None
    if fp_file.is_file():
        try:
            previous = json.loads(fp_file.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
    found = checkpoints(checkpoint_dir)
    if found and previous != fingerprint:
        log.warning("%s: params, base model or data changed since these checkpoints; starting from scratch",
                    checkpoint_dir)
        for _, path in found:
            shutil.rmtree(path)
        found = []
    write_text_atomic(fp_file, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    # trainer_state.json is the last file the Trainer writes into a checkpoint: without it the save was cut short.
    while found and not (found[-1][1] / "trainer_state.json").is_file():
        log.warning("%s: incomplete checkpoint (no trainer_state.json), removing it", found[-1][1])
        shutil.rmtree(found.pop()[1])
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- trainer


def training_arguments(ft: FinetuneParams, output_dir: Path, evaluate_every: int, generation_max_length: int):
    from transformers import Seq2SeqTrainingArguments

    check_precision(ft.precision)
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
    kwargs.update(check_trainer_overrides(ft.trainer))
    return Seq2SeqTrainingArguments(**kwargs)


def build_trainer(ft: FinetuneParams, model, tokenizer, multilingual: bool, train_ds, eval_ds, output_dir: Path,
                  callbacks: Sequence = (), normalizer: str = "english", cache_encoder: bool = True):
    """A ``Seq2SeqTrainer`` with our collator and generated-text WER; ``train_ds``/``eval_ds`` have audio + text."""
    from transformers import Seq2SeqTrainer

    configure_model(model, ft, multilingual)
    prefix = label_prefix(tokenizer, multilingual, ft.language, ft.task)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    collator = WhisperCollator(tokenizer, prefix, eot, model.config.decoder_start_token_id, model.config.num_mel_bins)
    gen_max = model.config.max_target_positions
    if eval_ds is not None and len(eval_ds):
        longest = max(len(label_ids(tokenizer, t, prefix, eot)) for t in eval_ds["text"])
        gen_max = min(gen_max, 2 * longest + 8)  # room for a model that over-generates, without 448-token stalls
    args = training_arguments(ft, output_dir, ft.eval_steps if eval_ds is not None else 0, gen_max)
    depth = cacheable_encoder_depth(model, ft) if cache_encoder else 0
    if depth and ft.freeze_encoder:
        to_cache = train_ds
        if eval_ds is not None and not set(map(str, eval_ds["id"])) & set(map(str, train_ds["id"])):
            import datasets

            to_cache = datasets.concatenate_datasets([train_ds, eval_ds.select_columns(train_ds.column_names)])
        collator.encoder_cache = cache_encoder_outputs(model.to(args.device), to_cache, max(ft.batch_size, 8))
    elif depth:
        # Validation generation needs the whole encoder, so only training items are cached (below the trained layers).
        cache = cache_encoder_outputs(model.to(args.device), train_ds, max(ft.batch_size, 8), depth=depth)
        if cache is not None:
            use_cached_lower_encoder(model, depth)
            collator.encoder_cache, collator.cache_is_encoder_output = cache, False
    return Seq2SeqTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=as_training_rows(train_ds),
        eval_dataset=as_training_rows(eval_ds) if eval_ds is not None else None,
        processing_class=tokenizer,
        compute_metrics=wer_metric(tokenizer, normalizer) if eval_ds is not None else None,
        callbacks=list(callbacks),
    )


# --------------------------------------------------------------------------- outputs


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_client_model(model, base_dir: Path, out_dir: Path, summary: dict) -> Path:
    """Canonical HF dir (base config, tokenizer, preprocessor, generation config) + training_summary.json, atomically."""
    from fedwhisper.formats.hf import load_config, replace_dir, write_whisper_dir

    remove_stale_siblings(out_dir)  # also <out>.staging-<pid>.tmp-<pid> and <out>.old-<pid>
    staging = out_dir.with_name(f"{out_dir.name}.staging-{os.getpid()}")
    try:
        write_whisper_dir(model.state_dict(), load_config(base_dir), staging, tokenizer_from=base_dir)
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


def prune_checkpoints(checkpoint_dir: Path) -> None:
    """Drop the trainer checkpoints once the client model is exported.

    They exist to resume an interrupted run; after success they would only add ~3x the model size (optimizer
    state) to the DVC cache and remote. The fingerprint stays, so the output is small and restorable by `dvc pull`.
    """
    for _, path in checkpoints(checkpoint_dir):
        shutil.rmtree(path, ignore_errors=True)


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
    from fedwhisper.data.prepared import load_split, split_path

    base_dir, data_root = Path(base_dir), Path(data_root)
    out_dir, checkpoint_dir = Path(out_root) / client, Path(checkpoint_root) / client
    metrics_file, live_dir = Path(metrics_root) / f"{client}.json", Path(metrics_root) / client
    check_precision(ft.precision)
    check_trainer_overrides(ft.trainer)

    model, tokenizer, multilingual = load_base(base_dir)
    prefix = label_prefix(tokenizer, multilingual, ft.language, ft.task)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    max_len = min(ft.max_label_length, model.config.max_target_positions)
    start = model.config.decoder_start_token_id
    train_ds = load_split(data_root, client, "train")
    if len(train_ds) == 0:
        raise DataError(f"{split_path(data_root, client, 'train')}: client {client!r} has no training items; "
                        "check the partitioning in params.yaml (prepare.partition) and re-run prepare")
    train_ds, dropped = keep_short_labels(train_ds, tokenizer, prefix, eot, start, max_len,
                                          str(split_path(data_root, client, "train")))
    if len(train_ds) == 0:
        raise DataError(f"{split_path(data_root, client, 'train')}: every label is longer than "
                        f"finetune.max_label_length={ft.max_label_length}; raise it (at most 448)")
    eval_ds = load_split(data_root, client, "validation")
    eval_ds = eval_ds.select(range(min(len(eval_ds), ft.eval_max_items)))
    eval_ds, _ = keep_short_labels(eval_ds, tokenizer, prefix, eot, start, max_len,
                                   str(split_path(data_root, client, "validation")))
    if len(eval_ds) == 0:
        log.warning("%s: no validation items; validation WER is not computed",
                    split_path(data_root, client, "validation"))
        eval_ds = None
    normalizer = "english" if ft.language in (None, "en", "english") or ft.task == "translate" else "basic"

    curves = DVCLiveCurves(live_dir)
    trainer = build_trainer(ft, model, tokenizer, multilingual, train_ds, eval_ds, checkpoint_dir,
                            [*callbacks, curves], normalizer)
    fingerprint = run_fingerprint(ft, client, base_dir, split_path(data_root, client, "train"))
    with trainer.args.main_process_first(local=False, desc="checkpoint check"):
        resume = resume_point(checkpoint_dir, fingerprint)
    resumed_from = int(_CHECKPOINT_RE.match(resume.name).group(1)) if resume else 0
    if resume:
        log.info("%s: resuming from %s", client, resume)

    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_eval = None
    if eval_ds is not None:
        final_eval = _last_eval(trainer) or trainer.evaluate()
    seconds = time.monotonic() - t0
    curves.close()

    state = trainer.state
    metrics = {
        "client": client,
        "train_samples": len(train_ds),
        "dropped_long_labels": dropped,
        "global_step": state.global_step,
        "epochs": round(float(state.epoch or 0.0), 4),
        "train_loss": round(mean_train_loss(state.log_history, result.training_loss), 6),
        "eval_items": len(eval_ds) if eval_ds is not None else 0,
        "eval_wer": round(final_eval["eval_wer"], 4) if final_eval and final_eval["eval_wer"] is not None else None,
        "eval_cer": round(final_eval["eval_cer"], 4) if final_eval and final_eval["eval_cer"] is not None else None,
        "resumed_from_step": resumed_from,
        "train_seconds": round(seconds, 2),
    }
    if trainer.is_world_process_zero():
        summary = {k: metrics[k] for k in ("client", "train_samples", "global_step", "epochs")}
        summary.update(base_model=str(base_dir), multilingual=multilingual, params=to_dict(ft))
        export_client_model(trainer.model, base_dir, out_dir, summary)
        write_json_atomic(metrics_file, metrics)
        prune_checkpoints(checkpoint_dir)
    wer = f"{metrics['eval_wer']:.1f}%" if metrics["eval_wer"] is not None else "n/a"
    log.info("finetune %s: %d samples, %d steps (%.2f epochs), train loss %.3f, validation WER %s, %.0f s -> %s",
             client, metrics["train_samples"], metrics["global_step"], metrics["epochs"], metrics["train_loss"],
             wer, seconds, out_dir)
    return metrics
