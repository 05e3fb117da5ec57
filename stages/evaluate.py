"""Evaluate one model: the prepared test split (pooled and per client), or a streamed HF dataset.

DVC:      python stages/evaluate.py --model models/base --name base
Seed 000: python stages/evaluate.py --model_dir DIR --dataset_name i4ds/spc_r --split test
          (DIR may hold only seed 000's model.pt; its --precision, --examples_csv, --metrics_csv,
          --max_saved_examples, --wandb_run_name and --disable_wandb mean what they mean there)
"""

import argparse
import logging
import re
import sys
from pathlib import Path

from fedwhisper.decode.backends import resolve_device
from fedwhisper.decode.evaluate import StreamSpec, evaluate_model
from fedwhisper.decode.seed000 import (
    compute_type_for_precision, seed_metrics, write_examples_csv, write_metrics_csv,
)
from fedwhisper.decode.settings import LANGUAGE_HELP, evaluate_params_with_overrides
from fedwhisper.errors import FedWhisperError, ParamsError
from fedwhisper.formats.base_model import canonical_model_dir
from fedwhisper.wandb_logging import log_wandb_run

SEED_EXAMPLES_CSV = "evaluation_examples.csv"  # seed 000's defaults, written when streaming
SEED_METRICS_CSV = "evaluation_metrics.csv"


def default_name(model: str, spec: StreamSpec | None) -> str:
    """The model folder's name; for a streamed dataset also the dataset and split (``aggregated_i4ds-spc_r_test``),
    so that evaluating ``models/aggregated`` on a hub dataset does not overwrite the pipeline's
    ``metrics/eval/aggregated.json``."""
    path = Path(model).resolve()
    name = path.stem if path.is_file() else path.name
    if spec is None:
        return name
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.dataset).name if Path(spec.dataset).exists()
                     else spec.dataset).strip("-.")
    return f"{name}_{dataset}_{spec.split}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_dir", dest="model", required=True,
                        help="canonical HF Whisper directory, an openai-whisper .pt, or a folder holding only model.pt")
    parser.add_argument("--architecture", help="openai-whisper model name (large-v3-turbo, ...) of a bare state dict "
                        "whose shapes match no known model or several (default: read from the tensor shapes)")
    parser.add_argument("--name", help="output name: <out_dir>/<name>.json (default: the model folder name; when "
                        "streaming, <model folder>_<dataset>_<split>, so that the pipeline's own metrics stay)")
    parser.add_argument("--params", default="params.yaml", help="params file; its `evaluate:` section is used")
    parser.add_argument("--prepared", default="data/prepared", type=Path)
    parser.add_argument("--out_dir", default="metrics/eval", type=Path)
    stream = parser.add_argument_group("streaming evaluation (instead of the prepared data)")
    stream.add_argument("--dataset_name", help="HF dataset id or local data directory, streamed")
    stream.add_argument("--dataset_config")
    stream.add_argument("--split", default="test")
    stream.add_argument("--audio_column", default="audio")
    stream.add_argument("--text_column", default="text")
    stream.add_argument("--id_column")
    stream.add_argument("--group_column", help="column giving each row's group (per-group WER keys)")
    stream.add_argument("--max_samples", type=int)
    over = parser.add_argument_group("overrides of params.yaml evaluate.*")
    for key in ("backend", "batch_size", "beam_size", "language", "task", "max_new_tokens", "normalizer", "device",
                "compute_type"):
        over.add_argument(f"--{key}", type=int if key in ("batch_size", "beam_size", "max_new_tokens") else str,
                          help=LANGUAGE_HELP if key == "language" else None)
    seed = parser.add_argument_group("seed 000's evaluate_model.py options")
    seed.add_argument("--precision", help="float16 | float32 | fp32: decode in float16 on CUDA (float32 on CPU) or "
                      "float32; sets evaluate.compute_type, so not together with --compute_type")
    seed.add_argument("--examples_csv", help="the first --max_saved_examples predictions in the seed's columns "
                      f"(default when streaming: {SEED_EXAMPLES_CSV}; '' writes none)")
    seed.add_argument("--metrics_csv", help="metric,value rows: wer (a fraction) and bleu "
                      f"(default when streaming: {SEED_METRICS_CSV}; '' writes none)")
    seed.add_argument("--max_saved_examples", type=int, default=20, help="rows in --examples_csv (default 20)")
    seed.add_argument("--wandb_run_name", help="W&B run name (default: the output name); W&B logs when "
                      "WANDB_API_KEY is set")
    seed.add_argument("--disable_wandb", action="store_true", help="never log to W&B (also: WANDB_MODE=disabled)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = None
    if args.dataset_name:
        spec = StreamSpec(args.dataset_name, args.split, args.dataset_config, args.audio_column, args.text_column,
                          args.id_column, args.group_column, args.max_samples)
        args.examples_csv = SEED_EXAMPLES_CSV if args.examples_csv is None else args.examples_csv
        args.metrics_csv = SEED_METRICS_CSV if args.metrics_csv is None else args.metrics_csv
    name = args.name or default_name(args.model, spec)
    try:
        if args.max_saved_examples < 0:
            raise ParamsError(f"--max_saved_examples: got {args.max_saved_examples}; give 0 or more")
        params = evaluate_params_with_overrides(args.params, vars(args))
        if args.precision is not None:
            if args.compute_type is not None:
                raise ParamsError("--precision and --compute_type both set the compute type; pass only one")
            compute_type = compute_type_for_precision(args.precision, resolve_device(params.device))
            params = evaluate_params_with_overrides(args.params, {**vars(args), "compute_type": compute_type})
        with canonical_model_dir(args.model, args.architecture) as model_dir:
            metrics = evaluate_model(model_dir, name, params, args.out_dir, args.prepared, spec)
        if args.examples_csv:
            write_examples_csv(args.out_dir / f"{name}_predictions.csv", args.examples_csv, args.max_saved_examples)
        if args.metrics_csv:
            write_metrics_csv(metrics, args.metrics_csv)
    except FedWhisperError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1
    if metrics.get("same_model_as"):  # one client: the aggregate is that client's model, logged with it
        return 0
    log_wandb_run(args.wandb_run_name or name, {
        **seed_metrics(metrics),
        "model_dir": args.model, "dataset": spec.dataset if spec else str(args.prepared),
        "split": spec.split if spec else "test", "precision": args.precision or params.compute_type,
        "samples": metrics["n_samples"] + metrics["n_empty_refs"],
    }, job_type="evaluate", disabled=args.disable_wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
