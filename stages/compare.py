"""The four-way comparison: local-only clients, one-shot merge, federated rounds and centralised, per client group
and pooled (intervals, paired bootstrap verdicts with params.yaml's evaluate.bootstrap, gap to centralised); writes
metrics/federated/report.md and metrics/federated/comparison.json."""

import argparse
import sys
from pathlib import Path

from fedwhisper.decode.significance import BootstrapSettings
from fedwhisper.errors import FedWhisperError
from fedwhisper.federated_report import build_four_way_report
from fedwhisper.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics-dir", default="metrics", type=Path,
                        help="reads METRICS/eval (root pipeline) and METRICS/federated (this pipeline)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, stage="compare")
        build_four_way_report(args.metrics_dir, params.clients,
                              BootstrapSettings.from_params(params.evaluate.bootstrap))
    except FedWhisperError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    print(f"compare: wrote {args.metrics_dir / 'federated' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
