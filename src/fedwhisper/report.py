"""The run report: base vs each client vs the aggregate, pooled and per client group.

Reads the evaluate stages' flat metrics (`metrics/eval/<model>.json`: `wer`, `cer`, `bleu`, `wer_<group>`, ...) and
writes `metrics/report.md`, `metrics/report.png` and `metrics/wer_by_group.csv` (the DVC plot source).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.errors import FedWhisperError


@dataclass(frozen=True)
class ModelScores:
    name: str
    role: str  # base | client | aggregated
    metrics: dict

    def get(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else None


def load_scores(eval_dir: Path, clients: list[str]) -> list[ModelScores]:
    """Scores in report order: base, the clients as listed, aggregated. Missing models are skipped."""
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
        scores.append(ModelScores(name, role, metrics))
    if not scores:
        raise FedWhisperError(f"{eval_dir}: no evaluation metrics found; run the evaluate stages first")
    return scores


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _label(score: ModelScores) -> str:
    return {"base": "base", "aggregated": "**aggregated**"}.get(score.role, f"client `{score.name}`")


def wer_table(scores: list[ModelScores], groups: list[str]) -> str:
    header = ["model", "WER (pooled)"] + [f"WER {g}" for g in groups] + ["CER", "BLEU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for s in scores:
        row = [_label(s), _fmt(s.get("wer"))] + [_fmt(s.get(f"wer_{g}")) for g in groups]
        row += [_fmt(s.get("cer")), _fmt(s.get("bleu"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def findings(scores: list[ModelScores], groups: list[str]) -> list[str]:
    """Plain statements computed from the numbers (nothing is claimed that the table does not show)."""
    by_role = {s.role: s for s in scores if s.role != "client"}
    clients = [s for s in scores if s.role == "client"]
    base, agg = by_role.get("base"), by_role.get("aggregated")
    out = []
    if base and agg and base.get("wer") and agg.get("wer") is not None:
        ratio = agg.get("wer") / base.get("wer")
        out.append(
            f"Pooled WER: base {_fmt(base.get('wer'))}% -> aggregated {_fmt(agg.get('wer'))}% "
            f"({ratio:.2f}x the base)."
        )
    if agg and clients:
        best = min(clients, key=lambda s: s.get("wer") if s.get("wer") is not None else float("inf"))
        relation = "at or below" if agg.get("wer") <= best.get("wer") else "above"
        out.append(
            f"Best single client pooled: `{best.name}` {_fmt(best.get('wer'))}%; the aggregate is {relation} it."
        )
    if base and agg:
        better = [g for g in groups if (agg.get(f"wer_{g}") or 0) < (base.get(f"wer_{g}") or 0)]
        out.append(f"The aggregate beats the base on {len(better)} of {len(groups)} client groups.")
    return out


def write_plot_csv(scores: list[ModelScores], groups: list[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "model", "group", "wer"])
    for s in scores:
        for g in ["pooled"] + groups:
            value = s.get("wer" if g == "pooled" else f"wer_{g}")
            if value is not None:
                writer.writerow([f"{s.name} | {g}", s.name, g, f"{value:.4f}"])
    write_text_atomic(path, buf.getvalue())


def write_chart(scores: list[ModelScores], groups: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = ["pooled"] + groups
    width = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(cols)), 4.2))
    for i, s in enumerate(scores):
        values = [s.get("wer" if c == "pooled" else f"wer_{c}") or 0.0 for c in cols]
        ax.bar(np.arange(len(cols)) + i * width - 0.4 + width / 2, values, width, label=s.name)
    ax.set_xticks(np.arange(len(cols)), cols)
    ax.set_ylabel("WER (%)")
    ax.set_title("Test WER by client group: base vs clients vs aggregate")
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
    strategy = data.get("strategy", "?")
    weights = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("weight/")}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in weights.items())
    return f"Aggregation: `{strategy}`" + (f" with weights {shown}." if shown else ".")


def build_report(metrics_dir: Path, clients: list[str]) -> str:
    """Write report.md, report.png and wer_by_group.csv under ``metrics_dir``; return the markdown."""
    scores = load_scores(metrics_dir / "eval", clients)
    groups = [c for c in clients if any(s.get(f"wer_{c}") is not None for s in scores)]
    parts = ["# fedwhisper run report", "", "Test-set WER (%) after Whisper's English normaliser, corpus-level.", ""]
    parts += [wer_table(scores, groups), ""]
    parts += [f"- {line}" for line in findings(scores, groups)]
    agg_line = _aggregation_line(metrics_dir / "aggregate.json")
    if agg_line:
        parts += ["", agg_line]
    parts += ["", "![WER by client group](report.png)", ""]
    markdown = "\n".join(parts)
    write_plot_csv(scores, groups, metrics_dir / "wer_by_group.csv")
    write_chart(scores, groups, metrics_dir / "report.png")
    write_text_atomic(metrics_dir / "report.md", markdown)
    return markdown
