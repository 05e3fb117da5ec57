"""Poisoned-client benchmark: do robust merges keep pooled WER near the clean merge when one client of five is bad?

Five clients: the four default trained clients (``models/clients/<c>``) plus a fifth, the uniform merge of two of
them (``--fifth``, default en-us + en-029: a plausible, honest partner). One client (``--victim``, default the
fifth) is then replaced by a poisoned model, in two variants:

- ``random``: base + a large random delta, N(0, (s * rms(base tensor))^2) per entry (``--random-scale`` s = 1.0);
- ``signflip``: base - k * (victim - base), the victim's own update reversed (``--flip-scale`` k = 1.0);
- ``scaledflip``: the same with k = ``--scaled-flip-scale`` (4.5): large enough to outweigh the other clients in a
  plain mean, small enough to stay under screening's norm check (``max_norm_ratio`` 5).

With ``--iid N``, the clients are instead N clients fine-tuned here (default params) on an IID partition of the
default data (``prepare.partition.mode: iid``: every client gets every accent), the setting Krum was designed for;
the last one is the victim. Training takes one to two minutes per client on 2 CPU cores; the clients are kept in
``--work`` and reused by a later run.

Each client set is merged with mean, median, trimmed_mean, krum, multi_krum and ``mean+screen`` (the mean with
``aggregation.screening.exclude: true``) through the library's aggregate call, and each
merged model is evaluated on the pooled prepared test split with ``fedwhisper.decode.evaluate.evaluate_model``
(identical merged weights are decoded once). Prints a markdown table of pooled WER, with the clean uniform mean as
the baseline measured in the same run.

    python bench/poisoned_clients.py [--work /tmp/poison] [--batch-size 16] [--strategies mean median ...]
    python bench/poisoned_clients.py --iid 5        # five IID clients trained first
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

STRATEGIES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "mean+screen")
VARIANTS = ("clean", "random", "signflip", "scaledflip")


def poison_random(base: dict[str, torch.Tensor], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """base + N(0, (scale * rms(b))^2) per float tensor b, seeded per tensor name (order-independent)."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        b32 = b.float()
        rms = float(b32.pow(2).mean().sqrt())  # all-zero tensors (fresh biases) stay zero
        out[name] = (b32 + scale * rms * torch.randn(b.shape, generator=gen)).to(b.dtype)
    return out


def poison_sign_flip(base: dict[str, torch.Tensor], victim: dict[str, torch.Tensor], scale: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """base - scale * (victim - base): the victim's update, reversed."""
    return {k: ((b.float() - scale * (victim[k].float() - b.float())).to(b.dtype) if b.is_floating_point()
                else b.clone()) for k, b in base.items()}


def _read(model_dir: Path) -> dict[str, torch.Tensor]:
    from fedwhisper.formats.hf import read_state_dict

    return read_state_dict(model_dir)


def _write_like(template_dir: Path, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """A copy of ``template_dir`` (configs, tokenizer) with ``state`` as its model.safetensors."""
    from safetensors.torch import save_file

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(template_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt",
                                                                         "training_summary.json"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def merge(params, inputs: list[Path], names: list[str], base: Path, out: Path, strategy: str) -> Path:
    """Merge with ``strategy``; ``<strategy>+screen`` also sets ``aggregation.screening.exclude: true``."""
    import dataclasses

    from fedwhisper.merge import aggregate

    strategy, _, screen = strategy.partition("+")
    if screen not in ("", "screen"):
        raise SystemExit(f"--strategies: unknown suffix '+{screen}'; only '+screen' (screening.exclude) exists")
    agg = dataclasses.replace(params.aggregation, strategy=strategy, weights=None, preset=None, checkpoints=None,
                              screening=dataclasses.replace(params.aggregation.screening, exclude=bool(screen)))
    aggregate(dataclasses.replace(params, aggregation=agg), checkpoints=[str(p) for p in inputs], names=names,
              base_dir=base, out_dir=out, metrics_path=out.parent / f"{out.name}.json", manifest=None)
    return out


def weights_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensor bytes, without the header (whose metadata names every input)."""
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(n).split(b'"__metadata__"')[0])  # tensor names, dtypes, shapes, offsets
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def train_iid_clients(args, work: Path) -> tuple[list[str], Path]:
    """Prepare the default data as ``args.iid`` IID clients and fine-tune each with the default finetune params
    (skipping clients already trained in ``work``); returns (client names, prepared root)."""
    import dataclasses

    from fedwhisper.data.partition import client_names
    from fedwhisper.data.prepare import load_token_counter, run_prepare
    from fedwhisper.params import load_params
    from fedwhisper.train.trainer import run_finetune

    params = load_params(args.params)
    names = client_names(args.iid)
    partition = dataclasses.replace(params.prepare.partition, mode="iid", num_clients=args.iid)
    params = dataclasses.replace(params, clients=names,
                                 prepare=dataclasses.replace(params.prepare, partition=partition))
    root = work / f"iid{args.iid}"
    prepared = root / "prepared"
    if not (prepared / "manifest.json").is_file():
        run_prepare(params, load_token_counter(args.base), prepared, root / "metrics")
    for name in names:
        if not (root / "clients" / name / "model.safetensors").is_file():
            print(f"training IID client {name}", file=sys.stderr, flush=True)
            run_finetune(params.finetune, name, base_dir=args.base, data_root=prepared, out_root=root / "clients",
                         checkpoint_root=root / "checkpoints", metrics_root=root / "metrics" / "finetune")
    return names, prepared


def build_clients(args, work: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Client names and, per variant, the five input dirs."""
    from fedwhisper.params import load_params

    params = load_params(args.params)
    if args.iid:
        names = list(args.iid_names)
        clean = [work / f"iid{args.iid}" / "clients" / c for c in names]
    else:
        clients = list(args.clients or params.clients)
        dirs = [args.clients_dir / c for c in clients]
        missing = [str(d) for d in dirs if not (d / "model.safetensors").is_file()]
        if missing:
            raise SystemExit(f"missing trained clients: {', '.join(missing)}; run `make run` (dvc repro) first")
        a, b = args.fifth
        fifth_name = f"mix-{a}+{b}"
        fifth = work / "inputs" / fifth_name
        merge(params, [args.clients_dir / a, args.clients_dir / b], [a, b], args.base, fifth, "mean")
        names = clients + [fifth_name]
        clean = dirs + [fifth]
    victim = names.index(args.victim) if args.victim else len(names) - 1
    base_state = _read(args.base)
    victim_state = _read(clean[victim])
    poisoned = {
        "random": poison_random(base_state, args.random_scale, seed=args.seed),
        "signflip": poison_sign_flip(base_state, victim_state, args.flip_scale),
        "scaledflip": poison_sign_flip(base_state, victim_state, args.scaled_flip_scale),
    }
    sets = {"clean": clean}
    for variant, state in poisoned.items():
        p = _write_like(clean[victim], state, work / "inputs" / f"poison-{variant}")
        sets[variant] = clean[:victim] + [p] + clean[victim + 1:]
    print(f"clients: {names}; victim: {names[victim]}", file=sys.stderr)
    return names, sets


def subset_prepared(root: Path, per_client: int, out: Path) -> Path:
    """A prepared root holding the first ``per_client`` test rows (by id) of every client, for a quicker run."""
    from fedwhisper.data.prepared import iter_split_arrays, list_clients, load_split, write_manifest, write_split

    if out.exists():
        shutil.rmtree(out)
    counts = {}
    for client in list_clients(root):
        durations = load_split(root, client, "test")["duration_s"][:per_client]
        rows = ({"id": i, "client": client, "text": t, "audio": a.copy(), "duration_s": d}
                for (i, t, a), d in zip(iter_split_arrays(root, client, "test"), durations))
        counts[client] = {"test": write_split(out / client / "test.arrow", rows)}
    write_manifest(out, counts, list(counts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--clients-dir", default=Path("models/clients"), type=Path)
    ap.add_argument("--clients", nargs="+", help="default: params.yaml clients")
    ap.add_argument("--base", default=Path("models/base"), type=Path)
    ap.add_argument("--prepared", default=Path("data/prepared"), type=Path)
    ap.add_argument("--fifth", nargs=2, default=["en-us", "en-029"], metavar=("A", "B"),
                    help="the fifth client is the uniform merge of these two")
    ap.add_argument("--victim", help="client replaced by the poisoned model (default: the fifth)")
    ap.add_argument("--random-scale", type=float, default=1.0)
    ap.add_argument("--flip-scale", type=float, default=1.0)
    ap.add_argument("--scaled-flip-scale", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-client", type=int, help="evaluate on the first N test rows (by id) of each client only")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--iid", type=int, metavar="N",
                    help="use N clients fine-tuned here on an IID partition of the default data instead")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedwhisper-poison"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from fedwhisper.decode.evaluate import evaluate_model
    from fedwhisper.params import EvaluateParams, load_params

    t0 = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    if args.iid:
        if args.iid < 5:
            raise SystemExit("--iid: krum with f=1 needs n > 2f + 2, so at least 5 clients")
        args.iid_names, args.prepared = train_iid_clients(args, work)
    names, sets = build_clients(args, work)
    prepared = subset_prepared(args.prepared, args.per_client, work / "prepared") if args.per_client else args.prepared
    ev = EvaluateParams(**{**{k: getattr(params.evaluate, k) for k in ("backend", "beam_size", "language", "task",
                                                                       "max_new_tokens", "normalizer")},
                           "batch_size": args.batch_size, "device": args.device})
    wer: dict[tuple[str, str], float] = {}
    by_hash: dict[str, float] = {}
    screened: dict[str, list[str]] = {}
    for variant in args.variants:
        for strategy in args.strategies:
            out = merge(params, sets[variant], names, args.base, work / "merged" / f"{variant}-{strategy}", strategy)
            digest = weights_digest(out / "model.safetensors")
            if digest not in by_hash:
                m = evaluate_model(out, f"{variant}-{strategy}", ev, out_dir=work / "eval",
                                   prepared_root=prepared)
                by_hash[digest] = float(m["wer"])
            wer[(variant, strategy)] = by_hash[digest]
            if strategy.endswith("+screen"):
                metrics = json.loads((out.parent / f"{out.name}.json").read_text(encoding="utf-8"))
                screened[variant] = [n for n in names if metrics.get(f"excluded/{n}")]
            print(f"{variant:9s} {strategy:13s} WER {wer[(variant, strategy)]:.2f}", file=sys.stderr, flush=True)
    ref = wer.get(("clean", "mean"))
    head = "| strategy | " + " | ".join(f"{v} WER" for v in args.variants) + " | worst Δ vs clean mean |"
    lines = [head, "|" + "---|" * (len(args.variants) + 2)]
    for strategy in args.strategies:
        cells = [f"{wer[(v, s)]:.2f}" for v in args.variants for s in [strategy]]
        delta = f"{max(wer[(v, strategy)] - ref for v in args.variants):+.2f}" if ref is not None else "n/a"
        lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {delta} |")
    table = "\n".join(lines)
    print(table)
    for variant, excluded in screened.items():
        print(f"screening excluded ({variant}): {', '.join(excluded) or 'none'}")
    print(f"\nclients: {', '.join(names)}; pooled test split of {prepared}; "
          f"random scale {args.random_scale}, flip scale {args.flip_scale}, "
          f"scaled flip scale {args.scaled_flip_scale}; "
          f"{len(by_hash)} distinct models decoded in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({f"{v}/{s}": w for (v, s), w in wer.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
