"""`python -m fedwhisper transcribe --model DIR FILE...`: transcribe audio without references (seed 003's test.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load_checked(path: str | Path) -> np.ndarray:
    """16 kHz audio of ``path``; a DataError naming the file when it cannot be decoded or holds no usable audio."""
    from fedwhisper.audio import audio_problem, load_16k_mono
    from fedwhisper.errors import DataError

    audio = load_16k_mono(path)
    problem = audio_problem(audio)
    if problem is not None:
        raise DataError(f"{path}: {problem[1]}; re-export or remove the file")
    return audio


def transcribe_files(
    model: str | Path, files: list[str | Path], params, skip_bad: bool = False
) -> tuple[list[dict], list[dict]]:
    """Decode audio files with the evaluation path (same backend, batching and long-form handling).

    Returns ({file, duration_s, text} per usable file, {file, error} per skipped file). Every file is read before the
    model is loaded; without ``skip_bad`` the first unusable one raises its DataError.
    """
    from fedwhisper.decode.evaluate import open_eval_backend
    from fedwhisper.decode.transcribe import transcribe_audios
    from fedwhisper.errors import DataError

    loaded, skipped = [], []
    for f in files:
        try:
            loaded.append((f, load_checked(f)))
        except DataError as exc:
            if not skip_bad:
                hint = "; or pass --skip-bad to transcribe the other files" if len(files) > 1 else ""
                raise DataError(f"{exc}{hint}") from None
            skipped.append({"file": str(f), "error": str(exc)})
    if not loaded:
        return [], skipped
    audios = [a for _, a in loaded]
    with open_eval_backend(model, params) as backend:
        result = transcribe_audios(backend, audios, params.batch_size, desc="transcribe", progress=len(files) > 1)
    results = [
        {"file": str(f), "duration_s": round(len(a) / 16000, 3), "text": t}
        for (f, a), t in zip(loaded, result.texts)
    ]
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    from fedwhisper.errors import FedWhisperError

    parser = argparse.ArgumentParser(prog="python -m fedwhisper")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("transcribe", help="print the transcript of each audio file")
    tr.add_argument("--model", required=True, help="canonical HF Whisper directory (e.g. models/aggregated)")
    tr.add_argument("files", nargs="+", metavar="FILE")
    tr.add_argument("--json", action="store_true", help="print a JSON list of {file, duration_s, text}")
    tr.add_argument("--params", default="params.yaml", help="decoding settings from its `evaluate:` section")
    tr.add_argument("--skip-bad", action="store_true",
                    help="skip files that cannot be decoded or hold no usable audio (0 samples, NaN), transcribe the "
                         "rest, list the skipped files on stderr and exit with status 1")
    for key in ("backend", "batch_size", "beam_size", "language", "task", "max_new_tokens", "device", "compute_type"):
        tr.add_argument(f"--{key}", type=int if key in ("batch_size", "beam_size", "max_new_tokens") else str)
    args = parser.parse_args(argv)
    try:
        from fedwhisper.decode.settings import evaluate_params_with_overrides

        params = evaluate_params_with_overrides(args.params, vars(args))
        results, skipped = transcribe_files(args.model, args.files, params, skip_bad=args.skip_bad)
    except FedWhisperError as exc:
        print(f"transcribe: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in results:
            print(r["text"] if len(args.files) == 1 else f"{r['file']}\t{r['text']}")
    for s in skipped:
        print(f"transcribe: skipped {s['error']}", file=sys.stderr)
    if skipped:
        print(f"transcribe: {len(skipped)} of {len(args.files)} files skipped, {len(results)} transcribed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
