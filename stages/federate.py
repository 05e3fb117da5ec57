"""Federated rounds: params.yaml `federated` (rounds, local steps, strategy, server optimiser, FedProx, client
sampling) over the prepared clients, through the Flower apps in one process; writes models/federated/ and
metrics/federated/ (rounds.tsv, client_loss.tsv, DVCLive curves under live/, metrics.json).

The `federate` stage of pipelines/federated/dvc.yaml (`make federated`); see the README's "Federated rounds".
"""

import argparse
import logging
import sys

from fedwhisper.errors import FedWhisperError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base", default="models/base", help="the starting global model (canonical HF dir)")
    ap.add_argument("--prepared", default="data/prepared", help="prepared data, one folder per client")
    ap.add_argument("--out", default="models/federated")
    ap.add_argument("--metrics", default="metrics/federated")
    ap.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                    help="skip the global model's validation WER after each round")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fedwhisper.federated.stage import run_federate

    try:
        run_federate(args.params, base_dir=args.base, data_root=args.prepared, out_dir=args.out,
                     metrics_dir=args.metrics, evaluate=args.evaluate)
    except FedWhisperError as exc:
        print(f"federate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
