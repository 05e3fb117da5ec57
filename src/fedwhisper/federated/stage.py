"""The ``federate`` stage as a library call, and the Flower ``ServerApp`` of a deployment: both run the rounds
through the Flower apps of ``flower.py`` and write ``outputs.py``'s model directory, curves and metrics.

- In one process (``run_federate``, the DVC stage): an ``InProcessGrid`` hands the messages to the ClientApp, one
  node per client of ``params.clients``, each reading ``data/prepared/<client>``.
- Across processes or machines (``server_app``): a SuperLink carries them to SuperNodes started with
  ``--node-config "client='<name>' data-root=... base-dir=... params=..."``; the run config names the server's
  params file, base model and output folders (see README "Federated rounds").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedwhisper.atomic import write_text_atomic
from fedwhisper.federated.flower import InProcessGrid, ensure_task_identity, run_server
from fedwhisper.federated.outputs import (
    federated_metrics, write_global_model, write_live_curves, write_round_curves,
)
from fedwhisper.params import FederatedParams, load_params

log = logging.getLogger(__name__)


def serve(grid: Grid, fed: FederatedParams, *, base_dir: str | Path, out_dir: str | Path,
          metrics_dir: str | Path, metrics_file: Optional[str | Path] = None, evaluate: bool = True,
          wait_for_nodes_s: float = 120.0, resume_dir: Optional[str | Path] = None,
          fingerprint: Optional[dict] = None) -> dict:
    """Run ``fed.rounds`` rounds over ``grid`` from the model in ``base_dir``; write the outputs; return metrics.

    The curves (TSV tables, and DVCLive plots under ``<metrics_dir>/live``) and, with ``resume_dir``, the resume
    point are rewritten after every finished round; the model directory once, at the end. A matching resume point (``fingerprint``) continues after its last round."""
    from fedwhisper.federated.resume import load_point, save_point
    from fedwhisper.federated.rounds import model_state
    from fedwhisper.train.model_setup import load_base

    base_dir, metrics_dir = Path(base_dir), Path(metrics_dir)
    start, rounds_done, moments, done = model_state(load_base(base_dir)[0]), 0, None, []
    if resume_dir is not None and fingerprint is not None:
        point = load_point(resume_dir, fingerprint, fed.rounds)
        if point is not None:
            rounds_done, start, moments, done = point

    def on_round(record, state, optimizer):
        done.append(record)
        write_round_curves(done, metrics_dir)
        write_live_curves(done, metrics_dir / "live")
        if resume_dir is not None and fingerprint is not None:
            save_point(resume_dir, record.server_round, state, optimizer, done, fingerprint)

    state, _ = run_server(grid, fed, start, evaluate=evaluate, work_dir=Path(out_dir).parent, on_round=on_round,
                          wait_for_nodes_s=wait_for_nodes_s, rounds_done=rounds_done, optimizer_state=moments)
    write_round_curves(done, metrics_dir)
    write_live_curves(done, metrics_dir / "live")
    metrics = federated_metrics(fed, done)
    metrics["resumed_after_round"] = rounds_done
    write_global_model(state, base_dir, out_dir, {"base_model": str(base_dir), **metrics})
    write_text_atomic(Path(metrics_file) if metrics_file else metrics_dir / "metrics.json",
                      json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def run_federate(params_path: str | Path = "params.yaml", *, base_dir: str | Path = "models/base",
                 data_root: str | Path = "data/prepared", out_dir: str | Path = "models/federated",
                 metrics_dir: str | Path = "metrics/federated", resume_dir: Optional[str | Path] = None,
                 evaluate: bool = True) -> dict:
    """The DVC ``federate`` stage: every client of params.yaml as a node of an in-process Flower grid.

    ``resume_dir`` (default ``<out_dir>_resume``) keeps the last finished round (see ``resume.py``)."""
    from fedwhisper.federated.resume import fingerprint

    params = load_params(params_path, stage="federate")
    nodes = [{"client": c, "data-root": str(data_root), "base-dir": str(base_dir), "params": str(params_path)}
             for c in params.clients]
    resume_dir = Path(resume_dir) if resume_dir else Path(out_dir).with_name(f"{Path(out_dir).name}_resume")
    ensure_task_identity()
    return serve(InProcessGrid(nodes), params.federated, base_dir=base_dir, out_dir=out_dir,
                 metrics_dir=metrics_dir, evaluate=evaluate, wait_for_nodes_s=5.0, resume_dir=resume_dir,
                 fingerprint=fingerprint(params.federated, params.finetune, params.clients, base_dir))


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """A deployment's server: run config keys ``params``, ``base-dir``, ``out-dir``, ``metrics-dir``, ``evaluate``,
    ``wait-for-nodes-s`` and ``resume-dir`` (default ``<out-dir>_resume``)."""
    from fedwhisper.federated.resume import fingerprint

    cfg = context.run_config
    params = load_params(str(cfg.get("params", "params.yaml")), stage="federate")
    base_dir, out_dir = str(cfg.get("base-dir", "models/base")), str(cfg.get("out-dir", "models/federated"))
    serve(grid, params.federated, base_dir=base_dir, out_dir=out_dir,
          metrics_dir=str(cfg.get("metrics-dir", "metrics/federated")),
          evaluate=bool(cfg.get("evaluate", True)),
          wait_for_nodes_s=float(cfg.get("wait-for-nodes-s", 300)),
          resume_dir=str(cfg.get("resume-dir", f"{out_dir}_resume")),
          fingerprint=fingerprint(params.federated, params.finetune, params.clients, base_dir))
