"""Resuming an interrupted run: a fingerprint of what the checkpoints were trained from, and the last complete
``checkpoint-N`` of the same run. Checkpoints of a different run are removed, and all of them once the model is out."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

from fedwhisper.atomic import write_text_atomic
from fedwhisper.params import FinetuneParams, to_dict

log = logging.getLogger(__name__)

FINGERPRINT_NAME = "fingerprint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Params that do not change the training trajectory, so changing them keeps the checkpoints.
_NOT_IN_FINGERPRINT = ("eval_steps", "eval_max_items", "save_steps", "save_total_limit", "launcher", "wandb")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def run_fingerprint(ft: FinetuneParams, client: str, base_dir: Path, train_file: Optional[Path]) -> dict:
    """What a checkpoint was trained from; resuming is only allowed when this is unchanged."""
    from fedwhisper.formats.hf import weight_files

    import fedwhisper.decode.features as features

    params = {k: v for k, v in to_dict(ft).items() if k not in _NOT_IN_FINGERPRINT}
    code = sorted(Path(__file__).parent.glob("*.py")) + [Path(features.__file__)]
    return {
        "client": client,
        "params": params,
        "code": hashlib.sha256(b"".join(p.read_bytes() for p in code)).hexdigest(),  # training code changed: retrain
        "base": [file_digest(p) for p in weight_files(base_dir)],
        "train_data": file_digest(train_file) if train_file is not None and train_file.is_file() else None,
    }


def checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of ``checkpoint-N`` dirs, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def checkpoint_step(path: Optional[Path]) -> int:
    """N of ``checkpoint-N``; 0 for None (a run from scratch)."""
    return int(_CHECKPOINT_RE.match(path.name).group(1)) if path is not None else 0


def resume_point(checkpoint_dir: Path, fingerprint: dict) -> Optional[Path]:
    """The last complete checkpoint of this same run, or None. Checkpoints of a different run are removed."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fp_file = checkpoint_dir / FINGERPRINT_NAME
    previous = None
    if fp_file.is_file():
        try:
            previous = json.loads(fp_file.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
    found = checkpoints(checkpoint_dir)
    if found and previous != fingerprint:
        log.warning("%s: params, base model or data changed since these checkpoints; starting from scratch",
                    checkpoint_dir)
        for _, path in found:
            shutil.rmtree(path)
        found = []
    write_text_atomic(fp_file, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    # trainer_state.json is the last file the Trainer writes into a checkpoint: without it the save was cut short.
    while found and not (found[-1][1] / "trainer_state.json").is_file():
        log.warning("%s: incomplete checkpoint (no trainer_state.json), removing it", found[-1][1])
        shutil.rmtree(found.pop()[1])
    return found[-1][1] if found else None


def prune_checkpoints(checkpoint_dir: Path) -> None:
    """Drop the trainer checkpoints once the client model is exported.

    They exist to resume an interrupted run; after success they would only add ~3x the model size (optimizer
    state) to the DVC cache and remote. The fingerprint stays, so the output is small and restorable by `dvc pull`.
    """
    for _, path in checkpoints(checkpoint_dir):
        shutil.rmtree(path, ignore_errors=True)
