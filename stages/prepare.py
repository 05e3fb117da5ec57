"""Prepare the dataset: data/prepared/<client>/<split>.arrow, metrics/prepare.json, metrics/prepare_drops.csv."""

import argparse
import logging
import sys
from pathlib import Path

from fedwhisper.data.prepare import load_token_counter, run_prepare
from fedwhisper.errors import FedWhisperError
from fedwhisper.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base", type=Path, help="model dir whose tokenizer counts labels")
    parser.add_argument("--out", default="data/prepared", type=Path)
    parser.add_argument("--metrics-dir", default="metrics", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params, stage="prepare")
        run_prepare(params, load_token_counter(args.base), args.out, args.metrics_dir)
    except FedWhisperError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
