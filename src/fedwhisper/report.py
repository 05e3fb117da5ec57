"""The run report: base vs each client vs the aggregate, pooled and per client group.

Reads the evaluate stages' flat metrics (`metrics/eval/<model>.json`: `wer`, `cer`, `bleu`, `wer_<group>`,
`wer_ci_low`, ...) and their predictions (`metrics/eval/<model>_predictions.csv`), and writes `metrics/report.md`,
`metrics/report.png` and `metrics/wer_by_group.csv` (the DVC plot source). Every model is marked against the base
and against the aggregate as better / worse / not distinguishable, by the paired bootstrap on the predictions.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.decode.significance import (
    POOLED, BootstrapSettings, Comparison, UtteranceCounts, describe, format_p, group_rows, paired_bootstrap,
    rate_intervals, read_predictions, check_same_utterances,
)
from fedwhisper.errors import DecodeError, FedWhisperError

VERDICT_SHORT = {"better": "better", "worse": "worse", "not distinguishable": "n.d."}


@dataclass(frozen=True)
class ModelScores:
    name: str
    role: str  # base | client | aggregated
    metrics: dict
    predictions: Optional[UtteranceCounts] = None
    problem: str = ""  # why there are no predictions to compare
    intervals: dict = field(default_factory=dict)  # "pooled" / group -> (low, high) WER interval

    def get(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def wer_key(self, group: str) -> str:
        return "wer" if group == POOLED else f"wer_{group}"


def load_scores(eval_dir: Path, clients: list[str]) -> list[ModelScores]:
    """Scores in report order: base, the clients as listed, aggregated. Missing models are skipped, and so is a
    model recorded as ``same_model_as`` another (one client: the "aggregate" is that client's model)."""
    order = [("base", "base")] + [(c, "client") for c in clients] + [("aggregated", "aggregated")]
    scores = []
    for name, role in order:
        path = eval_dir / f"{name}.json"
        if not path.exists():
            continue
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FedWhisperError(f"{path}: not valid JSON ({exc}); re-run its evaluate stage") from None
        if metrics.get("same_model_as"):
            continue
        scores.append(ModelScores(name, role, metrics))
    if not scores:
        raise FedWhisperError(f"{eval_dir}: no evaluation metrics found; run the evaluate stages first")
    return scores


def attach_predictions(scores: list[ModelScores], eval_dir: Path, groups: list[str],
                       settings: BootstrapSettings) -> list[ModelScores]:
    """Each model with its predictions and WER intervals: the metrics' ``wer_ci_low[_<group>]`` keys, or, for
    metrics written before they existed, the same bootstrap redone on the predictions."""
    out = []
    for s in scores:
        path = eval_dir / f"{s.name}_predictions.csv"
        counts, problem = None, ""
        if path.exists():
            try:
                counts = read_predictions(path, str(s.metrics.get("normalizer") or "english"))
            except DecodeError as exc:
                problem = str(exc)
        else:
            problem = f"{path} not found"
        intervals = {}
        for g in [POOLED] + groups:
            suffix = "" if g == POOLED else f"_{g}"
            low, high = s.get(f"wer_ci_low{suffix}"), s.get(f"wer_ci_high{suffix}")
            if (low is None or high is None) and counts is not None:
                rows = group_rows(counts).get(g)
                if rows is not None and len(rows):
                    wer = rate_intervals(counts, settings, rows)["wer"]
                    low, high = wer.low, wer.high
            if low is not None and high is not None:
                intervals[g] = (low, high)
        out.append(ModelScores(s.name, s.role, s.metrics, counts, problem, intervals))
    return out


def compare_models(a: ModelScores, b: ModelScores, groups: list[str],
                   settings: BootstrapSettings) -> dict[str, Comparison] | str:
    """WER of ``b`` against ``a`` (``b - a``), pooled and per group; a reason string when they cannot be compared."""
    if a.predictions is None or b.predictions is None:
        return "no predictions"
    try:
        order = check_same_utterances(a.predictions, b.predictions)
    except DecodeError:
        return "different test utterances"
    rows = group_rows(a.predictions)
    return {g: paired_bootstrap(a.predictions, b.predictions, settings, rows[g], g, order)["wer"]
            for g in [POOLED] + groups if g in rows and len(rows[g])}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_interval(score: ModelScores, group: str) -> str:
    value = _fmt(score.get(score.wer_key(group)))
    if group in score.intervals:
        low, high = score.intervals[group]
        value += f" [{low:.1f}, {high:.1f}]"
    return value


def _label(score: ModelScores) -> str:
    return {"base": "base", "aggregated": "**aggregated**"}.get(score.role, f"client `{score.name}`")


def wer_table(scores: list[ModelScores], groups: list[str], settings: Optional[BootstrapSettings] = None) -> str:
    level = _level(scores, settings)
    header = ["model", f"WER (pooled) [{level} CI]"] + [f"WER {g}" for g in groups] + ["CER", "BLEU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for s in scores:
        row = [_label(s), _with_interval(s, POOLED)] + [_fmt(s.get(f"wer_{g}")) for g in groups]
        row += [_fmt(s.get("cer")), _fmt(s.get("bleu"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _level(scores: list[ModelScores], settings: Optional[BootstrapSettings] = None) -> str:
    """The intervals' confidence: the metrics' ``ci_confidence``, else that of the bootstrap redone here."""
    confidence = next((s.get("ci_confidence") for s in scores if s.get("ci_confidence")), None)
    return f"{confidence or (settings or BootstrapSettings()).confidence:.0%}"


def _relation(c: Comparison, other: str) -> str:
    """``better than the base at 95% (-34.05 [-45.89, -25.63], p <0.002)``."""
    head = {"better": f"better than {other}", "worse": f"worse than {other}"}.get(
        c.verdict, f"not distinguishable from {other}")
    return f"{head} at {c.confidence:.0%} ({c.delta:+.2f} points [{c.low:.2f}, {c.high:.2f}], " \
           f"p {format_p(c.p_value, c.resamples)})"


def findings(scores: list[ModelScores], groups: list[str],
             settings: Optional[BootstrapSettings] = None) -> list[str]:
    """Plain statements computed from the numbers (nothing is claimed that the tables do not show)."""
    settings = settings or BootstrapSettings()
    by_role = {s.role: s for s in scores if s.role != "client"}
    clients = [s for s in scores if s.role == "client"]
    base, agg = by_role.get("base"), by_role.get("aggregated")
    out = []
    vs_base = compare_models(base, agg, groups, settings) if base and agg else None
    if base and agg and base.get("wer") and agg.get("wer") is not None:
        ratio = agg.get("wer") / base.get("wer")
        line = (f"Pooled WER: base {_fmt(base.get('wer'))}% -> aggregated {_fmt(agg.get('wer'))}% "
                f"({ratio:.2f}x the base)")
        out.append(line + (f"; the aggregate is {_relation(vs_base[POOLED], 'the base')}." if isinstance(
            vs_base, dict) and POOLED in vs_base else "."))
    if agg and clients:
        best = min(clients, key=lambda s: s.get("wer") if s.get("wer") is not None else float("inf"))
        vs_best = compare_models(best, agg, groups, settings)
        if isinstance(vs_best, dict) and POOLED in vs_best:
            relation = f"({_fmt(agg.get('wer'))}%) is {_relation(vs_best[POOLED], 'it')}"
        else:
            relation = "is " + ("at or below" if agg.get("wer") <= best.get("wer") else "above") + " it"
        out.append(f"Best single client pooled: `{best.name}` {_fmt(best.get('wer'))}%; the aggregate {relation}.")
    if base and not agg and len(clients) == 1:
        out += _single_model_findings(base, clients[0], settings)
    if base and agg:
        better = [g for g in groups if (agg.get(f"wer_{g}") or 0) < (base.get(f"wer_{g}") or 0)]
        line = f"The aggregate beats the base on {len(better)} of {len(groups)} client groups"
        if isinstance(vs_base, dict):
            sig = [g for g in groups if g in vs_base and vs_base[g].verdict == "better"]
            line += f"; significantly (paired bootstrap, {settings.confidence:.0%}) on {len(sig)} of them"
        out.append(line + ".")
    return out


def _single_model_findings(base: ModelScores, model: ModelScores, settings: BootstrapSettings) -> list[str]:
    """One fine-tuned model against the base, pooled (its WER, BLEU and the paired verdict)."""
    out = []
    vs_base = compare_models(base, model, [], settings)
    if base.get("wer") is not None and model.get("wer") is not None:
        line = f"Pooled WER: base {_fmt(base.get('wer'))}% -> fine-tuned `{model.name}` {_fmt(model.get('wer'))}%"
        if base.get("wer"):
            line += f" ({model.get('wer') / base.get('wer'):.2f}x the base)"
        if isinstance(vs_base, dict) and POOLED in vs_base:
            line += f"; the fine-tuned model is {_relation(vs_base[POOLED], 'the base')}"
        out.append(line + ".")
    if base.get("bleu") is not None and model.get("bleu") is not None:
        out.append(f"BLEU: base {_fmt(base.get('bleu'))} -> fine-tuned `{model.name}` {_fmt(model.get('bleu'))}.")
    return out


def verdict_tables(scores: list[ModelScores], groups: list[str], settings: BootstrapSettings) -> list[str]:
    """Every model against the base and against the aggregate, pooled (difference, interval, p) and per group."""
    refs = [s for s in scores if s.role in ("base", "aggregated")]
    if not refs:
        return []
    level = f"{settings.confidence:.0%}"
    names = {"base": "the base", "aggregated": "the aggregate"}
    results = {(s.name, r.name): compare_models(r, s, groups, settings) for s in scores for r in refs if s is not r}
    pooled = ["| model | " + " | ".join(f"vs {names[r.role]}" for r in refs) + " |",
              "|---|" + "---|" * len(refs)]
    for s in scores:
        cells = []
        for r in refs:
            res = results.get((s.name, r.name))
            if res is None:
                cells.append("-")
            elif isinstance(res, str):
                cells.append(f"n/a ({res})")
            else:
                cells.append(describe(res[POOLED]) if POOLED in res else "n/a")
        pooled.append(f"| {_label(s)} | " + " | ".join(cells) + " |")
    per_group = ["| model | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)] if groups else []
    for s in scores if groups else []:
        cells = []
        for g in groups:
            parts = []
            for r in refs:
                res = results.get((s.name, r.name))
                parts.append("-" if res is None else "n/a" if isinstance(res, str) or g not in res
                             else VERDICT_SHORT[res[g].verdict])
            cells.append(" / ".join(parts))
        per_group.append(f"| {_label(s)} | " + " | ".join(cells) + " |")
    against = " and ".join(names[r.role] for r in refs)
    out = [
        f"## Better, worse or not distinguishable at {level}",
        "",
        f"Each model against {against}: the paired bootstrap (Bisani & Ney 2004) on the same test utterances, "
        f"{settings.resamples} resamples of {settings.unit}s, seed {settings.seed}. Cells give the verdict for the "
        f"row's model, its WER minus the other's (points), the {level} interval of that difference, and the "
        "two-sided p-value. A model is better or worse only when the interval excludes 0.",
        "",
        *pooled,
    ]
    if per_group:
        out += ["", f"Per client group (verdict vs {' / vs '.join(names[r.role] for r in refs)}; n.d. = not "
                f"distinguishable at {level}):", "", *per_group]
    notes = [f"- `{s.name}`: no paired comparison ({s.problem})." for s in scores if s.problem]
    return out + ([""] + notes if notes else [])


def write_plot_csv(scores: list[ModelScores], groups: list[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "model", "group", "wer", "wer_ci_low", "wer_ci_high"])
    for s in scores:
        for g in [POOLED] + groups:
            value = s.get(s.wer_key(g))
            if value is not None:
                low, high = (f"{v:.4f}" for v in s.intervals[g]) if g in s.intervals else ("", "")
                writer.writerow([f"{s.name} | {g}", s.name, g, f"{value:.4f}", low, high])
    write_text_atomic(path, buf.getvalue())


def write_chart(scores: list[ModelScores], groups: list[str], path: Path,
                settings: Optional[BootstrapSettings] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [POOLED] + groups
    width = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(cols)), 4.2))
    for i, s in enumerate(scores):
        values = np.array([s.get(s.wer_key(c)) or 0.0 for c in cols])
        low = np.array([s.intervals[c][0] if c in s.intervals else v for c, v in zip(cols, values)])
        high = np.array([s.intervals[c][1] if c in s.intervals else v for c, v in zip(cols, values)])
        errors = np.stack([np.maximum(values - low, 0), np.maximum(high - values, 0)])
        ax.bar(np.arange(len(cols)) + i * width - 0.4 + width / 2, values, width, label=s.name,
               yerr=errors, capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "0.2"})
    ax.set_xticks(np.arange(len(cols)), cols)
    ax.set_ylabel("WER (%)")
    compared = ("base vs clients vs aggregate" if any(s.role == "aggregated" for s in scores)
                else "base vs fine-tuned")
    ax.set_title(f"Test WER by client group, {_level(scores, settings)} bootstrap intervals: {compared}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def _aggregation_line(aggregate_json: Path) -> str:
    if not aggregate_json.exists():
        return ""
    data = json.loads(aggregate_json.read_text(encoding="utf-8"))
    if data.get("single_client"):
        return (f"One client, one model: nothing was merged; `models/aggregated` is the model of "
                f"`{data['single_client']}` (hard links) and is not evaluated again.")
    strategy = data.get("strategy", "?")
    weights = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("weight/")}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in weights.items())
    return f"Aggregation: `{strategy}`" + (f" with weights {shown}." if shown else ".")


NORMALISER_NAMES = {
    "english": "Whisper's English normaliser",
    "basic": "Whisper's basic (multilingual) normaliser",
    "none": "no normaliser (text as decoded)",
}


def _distinct(scores: list[ModelScores], key: str) -> list[str]:
    return list(dict.fromkeys(str(s.metrics[key]) for s in scores if s.metrics.get(key) is not None))


def scoring_phrase(scores: list[ModelScores]) -> str:
    """``Whisper's English normaliser; decoded with language `en`, task `transcribe```, from the metrics (each
    model's where they differ; the language is left out for metrics written before it was recorded)."""
    normalisers = _distinct(scores, "normalizer") or ["english"]
    phrase = " / ".join(NORMALISER_NAMES.get(n, f"the `{n}` normaliser") for n in normalisers)
    settings = list(dict.fromkeys((s.metrics.get("language"), s.metrics.get("task")) for s in scores
                                  if "task" in s.metrics))
    if len(settings) == 1:
        language, task = settings[0]
        shown = f"`{language}`" if language else "detected per clip"
        phrase += f"; decoded with language {shown}, task `{task}`"
    elif settings:
        per_model = ", ".join(f"{s.name} `{s.metrics.get('language') or 'auto'}`/`{s.metrics.get('task')}`"
                              for s in scores if "task" in s.metrics)
        phrase += f"; decoded with language/task {per_model}"
    return phrase


def build_report(metrics_dir: Path, clients: list[str], settings: Optional[BootstrapSettings] = None) -> str:
    """Write report.md, report.png and wer_by_group.csv under ``metrics_dir``; return the markdown."""
    settings = settings or BootstrapSettings()
    scores = load_scores(metrics_dir / "eval", clients)
    single = len(clients) == 1
    # One client: its only group is the whole test set, so the per-group columns would repeat the pooled one.
    groups = [] if single else [c for c in clients if any(s.get(f"wer_{c}") is not None for s in scores)]
    scores = attach_predictions(scores, metrics_dir / "eval", groups, settings)
    title = "# fedwhisper single-model run report" if single else "# fedwhisper run report"
    parts = [title, "",
             f"Test-set WER (%) after {scoring_phrase(scores)}, corpus-level; pooled with its "
             f"{_level(scores, settings)} "
             f"bootstrap confidence interval (resampling test {settings.unit}s).", ""]
    parts += [wer_table(scores, groups, settings), ""]
    parts += [f"- {line}" for line in findings(scores, groups, settings)]
    verdicts = verdict_tables(scores, groups, settings)
    if verdicts:
        parts += ["", *verdicts]
    agg_line = _aggregation_line(metrics_dir / "aggregate.json")
    if agg_line:
        parts += ["", agg_line]
    parts += ["", "![WER by client group](report.png)", ""]
    markdown = "\n".join(parts)
    write_plot_csv(scores, groups, metrics_dir / "wer_by_group.csv")
    write_chart(scores, groups, metrics_dir / "report.png", settings)
    write_text_atomic(metrics_dir / "report.md", markdown)
    return markdown
