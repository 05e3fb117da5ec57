"""`python -m fedwhisper transcribe --model DIR FILE_OR_FOLDER... [--out captions.jsonl]`: batched inference over
files and folders (seed 003's test.py), with each clip's reference caption from its sidecar where there is one.
`python -m fedwhisper compare A_predictions.csv B_predictions.csv`: is B's WER really different from A's?"""

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

    Returns ({file, duration_s, text, language} per usable file, {file, error} per skipped file). Every file is read before the
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
        {"file": str(f), "duration_s": round(len(a) / 16000, 3), "text": t, "language": lang}
        for (f, a), t, lang in zip(loaded, result.texts, result.languages)
    ]
    return results, skipped


def compare_settings(params_path: str | Path | None, overrides: dict):
    """``evaluate.bootstrap`` (and ``evaluate.normalizer``) from the params file, or the defaults when it is absent,
    with command-line overrides validated like params.yaml."""
    from fedwhisper.decode.settings import evaluate_params_with_overrides
    from fedwhisper.decode.significance import BootstrapSettings
    from fedwhisper.params import params_from_dict, to_dict

    evaluate = evaluate_params_with_overrides(params_path, {"normalizer": overrides.get("normalizer")})
    changes = {k: overrides[k] for k in ("resamples", "seed", "confidence", "unit") if overrides.get(k) is not None}
    if changes:
        section = to_dict(evaluate)
        section["bootstrap"] = {**section["bootstrap"], **changes}
        evaluate = params_from_dict({"evaluate": section}).evaluate
    return BootstrapSettings.from_params(evaluate.bootstrap), evaluate.normalizer


def _sentence(verdict: str) -> str:
    sentences = {"better": "B is better than A", "worse": "B is worse than A"}
    return sentences.get(verdict, "A and B are not distinguishable")


def run_compare(args) -> str:
    from fedwhisper.decode.significance import comparison_table, compare_counts, describe, read_predictions

    settings, normalizer = compare_settings(args.params, vars(args))
    a, b = read_predictions(args.a, normalizer), read_predictions(args.b, normalizer)
    comparisons = compare_counts(a, b, settings)
    if args.metric != "both":
        comparisons = [c for c in comparisons if c.metric == args.metric]
    if args.json:
        import dataclasses

        return json.dumps([{**dataclasses.asdict(c), "verdict": c.verdict} for c in comparisons], indent=2)
    pooled = next(c for c in comparisons if c.group == "pooled")
    level = f"{settings.confidence:.0%}"
    lines = [
        f"A: {args.a}",
        f"B: {args.b}",
        f"{int(a.scored.sum())} scored utterances in both; B - A in percentage points; paired bootstrap "
        f"(Bisani & Ney 2004): {settings.resamples} resamples of {settings.unit}s, seed {settings.seed}",
        "",
        comparison_table(comparisons, markdown=args.md),
        "",
        f"{pooled.metric.upper()} pooled, A {pooled.a:.2f} -> B {pooled.b:.2f}: {_sentence(pooled.verdict)} at "
        f"{level} ({describe(pooled)})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fedwhisper.decode.settings import LANGUAGE_HELP
    from fedwhisper.errors import FedWhisperError

    parser = argparse.ArgumentParser(prog="python -m fedwhisper")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("transcribe", help="print the transcript of each audio file")
    tr.add_argument("--model", required=True, help="canonical HF Whisper directory (e.g. models/aggregated)")
    tr.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER",
                    help="audio files and folders (searched recursively for audio; .txt/.json/.csv sidecars are "
                         "skipped, also when named directly, e.g. by dir/*)")
    tr.add_argument("--json", action="store_true", help="print a JSON list of {file, duration_s, text, language}")
    tr.add_argument("--out", help="also write seed 003's rows {file, pred_caption, gt_caption} to this .csv or "
                                  ".jsonl file; gt_caption is the reference from the clip's .txt/.json sidecar "
                                  "(empty in CSV, absent in JSONL, where there is none)")
    tr.add_argument("--text_key", default="text", help="caption field of .json sidecars (dotted for nested)")
    tr.add_argument("--params", default="params.yaml", help="decoding settings from its `evaluate:` section")
    tr.add_argument("--skip-bad", action="store_true",
                    help="skip files that cannot be decoded or hold no usable audio (0 samples, NaN), transcribe the "
                         "rest, list the skipped files on stderr and exit with status 1")
    for key in ("backend", "batch_size", "beam_size", "language", "task", "max_new_tokens", "device", "compute_type"):
        tr.add_argument(f"--{key}", type=int if key in ("batch_size", "beam_size", "max_new_tokens") else str,
                        help=LANGUAGE_HELP if key == "language" else None)
    cmp = sub.add_parser(
        "compare", help="paired bootstrap of two predictions CSVs on the same utterances: WER/CER difference, "
        "its confidence interval and p-value, pooled and per client group",
        description="Compare B against A (B - A), e.g. the workspace against HEAD: python -m fedwhisper compare "
        "<(git show HEAD:metrics/eval/aggregated_predictions.csv) metrics/eval/aggregated_predictions.csv. "
        "Refuses predictions on different utterance sets. CSVs written before the per-utterance count columns "
        "existed are recounted from their normalised text.")
    cmp.add_argument("a", metavar="A_predictions.csv", help="the reference system (e.g. HEAD, the base)")
    cmp.add_argument("b", metavar="B_predictions.csv", help="the system under review (e.g. the workspace)")
    cmp.add_argument("--params", default="params.yaml", help="bootstrap settings from its `evaluate.bootstrap:`")
    cmp.add_argument("--resamples", type=int)
    cmp.add_argument("--seed", type=int)
    cmp.add_argument("--confidence", type=float, help="e.g. 0.95")
    cmp.add_argument("--unit", help="utterance | sentence: what is resampled")
    cmp.add_argument("--normalizer",
                     help="only for CSVs without normalised text columns (default: evaluate.normalizer)")
    cmp.add_argument("--metric", choices=("wer", "cer", "both"), default="both")
    shown = cmp.add_mutually_exclusive_group()
    shown.add_argument("--md", action="store_true", help="the table in markdown, to paste into a PR")
    shown.add_argument("--json", action="store_true", help="every comparison as JSON")
    args = parser.parse_args(argv)
    if args.command == "compare":
        try:
            print(run_compare(args))
        except FedWhisperError as exc:
            print(f"compare: error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        from fedwhisper.decode.settings import evaluate_params_with_overrides

        from fedwhisper.audio import AUDIO_EXTENSIONS
        from fedwhisper.decode.captions import OUTPUT_SUFFIXES, caption_rows, expand_inputs, write_captions
        from fedwhisper.errors import DataError, ParamsError

        params = evaluate_params_with_overrides(args.params, vars(args))
        if args.out and Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ParamsError(f"--out {args.out}: name a .csv or .jsonl file")
        files, sidecars = expand_inputs(args.files)
        if not files:
            raise DataError(f"no audio files in {', '.join(args.files)} (looked for {', '.join(AUDIO_EXTENSIONS)})")
        if sidecars:
            print(f"transcribe: skipped {len(sidecars)} sidecar file(s) (.txt/.json/.csv)", file=sys.stderr)
        results, skipped = transcribe_files(args.model, files, params, skip_bad=args.skip_bad)
        if args.out:
            rows = caption_rows(results, args.text_key)
            write_captions(args.out, rows)
            print(f"transcribe: wrote {len(rows)} captions ({sum('gt_caption' in r for r in rows)} with a "
                  f"reference) to {args.out}", file=sys.stderr)
    except FedWhisperError as exc:
        print(f"transcribe: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in results:
            print(r["text"] if len(files) == 1 else f"{r['file']}\t{r['text']}")
    for s in skipped:
        print(f"transcribe: skipped {s['error']}", file=sys.stderr)
    if skipped:
        print(f"transcribe: {len(skipped)} of {len(files)} files skipped, {len(results)} transcribed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
