"""The resume point of a federated run: after each finished round, the global model, the server optimiser's
moments and the round records, written as one directory swapped in whole. A run whose params (all of
``federated`` but ``rounds``, ``finetune``, the clients) and base model match continues after its last finished
round, so a failed round loses only itself, and raising ``federated.rounds`` trains only the new rounds."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from fedwhisper.atomic import remove_stale_siblings
from fedwhisper.federated.rounds import RoundRecord
from fedwhisper.federated.server_optimizer import ServerOptimizer
from fedwhisper.params import FederatedParams, FinetuneParams, to_dict

log = logging.getLogger(__name__)

POINT_FILE = "resume.json"
STATE_FILE = "global.safetensors"
MOMENTS_FILE = "server_optimizer.safetensors"


def fingerprint(fed: FederatedParams, ft: FinetuneParams, clients: Sequence[str], base_dir: str | Path) -> dict:
    """What a resume point was trained from; ``rounds`` is left out (more rounds continue the same run)."""
    from fedwhisper.formats.hf import weight_files
    from fedwhisper.train.resume import file_digest

    return {"federated": {k: v for k, v in to_dict(fed).items() if k != "rounds"}, "finetune": to_dict(ft),
            "clients": sorted(clients), "base": [file_digest(p) for p in weight_files(Path(base_dir))]}


def save_point(resume_dir: str | Path, server_round: int, state: Mapping[str, torch.Tensor],
               optimizer: ServerOptimizer, records: Sequence[RoundRecord], fp: dict) -> None:
    from safetensors.torch import save_file

    from fedwhisper.formats.hf import replace_dir

    out = Path(resume_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    staging = out.with_name(f"{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / STATE_FILE))
        moments = optimizer.state()
        save_file({f"{which}/{k}": v.contiguous() for which in ("m", "v") for k, v in moments[which].items()},
                  str(staging / MOMENTS_FILE))
        (staging / POINT_FILE).write_text(json.dumps(
            {"round": server_round, "optimizer": optimizer.name, "fingerprint": fp,
             "records": [dataclasses.asdict(r) for r in records]}, indent=2, sort_keys=True) + "\n")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_point(resume_dir: str | Path, fp: dict, rounds: int
               ) -> Optional[tuple[int, dict[str, torch.Tensor], dict, list[RoundRecord]]]:
    """(last finished round, global model, optimiser moments, records) of a matching resume point, else None."""
    from safetensors.torch import load_file

    d = Path(resume_dir)
    point_file = d / POINT_FILE
    if not point_file.is_file():
        return None
    try:
        point = json.loads(point_file.read_text())
        if point.get("fingerprint") != fp:
            log.info("%s: params, clients or base model changed since; starting from round 1", d)
            return None
        done = int(point["round"])
        if done > rounds:
            log.info("%s: holds round %d, more than federated.rounds=%d; starting from round 1", d, done, rounds)
            return None
        state = load_file(str(d / STATE_FILE))
        moments: dict = {"m": {}, "v": {}}
        for key, value in load_file(str(d / MOMENTS_FILE)).items():
            which, name = key.split("/", 1)
            moments[which][name] = value
        records = [RoundRecord(**r) for r in point["records"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable resume point (%s: %s); starting from round 1", d, type(exc).__name__, exc)
        return None
    log.info("%s: resuming after round %d", d, done)
    return done, state, moments, records
