"""Training curves: loss, learning rate and validation WER per global step, as DVCLive TSV plots."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class DVCLiveCurves(TrainerCallback):
    """Training loss, learning rate and validation WER per global step, as DVCLive plots.

    Only the TSV curves under ``<dir>/plots/metrics/`` are written: no dvc.yaml (``dvc.yaml`` is kept by hand), no
    DVC experiment, no summary (final figures go to ``metrics/finetune/<client>.json``).
    """

    CURVES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "eval_wer": "eval/wer"}

    def __init__(self, live_dir: Path):
        self.live_dir = Path(live_dir)
        self.live = None
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.live is not None:
            return
        from dvclive import Live

        resume = state.global_step > 0
        if resume:
            tidy_curves(self.live_dir / "plots" / "metrics", state.global_step)
        try:
            self.live = Live(str(self.live_dir), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)
        except Exception as exc:  # e.g. scmrepo's "Empty git repo": lose the curves, not the training run
            log.warning("DVCLive could not start in %s (%s: %s); training curves are not logged; "
                        "commit once (git commit) to fix", self.live_dir, type(exc).__name__, exc)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not logs:
            return
        for key, name in self.CURVES.items():
            if key in logs and logs[key] is not None:
                self.live.step = self.last_step = state.global_step
                self.live.log_metric(name, float(logs[key]))

    def close(self) -> None:
        if self.live is not None:
            tidy_curves(self.live_dir / "plots" / "metrics", self.last_step)
            self.live = None


def tidy_curves(plots_dir: Path, max_step: int) -> None:
    """Keep one point per step (the latest) up to ``max_step``: after a resume, the steps past the checkpoint are
    trained (and logged) again."""
    for tsv in plots_dir.rglob("*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\n").split("\t").index("step")
        by_step = {int(ln.split("\t")[col]): ln for ln in lines[1:] if ln.strip()}
        kept = [lines[0]] + [by_step[k] for k in sorted(by_step) if k <= max_step]
        tsv.write_text("".join(kept), encoding="utf-8")
