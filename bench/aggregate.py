"""Benchmark the streaming merge against a naive load-everything merge and against plain reading.

Creates four synthetic fp16 client checkpoints plus a base, shaped like whisper-large-v3-turbo (about 809M
parameters, 1.6 GB each at --scale 1), then, in one run and in fresh processes each time:

- read:  ``cat`` every input (4 clients + base) to /dev/null: the time to read each input once;
- ours:  the streaming engine (uniform mean, with the base: screening statistics and sha256 of every input);
- naive: load every client fully (``safetensors.torch.load_file``), average in fp32, ``save_file``;
- with --breakdown: ours without the base (no screening statistics) and the sha256 of every input alone, hashed
  and from the hash cache.
- ours, warm re-run: ours again over the same unchanged inputs with the sha256 cache (``fedwhisper.hash_cache``)
  filled by an earlier run, as a second ``dvc exp`` or sweep run has it: nothing is hashed. "ours" itself runs with
  the cache off (``FEDWHISPER_HASH_CACHE=off``), so it hashes every input as a first run does.

Every child runs torch with one intra-op thread, as the engine does.

With --cold, every input is dropped from the page cache (fsync + posix_fadvise DONTNEED) before each measurement,
so read, ours and naive all read from the disk, as they do for checkpoints that just arrived; without it all of them
read from the page cache (the files were just written).

Peak RSS is each process's VmHWM. Prints medians over --repeats and the ratios; targets: our peak RSS <= 1.3 x one
checkpoint and our wall time <= 2 x the read time.

    python bench/aggregate.py --scale 0.25 --repeats 1      # quick (64M params, ~130 MB per checkpoint)
    python bench/aggregate.py                               # full size: needs ~10 GB disk, ~10 GB RAM for naive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

CHILD = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
mode, out, base, *clients = sys.argv[1:]
import torch
torch.set_num_threads(1)  # as the engine does; OpenMP threads spin badly on a shared 2-core machine
t0, cpu0 = time.perf_counter(), time.process_time()
if mode in ("ours", "ours_nobase", "ours_cached"):
    from fedwhisper.formats.checkpoints import open_checkpoint
    from fedwhisper.merge.engine import MergePlan, merge_checkpoints
    from fedwhisper.merge.strategies import make_strategy
    readers = [open_checkpoint(c) for c in clients]
    plan = MergePlan(strategy=make_strategy("mean"), weights=[1 / len(clients)] * len(clients))
    merge_checkpoints([f"c{i}" for i in range(len(clients))], readers,
                      open_checkpoint(base) if mode in ("ours", "ours_cached") else None, plan, out, {"format": "pt"})
    if mode == "ours_cached":
        from fedwhisper import hash_cache
        if hash_cache.counts() != {"hits": 5, "misses": 0}:
            raise SystemExit(f"warm re-run hashed inputs: {hash_cache.counts()}")
elif mode == "hash":
    from fedwhisper.formats.checkpoints import sha256_file
    for path in [base, *clients]:
        sha256_file(path)
elif mode in ("prime", "hash_cached"):
    from fedwhisper.formats.checkpoints import open_checkpoint
    from fedwhisper import hash_cache
    readers = [open_checkpoint(path) for path in [base, *clients]]
    t0, cpu0 = time.perf_counter(), time.process_time()  # the lookups alone, not the safetensors headers
    for reader in readers:
        reader.sha256()
    expected = {"hits": 0, "misses": 5} if mode == "prime" else {"hits": 5, "misses": 0}
    if hash_cache.counts() != expected:
        raise SystemExit(f"{mode}: hash cache {hash_cache.counts()}, expected {expected}")
else:
    from safetensors.torch import load_file, save_file
    states = [load_file(c) for c in clients]
    merged = {}
    for name in states[0]:
        acc = torch.zeros(states[0][name].shape, dtype=torch.float32)
        for s in states:
            acc.add_(s[name], alpha=1 / len(states))
        merged[name] = acc.to(states[0][name].dtype)
    save_file(merged, out, metadata={"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "peak_rss": hwm()}))
"""


def turbo_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of whisper-large-v3-turbo (widths times ``scale``), without allocating weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    d = max(64, int(1280 * scale) // 64 * 64)
    config = WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=d, encoder_layers=32, decoder_layers=4,
        encoder_attention_heads=d // 64, decoder_attention_heads=d // 64, encoder_ffn_dim=4 * d,
        decoder_ffn_dim=4 * d, max_source_positions=1500, max_target_positions=448,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "proj_out.weight"}


_POOL: dict[int, torch.Tensor] = {}


def _pool(seed: int, n: int = 1 << 24) -> torch.Tensor:
    if seed not in _POOL:
        _POOL[seed] = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return _POOL[seed]


def _tiled(seed: int, numel: int, shift: int) -> torch.Tensor:
    """numel values cut from a fixed random pool (starting at ``shift``): random-looking, cheap to make."""
    pool = _pool(seed)
    reps = -(-(numel + shift) // pool.numel())
    return pool.repeat(reps)[shift:shift + numel] if reps > 1 else pool[shift:shift + numel]


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, base_seed: int | None) -> None:
    """fp16 synthetic weights, tensor by tensor: base ~ N(0, 0.02); a client = base + N(0, 0.002)."""
    from fedwhisper.merge.engine import SafetensorsStreamWriter

    entries = [(k, shapes[k], torch.float16) for k in sorted(shapes)]
    writer = SafetensorsStreamWriter(path, entries, {"format": "pt"})
    for i, (name, shape, _) in enumerate(entries):
        numel = torch.Size(shape).numel()
        t = _tiled(0, numel, (i * 7919) % (1 << 20)) * 0.02
        if base_seed is not None:
            t = t + _tiled(1, numel, (i * 104729 + seed * 15485863) % (1 << 22)) * 0.002
        writer.write(name, t.half().reshape(shape))
    writer.finish({"format": "pt"})


def run_child(mode: str, out: Path, base: Path, clients: list[Path], hash_cache: Path | None = None) -> dict:
    env = {**os.environ, "FEDWHISPER_HASH_CACHE": str(hash_cache) if hash_cache else "off"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(out), str(base), *map(str, clients)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["process_wall"] = wall
    out.unlink(missing_ok=True)
    return r


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (their pages are clean after fsync), so the next read hits the disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="width multiplier (1 = large-v3-turbo, 809M params)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="where the synthetic checkpoints go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--no-naive", action="store_true",
                    help="skip the naive baseline (it needs ~7x a checkpoint of free RAM)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time ours without the base (no screening) and the sha256 of the inputs alone")
    ap.add_argument("--cold", action="store_true",
                    help="evict the inputs from the page cache before every measurement (reads hit the disk)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedwhisper-bench-", dir="."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shapes = turbo_shapes(args.scale)
        n_params = sum(torch.Size(s).numel() for s in shapes.values())
        base = work / "base.safetensors"
        clients = [work / f"client{i}.safetensors" for i in range(4)]
        for i, path in enumerate(tqdm([base, *clients], desc="synthetic checkpoints", unit="file")):
            if not path.exists():
                write_checkpoint(path, shapes, seed=i, base_seed=None if path == base else 0)
        size = clients[0].stat().st_size
        print(f"{len(shapes)} tensors, {n_params / 1e6:.0f}M params, {size / 1e9:.2f} GB per checkpoint, "
              f"4 clients + base, {psutil.cpu_count()} CPUs")

        naive = not args.no_naive
        if naive and psutil.virtual_memory().available < 7 * size:
            print(f"skipping naive: {psutil.virtual_memory().available / 1e9:.1f} GB available < 7 x checkpoint")
            naive = False
        rows: dict[str, list[dict]] = {"read": [], "ours": [], "naive": [], "ours_nobase": [], "hash": [],
                                       "ours_cached": [], "hash_cached": []}
        inputs = [base, *clients]
        # The warm re-run's cache, filled once; the cache stores no file changed within its racy window (2 s).
        cache_db = work / "sha256.sqlite"
        cache_db.unlink(missing_ok=True)
        newest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in inputs)
        time.sleep(max(0.0, newest + 2.5 - time.time()))
        run_child("prime", work / "unused", base, clients, hash_cache=cache_db)
        cold = evict if args.cold else (lambda files: None)
        print(f"page cache: {'inputs evicted before every measurement (cold)' if args.cold else 'warm'}")
        for _ in tqdm(range(args.repeats), desc="rounds", unit="round"):
            cold(inputs)
            rows["read"].append({"seconds": read_all(inputs)})
            cold(inputs)
            rows["ours"].append(run_child("ours", work / "ours.safetensors", base, clients))
            cold(inputs)
            rows["ours_cached"].append(run_child("ours_cached", work / "ours.safetensors", base, clients,
                                                 hash_cache=cache_db))
            if args.breakdown:
                cold(inputs)
                rows["ours_nobase"].append(run_child("ours_nobase", work / "ours.safetensors", base, clients))
                cold(inputs)
                rows["hash"].append(run_child("hash", work / "unused", base, clients))
                cold(inputs)
                rows["hash_cached"].append(run_child("hash_cached", work / "unused", base, clients,
                                                     hash_cache=cache_db))
            if naive:
                cold(inputs)
                rows["naive"].append(run_child("naive", work / "naive.safetensors", base, clients))

        def med(mode: str, key: str) -> float:
            return statistics.median(r[key] for r in rows[mode])

        read_s = med("read", "seconds")
        ours_s, ours_rss = med("ours", "seconds"), med("ours", "peak_rss")
        print(f"\nmedians over {args.repeats} round(s):")
        print(f"  read (cat 5 files)  {read_s:8.2f} s")
        print(f"  ours                {ours_s:8.2f} s  (process {med('ours', 'process_wall'):.2f} s)  "
              f"peak RSS {ours_rss / 1e9:6.2f} GB")
        print(f"  ours, warm re-run   {med('ours_cached', 'seconds'):8.2f} s  (process "
              f"{med('ours_cached', 'process_wall'):.2f} s)  hash cache: 5 of 5 inputs, nothing hashed")
        print(f"  CPU time (user+sys, whole process): ours {med('ours', 'cpu'):.2f} s, "
              f"warm re-run {med('ours_cached', 'cpu'):.2f} s")
        if rows["naive"]:
            print(f"  naive               {med('naive', 'seconds'):8.2f} s  (process "
                  f"{med('naive', 'process_wall'):.2f} s)  peak RSS {med('naive', 'peak_rss') / 1e9:6.2f} GB")
        if rows["hash"]:
            print(f"  breakdown: ours without base (no screening, 4 hashes)  {med('ours_nobase', 'seconds'):8.2f} s;"
                  f"  sha256 of the 5 inputs alone {med('hash', 'seconds'):8.2f} s, "
                  f"from the hash cache {med('hash_cached', 'seconds') * 1e3:.1f} ms")
        print("ratios:")
        print(f"  ours peak RSS / one checkpoint = {ours_rss / size:.2f}   (target <= 1.3)")
        print(f"  ours wall / read time          = {ours_s / read_s:.2f}   (target <= 2.0)")
        cached = [c["seconds"] / o["seconds"] for c, o in zip(rows["ours_cached"], rows["ours"])]
        print(f"  warm re-run / ours             = {med('ours_cached', 'seconds') / ours_s:.2f}   (per round: "
              + ", ".join(f"{r:.2f}" for r in cached) + f"; process {med('ours_cached', 'process_wall') / med('ours', 'process_wall'):.2f})")
        print(f"  warm re-run CPU / ours CPU     = {med('ours_cached', 'cpu') / med('ours', 'cpu'):.2f}")
        if rows["naive"]:
            print(f"  naive peak RSS / ours          = {med('naive', 'peak_rss') / ours_rss:.2f}")
            print(f"  naive wall / ours              = {med('naive', 'seconds') / ours_s:.2f}")
        print("raw:", json.dumps(rows))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
