"""Shared builders for the reliability suite: tiny Whisper state dicts, checkpoint files, subprocess environment.

Imported by the test modules as a plain module (pytest puts this folder on ``sys.path``; no ``__init__.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = ROOT / "stages"
HERE = Path(__file__).resolve().parent

# A very small Whisper (vocab 100) for merge/checkpoint tests: no tokenizer needed, ~0.3 M parameters.
TINY_CONFIG = dict(
    vocab_size=100, num_mel_bins=80, encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=50,
    max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=2,
)


def tiny_config(**over):
    from transformers import WhisperConfig

    return WhisperConfig(**{**TINY_CONFIG, **over})


def tiny_state(seed: int = 0, **config_over) -> dict[str, torch.Tensor]:
    """Random-init tiny Whisper weights in HF naming, without the tied ``proj_out.weight``."""
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_config(**config_over))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "proj_out.weight"}


def randn_like_seeded(state: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def add(a: dict, b: dict, alpha: float = 1.0) -> dict:
    return {k: a[k] + alpha * b[k] for k in a}


def write_hf_dir(path: Path, state: dict[str, torch.Tensor], config=None) -> Path:
    """config.json + model.safetensors: enough for open_checkpoint and for aggregate's config copy."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (config or tiny_config()).save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    return env


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll until ``path`` exists; fail with the process output if it exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared:\n{out[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.05)


def run_ok(cmd: list[str], cwd: Path, timeout: int = 240) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


# --------------------------------------------------------------------------- a tiny finetune project

CLIENT = "c1"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
FT = dict(max_steps=4, batch_size=2, save_steps=2, eval_max_items=2, learning_rate=1e-3, eval_steps=0)
FINETUNE = [str(STAGES / "finetune.py"), "--client", CLIENT]


def _rows(n: int, seed: int, split: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        samples = int(16000 * rng.uniform(0.4, 0.8))
        t = np.arange(samples) / 16000
        audio = (0.1 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.01 * rng.standard_normal(samples))
        rows.append({"id": f"{split}-{i:03d}", "client": CLIENT, "text": " ".join(rng.choice(WORDS, size=3)),
                     "audio": audio.astype(np.float32), "duration_s": samples / 16000})
    return rows


def make_ft_project(root: Path, base_dir: Path) -> Path:
    """A project dir for ``stages/finetune.py --client c1``: params.yaml (reduced finetune), models/base, and
    data/prepared/c1 (8 train, 2 validation, 2 test rows in the prepared Arrow format)."""
    from fedwhisper.data.prepared import write_manifest, write_split

    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["clients"] = [CLIENT]
    params["finetune"].update(FT)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(base_dir, root / "models" / "base")
    prepared = root / "data" / "prepared"
    counts = {s: write_split(prepared / CLIENT / f"{s}.arrow", _rows(n, seed, s))
              for s, n, seed in [("train", 8, 0), ("validation", 2, 1), ("test", 2, 2)]}
    write_manifest(prepared, {CLIENT: counts}, [CLIENT])
    return root


def project_copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest
