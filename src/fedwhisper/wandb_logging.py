"""Optional Weights & Biases logging, on the seed's rule: on when ``WANDB_API_KEY`` is set and not disabled.

Disabled by the caller's flag (``--disable_wandb``), or by ``WANDB_MODE=disabled`` / ``WANDB_DISABLED=true`` in the
environment. ``wandb`` is imported only when a run is logged, so the pipeline never needs it installed.
``WANDB_PROJECT`` and ``WANDB_ENTITY`` choose where runs go (project ``fedwhisper`` when unset).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "fedwhisper"


def wandb_wanted(disabled: bool = False) -> bool:
    """True when a run should be logged: ``WANDB_API_KEY`` set, and neither the flag nor the environment disables it."""
    if disabled or not os.environ.get("WANDB_API_KEY"):
        return False
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return False
    return os.environ.get("WANDB_DISABLED", "").lower() not in ("true", "1", "yes")


def log_wandb_run(run_name: str, values: Mapping[str, Any], job_type: str, disabled: bool = False) -> Optional[str]:
    """Log ``values`` as one step of a new W&B run and finish it; the run's local directory, or None when not logged.

    A missing ``wandb`` package or a failing W&B call is a one-line warning, never a failed evaluation: the
    metrics files are already written when this runs.
    """
    if not wandb_wanted(disabled):
        return None
    if importlib.util.find_spec("wandb") is None:
        log.warning("WANDB_API_KEY is set but wandb is not installed (pip install -r requirements.txt); not logging")
        return None
    import wandb

    try:
        # wandb keeps the environment of its first setup in this process (an import elsewhere may have made it):
        # start afresh when WANDB_* changed since, so that WANDB_MODE / WANDB_DIR / the key apply to this run
        session = wandb.setup()
        if getattr(session, "did_environment_change", lambda: False)():
            wandb.teardown()
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                         entity=os.environ.get("WANDB_ENTITY"), name=run_name, job_type=job_type,
                         reinit="finish_previous")
        run.log(dict(values))
        run_dir = run.dir
        run.finish()
    except Exception as exc:  # wandb raises many types (network, auth, usage); the evaluation itself succeeded
        log.warning("W&B logging failed (%s: %s); the metrics files are unaffected", type(exc).__name__, exc)
        return None
    log.info("logged %d values to W&B run %r", len(values), run_name)
    return run_dir
