"""The centralised upper bound: fine-tune the base on every client's train split pooled (finetune params, the
clients' one-shot steps summed); writes models/centralised/ and metrics/federated/centralise.json + curves."""

import argparse
import logging
import sys
from pathlib import Path

from fedwhisper.errors import FedWhisperError
from fedwhisper.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base", type=Path)
    parser.add_argument("--data", default="data/prepared", type=Path)
    parser.add_argument("--out", default="models/centralised", type=Path)
    parser.add_argument("--checkpoints", default="models/centralised_checkpoints", type=Path,
                        help="resume point, kept between runs while params, base and data are unchanged")
    parser.add_argument("--metrics", default="metrics/federated", type=Path,
                        help="writes METRICS/centralise.json and the curves under METRICS/centralise/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params, stage="centralise")
        from fedwhisper.centralised import run_centralised

        run_centralised(params.finetune, params.clients, base_dir=args.base, data_root=args.data,
                        out_dir=args.out, checkpoint_dir=args.checkpoints,
                        metrics_file=args.metrics / "centralise.json", live_dir=args.metrics / "centralise")
    except FedWhisperError as exc:
        print(f"centralise: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
