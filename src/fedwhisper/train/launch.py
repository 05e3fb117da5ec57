"""Start the finetune stage under ``accelerate launch`` or ``torchrun`` (multi-GPU, multi-node).

``finetune.launcher`` picks the launcher and ``finetune.num_processes`` the processes on this node. Anything else the
launcher needs (multi-node rendezvous, a config file) goes in the environment variable ``FEDWHISPER_LAUNCH_ARGS``,
e.g. ``--num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500`` (accelerate) or
``--nnodes 2 --node_rank 0 --master_addr 10.0.0.1`` (torchrun); it is added before the script path.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from fedwhisper.params import FinetuneParams

LAUNCH_ARGS_ENV = "FEDWHISPER_LAUNCH_ARGS"
LAUNCHED_ENV = "FEDWHISPER_LAUNCHED"
# Set in every launched worker (by us, or by torchrun / a multi-process accelerate launch): do not launch again.
# accelerate launch with one process sets none of the launcher variables, hence our own marker.
_WORKER_ENV = (LAUNCHED_ENV, "LOCAL_RANK", "WORLD_SIZE")


def launched() -> bool:
    return any(k in os.environ for k in _WORKER_ENV)


def launcher_command(ft: FinetuneParams, script: str, argv: Sequence[str], env: Optional[dict] = None) -> Optional[list[str]]:
    """The command that re-runs ``script argv`` under the configured launcher, or None to run in this process."""
    env = os.environ if env is None else env
    if ft.launcher == "python" or any(k in env for k in _WORKER_ENV):
        return None
    extra = shlex.split(env.get(LAUNCH_ARGS_ENV, ""))
    n = str(ft.num_processes)
    if ft.launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", n]
        if ft.num_processes > 1 and "--multi_gpu" not in extra:
            head.append("--multi_gpu")
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n]
    return [*head, *extra, script, *argv]


def run_launched(command: Sequence[str]) -> int:
    """Run a launcher command with the marker that stops the workers from launching again; its exit status."""
    return subprocess.run(list(command), check=False, env={**os.environ, LAUNCHED_ENV: "1"}).returncode
