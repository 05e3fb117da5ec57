"""Write metrics/report.md, metrics/report.png and metrics/wer_by_group.csv from the evaluation metrics and
predictions (paired bootstrap verdicts with params.yaml's evaluate.bootstrap settings)."""

import argparse
import sys
from pathlib import Path

from fedwhisper.decode.significance import BootstrapSettings
from fedwhisper.errors import FedWhisperError
from fedwhisper.params import load_params
from fedwhisper.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics-dir", default="metrics", type=Path)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, stage="report")
        build_report(args.metrics_dir, params.clients, BootstrapSettings.from_params(params.evaluate.bootstrap))
    except FedWhisperError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    print(f"report: wrote {args.metrics_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
