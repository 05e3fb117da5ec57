"""Run the seed's ten presets and the other merge strategies as queued DVC experiments, then compare them.

Replaces seed 000's run_aggregation_configs.py. Each experiment re-runs only `aggregate` and `evaluate@aggregated`
(and the report) on top of the committed/cached pipeline. Writes metrics/sweep.md and metrics/sweep.png: every
strategy's WER with its bootstrap confidence interval, and which strategies are not distinguishable from the best
(paired bootstrap on each experiment's metrics/eval/aggregated_predictions.csv, read from its git commit).

    python scripts/sweep.py               # queue, run with one worker, collect
    python scripts/sweep.py --jobs 2      # two workers
    python scripts/sweep.py --collect     # only rebuild the comparison from existing experiments
    python scripts/sweep.py --collect --wait   # wait for queued sweep experiments (after `dvc queue start`), then collect
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedwhisper.decode.significance import (
    BootstrapSettings, UtteranceCounts, describe, format_interval, paired_bootstrap, parse_predictions,
    rate_intervals,
)
from fedwhisper.errors import FedWhisperError
from fedwhisper.merge.presets import PRESETS
from fedwhisper.merge.strategies import REGISTRY



def swept_strategies() -> dict[str, list[str]]:
    """Strategy -> extra `-S` overrides, from the strategy registry (each strategy's ``sweep=``; mean and uniform
    are swept through the presets instead)."""
    return {name: list(spec.sweep) for name, spec in REGISTRY.items() if spec.sweep is not None}


STRATEGIES = swept_strategies()
PREFIX = "sweep-"
PREDICTIONS = "metrics/eval/aggregated_predictions.csv"


def experiments() -> dict[str, list[str]]:
    """Experiment name -> `-S` overrides."""
    runs = {f"{PREFIX}{name}": [f"aggregation.preset={name}"] for name in PRESETS}
    runs.update({f"{PREFIX}{s.replace('_', '-')}": [f"aggregation.strategy={s}", *extra]
                 for s, extra in swept_strategies().items()})
    return runs


def applicable(runs: dict[str, list[str]], n_clients: int) -> tuple[dict[str, list[str]], list[str]]:
    """The experiments that can run with ``n_clients`` clients, and one note per group skipped: the seed's presets
    weight exactly four clients, Krum and Multi-Krum (f = 0, m = 2) need three, and one client has nothing to merge."""
    if n_clients == 1:
        return {}, [f"one client (a single model): nothing to merge; skipped all {len(runs)} experiments"]
    kept, presets, krums = {}, [], []
    for name, overrides in runs.items():
        preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("aggregation.preset=")), None)
        strategy = next((o.split("=", 1)[1] for o in overrides if o.startswith("aggregation.strategy=")), None)
        if preset in PRESETS and len(PRESETS[preset]) != n_clients:
            presets.append(name)
        elif strategy in ("krum", "multi_krum") and n_clients < 3:
            krums.append(name)
        else:
            kept[name] = overrides
    notes = []
    if presets:
        notes.append(f"skipped the {len(presets)} preset experiments: the seed's presets weight 4 clients and "
                     f"clients: lists {n_clients}; set aggregation.weights for your own weighting")
    if krums:
        notes.append(f"skipped {', '.join(n[len(PREFIX):] for n in krums)}: with f = 0 they need at least 3 clients "
                     f"(clients: lists {n_clients})")
    return kept, notes


def client_count(params_path: Path = Path("params.yaml")) -> int | None:
    """``len(clients)`` in the workspace's params file; None without one."""
    from fedwhisper.params import load_params

    return len(load_params(params_path).clients) if params_path.is_file() else None


def settings(name: str) -> str:
    """The overrides of a sweep experiment, for the table (``-`` for none beyond the strategy)."""
    overrides = experiments().get(PREFIX + name, [])
    shown = [o.split(".", 1)[1] for o in overrides if not o.startswith("aggregation.strategy=")]
    return ", ".join(shown) or "-"


def dvc(*args: str, capture: bool = False) -> str:
    result = subprocess.run(["dvc", *args], check=True, text=True, capture_output=capture)
    return result.stdout if capture else ""


def remove_previous(runs: dict[str, list[str]]) -> list[str]:
    """Remove experiments left by an earlier sweep under the same names, so that the new ones can take them.

    (Not `dvc exp run --force`: that also means `dvc repro --force`, which would re-train every client.)
    """
    existing = set(dvc("exp", "list", "--all-commits", "--name-only", capture=True).split())
    stale = sorted(existing & set(runs))
    if stale:
        dvc("exp", "remove", *stale)
    return stale


def queue_all(runs: dict[str, list[str]]) -> None:
    for name, overrides in runs.items():
        sets = [arg for o in overrides for arg in ("-S", o)]
        dvc("exp", "run", "--queue", "-n", name, *sets)


def parse_queue_status(text: str) -> tuple[dict[str, str], int | None]:
    """`dvc queue status` output -> ({experiment name: status}, number of workers, active or idle).

    The table's last column is the status (Queued, Running, Success, Failed) and its second the name; the last
    line reads "Worker status: N active, M idle". Workers is None when that line is missing.
    """
    statuses: dict[str, str] = {}
    workers = None
    for line in text.splitlines():
        words = line.split()
        if line.startswith("Worker status:"):
            numbers = [int(w) for w in line.replace(",", " ").split() if w.isdigit()]
            workers = sum(numbers) if numbers else None
        elif len(words) >= 4 and words[-1] in ("Queued", "Running", "Success", "Failed"):
            statuses[words[1]] = words[-1]
    return statuses, workers


def wait_for_queue(names: list[str], poll_s: float = 5.0, stall_polls: int = 12, status=None) -> None:
    """Wait until none of ``names`` is queued or running, printing progress as it changes.

    Stops with an error when experiments stay queued while no queue worker exists for ``stall_polls`` polls in a
    row (the workers were killed, or never started), instead of waiting forever.
    """
    status = status or (lambda: dvc("queue", "status", capture=True))
    last, stalled = None, 0
    while True:
        statuses, workers = parse_queue_status(status())
        ours = [statuses[n] for n in names if n in statuses]  # unlisted: not in the queue (run and cleared)
        counts = {k: ours.count(k) for k in ("Success", "Failed", "Running", "Queued")}
        summary = (f"sweep: {counts['Success'] + counts['Failed']}/{len(ours)} done ({counts['Failed']} failed), "
                   f"{counts['Running']} running, {counts['Queued']} queued")
        if summary != last:
            print(summary, flush=True)
            last = summary
        if not counts["Running"] and not counts["Queued"]:
            return
        stalled = stalled + 1 if (workers == 0 and not counts["Running"]) else 0
        if stalled >= stall_polls:
            raise SystemExit(
                f"sweep: {counts['Queued']} experiment(s) still queued but no queue worker is running; "
                "start one with `dvc queue start`, then `python scripts/sweep.py --collect --wait` (or see `dvc queue logs`)"
            )
        time.sleep(poll_s)


def _revisions(shown: list) -> dict[str, tuple[dict, object, str]]:
    """name -> (data, error, baseline rev) of the newest revision of every sweep experiment.

    `dvc exp show --json --all-commits` lists each baseline commit with its experiments; an experiment re-run
    (``--only``) on a newer commit replaces the older run of the same name.
    """
    found: dict[str, tuple[dict, object, str]] = {}
    for baseline in shown if isinstance(shown, list) else []:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name, data = rev.get("name"), rev.get("data")
                if not (isinstance(name, str) and name.startswith(PREFIX) and isinstance(data, dict)):
                    continue
                old = found.get(name)
                if old is None or str(data.get("timestamp") or "") > str(old[0].get("timestamp") or ""):
                    found[name] = (data, rev.get("error"), str(baseline.get("rev", "?"))[:7])
    return found


def collect() -> list[dict]:
    found = _revisions(json.loads(dvc("exp", "show", "--json", "--all-commits", capture=True)))
    rows = []
    for name, (data, error, baseline) in sorted(found.items()):
        metrics = (data.get("metrics") or {}).get("metrics/eval/aggregated.json", {}).get("data", {})
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {}).get("aggregation", {})
        if error or not metrics:  # a failed run still lists its baseline's metrics: never show those as its own
            rows.append({"name": name[len(PREFIX):], "status": "failed", "metrics": {}, "params": params,
                         "baseline": baseline})
            continue
        rows.append({"name": name[len(PREFIX):], "status": "ok", "metrics": metrics, "params": params,
                     "baseline": baseline, "rev": str(data.get("rev") or "")})
    return rows


def predictions_at(rev: str) -> UtteranceCounts:
    """The experiment's predictions CSV from its git commit (DVC commits the metrics files of every experiment)."""
    result = subprocess.run(["git", "show", f"{rev}:{PREDICTIONS}"], text=True, capture_output=True)
    if result.returncode != 0:
        raise FedWhisperError(f"git show {rev[:7]}:{PREDICTIONS}: {result.stderr.strip() or 'failed'}")
    return parse_predictions(result.stdout, f"{rev[:7]}:{PREDICTIONS}")


def add_significance(rows: list[dict], bootstrap: BootstrapSettings) -> dict:
    """Give each successful row its WER interval (``ci``) and its paired comparison with the best (``vs_best``:
    a Comparison, or a reason string); return a summary (best name, names not distinguishable from it)."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        m = r["metrics"]
        try:
            r["predictions"] = predictions_at(r["rev"]) if r.get("rev") else None
            r["problem"] = "" if r["predictions"] is not None else "no experiment commit"
        except FedWhisperError as exc:
            r["predictions"], r["problem"] = None, str(exc)
        if isinstance(m.get("wer_ci_low"), (int, float)) and isinstance(m.get("wer_ci_high"), (int, float)):
            r["ci"] = (float(m["wer_ci_low"]), float(m["wer_ci_high"]))
        elif r["predictions"] is not None:
            wer = rate_intervals(r["predictions"], bootstrap)["wer"]
            r["ci"] = (wer.low, wer.high)
    scored = sorted((r for r in ok if r["predictions"] is not None),
                    key=lambda r: (r["metrics"].get("wer", float("inf")), r["name"]))
    if not scored:
        return {"best": None}
    best = scored[0]
    best["vs_best"] = "best"
    for r in scored[1:]:
        try:
            r["vs_best"] = paired_bootstrap(best["predictions"], r["predictions"], bootstrap)["wer"]
        except FedWhisperError as exc:
            r["vs_best"] = f"not comparable ({exc})"
    verdicts = {r["name"]: "not comparable" if isinstance(r["vs_best"], str) else r["vs_best"].verdict
                for r in scored[1:]}
    return {"best": best["name"], **{key: [n for n, v in verdicts.items() if v == verdict] for key, verdict in (
        ("tied", "not distinguishable"), ("worse", "worse"), ("better", "better"), ("apart", "not comparable"))}}


def _vs_best_cell(r: dict) -> str:
    value = r.get("vs_best")
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value if value == "best" else "not comparable"
    return describe(value).replace("not distinguishable", "n.d.")


def write_comparison(rows: list[dict], out_dir: Path, bootstrap: BootstrapSettings | None = None) -> str:
    bootstrap = bootstrap or BootstrapSettings()
    summary = add_significance(rows, bootstrap)
    level = f"{bootstrap.confidence:.0%}"
    groups = sorted({k[4:] for r in rows for k in r["metrics"] if k.startswith("wer_") and not k.startswith("wer_ci_")})
    header = ["experiment", "strategy", "settings", "WER", f"{level} CI", "vs best (B - best, CI, p)",
              *[f"WER {g}" for g in groups], "BLEU"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * 2 + ["---"] + ["---:"] * (len(header) - 6)) + "|"]
    ok = sorted((r for r in rows if r["status"] == "ok"),
                key=lambda r: (r["metrics"].get("wer", float("inf")), r["name"]))
    for r in ok + [r for r in rows if r["status"] != "ok"]:
        m, p = r["metrics"], r["params"]
        cells = [r["name"], str(p.get("strategy", "?")), settings(r["name"])]
        values = [f"{m[k]:.2f}" if isinstance(m.get(k), (int, float)) else r["status"]
                  for k in ["wer", *[f"wer_{g}" for g in groups], "bleu"]]
        ci = format_interval(*r["ci"]) if r.get("ci") else ("n/a" if r["status"] == "ok" else r["status"])
        cells += [values[0], ci, _vs_best_cell(r) if r["status"] == "ok" else r["status"], *values[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "# Aggregation sweep (test WER %, aggregated model)\n\n" + "\n".join(lines) + "\n"
    if summary["best"]:
        names = {k: ", ".join(f"`{n}`" for n in summary[k]) or "none" for k in ("tied", "worse", "better", "apart")}
        markdown += (
            f"\nBest: `{summary['best']}`. Not distinguishable from it at {level}: {names['tied']}. "
            f"Worse: {names['worse']}."
            + (f" Better despite a higher WER (ties in the WER sort): {names['better']}." if summary["better"] else "")
            + (f" Evaluated on other utterances, not comparable: {names['apart']}." if summary["apart"] else "")
            + f" Paired bootstrap (Bisani & Ney 2004) on each experiment's {PREDICTIONS}, {bootstrap.resamples} "
            f"resamples of {bootstrap.unit}s, seed {bootstrap.seed}; n.d. = not distinguishable (the interval of the "
            "difference holds 0).\n"
        )
    missing = [f"`{r['name']}` ({r['problem']})" for r in ok if r.get("problem")]
    if missing:
        markdown += f"\nNo predictions, so no interval or comparison, for: {'; '.join(missing)}.\n"
    baselines = sorted({r.get("baseline") for r in rows if r.get("baseline")})
    if len(baselines) > 1:
        counts = ", ".join(f"{b} ({sum(r.get('baseline') == b for r in rows)})" for b in baselines)
        markdown += f"\nExperiments from {len(baselines)} baseline commits: {counts}.\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".sweep.md.tmp-{os.getpid()}"
    tmp.write_text(markdown + "\n![sweep](sweep.png)\n", encoding="utf-8")
    os.replace(tmp, out_dir / "sweep.md")
    _plot(ok, out_dir / "sweep.png", level)
    return markdown


def _plot(rows: list[dict], path: Path, level: str = "95%") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.32 * len(rows) + 1)), sharey=True)
    wer = np.array([r["metrics"].get("wer", 0) for r in rows], float)
    low = np.array([r["ci"][0] if r.get("ci") else w for r, w in zip(rows, wer)])
    high = np.array([r["ci"][1] if r.get("ci") else w for r, w in zip(rows, wer)])
    near_best = [r.get("vs_best") == "best" or (not isinstance(r.get("vs_best"), (str, type(None)))
                                                and r["vs_best"].verdict == "not distinguishable") for r in rows]
    ax1.barh(names, wer, color=["tab:red" if b else "lightcoral" for b in near_best],
             xerr=np.stack([np.maximum(wer - low, 0), np.maximum(high - wer, 0)]), capsize=2,
             error_kw={"elinewidth": 0.8, "ecolor": "0.2"})
    ax1.set_xlabel(f"WER (%), {level} bootstrap interval; dark: the best and those not distinguishable from it")
    ax2.barh(names, [r["metrics"].get("bleu", 0) for r in rows], color="tab:blue")
    ax2.set_xlabel("BLEU")
    ax1.invert_yaxis()
    fig.suptitle("Aggregation strategies on the pooled test split")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def sweep_bootstrap_settings(params_path: Path = Path("params.yaml")) -> BootstrapSettings:
    """The workspace's ``evaluate.bootstrap`` (the defaults without a params file)."""
    from fedwhisper.params import load_params

    if not params_path.is_file():
        return BootstrapSettings()
    return BootstrapSettings.from_params(load_params(params_path).evaluate.bootstrap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", "-j", type=int, default=1, help="parallel queue workers")
    parser.add_argument("--collect", action="store_true", help="skip running; only collect existing experiments")
    parser.add_argument("--wait", action="store_true",
                        help="with --collect: first wait for this sweep's queued experiments to finish")
    parser.add_argument("--out", type=Path, default=Path("metrics"))
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these experiments (e.g. krum bias_best_light); the table covers all")
    args = parser.parse_args(argv)
    runs = experiments()
    if args.only:
        unknown = sorted(set(PREFIX + n for n in args.only) - set(runs))
        if unknown:
            parser.error(f"--only: unknown experiment(s) {unknown}; known: {sorted(n[len(PREFIX):] for n in runs)}")
        runs = {PREFIX + n: runs[PREFIX + n] for n in args.only}
    n_clients = client_count()
    if n_clients is not None:
        runs, notes = applicable(runs, n_clients)
        for note in notes:
            print(f"sweep: {note}", flush=True)
        if not runs and not args.collect:
            print("sweep: nothing to run", flush=True)
            return 0
    if not args.collect:
        stale = remove_previous(runs)
        if stale:
            print(f"sweep: removed {len(stale)} experiment(s) of an earlier sweep", flush=True)
        print(f"sweep: queueing {len(runs)} experiments", flush=True)
        queue_all(runs)
        dvc("queue", "start", "-j", str(args.jobs))
    if not args.collect or args.wait:
        wait_for_queue(sorted(runs))
    rows = collect()
    if not rows:
        print("sweep: no sweep experiments found (dvc exp show)", file=sys.stderr)
        return 1
    print(write_comparison(rows, args.out, sweep_bootstrap_settings()))
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"sweep: {len(failed)} experiment(s) failed: {', '.join(failed)}; see `dvc queue logs <name>`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
