"""Fine-tune the base model on one client: models/clients/<client>, models/checkpoints/<client>, metrics/finetune/."""

import argparse
import logging
import sys
from pathlib import Path

from fedwhisper.errors import FedWhisperError
from fedwhisper.params import load_params
from fedwhisper.train.launch import launcher_command, run_launched


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base", type=Path)
    parser.add_argument("--data", default="data/prepared", type=Path)
    parser.add_argument("--out", default="models/clients", type=Path, help="writes OUT/<client>")
    parser.add_argument("--checkpoints", default="models/checkpoints", type=Path, help="resume point: CHECKPOINTS/<client>")
    parser.add_argument("--metrics", default="metrics/finetune", type=Path, help="writes METRICS/<client>.json and curves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params, stage="finetune")
        command = launcher_command(params.finetune, __file__, argv)
        if command is not None:
            return run_launched(command)
        from fedwhisper.train.trainer import run_finetune

        run_finetune(params.finetune, args.client, base_dir=args.base, data_root=args.data, out_root=args.out,
                     checkpoint_root=args.checkpoints, metrics_root=args.metrics)
    except FedWhisperError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
