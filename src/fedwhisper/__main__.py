"""`python -m fedwhisper transcribe --model DIR FILE...`: transcribe audio without references (seed 003's test.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def transcribe_files(model: str | Path, files: list[str | Path], params) -> list[dict]:
    """Decode audio files with the evaluation path (same backend, batching and long-form handling)."""
    from fedwhisper.audio import load_16k_mono
    from fedwhisper.decode.evaluate import open_eval_backend
    from fedwhisper.decode.transcribe import transcribe_audios

    audios = [load_16k_mono(f) for f in files]
    with open_eval_backend(model, params) as backend:
        result = transcribe_audios(backend, audios, params.batch_size, desc="transcribe", progress=len(files) > 1)
    return [
        {"file": str(f), "duration_s": round(len(a) / 16000, 3), "text": t}
        for f, a, t in zip(files, audios, result.texts)
    ]


def main(argv: list[str] | None = None) -> int:
    from fedwhisper.errors import FedWhisperError

    parser = argparse.ArgumentParser(prog="python -m fedwhisper")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("transcribe", help="print the transcript of each audio file")
    tr.add_argument("--model", required=True, help="canonical HF Whisper directory (e.g. models/aggregated)")
    tr.add_argument("files", nargs="+", metavar="FILE")
    tr.add_argument("--json", action="store_true", help="print a JSON list of {file, duration_s, text}")
    tr.add_argument("--params", default="params.yaml", help="decoding settings from its `evaluate:` section")
    for key in ("backend", "batch_size", "beam_size", "language", "task", "max_new_tokens", "device", "compute_type"):
        tr.add_argument(f"--{key}", type=int if key in ("batch_size", "beam_size", "max_new_tokens") else str)
    args = parser.parse_args(argv)
    try:
        from fedwhisper.decode.settings import evaluate_params_with_overrides

        params = evaluate_params_with_overrides(args.params, vars(args))
        results = transcribe_files(args.model, args.files, params)
    except FedWhisperError as exc:
        print(f"transcribe: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in results:
            print(r["text"] if len(results) == 1 else f"{r['file']}\t{r['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
