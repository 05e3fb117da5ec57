"""Evaluate one model: the prepared test split (pooled and per client), or a streamed HF dataset.

DVC:      python stages/evaluate.py --model models/base --name base
Seed 000: python stages/evaluate.py --model_dir DIR --dataset_name i4ds/spc_r --split test
"""

import argparse
import logging
import re
import sys
from pathlib import Path

from fedwhisper.decode.evaluate import StreamSpec, evaluate_model
from fedwhisper.decode.settings import evaluate_params_with_overrides
from fedwhisper.errors import FedWhisperError


def default_name(model: str, spec: StreamSpec | None) -> str:
    """The model folder's name; for a streamed dataset also the dataset and split (``aggregated_i4ds-spc_r_test``),
    so that evaluating ``models/aggregated`` on a hub dataset does not overwrite the pipeline's
    ``metrics/eval/aggregated.json``."""
    name = Path(model).resolve().name
    if spec is None:
        return name
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.dataset).name if Path(spec.dataset).exists()
                     else spec.dataset).strip("-.")
    return f"{name}_{dataset}_{spec.split}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_dir", dest="model", required=True, help="canonical HF Whisper directory")
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
        over.add_argument(f"--{key}", type=int if key in ("batch_size", "beam_size", "max_new_tokens") else str)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = None
    if args.dataset_name:
        spec = StreamSpec(args.dataset_name, args.split, args.dataset_config, args.audio_column, args.text_column,
                          args.id_column, args.group_column, args.max_samples)
    try:
        params = evaluate_params_with_overrides(args.params, vars(args))
        evaluate_model(args.model, args.name or default_name(args.model, spec), params, args.out_dir,
                       args.prepared, spec)
    except FedWhisperError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
