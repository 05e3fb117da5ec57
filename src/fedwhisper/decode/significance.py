"""Bootstrap confidence intervals and paired significance for WER / CER (Bisani & Ney, ICASSP 2004).

Everything works on per-utterance counts: word errors ``e_i`` and reference words ``n_i`` (the same for characters).
Corpus WER is ``sum(e) / sum(n)``. One resample draws the units (utterances, or sentences) with replacement; a unit
drawn ``k_i`` times counts ``k_i`` times::

    WER* = sum_i k_i e_i / sum_i k_i n_i

The interval is the percentile interval of WER* over the resamples. The paired test draws the same ``k_i`` for
two systems A and B scored on the same units::

    delta* = WER*_B - WER*_A = sum_i k_i (eB_i - eA_i) / sum_i k_i n_i

B is better (worse) than A when the interval of delta* lies entirely below (above) zero, otherwise the two are not
distinguishable at that confidence. The two-sided p-value is ``min(1, 2 min(P*(delta* <= 0), P*(delta* >= 0)))``;
when no resample reaches zero it is below ``2 / resamples`` (shown as such).
Each interval starts a fresh generator from the seed, so a number depends only on its own data and settings.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import numpy as np

from fedwhisper.decode.metrics import normalize_texts, utterance_counts
from fedwhisper.errors import DecodeError

COUNT_COLUMNS = ("word_errors", "ref_words", "char_errors", "ref_chars")
POOLED = "pooled"
_DRAWS_PER_CHUNK = 4_000_000  # resample-by-unit draws held at once (about 32 MB of int64)
_SHOWN_IDS = 5


@dataclass(frozen=True)
class BootstrapSettings:
    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    unit: Literal["utterance", "sentence"] = "utterance"

    @classmethod
    def from_params(cls, params: Any) -> "BootstrapSettings":
        """From ``evaluate.bootstrap`` (fedwhisper.params.BootstrapParams)."""
        return cls(params.resamples, params.seed, params.confidence, params.unit)


@dataclass(frozen=True)
class UtteranceCounts:
    """Every row of one predictions set, in file order; only ``scored`` rows (non-empty reference) are resampled."""

    source: str
    ids: list[str]
    groups: list[str]
    references: list[str]
    references_normalized: list[str]
    scored: np.ndarray  # (n,) bool
    counts: np.ndarray  # (n, 4) int64 in COUNT_COLUMNS order; zeros where not scored

    def __len__(self) -> int:
        return len(self.ids)

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(g for g, s in zip(self.groups, self.scored) if s))


@dataclass(frozen=True)
class Interval:
    estimate: Optional[float]  # percent; None when nothing is scored
    low: Optional[float]
    high: Optional[float]


@dataclass(frozen=True)
class Comparison:
    """B against A on one metric and one group: ``delta = B - A`` in percentage points."""

    metric: str  # wer | cer
    group: str  # POOLED or a client group
    a: float
    b: float
    delta: float
    low: float
    high: float
    p_value: float
    units: int
    resamples: int
    confidence: float

    @property
    def verdict(self) -> str:
        """B relative to A: ``better``, ``worse`` or ``not distinguishable`` (the interval of delta holds 0)."""
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        return "not distinguishable"


# --------------------------------------------------------------------------- counts from predictions


def counts_from_texts(
    source: str, ids: list[str], groups: list[str], references: list[str], hypotheses: list[str], normalizer: str,
) -> UtteranceCounts:
    """Counts of raw reference / hypothesis pairs, normalised as the evaluate stage does."""
    refs_n, hyps_n = normalize_texts(references, normalizer), normalize_texts(hypotheses, normalizer)
    return _counts_from_normalized(source, ids, groups, references, refs_n, hyps_n)


def _counts_from_normalized(source, ids, groups, references, refs_n, hyps_n) -> UtteranceCounts:
    counts = np.zeros((len(ids), len(COUNT_COLUMNS)), np.int64)
    scored = np.array([bool(r) for r in refs_n], bool)
    for i in np.flatnonzero(scored):
        counts[i] = utterance_counts(refs_n[i], hyps_n[i])
    return UtteranceCounts(source, list(ids), list(groups), list(references), list(refs_n), scored, counts)


def read_predictions(path: str | Path, normalizer: str = "english") -> UtteranceCounts:
    """Read a ``*_predictions.csv`` written by the evaluate stage (a pipe such as ``<(git show ...)`` works too).

    The four count columns are used when the file has them. Files written before they existed are recounted from
    their ``reference_normalized`` / ``hypothesis_normalized`` columns (the text that run scored), or, lacking
    those, from ``reference`` / ``hypothesis`` normalised with ``normalizer``.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read predictions ({exc.strerror})") from None
    return parse_predictions(text, str(path), normalizer)


def parse_predictions(text: str, source: str, normalizer: str = "english") -> UtteranceCounts:
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    missing = [c for c in ("id", "reference", "hypothesis") if c not in columns]
    if missing:
        raise DecodeError(
            f"{source}: no column {missing[0]!r} (columns: {', '.join(columns) or 'none'}); "
            "pass a *_predictions.csv written by the evaluate stage"
        )
    rows = list(reader)
    if not rows:
        raise DecodeError(f"{source}: no predictions (header only)")
    ids = [r["id"] for r in rows]
    seen: dict[str, int] = {}
    for line, uid in enumerate(ids, start=2):
        if uid in seen:
            raise DecodeError(f"{source}: line {line}: id {uid!r} repeats line {seen[uid]}; ids must be unique")
        seen[uid] = line
    groups = [r.get("client") or "all" for r in rows]
    references = [r["reference"] or "" for r in rows]
    if not all(c in columns for c in COUNT_COLUMNS):
        if "reference_normalized" in columns and "hypothesis_normalized" in columns:
            return _counts_from_normalized(source, ids, groups, references,
                                           [" ".join((r["reference_normalized"] or "").split()) for r in rows],
                                           [" ".join((r["hypothesis_normalized"] or "").split()) for r in rows])
        return counts_from_texts(source, ids, groups, references, [r["hypothesis"] or "" for r in rows], normalizer)
    refs_n = [r.get("reference_normalized") for r in rows]
    if any(r is None for r in refs_n):
        refs_n = normalize_texts(references, normalizer)
    counts = np.zeros((len(rows), len(COUNT_COLUMNS)), np.int64)
    scored = np.zeros(len(rows), bool)
    for i, r in enumerate(rows):
        cells = [r[c] for c in COUNT_COLUMNS]
        if all(c in ("", None) for c in cells):
            continue  # not scored (empty reference)
        for j, (column, cell) in enumerate(zip(COUNT_COLUMNS, cells)):
            try:
                counts[i, j] = int(cell)
            except (TypeError, ValueError):
                raise DecodeError(f"{source}: line {i + 2}: {column} = {cell!r}; expected a whole number") from None
        if counts[i, 1] <= 0 or counts[i, 3] <= 0 or (counts[i] < 0).any():
            raise DecodeError(
                f"{source}: line {i + 2}: counts {dict(zip(COUNT_COLUMNS, counts[i].tolist()))} are impossible for a "
                "scored utterance (reference words and chars must be > 0, errors >= 0)"
            )
        scored[i] = True
    return UtteranceCounts(source, ids, groups, references, [r or "" for r in refs_n], scored, counts)


# --------------------------------------------------------------------------- resampling


def _unit_labels(counts: UtteranceCounts, rows: np.ndarray, unit: str) -> Optional[np.ndarray]:
    """For the utterances ``rows``: the resampling unit of each (None when every utterance is its own unit)."""
    if unit == "utterance":
        return None
    if unit == "sentence":
        keys = np.array([counts.references_normalized[i] for i in rows], dtype=str)
        return np.unique(keys, return_inverse=True)[1].reshape(-1)
    raise DecodeError(f"evaluate.bootstrap.unit: unknown unit {unit!r}; use utterance or sentence")


def _by_unit(values: np.ndarray, labels: Optional[np.ndarray]) -> np.ndarray:
    """Per-utterance ``values`` (n, k) summed within each unit -> (units, k)."""
    if labels is None:
        return values.astype(np.float64)
    out = np.zeros((int(labels.max()) + 1, values.shape[1]))
    np.add.at(out, labels, values)
    return out


def resample_totals(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(units, k) values -> (resamples, k): each column's total over one resample of the units with replacement.

    A resample is the vector of how often each unit was drawn (``bincount`` of uniform draws), so every column
    is summed in one matrix product instead of gathering ``resamples x units`` rows.
    """
    units = len(values)
    if units == 0:
        raise DecodeError("bootstrap: nothing to resample (no scored utterance)")
    rng = np.random.default_rng(seed)
    values = np.asarray(values, np.float64)
    out = np.empty((resamples, values.shape[1]))
    chunk = max(1, _DRAWS_PER_CHUNK // units)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        draws = rng.integers(0, units, size=(b, units))
        draws += (np.arange(b) * units)[:, None]
        times = np.bincount(draws.ravel(), minlength=b * units).reshape(b, units)
        out[start:start + b] = times.astype(np.float64) @ values
    return out


def _percent(errors: np.ndarray, totals: np.ndarray) -> np.ndarray:
    return 100.0 * errors / totals


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def rate_intervals(
    counts: UtteranceCounts, settings: BootstrapSettings, rows: Optional[np.ndarray] = None,
) -> dict[str, Interval]:
    """``{"wer": Interval, "cer": Interval}`` over ``rows`` (default: every scored utterance), both from the same
    resamples."""
    rows = np.flatnonzero(counts.scored) if rows is None else rows
    if len(rows) == 0:
        return dict.fromkeys(("wer", "cer"), Interval(None, None, None))
    values = _by_unit(counts.counts[rows], _unit_labels(counts, rows, settings.unit))
    totals = resample_totals(values, settings.resamples, settings.seed)
    point = values.sum(axis=0)
    out = {}
    for metric, (e, n) in (("wer", (0, 1)), ("cer", (2, 3))):
        low, high = _quantiles(_percent(totals[:, e], totals[:, n]), settings.confidence)
        out[metric] = Interval(float(_percent(point[e], point[n])), low, high)
    return out


def group_rows(counts: UtteranceCounts) -> dict[str, np.ndarray]:
    """POOLED and each client group -> indices of its scored rows."""
    scored = np.flatnonzero(counts.scored)
    out = {POOLED: scored}
    groups = np.array(counts.groups, dtype=object)
    for g in counts.group_names():
        out[g] = scored[groups[scored] == g]
    return out


def interval_metrics(counts: UtteranceCounts, settings: BootstrapSettings) -> dict[str, Any]:
    """Flat metrics keys: ``wer_ci_low``, ``wer_ci_high``, ``cer_ci_low``, ``cer_ci_high``, then the same with
    ``_<group>`` for every client group (like ``wer_<group>``), and the settings that produced them."""
    out: dict[str, Any] = {}
    for group, rows in group_rows(counts).items():
        suffix = "" if group == POOLED else f"_{group}"
        for metric, interval in rate_intervals(counts, settings, rows).items():
            out[f"{metric}_ci_low{suffix}"] = interval.low
            out[f"{metric}_ci_high{suffix}"] = interval.high
    out.update(ci_confidence=settings.confidence, ci_resamples=settings.resamples, ci_seed=settings.seed,
               ci_unit=settings.unit)
    return out


# --------------------------------------------------------------------------- paired comparison


def check_same_utterances(a: UtteranceCounts, b: UtteranceCounts) -> np.ndarray:
    """Raise DecodeError naming what differs unless A and B hold the same utterances with the same references;
    return, for each row of A, the row of B with its id."""
    index_b = {uid: i for i, uid in enumerate(b.ids)}
    only_a = [uid for uid in a.ids if uid not in index_b]
    ids_a = set(a.ids)
    only_b = [uid for uid in b.ids if uid not in ids_a]
    if only_a or only_b:
        parts = []
        for name, src, ids in (("A", a.source, only_a), ("B", b.source, only_b)):
            if ids:
                more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
                parts.append(f"{len(ids)} only in {name} ({src}): {', '.join(ids[:_SHOWN_IDS])}{more}")
        raise DecodeError(
            f"cannot compare predictions made on different utterance sets ({len(a)} vs {len(b)} rows): "
            + "; ".join(parts) + ". Evaluate both models on the same test split"
        )
    order = np.array([index_b[uid] for uid in a.ids], np.int64)
    for i, j in enumerate(order):
        for what, va, vb in (("reference", a.references[i], b.references[j]),
                             ("client group", a.groups[i], b.groups[j]),
                             ("normalised reference", a.references_normalized[i], b.references_normalized[j])):
            if va != vb:
                hint = " (different evaluate.normalizer?)" if what == "normalised reference" else ""
                raise DecodeError(
                    f"cannot compare: utterance {a.ids[i]!r} has a different {what} in A ({a.source}: {va!r}) and "
                    f"B ({b.source}: {vb!r}){hint}; both must be scored against the same test set"
                )
        if a.scored[i] and (a.counts[i, 1], a.counts[i, 3]) != (b.counts[j, 1], b.counts[j, 3]):
            raise DecodeError(
                f"cannot compare: utterance {a.ids[i]!r} has {a.counts[i, 1]} reference words in A and "
                f"{b.counts[j, 1]} in B (chars {a.counts[i, 3]} vs {b.counts[j, 3]}); "
                "both must count the same reference"
            )
    return order


def paired_bootstrap(
    a: UtteranceCounts, b: UtteranceCounts, settings: BootstrapSettings, rows: Optional[np.ndarray] = None,
    group: str = POOLED, order: Optional[np.ndarray] = None,
) -> dict[str, Comparison]:
    """``{"wer": Comparison, "cer": Comparison}`` of B against A over A's ``rows`` (default: all scored)."""
    order = check_same_utterances(a, b) if order is None else order
    rows = np.flatnonzero(a.scored) if rows is None else rows
    ca, cb = a.counts[rows], b.counts[order[rows]]
    # columns: eA_w, eB_w, n_w, eA_c, eB_c, n_c
    per_utt = np.stack([ca[:, 0], cb[:, 0], ca[:, 1], ca[:, 2], cb[:, 2], ca[:, 3]], axis=1)
    values = _by_unit(per_utt, _unit_labels(a, rows, settings.unit))
    totals = resample_totals(values, settings.resamples, settings.seed)
    point = values.sum(axis=0)
    out = {}
    for metric, (ea, eb, n) in (("wer", (0, 1, 2)), ("cer", (3, 4, 5))):
        delta = _percent(totals[:, eb] - totals[:, ea], totals[:, n])
        low, high = _quantiles(delta, settings.confidence)
        p = min(1.0, 2.0 * min(float(np.mean(delta <= 0)), float(np.mean(delta >= 0))))
        wa, wb = float(_percent(point[ea], point[n])), float(_percent(point[eb], point[n]))
        out[metric] = Comparison(metric, group, wa, wb, wb - wa, low, high, p, len(values), settings.resamples,
                                 settings.confidence)
    return out


def compare_counts(a: UtteranceCounts, b: UtteranceCounts, settings: BootstrapSettings) -> list[Comparison]:
    """B against A, WER then CER, pooled first and then per client group; refuses different utterance sets."""
    order = check_same_utterances(a, b)
    if not a.scored.any():
        raise DecodeError(f"{a.source}: no scored utterance (every reference is empty); nothing to compare")
    by_metric: dict[str, list[Comparison]] = {"wer": [], "cer": []}
    for group, rows in group_rows(a).items():
        for metric, comparison in paired_bootstrap(a, b, settings, rows, group, order).items():
            by_metric[metric].append(comparison)
    return by_metric["wer"] + by_metric["cer"]


def compare_files(path_a: str | Path, path_b: str | Path, settings: BootstrapSettings,
                  normalizer: str = "english") -> list[Comparison]:
    return compare_counts(read_predictions(path_a, normalizer), read_predictions(path_b, normalizer), settings)


# --------------------------------------------------------------------------- presentation


def format_p(p: float, resamples: int) -> str:
    """The p-value, or ``<2/resamples`` when no resample reached zero (the test cannot resolve smaller)."""
    floor = 2.0 / resamples
    if p < floor:
        return f"<{floor:.2g}"
    return f"{p:.3f}"


def format_interval(low: Optional[float], high: Optional[float], digits: int = 2) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def describe(c: Comparison, digits: int = 2) -> str:
    """``better: -34.05 [-37.87, -30.32], p <0.002`` (B relative to A)."""
    return (f"{c.verdict}: {c.delta:+.{digits}f} {format_interval(c.low, c.high, digits)}, "
            f"p {format_p(c.p_value, c.resamples)}")


def comparison_table(comparisons: Iterable[Comparison], markdown: bool = False) -> str:
    comparisons = list(comparisons)
    level = f"{comparisons[0].confidence:.0%}" if comparisons else "95%"
    header = ["metric", "group", "A", "B", "B - A", f"{level} CI", "p", "units", "verdict (B vs A)"]
    rows = [[c.metric.upper(), c.group, f"{c.a:.2f}", f"{c.b:.2f}", f"{c.delta:+.2f}",
             format_interval(c.low, c.high), format_p(c.p_value, c.resamples), str(c.units), c.verdict]
            for c in comparisons]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6 + ["---"]) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    right = {2, 3, 4, 5, 6, 7}
    fmt = lambda cells: "  ".join(c.rjust(w) if k in right else c.ljust(w)  # noqa: E731
                                  for k, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])
