"""GPU fine-tuning throughput: our trainer against a plain HF ``Seq2SeqTrainer`` with the HF blog's settings.

Both train the same random-init whisper-small-shaped model (d_model 768, 12+12 layers, 12 heads, multilingual vocab)
in bf16 on one GPU, on the same synthetic clips and transcripts, in the same process. For each it reports training
samples/s (timed after ``--warmup`` steps, so start-up and the first CUDA kernels are excluded) and peak GPU memory,
then the ratio ours / blog.

- ours: ``fedwhisper.train.trainer.build_trainer`` (our collator computes log-mel in the data loader workers;
  full fine-tune unless ``--freeze-encoder``; no gradient checkpointing, as in params.yaml).
- blog: https://huggingface.co/blog/fine-tune-whisper: features precomputed with ``WhisperFeatureExtractor`` in
  ``dataset.map`` (not timed), its ``DataCollatorSpeechSeq2SeqWithPadding``, and its ``Seq2SeqTrainingArguments``
  (batch 16, lr 1e-5, warm-up 500, gradient checkpointing on), with bf16 instead of fp16.

    python bench/finetune_gpu.py                 # needs CUDA; refuses otherwise
    python bench/finetune_gpu.py --smoke         # tiny model, a few CPU steps: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
             decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=256, decoder_ffn_dim=256)
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jumping zebras near "
         "old stone bridges in the cold northern rain").split()


def make_model_dir(out: Path, shape: dict) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from fedwhisper.formats import hf

    tok = hf.build_tokenizer(multilingual=True)
    ids = tok.convert_tokens_to_ids
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                           decoder_start_token_id=ids("<|startoftranscript|>"), bos_token_id=ids("<|endoftext|>"),
                           eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"), **shape)
    torch.manual_seed(0)
    return hf.write_whisper_dir(WhisperForConditionalGeneration(config), config, out, tokenizer_from=tok)


def make_data(out: Path, n: int, clip_s: float):
    """n synthetic clips (tones + noise) with 12-20 word transcripts, in the prepared format."""
    from fedwhisper.data.prepared import load_split, write_manifest, write_split

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        samples = int(16000 * clip_s)
        t = np.arange(samples) / 16000
        audio = (0.1 * np.sin(2 * np.pi * (150 + 7 * i) * t) + 0.02 * rng.standard_normal(samples)).astype(np.float32)
        rows.append({"id": f"{i:06d}", "client": "bench", "text": " ".join(rng.choice(WORDS, rng.integers(12, 21))),
                     "audio": audio, "duration_s": clip_s})
    write_split(out / "bench" / "train.arrow", rows)
    write_manifest(out, {"bench": {"train": n}}, ["bench"])
    return load_split(out, "bench", "train")


@dataclass
class Result:
    name: str
    samples_per_s: float
    peak_mem_gib: float | None
    seconds: float


def timer_callback(warmup: int, batch: int, cuda: bool):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        t0 = t1 = None
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == warmup:
                self.t0, self.steps = time.perf_counter(), 0
            elif self.t0 is not None:
                self.steps += 1
                self.t1 = time.perf_counter()

        def samples_per_s(self) -> float:
            return self.steps * batch / (self.t1 - self.t0)

    return Timer()


def run_timed(name: str, trainer, timer, cuda: bool) -> Result:
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return Result(name, timer.samples_per_s(), peak, seconds)


def bench_ours(model_dir: Path, ds, args, cuda: bool, work: Path) -> Result:
    from fedwhisper.params import FinetuneParams
    from fedwhisper.train.model_setup import load_base
    from fedwhisper.train.trainer import build_trainer

    ft = FinetuneParams(learning_rate=1e-5, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=0,
                        precision="bf16" if cuda else "fp32", freeze_encoder=args.freeze_encoder,
                        save_steps=10**6, trainer={"dataloader_num_workers": args.workers, "disable_tqdm": True,
                                                   "save_only_model": True})
    model, tok, multilingual = load_base(model_dir)
    timer = timer_callback(args.warmup, args.batch_size, cuda)
    trainer = build_trainer(ft, model, tok, multilingual, ds, None, work / "ours", [timer])
    return run_timed("ours", trainer, timer, cuda)


def bench_blog(model_dir: Path, ds, args, cuda: bool, work: Path) -> Result:
    """The HF blog's recipe, kept as written (including its bos_token_id check)."""
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    feature_extractor = WhisperFeatureExtractor.from_pretrained(str(model_dir))
    tokenizer = WhisperTokenizer.from_pretrained(str(model_dir), language="english", task="transcribe")
    if tokenizer.pad_token is None:  # hub Whisper tokenizers set pad = <|endoftext|>; ours may not
        tokenizer.pad_token = tokenizer.eos_token
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    def prepare_dataset(batch):
        batch["input_features"] = feature_extractor(batch["audio"], sampling_rate=16000).input_features[0]
        batch["labels"] = tokenizer(batch["text"]).input_ids
        return batch

    prepared = ds.map(prepare_dataset, remove_columns=ds.column_names, keep_in_memory=True)

    @dataclass
    class DataCollatorSpeechSeq2SeqWithPadding:
        processor: object
        decoder_start_token_id: int

        def __call__(self, features):
            input_features = [{"input_features": f["input_features"]} for f in features]
            batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
            label_features = [{"input_ids": f["labels"]} for f in features]
            labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
            labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
            if (labels[:, 0] == self.processor.tokenizer.bos_token_id).all().cpu().item():
                labels = labels[:, 1:]
            batch["labels"] = labels
            return batch

    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir))
    model.generation_config.language = "english"
    model.generation_config.task = "transcribe"
    model.generation_config.forced_decoder_ids = None
    model.config.use_cache = False
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(work / "blog"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        warmup_steps=500,
        max_steps=args.steps,
        gradient_checkpointing=True,
        bf16=cuda,
        use_cpu=not cuda,
        eval_strategy="no",
        per_device_eval_batch_size=8,
        predict_with_generate=True,
        generation_max_length=225,
        save_steps=10**6,
        save_only_model=True,
        logging_steps=25,
        report_to=[],
        disable_tqdm=True,
    )
    timer = timer_callback(args.warmup, args.batch_size, cuda)
    trainer = Seq2SeqTrainer(args=training_args, model=model, train_dataset=prepared,
                             data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
                             processing_class=processor, callbacks=[timer])
    return run_timed("blog", trainer, timer, cuda)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU allowed (checks the script)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-device batch (the blog's 16)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing")
    parser.add_argument("--clip-seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=8, help="data loader workers for our trainer")
    parser.add_argument("--freeze-encoder", action="store_true", help="ours trains the decoder only (default: encoder and decoder, as in params.yaml)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("finetune_gpu: no CUDA device visible to torch; this benchmark needs one GPU "
              "(run it on a GPU machine, or pass --smoke for a tiny CPU check)", file=sys.stderr)
        return 2
    if args.smoke:
        args.batch_size, args.steps, args.warmup = min(args.batch_size, 2), min(args.steps, 4), 1
        args.clip_seconds, args.workers = 1.0, 0
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    device = torch.cuda.get_device_name() if cuda else "CPU"
    with tempfile.TemporaryDirectory(prefix="fedwhisper-bench-") as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work / "model", TINY if args.smoke else SMALL)
        ds = make_data(work / "prepared", n=args.batch_size * 8, clip_s=args.clip_seconds)
        results = [bench_ours(model_dir, ds, args, cuda, work), bench_blog(model_dir, ds, args, cuda, work)]
    ours, blog = results
    shape = "tiny (smoke)" if args.smoke else "whisper-small shape"
    precision = "bf16" if cuda else "fp32"
    print(f"\nfinetune throughput: {shape}, {precision}, batch {args.batch_size}, {args.steps} steps "
          f"({args.warmup} warm-up), {args.clip_seconds:g} s clips, {device}")
    print(f"{'trainer':<8} {'samples/s':>10} {'peak GiB':>9} {'wall s':>8}")
    for r in results:
        mem = f"{r.peak_mem_gib:.2f}" if r.peak_mem_gib is not None else "n/a"
        print(f"{r.name:<8} {r.samples_per_s:>10.1f} {mem:>9} {r.seconds:>8.1f}")
    ratio = ours.samples_per_s / blog.samples_per_s
    mem_ratio = ours.peak_mem_gib / blog.peak_mem_gib if cuda else None
    print(f"ratio ours/blog: samples/s x{ratio:.2f}" + (f", peak memory x{mem_ratio:.2f}" if mem_ratio else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "device": device, "shape": shape, "precision": precision, "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "results": [r.__dict__ for r in results],
            "ratio_samples_per_s": ratio, "ratio_peak_mem": mem_ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
