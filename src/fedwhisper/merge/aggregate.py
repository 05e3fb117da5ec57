"""The aggregate stage as a library call: resolve inputs and weights, merge, write the model dir and metrics.

``aggregate(params, ...)`` writes ``models/aggregated/`` (a canonical HF Whisper dir: the merged
``model.safetensors`` plus configs and tokenizer copied from the base) and ``metrics/aggregate.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from fedwhisper.atomic import remove_stale_siblings, write_text_atomic
from fedwhisper.errors import CheckpointError, MergeError
from fedwhisper.formats.checkpoints import WEIGHT_SUFFIXES, CheckpointReader, open_checkpoint
from fedwhisper.formats.hf import replace_dir
from fedwhisper.merge.engine import DTYPES, MergePlan, MergeReport, merge_checkpoints
from fedwhisper.merge.presets import preset_weights
from fedwhisper.merge.strategies import make_strategy, normalise_weights
from fedwhisper.params import AggregationParams, Params, to_dict

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "models/clients"
_SKIP_COPY = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "training_summary.json",
              "model.pt"}


# --------------------------------------------------------------------------- inputs


def _client_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin"))
    return path.is_file() and path.suffix in WEIGHT_SUFFIXES


def resolve_inputs(agg: AggregationParams, clients: Sequence[str], checkpoints: Sequence[str] | None = None,
                   names: Sequence[str] | None = None) -> tuple[list[str], list[Path]]:
    """(client names, paths) to merge: explicit ``checkpoints`` (CLI, then params), else ``source/<client>`` for
    the finetune outputs, else every checkpoint in an external ``source`` folder, sorted by name."""
    explicit = list(checkpoints) if checkpoints else (list(agg.checkpoints) if agg.checkpoints else None)
    if explicit:
        paths = [Path(c) for c in explicit]
        for p in paths:
            if not p.exists():
                raise CheckpointError(f"{p}: checkpoint not found (from --checkpoints / aggregation.checkpoints); "
                                      "check the path")
    elif Path(agg.source) == Path(DEFAULT_SOURCE):
        if not clients:
            raise MergeError("clients: empty; list the client names in params.yaml or pass --checkpoints")
        paths = [Path(agg.source) / c for c in clients]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise CheckpointError(f"finetune outputs missing: {', '.join(missing)}; run `dvc repro finetune` "
                                  "or use external mode (aggregation.source / --checkpoints)")
    else:
        src = Path(agg.source)
        if not src.is_dir():
            raise CheckpointError(f"aggregation.source: {src} is not a folder; point it at the partners' "
                                  "checkpoints (e.g. `dvc add checkpoints`)")
        paths = sorted(p for p in src.iterdir() if _is_checkpoint(p))
        if not paths:
            raise CheckpointError(f"aggregation.source: {src} holds no checkpoints (.pt, .safetensors or HF dirs)")
    if names:
        names = list(names)
        if len(names) != len(paths):
            raise MergeError(f"--names: got {len(names)} names for {len(paths)} checkpoints; give one per checkpoint")
    elif not explicit and Path(agg.source) == Path(DEFAULT_SOURCE):
        names = list(clients)
    else:
        names = [_client_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise MergeError(f"client names are not unique: {names}; pass --names")
    return names, paths


def train_samples(path: Path, name: str, manifest: Path | None) -> int | None:
    """A client's training sample count: training_summary.json in its dir, the safetensors metadata, or prepare's
    manifest (``splits[name]["train"]``)."""
    summary = path / "training_summary.json" if path.is_dir() else path.parent / "training_summary.json"
    if path.is_dir() and summary.is_file():
        n = json.loads(summary.read_text()).get("train_samples")
        if isinstance(n, int):
            return n
    file = path if path.is_file() else path / "model.safetensors"
    if file.suffix == ".safetensors" and file.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
            if "train_samples" in meta:
                return int(meta["train_samples"])
        except Exception:  # unreadable files are reported when the merge opens them
            pass
    if manifest is not None and manifest.is_file():
        split = json.loads(manifest.read_text()).get("splits", {}).get(name, {})
        if isinstance(split.get("train"), int):
            return split["train"]
    return None


def resolve_weights(agg: AggregationParams, names: Sequence[str], paths: Sequence[Path],
                    manifest: Path | None = Path("data/prepared/manifest.json")) -> tuple[list[float], str]:
    """Normalised weights per client and where they came from."""
    n = len(names)
    if agg.strategy == "fedavg":
        if agg.weights is not None or agg.preset is not None:
            raise MergeError("aggregation.strategy=fedavg weighs by train sample counts; set aggregation.weights "
                             "and aggregation.preset to null (or use strategy: mean)")
        counts = []
        for name, path in zip(names, paths):
            c = train_samples(path, name, manifest)
            if c is None:
                raise MergeError(f"fedavg needs the train sample count of client '{name}' ({path}): none in "
                                 f"training_summary.json, safetensors metadata 'train_samples' or {manifest}; "
                                 "use strategy: mean with aggregation.weights instead")
            counts.append(float(c))
        return normalise_weights(counts, n, "fedavg train sample counts"), "fedavg"
    if agg.weights is not None and agg.preset is not None:
        raise MergeError("aggregation.preset and aggregation.weights are both set; set one of them to null")
    if agg.preset is not None:
        return normalise_weights(preset_weights(agg.preset, n), n, "aggregation.preset"), f"preset:{agg.preset}"
    if agg.weights is not None and agg.strategy != "uniform":
        return normalise_weights(agg.weights, n, "aggregation.weights"), "weights"
    return [1.0 / n] * n, "uniform"


def resolve_module_weights(agg: AggregationParams, n: int) -> list[tuple[str, list[float]]]:
    out = []
    for pattern, row in agg.module_weights.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise MergeError(f"aggregation.module_weights: {pattern!r} is not a valid regex ({exc})") from None
        out.append((pattern, normalise_weights(row, n, f"aggregation.module_weights[{pattern!r}]")))
    return out


# --------------------------------------------------------------------------- output


def _copy_model_files(src: Path, dst: Path, out_dtype: torch.dtype | None) -> None:
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in _SKIP_COPY and item.suffix not in WEIGHT_SUFFIXES:
            shutil.copyfile(item, dst / item.name)
    config = dst / "config.json"
    if out_dtype is not None and config.is_file():
        cfg = json.loads(config.read_text())
        changed = False
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = str(out_dtype).removeprefix("torch.")
                changed = True
        if changed:
            config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _refuse_duplicate_inputs(report: MergeReport) -> None:
    """The same bytes under two client names would silently double that client's weight."""
    seen: dict[str, str] = {}
    for name in report.client_names:
        digest = report.sha256.get(name)
        if digest is None:
            continue
        if digest in seen:
            raise MergeError(f"clients {seen[digest]!r} and {name!r} are the same file (sha256 {digest[:12]}...); "
                             "merging both would double its weight. Remove one, or give it weight 0")
        seen[digest] = name


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def export_openai(hf_dir: Path, out_path: Path) -> None:
    """openai-whisper ``{"dims", "model_state_dict"}`` file that ``whisper.load_model`` loads."""
    try:
        from fedwhisper.formats.openai_whisper import export_openai_pt
    except ImportError:
        export_openai_pt = None
    if export_openai_pt is not None:
        export_openai_pt(hf_dir, out_path)
        return
    from fedwhisper.formats.checkpoints import arch_from_config
    from fedwhisper.formats.naming import hf_to_openai

    dims = arch_from_config(json.loads((hf_dir / "config.json").read_text()))
    with open_checkpoint(hf_dir) as reader:
        state = {hf_to_openai(name): reader.read(name) for name in reader.names()}
    remove_stale_siblings(out_path)
    tmp = out_path.parent / f"{out_path.name}.tmp-{os.getpid()}"
    torch.save({"dims": dims, "model_state_dict": state}, tmp)
    tmp.replace(out_path)


def metrics_from_report(report: MergeReport, all_names: Sequence[str], raw_weights: Sequence[float],
                        agg: AggregationParams, weight_source: str) -> dict[str, Any]:
    """Flat keys for ``dvc metrics show``."""
    m: dict[str, Any] = {
        "strategy": agg.strategy, "weight_source": weight_source, "n_inputs": len(all_names),
        "n_merged": sum(1 for w in report.weights_used if w > 0), "n_tensors": report.n_tensors,
        "params_m": round(report.n_params / 1e6, 3), "passes": report.passes, "seconds": round(report.seconds, 3),
    }
    idx = {name: i for i, name in enumerate(report.client_names)}
    for name, raw in zip(all_names, raw_weights):
        i = idx.get(name)
        m[f"weight/{name}"] = round(report.weights_used[i], 6) if i is not None else 0.0
        m[f"read/{name}"] = i is not None
        if i is None:
            continue
        m[f"excluded/{name}"] = report.excluded[i]
        m[f"flagged/{name}"] = report.flags[i] is not None
        if report.flags[i]:
            m[f"flag_reason/{name}"] = report.flags[i]
        if report.l2_to_base[i] is not None:
            m[f"l2_to_base/{name}"] = round(report.l2_to_base[i], 6)
        if report.cosine_to_mean[i] is not None:
            m[f"cosine_to_mean/{name}"] = round(report.cosine_to_mean[i], 6)
        if report.cosine_to_clipped_mean[i] is not None:
            m[f"cosine_to_clipped_mean/{name}"] = round(report.cosine_to_clipped_mean[i], 6)
        m[f"nonfinite/{name}"] = report.nonfinite[i]
        if report.selected is not None:
            m[f"selected/{name}"] = i in report.selected
    for key, digest in sorted(report.sha256.items()):
        m[f"sha256/{key}"] = digest
    return m


def aggregate(params: Params, *, checkpoints: Sequence[str] | None = None, names: Sequence[str] | None = None,
              base_dir: str | Path = "models/base", out_dir: str | Path = "models/aggregated",
              metrics_path: str | Path | None = "metrics/aggregate.json",
              manifest: str | Path | None = "data/prepared/manifest.json") -> dict[str, Any]:
    """Merge the clients per ``params.aggregation``; write ``out_dir`` and ``metrics_path``; return the metrics."""
    agg = params.aggregation
    all_names, all_paths = resolve_inputs(agg, params.clients, checkpoints, names)
    weights, weight_source = resolve_weights(agg, all_names, all_paths, Path(manifest) if manifest else None)
    module_weights = resolve_module_weights(agg, len(all_names))
    strategy = make_strategy(agg.strategy, density=agg.density, lambda_=agg.lambda_, beta=agg.beta, f=agg.f, m=agg.m)

    active = [i for i in range(len(all_names))
              if weights[i] > 0 or any(row[i] > 0 for _, row in module_weights)]
    base_path = Path(base_dir) if base_dir else None
    if base_path is not None and not base_path.exists():
        if strategy.needs_base:
            raise CheckpointError(f"{base_path}: base model not found; strategy '{agg.strategy}' needs it "
                                  "(run the base stage or pass --base DIR)")
        base_path = None
    config_src = base_path if base_path is not None and base_path.is_dir() else next(
        (all_paths[i] for i in active if all_paths[i].is_dir() and (all_paths[i] / "config.json").is_file()), None)
    if config_src is None:
        raise CheckpointError("no config/tokenizer to copy into the merged model: pass --base DIR "
                              "(an HF Whisper dir, e.g. models/base from the base stage)")

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    if metrics_path:
        remove_stale_siblings(Path(metrics_path))
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    readers: list[CheckpointReader] = []
    base_reader = None
    try:
        for i in active:
            readers.append(open_checkpoint(all_paths[i]))
        if base_path is not None:
            base_reader = open_checkpoint(base_path)
        plan = MergePlan(
            strategy=strategy, weights=[weights[i] for i in active],
            module_weights=[(p, [row[i] for i in active]) for p, row in module_weights],
            accumulate_dtype=DTYPES[agg.accumulate_dtype],
            out_dtype=DTYPES[agg.out_dtype] if agg.out_dtype else None, seed=agg.seed,
            exclude=agg.screening.exclude, max_cosine_distance=agg.screening.max_cosine_distance,
            max_norm_ratio=agg.screening.max_norm_ratio,
        )
        agg_dict = to_dict(agg)
        agg_dict.pop("checkpoints", None)  # paths differ between machines; the input hashes identify the inputs
        agg_dict.pop("source", None)
        metadata = {
            "format": "pt",
            "fedwhisper.strategy": agg.strategy,
            "fedwhisper.params": json.dumps(agg_dict, sort_keys=True),
            "fedwhisper.clients": json.dumps([all_names[i] for i in active]),
        }
        report = merge_checkpoints([all_names[i] for i in active], readers, base_reader, plan,
                                   tmp / "model.safetensors", metadata)
        _refuse_duplicate_inputs(report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for r in readers:
            r.close()
        if base_reader is not None:
            base_reader.close()
    try:
        _copy_model_files(config_src, tmp, plan.out_dtype)
        if agg.export_openai:
            export_openai(tmp, tmp / "model.pt")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics = metrics_from_report(report, all_names, weights, agg, weight_source)
    if metrics_path:
        _write_json_atomic(Path(metrics_path), metrics)
    used = ", ".join(f"{n}={w:.3f}" for n, w in zip(report.client_names, report.weights_used))
    log.info("aggregate: %s (%s) over %d/%d clients [%s] in %.1f s -> %s", agg.strategy, weight_source,
             metrics["n_merged"], len(all_names), used, report.seconds, out)
    return metrics


def with_overrides(agg: AggregationParams, **overrides: Any) -> AggregationParams:
    """A copy of ``agg`` with the non-None overrides applied (CLI flags), re-checked through the params schema."""
    from fedwhisper.params import params_from_dict

    data = to_dict(agg)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("weights") is not None:
        data["preset"] = None
    if overrides.get("preset") is not None:
        data["weights"] = None
    return params_from_dict({"aggregation": data}).aggregation


def replace_aggregation(params: Params, agg: AggregationParams) -> Params:
    return dataclasses.replace(params, aggregation=agg)


def run_aggregate_stage(params_path: str | Path = "params.yaml", *, checkpoints: Sequence[str] | None = None,
                        names: Sequence[str] | None = None, base: str | Path = "models/base",
                        out: str | Path = "models/aggregated", metrics: str | Path | None = "metrics/aggregate.json",
                        **overrides: Any) -> dict[str, Any]:
    """``stages/aggregate.py``: load params (defaults when the file is absent, for use outside a project),
    apply CLI overrides (``strategy``, ``weights``, ``preset``, ``density``, ...), and aggregate."""
    from fedwhisper.params import load_params

    params_path = Path(params_path)
    params = load_params(params_path, stage="aggregate") if params_path.exists() else Params()
    agg = with_overrides(params.aggregation, **overrides)
    return aggregate(replace_aggregation(params, agg), checkpoints=checkpoints, names=names, base_dir=base,
                     out_dir=out, metrics_path=metrics)
