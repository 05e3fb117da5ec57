"""Benchmark the bootstrap confidence interval and the paired bootstrap on synthetic per-utterance counts.

Times `rate_intervals` (WER + CER interval, one set of resamples) and `paired_bootstrap` (two systems) on --utterances
synthetic utterances (word/char counts and error counts drawn like a 5-40% WER test set), against a baseline
measured in the same run: the textbook loop that gathers the resampled rows of each resample (``values[idx].sum``).
Prints medians over --repeats and the ratio; the target is at most 1 s for 10,000 utterances and 1,000 resamples.

    python bench/bootstrap.py                         # 10,000 utterances, 1,000 resamples
    python bench/bootstrap.py --utterances 100000     # a large test set
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedwhisper.decode.significance import BootstrapSettings, UtteranceCounts, paired_bootstrap, rate_intervals


def synthetic_counts(n: int, seed: int, wer: float) -> UtteranceCounts:
    rng = np.random.default_rng(seed)
    words = rng.integers(3, 30, n)
    chars = words * 5 + rng.integers(0, 5, n)
    word_errors = rng.binomial(words, wer)
    char_errors = rng.binomial(chars, wer / 2)
    counts = np.stack([word_errors, words, char_errors, chars], axis=1).astype(np.int64)
    ids = [f"utt{i}" for i in range(n)]
    refs = [f"ref {i}" for i in range(n)]
    return UtteranceCounts("synthetic", ids, ["all"] * n, refs, refs, np.ones(n, bool), counts)


def gather_baseline(counts: UtteranceCounts, settings: BootstrapSettings) -> tuple[float, float]:
    """The straightforward bootstrap: draw indices, gather the rows, sum them (one resample at a time)."""
    rng = np.random.default_rng(settings.seed)
    values = counts.counts.astype(np.float64)
    n = len(values)
    wer = np.empty(settings.resamples)
    for b in range(settings.resamples):
        total = values[rng.integers(0, n, n)].sum(axis=0)
        wer[b] = 100.0 * total[0] / total[1]
    low, high = np.quantile(wer, [0.025, 0.975])
    return float(low), float(high)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    settings = BootstrapSettings(resamples=args.resamples)
    a = synthetic_counts(args.utterances, 1, 0.20)
    b = synthetic_counts(args.utterances, 2, 0.18)
    b = UtteranceCounts(b.source, a.ids, a.groups, a.references, a.references_normalized, a.scored,
                        np.concatenate([b.counts[:, [0]], a.counts[:, [1]], b.counts[:, [2]], a.counts[:, [3]]], 1))
    t_ci, ci = timed(lambda: rate_intervals(a, settings), args.repeats)
    t_paired, cmp = timed(lambda: paired_bootstrap(a, b, settings), args.repeats)
    t_base, base_ci = timed(lambda: gather_baseline(a, settings), max(1, args.repeats // 2))
    print(f"bootstrap: {args.utterances} utterances, {args.resamples} resamples, medians of {args.repeats}")
    print(f"  interval (WER + CER)   {t_ci * 1000:8.1f} ms   WER {ci['wer'].estimate:.2f} "
          f"[{ci['wer'].low:.2f}, {ci['wer'].high:.2f}]")
    print(f"  paired (WER + CER)     {t_paired * 1000:8.1f} ms   delta {cmp['wer'].delta:+.2f} "
          f"[{cmp['wer'].low:.2f}, {cmp['wer'].high:.2f}] ({cmp['wer'].verdict})")
    print(f"  baseline gather loop   {t_base * 1000:8.1f} ms   WER [{base_ci[0]:.2f}, {base_ci[1]:.2f}]")
    print(f"  ratio baseline / ours: x{t_base / t_ci:.1f} (interval), x{t_base / t_paired:.1f} (paired); "
          f"target <= 1 s: {'met' if max(t_ci, t_paired) <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
