"""The four-way comparison of the federated pipeline: local-only clients, one-shot merge, federated rounds and the
centralised upper bound, per client group and pooled, with bootstrap intervals, paired verdicts and the gap to
centralised.

- **local-only**: each site keeps its own model, so group ``g`` is scored with client ``g``'s model
  (``metrics/eval/<g>.json``); pooled, every test utterance is scored by its own group's client model (built here
  from the clients' predictions CSVs, so it has an interval and can be paired like the others).
- **one-shot merge**: ``metrics/eval/aggregated.json`` (the root pipeline's aggregate).
- **federated rounds** and **centralised**: ``metrics/federated/eval/{federated,centralised}.json``.

Intervals are the evaluate stages' ``wer_ci_low/high[_<group>]``; verdicts are the paired bootstrap of
``decode/significance.py`` on the predictions CSVs (the same test utterances for every model).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from fedwhisper.atomic import write_text_atomic
from fedwhisper.decode.significance import (
    POOLED, BootstrapSettings, UtteranceCounts, check_same_utterances, describe, group_rows, rate_intervals,
)
from fedwhisper.errors import DecodeError, FedWhisperError
from fedwhisper.report import ModelScores, attach_predictions, compare_models, scoring_phrase

LOCAL, ONE_SHOT, FEDERATED, CENTRALISED = "local-only", "aggregated", "federated", "centralised"
LABELS = {LOCAL: "local-only", ONE_SHOT: "one-shot merge", FEDERATED: "federated rounds", CENTRALISED: "centralised"}
# (A, B): B's WER minus A's, so "better" means B is better than A.
PAIRS = [(ONE_SHOT, FEDERATED), (CENTRALISED, FEDERATED), (LOCAL, FEDERATED), (CENTRALISED, ONE_SHOT),
         (CENTRALISED, LOCAL)]


def _read_metrics(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise FedWhisperError(f"{path} not found; run `dvc repro {stage}` (or `make federated`) first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedWhisperError(f"{path}: not valid JSON ({exc}); re-run `dvc repro {stage}`") from None


def local_only_counts(clients: dict[str, UtteranceCounts]) -> UtteranceCounts:
    """One predictions set in which each utterance of group ``g`` carries the counts of client ``g``'s model (rows
    of groups without a client model are not scored). Every client must have decoded the same utterances."""
    names = list(clients)
    template = clients[names[0]]
    counts = np.zeros_like(template.counts)
    scored = np.zeros_like(template.scored)
    groups = np.array(template.groups, dtype=object)
    for name, own in clients.items():
        order = check_same_utterances(template, own)  # raises DecodeError naming the differing ids
        rows = np.flatnonzero(groups == name)
        counts[rows] = own.counts[order[rows]]
        scored[rows] = own.scored[order[rows]]
    return dataclasses.replace(template, source=f"local-only ({', '.join(names)})", counts=counts, scored=scored)


def load_four_models(metrics_dir: Path, clients: list[str], settings: BootstrapSettings,
                     federated_dir: Optional[Path] = None) -> tuple[dict[str, ModelScores], list[str]]:
    """``{LOCAL, ONE_SHOT, FEDERATED, CENTRALISED: ModelScores}`` and the client groups found in the metrics."""
    eval_dir, fed_eval = metrics_dir / "eval", (federated_dir or metrics_dir / "federated") / "eval"
    raw = {c: ModelScores(c, "client", _read_metrics(eval_dir / f"{c}.json", f"evaluate_client@{c}"))
           for c in clients}
    agg_metrics = _read_metrics(eval_dir / "aggregated.json", "evaluate@aggregated")
    agg_dir, agg_name = eval_dir, "aggregated"
    if agg_metrics.get("same_model_as"):  # one client: the aggregate is that client's model
        agg_name = str(agg_metrics["same_model_as"])
        agg_metrics = _read_metrics(eval_dir / f"{agg_name}.json", f"evaluate_client@{agg_name}")
    groups = [c for c in clients if any(s.get(f"wer_{c}") is not None for s in raw.values())]
    client_scores = {s.name: s for s in attach_predictions(list(raw.values()), eval_dir, groups, settings)}
    (one_shot,) = attach_predictions([ModelScores(agg_name, "aggregated", agg_metrics)], agg_dir, groups, settings)
    fed_models = attach_predictions(
        [ModelScores(n, n, _read_metrics(fed_eval / f"{n}.json", f"pipelines/federated/dvc.yaml:evaluate@{n}"))
         for n in (FEDERATED, CENTRALISED)], fed_eval, groups, settings)
    models = {ONE_SHOT: dataclasses.replace(one_shot, name=ONE_SHOT), FEDERATED: fed_models[0],
              CENTRALISED: fed_models[1]}
    models[LOCAL] = local_only_scores(client_scores, groups, settings)
    return {k: models[k] for k in LABELS}, groups


def local_only_scores(client_scores: dict[str, ModelScores], groups: list[str],
                      settings: BootstrapSettings) -> ModelScores:
    """Per group ``g``: client ``g``'s own WER and interval on ``g``; pooled: each group scored by its own client."""
    metrics: dict = {}
    intervals: dict = {}
    for g in groups:
        own = client_scores[g]
        metrics[f"wer_{g}"] = own.get(f"wer_{g}")
        if g in own.intervals:
            intervals[g] = own.intervals[g]
    problems = [f"{s.name}: {s.problem}" for s in client_scores.values() if s.predictions is None]
    counts = None
    if not problems:
        try:
            counts = local_only_counts({g: client_scores[g].predictions for g in groups})
        except DecodeError as exc:
            problems.append(str(exc))
    if counts is not None:
        pooled = rate_intervals(counts, settings, group_rows(counts)[POOLED])["wer"]
        metrics["wer"] = pooled.estimate
        intervals[POOLED] = (pooled.low, pooled.high)
    first = next(iter(client_scores.values()))
    for key in ("normalizer", "language", "task", "ci_confidence"):
        if key in first.metrics:
            metrics[key] = first.metrics[key]
    return ModelScores(LOCAL, "local", metrics, counts, "; ".join(problems), intervals)


def _cell(score: ModelScores, group: str) -> str:
    value = score.get(score.wer_key(group))
    if value is None:
        return "n/a"
    if group in score.intervals and None not in score.intervals[group]:
        low, high = score.intervals[group]
        return f"{value:.1f} [{low:.1f}, {high:.1f}]"
    return f"{value:.1f}"


def _gap(score: ModelScores, centralised: ModelScores, group: str) -> Optional[float]:
    a, b = score.get(score.wer_key(group)), centralised.get(centralised.wer_key(group))
    return None if a is None or b is None else a - b


def _steps_lines(federated_json: dict, centralised_json: dict) -> list[str]:
    params = federated_json.get("params", {})
    per_round = federated_json.get("clients_per_round") or []
    local = params.get("local_steps")
    lines = []
    if isinstance(local, int):
        fed_steps = sum(len(c) for c in per_round) * local
        lines.append(f"Federated rounds: {federated_json.get('rounds_done')} round(s) x {local} local steps per "
                     f"picked client ({fed_steps} client optimizer steps in all), strategy "
                     f"`{params.get('strategy')}`, server optimiser `{params.get('server_optimizer')}` "
                     f"(server_lr {params.get('server_lr')}), proximal_mu {params.get('proximal_mu')}, "
                     f"fraction_fit {params.get('fraction_fit')}.")
    steps = centralised_json.get("one_shot_steps_per_client") or {}
    if steps:
        shown = ", ".join(f"{c} {n}" for c, n in steps.items())
        lines.append(f"One-shot merge: each client fine-tuned once from the base ({shown}: "
                     f"{sum(steps.values())} steps in all). Centralised: one model on the pooled train splits, "
                     f"{centralised_json.get('global_step')} steps (the one-shot steps summed), same `finetune` "
                     "params.")
    return lines


def build_four_way_report(metrics_dir: Path, clients: list[str], settings: Optional[BootstrapSettings] = None,
                          federated_dir: Optional[Path] = None) -> str:
    """Write ``<federated_dir>/report.md`` and ``comparison.json`` (default ``metrics/federated``); return the
    markdown."""
    settings = settings or BootstrapSettings()
    federated_dir = federated_dir or metrics_dir / "federated"
    models, groups = load_four_models(metrics_dir, clients, settings, federated_dir)
    fed_json = _read_metrics(federated_dir / "metrics.json", "pipelines/federated/dvc.yaml:federate")
    cen_json = _read_metrics(federated_dir / "centralise.json", "pipelines/federated/dvc.yaml:centralise")
    cols = [POOLED] + groups
    level = f"{settings.confidence:.0%}"
    central = models[CENTRALISED]

    table = ["| model | " + " | ".join(f"WER {g}" for g in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, score in models.items():
        table.append(f"| {LABELS[key]} | " + " | ".join(_cell(score, g) for g in cols) + " |")
    gaps = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    flat: dict = {}
    for key, score in models.items():
        for g in cols:
            value = score.get(score.wer_key(g))
            if value is not None:
                flat[f"{key}/wer" + ("" if g == POOLED else f"_{g}")] = round(value, 4)
        if key == CENTRALISED:
            continue
        cells = []
        for g in cols:
            gap = _gap(score, central, g)
            cells.append("n/a" if gap is None else f"{gap:+.1f}")
            if gap is not None:
                flat[f"{key}/gap_to_centralised" + ("" if g == POOLED else f"_{g}")] = round(gap, 4)
        gaps.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")

    verdicts = ["| B vs A | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    notes = []
    for a, b in PAIRS:
        result = compare_models(models[a], models[b], groups, settings)
        label = f"{LABELS[b]} vs {LABELS[a]}"
        if isinstance(result, str):
            verdicts.append(f"| {label} | " + " | ".join([f"n/a ({result})"] + ["n/a"] * len(groups)) + " |")
            continue
        verdicts.append(f"| {label} | " + " | ".join(describe(result[g]) if g in result else "n/a"
                                                      for g in cols) + " |")
        if POOLED in result:
            flat[f"{b}_vs_{a}/delta"] = round(result[POOLED].delta, 4)
            flat[f"{b}_vs_{a}/p_value"] = round(result[POOLED].p_value, 6)
    for key, score in models.items():
        if score.problem:
            notes.append(f"- {LABELS[key]}: no paired comparison ({score.problem}).")

    findings = []
    fed, one, local = models[FEDERATED].get("wer"), models[ONE_SHOT].get("wer"), models[LOCAL].get("wer")
    cen = central.get("wer")
    if cen is not None:
        shown = [f"{LABELS[k]} {gap:+.1f}" for k in (LOCAL, ONE_SHOT, FEDERATED)
                 if (gap := _gap(models[k], central, POOLED)) is not None]
        findings.append(f"Gap to centralised ({cen:.1f}% pooled WER), in WER points: " + ", ".join(shown) + ".")
    if fed is not None and one is not None and cen is not None and one - cen > 0:
        closed = (one - fed) / (one - cen)
        findings.append(f"Federated rounds close {closed:.0%} of the one-shot merge's gap to centralised "
                        f"({one:.1f}% -> {fed:.1f}%, centralised {cen:.1f}%).")
    vs_one = compare_models(models[ONE_SHOT], models[FEDERATED], [], settings)
    if fed is not None and one is not None:
        if isinstance(vs_one, dict) and POOLED in vs_one:
            verdict = vs_one[POOLED].verdict
            head = {"better": "beat", "worse": "do worse than"}.get(verdict, "are not distinguishable from")
            findings.append(f"Federated rounds {head} the one-shot merge pooled at {level} "
                            f"({describe(vs_one[POOLED])}).")
        else:
            findings.append(f"Federated rounds {fed:.1f}% vs one-shot merge {one:.1f}% pooled (no paired test: "
                            f"{vs_one}).")

    parts = [
        "# Federated rounds against the baselines", "",
        f"Test-set WER (%) after {scoring_phrase(list(models.values()))}, corpus-level, with {level} bootstrap "
        f"intervals (resampling test {settings.unit}s). Local-only: each group scored by its own client's model "
        "(pooled: every utterance by its own group's model).", "",
        *table, "",
        *[f"- {line}" for line in findings + _steps_lines(fed_json, cen_json)], "",
        "## Gap to centralised (WER points, model minus centralised; negative = below the upper bound)", "",
        *gaps, "",
        f"## Paired bootstrap at {level}", "",
        f"B's WER minus A's (points), its {level} interval and two-sided p ({settings.resamples} resamples of "
        f"{settings.unit}s, seed {settings.seed}); better/worse only when the interval excludes 0.", "",
        *verdicts,
    ]
    if notes:
        parts += ["", *notes]
    markdown = "\n".join(parts) + "\n"
    write_text_atomic(federated_dir / "comparison.json", json.dumps(flat, indent=2, sort_keys=True) + "\n")
    write_text_atomic(federated_dir / "report.md", markdown)
    return markdown
