"""Run a real stage script with a pause injected at a chosen point, so a test can SIGKILL it exactly there.

    python pause_hook.py aggregate-write MARKER N -- stages/aggregate.py ARGS...
        pause after the merge engine's N-th write (a tensor or a chunk of one) into its temporary output file
    python pause_hook.py finetune-step MARKER N -- stages/finetune.py ARGS...
        pause at the end of optimizer step N (after the Trainer's checkpoints up to step N-1 are on disk)

At the pause the hook writes MARKER and sleeps; the test kills the process. The library has no such hook of its
own, so it is patched in here; nothing else about the stage changes.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path


def _pause(marker: Path, note: str) -> None:
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(note)
    tmp.replace(marker)
    time.sleep(600)


def _hook_aggregate_write(marker: Path, n: int) -> None:
    from fedwhisper.merge import engine

    original = engine.SafetensorsStreamWriter.write
    calls = [0]

    def write(self, name, tensor):
        original(self, name, tensor)
        calls[0] += 1
        if calls[0] == n:
            f = getattr(self, "_f", None)
            if f is not None:
                f.flush()
            _pause(marker, f"{self.path}\n{name}")

    engine.SafetensorsStreamWriter.write = write


def _hook_finetune_step(marker: Path, n: int) -> None:
    from fedwhisper.train import curves

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == n:
            _pause(marker, str(state.global_step))

    curves.DVCLiveCurves.on_step_end = on_step_end


def main() -> None:
    mode, marker, n, sep, script, *args = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: pause_hook.py MODE MARKER N -- SCRIPT ARGS...")
    {"aggregate-write": _hook_aggregate_write, "finetune-step": _hook_finetune_step}[mode](Path(marker), int(n))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
