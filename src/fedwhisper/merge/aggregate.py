"""The aggregate stage as a library call: resolve inputs and weights, merge, write the model dir and metrics.

``aggregate(params, ...)`` writes ``models/aggregated/`` (a canonical HF Whisper dir: the merged
``model.safetensors`` plus configs and tokenizer copied from the base) and ``metrics/aggregate.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fedwhisper.atomic import remove_stale_siblings
from fedwhisper.errors import CheckpointError, MergeError
from fedwhisper.formats.checkpoints import WEIGHT_SUFFIXES, CheckpointReader, open_checkpoint
from fedwhisper.formats.hf import carry_generation_language
from fedwhisper.merge.engine import BASE_KEY, DTYPES, MergePlan, MergeReport, merge_checkpoints, validate_inputs
from fedwhisper.merge.presets import preset_weights
from fedwhisper.merge.strategies import (
    REGISTRY, WEIGHTS_COUNTS, WEIGHTS_REFUSED, WEIGHTS_SELECT, StrategySpec, normalise_weights, strategy_spec,
)
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


def external_checkpoints(src: Path) -> list[Path]:
    """The checkpoints in an external ``source`` folder, sorted by name. An entry that looks meant as an input
    but cannot be one (a dangling symlink, a weight-like suffix in another spelling such as ``.SAFETENSORS`` or
    ``.safetensor``) is an error, not a silently smaller merge; every other entry skipped is logged."""
    paths, problems, skipped = [], [], []
    for p in sorted(src.iterdir()):
        suffix = p.suffix.lower()
        if p.is_symlink() and not p.exists():
            problems.append(f"{p.name} (a dangling symlink: its target {os.readlink(p)} does not exist)")
        elif _is_checkpoint(p):
            paths.append(p)
        elif p.is_file() and (suffix in WEIGHT_SUFFIXES or "safetensor" in suffix):
            problems.append(f"{p.name} (suffix {p.suffix!r}; checkpoint files end in {', '.join(WEIGHT_SUFFIXES)})")
        elif p.is_dir():
            skipped.append(f"{p.name}/ (no model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
        else:
            skipped.append(f"{p.name} (not a checkpoint)")
    if problems:
        raise CheckpointError(f"aggregation.source: {src} holds entries that look like checkpoints but cannot be "
                              f"read as one: {'; '.join(problems)}; fix or remove them (merging without them would "
                              "silently drop clients)")
    if skipped:
        log.warning("aggregate: skipped in %s: %s", src, "; ".join(skipped))
    return paths


def refuse_unordered_weights(agg: AggregationParams, src: Path, paths: Sequence[Path]) -> None:
    """A folder has no order of its own: per-client weights (preset, weights, module_weights) over a folder would
    apply in whatever order its names sort to, silently. Ask for the order in aggregation.checkpoints instead."""
    given = [k for k, v in (("aggregation.preset", agg.preset), ("aggregation.weights", agg.weights),
                            ("aggregation.module_weights", agg.module_weights or None)) if v is not None]
    if given:
        listed = ", ".join(str(p) for p in paths)
        raise MergeError(f"{' and '.join(given)} apply per client in order, but aggregation.source: {src} is a folder "
                         f"and gives no order (sorted by name it would be: {listed}); list the checkpoints in the "
                         f"order the weights apply with aggregation.checkpoints: [{listed}] (or --checkpoints)")


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
        paths = external_checkpoints(src)
        if not paths:
            raise CheckpointError(f"aggregation.source: {src} holds no checkpoints (.pt, .safetensors or HF dirs)")
        refuse_unordered_weights(agg, src, paths)
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
    if BASE_KEY in names:
        raise MergeError(f"client name {BASE_KEY!r} ({paths[names.index(BASE_KEY)]}) is reserved for the base model; "
                         "rename the client (or pass --names)")
    return names, paths


def input_order_source(agg: AggregationParams, checkpoints: Sequence[str] | None) -> str:
    """Where the order of the inputs (the order weights and presets apply in) came from, for the log and metrics."""
    if checkpoints:
        return "--checkpoints"
    if agg.checkpoints:
        return "aggregation.checkpoints"
    if Path(agg.source) == Path(DEFAULT_SOURCE):
        return "clients"
    return f"aggregation.source folder {agg.source}, sorted by name (unweighted)"


def manifest_train_samples(manifest: Path | None, name: str) -> int | None:
    """prepare's count of a client's training items (``splits[name]["train"]`` in its manifest)."""
    if manifest is None or not manifest.is_file():
        return None
    try:
        split = json.loads(manifest.read_text()).get("splits", {}).get(name, {})
    except ValueError as exc:
        raise MergeError(f"{manifest}: not valid JSON ({exc}); re-run the prepare stage") from None
    n = split.get("train") if isinstance(split, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def resolve_weights(agg: AggregationParams, names: Sequence[str], sample_count: Callable[[int], int | None]
                    | None = None) -> tuple[list[float], str]:
    """Normalised weights per client and where they came from, by the one rule of the strategy's registration:
    ``weights`` / ``preset`` weigh (mean, delta strategies, krum), only select (median, trimmed_mean: the clients
    with a positive weight get equal weights), or contradict the strategy (uniform, fedavg) and are refused.
    ``sample_count(i)`` gives client i's training sample count (fedavg)."""
    spec = strategy_spec(agg.strategy)
    n = len(names)
    given = "aggregation.weights" if agg.weights is not None else "aggregation.preset" if agg.preset else None
    if agg.weights is not None and agg.preset is not None:
        raise MergeError("aggregation.preset and aggregation.weights are both set; set one of them to null")
    if given and spec.weights == WEIGHTS_REFUSED:
        raise MergeError(f"aggregation.strategy={agg.strategy} weighs every client equally, but {given} is set; "
                         f"use strategy: mean with {given}, or set {given} to null")
    if spec.weights == WEIGHTS_COUNTS:
        if given:
            raise MergeError(f"aggregation.strategy={agg.strategy} weighs by train sample counts, but {given} is "
                             f"set; set {given} to null (or use strategy: mean)")
        counts = []
        for i, name in enumerate(names):
            c = sample_count(i) if sample_count is not None else None
            if c is None:
                raise MergeError(f"{agg.strategy} needs the train sample count of client '{name}': none in its "
                                 "checkpoint (training_summary.json, safetensors metadata or .pt key "
                                 "'train_samples' / 'num_train_samples') nor in prepare's manifest; use "
                                 "strategy: mean with aggregation.weights instead")
            counts.append(float(c))
        return normalise_weights(counts, n, f"{agg.strategy} train sample counts"), agg.strategy
    if agg.preset is not None:
        weights, source = normalise_weights(preset_weights(agg.preset, n), n, "aggregation.preset"), \
            f"preset:{agg.preset}"
    elif agg.weights is not None:
        weights, source = normalise_weights(agg.weights, n, "aggregation.weights"), "weights"
    else:
        return [1.0 / n] * n, "uniform"
    if spec.weights == WEIGHTS_SELECT:
        chosen = [w > 0 for w in weights]
        if len({w for w in weights if w > 0}) > 1:
            log.warning("aggregate: %s is unweighted; %s only selects the clients with a positive weight (%s), "
                        "its values are ignored", agg.strategy, given,
                        ", ".join(nm for nm, c in zip(names, chosen) if c))
        weights = [1.0 / sum(chosen) if c else 0.0 for c in chosen]
        source += " (selection)"
    return weights, source


def effective_params(agg: AggregationParams, spec: StrategySpec) -> tuple[dict[str, Any], list[str]]:
    """(the aggregation params that take effect, the keys set away from their defaults that do not)."""
    data = to_dict(agg)
    defaults = to_dict(AggregationParams())
    strategy_keys = {k for other in REGISTRY.values() for k in other.params_used}
    ignored = [k for k in sorted(strategy_keys - set(spec.params_used)) if data[k] != defaults[k]]
    drop = strategy_keys - set(spec.params_used)
    if spec.weights in (WEIGHTS_REFUSED, WEIGHTS_COUNTS):
        drop |= {"weights", "preset"}
    data = {k: v for k, v in data.items() if k not in drop}
    return data, ignored


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


def write_openai_pt(merged: Path, out_path: Path, dims: dict[str, Any] | None) -> None:
    """The merged safetensors (canonical names) as an openai-whisper ``.pt`` with openai names: a bare state dict
    when ``dims`` is None (what the seed's average_runner writes), else ``{"dims", "model_state_dict"}``, which
    ``whisper.load_model`` loads. The safetensors file is removed once the ``.pt`` is written."""
    from safetensors.torch import load_file

    from fedwhisper.formats.naming import hf_to_openai

    state = {hf_to_openai(name): t for name, t in load_file(str(merged)).items()}
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state if dims is None else {"dims": dims, "model_state_dict": state}, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    merged.unlink()


def metrics_from_report(report: MergeReport, all_names: Sequence[str], raw_weights: Sequence[float],
                        agg: AggregationParams, weight_source: str,
                        used_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat keys for ``dvc metrics show``; ``param/<key>`` for the strategy params that took effect."""
    m: dict[str, Any] = {
        "strategy": agg.strategy, "weight_source": weight_source, "n_inputs": len(all_names),
        "n_merged": sum(1 for w in report.weights_used if w > 0), "n_tensors": report.n_tensors,
        "params_m": round(report.n_params / 1e6, 3), "passes": report.passes, "seconds": round(report.seconds, 3),
    }
    spec = strategy_spec(agg.strategy)
    for key in spec.params_used:
        if used_params is None or key in used_params:
            m[f"param/{key}"] = getattr(agg, key)
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


def _open(path: Path) -> CheckpointReader:
    """open_checkpoint with OS errors and malformed side files as one-line errors naming the file."""
    try:
        return open_checkpoint(path)
    except PermissionError as exc:
        raise CheckpointError(f"{exc.filename or path}: not readable (permission denied); fix its permissions "
                              "(e.g. chmod a+r) or run as its owner") from None
    except OSError as exc:
        raise CheckpointError(f"{exc.filename or path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a malformed index or config JSON
        where = path
        index = path / "model.safetensors.index.json"
        if path.is_dir() and not (path / "model.safetensors").is_file() and index.is_file():
            where = index
        raise CheckpointError(f"{where}: unreadable ({type(exc).__name__}: {exc}); re-copy or re-export it"
                              ) from None


def _sample_count(reader: CheckpointReader, path: Path, name: str, manifest: Path | None) -> int | None:
    n = reader.metadata.get("train_samples")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    summary = path / "training_summary.json"
    if path.is_dir() and summary.is_file():
        try:
            json.loads(summary.read_text())
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{summary}: not valid JSON ({exc}); fix it or remove it") from None
    return manifest_train_samples(manifest, name)


def _fingerprint(reader: CheckpointReader, samples: int = 16, block: int = 1 << 16) -> tuple:
    """Sizes of the weight files and ``samples`` blocks spread over each: equal for equal files, and nearly
    always different for different ones at a tiny fraction of a full hash's cost."""
    parts: list[Any] = []
    for f in reader.weight_files:
        size = f.stat().st_size
        parts.append(size)
        with open(f, "rb") as fh:
            for k in range(samples):
                fh.seek(max(0, (size - block) * k // max(1, samples - 1)))
                parts.append(hashlib.sha256(fh.read(block)).digest())
    return tuple(parts)


def refuse_duplicate_inputs(names: Sequence[str], readers: Sequence[CheckpointReader]) -> None:
    """Before any tensor is merged: the same bytes under two client names would silently double that client's
    weight. Same file or equal fingerprints, then confirmed with a full sha256."""
    seen: dict[Any, int] = {}
    for i, r in enumerate(readers):
        fp = _fingerprint(r)
        j = seen.get(fp)
        if j is not None and (digest := readers[j].sha256()) == r.sha256():
            raise MergeError(f"clients {names[j]!r} and {names[i]!r} are the same file (sha256 {digest[:12]}...: "
                             f"{readers[j].path} and {r.path}); merging both would double its weight. Remove one, "
                             "or give it weight 0")
        seen.setdefault(fp, i)


def check_output_paths(out: Path, metrics: Path | None, base: Path | None, inputs: Sequence[Path]) -> None:
    """Refuse an output that would replace the base or an input, a regular file, or a read-only directory."""
    out_r = out.resolve()
    for role, p in [("--base", base)] + [("an input", p) for p in inputs]:
        if p is None:
            continue
        pr = p.resolve()
        if out_r == pr or out_r in pr.parents or pr in out_r.parents:
            raise MergeError(f"--out {out} is {role} ({p}) or overlaps it; the merge would replace it. "
                             "Choose another output directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symlink" if out.is_symlink() else "not a directory"
        raise MergeError(f"--out {out} exists and is {kind}; it would be replaced. Remove it or choose another "
                         "output directory")
    for d in (out, out.parent):
        if d.is_dir() and not d.stat().st_mode & 0o222:
            raise MergeError(f"{d}: read-only directory; make it writable (chmod u+w) or choose another --out")
    if metrics is not None and metrics.is_dir():
        raise MergeError(f"--metrics {metrics} is a directory; give a file path")


def _swap_outputs(tmp: Path, out: Path, metrics_tmp: Path | None, metrics: Path | None) -> None:
    """Put the new model dir and metrics file in place together: if the metrics rename fails, the old model dir
    is put back, so the model and its metrics always belong to the same run."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
        if metrics_tmp is not None and metrics is not None:
            os.replace(metrics_tmp, metrics)
    except BaseException:
        if out.exists() and not tmp.exists():
            os.replace(out, tmp)  # the caller removes tmp
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def aggregate(params: Params, *, checkpoints: Sequence[str] | None = None, names: Sequence[str] | None = None,
              base_dir: str | Path = "models/base", out_dir: str | Path = "models/aggregated",
              metrics_path: str | Path | None = "metrics/aggregate.json",
              manifest: str | Path | None = "data/prepared/manifest.json") -> dict[str, Any]:
    """Merge the clients per ``params.aggregation``; write ``out_dir`` and ``metrics_path``; return the metrics.

    Everything that can be checked without merging (inputs, names, weights, shapes, duplicates, output paths)
    is checked before the first tensor is merged."""
    agg = params.aggregation
    spec = strategy_spec(agg.strategy)
    all_names, all_paths = resolve_inputs(agg, params.clients, checkpoints, names)
    n = len(all_names)
    order_source = input_order_source(agg, checkpoints)
    log.info("aggregate: client order (%s): %s", order_source,
             ", ".join(f"{nm}={p}" for nm, p in zip(all_names, all_paths)))
    out = Path(out_dir)
    metrics_file = Path(metrics_path) if metrics_path else None
    base_path = Path(base_dir) if base_dir else None
    check_output_paths(out, metrics_file, base_path, all_paths)
    module_weights = resolve_module_weights(agg, n)
    used_params, ignored = effective_params(agg, spec)
    for key in ignored:
        log.warning("aggregate: aggregation.%s=%r has no effect on strategy %s; ignored (not recorded)", key,
                    getattr(agg, key), agg.strategy)
    strategy = spec.build(agg)
    manifest_path = Path(manifest) if manifest else None

    opened: dict[int, CheckpointReader] = {}
    base_reader = None
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    metrics_tmp = metrics_file.with_name(f"{metrics_file.name}.tmp-{os.getpid()}") if metrics_file else None
    try:
        def reader(i: int) -> CheckpointReader:
            if i not in opened:
                opened[i] = _open(all_paths[i])
            return opened[i]

        weights, weight_source = resolve_weights(
            agg, all_names, lambda i: _sample_count(reader(i), all_paths[i], all_names[i], manifest_path))
        active = [i for i in range(n) if weights[i] > 0 or any(row[i] > 0 for _, row in module_weights)]
        if base_path is not None and not base_path.exists():
            without = ", ".join(k for k, sp in REGISTRY.items() if not sp.cls.needs_base)
            if strategy.needs_base:
                raise CheckpointError(f"{base_path}: base model not found; strategy '{agg.strategy}' merges "
                                      "deltas from the base, so --base DIR is required (the base the clients were "
                                      "fine-tuned from: an HF Whisper dir or an openai-whisper .pt; or run the base "
                                      f"stage); these strategies do not need it: {without}")
            if agg.screening.exclude:
                raise CheckpointError(f"{base_path}: base model not found; aggregation.screening.exclude measures "
                                      "each client's update from the base, so --base DIR is required (or set "
                                      "screening.exclude: false)")
            base_path = None
        config_src = base_path if base_path is not None and base_path.is_dir() else next(
            (all_paths[i] for i in active if all_paths[i].is_dir() and (all_paths[i] / "config.json").is_file()),
            None)
        readers = [reader(i) for i in active]
        openai_form = None
        if (base_path is None or not base_path.is_dir()) and all(r.kind == "pt" for r in readers):
            # the seed's drop-in: openai-whisper .pt in, D/model.pt out in the first input's form (dims carried)
            openai_form = "dims + model_state_dict" if readers[0].openai_dims is not None else "bare state dict"
        elif config_src is None:
            raise CheckpointError("no config/tokenizer to copy into the merged model: pass --base DIR "
                                  "(an HF Whisper dir, e.g. models/base from the base stage); without --base only "
                                  "openai-whisper .pt inputs can be merged (into DIR/model.pt)")
        if base_path is not None:
            base_reader = _open(base_path)
        validate_inputs(readers, base_reader)
        refuse_duplicate_inputs([all_names[i] for i in active], readers)
        plan = MergePlan(
            strategy=strategy, weights=[weights[i] for i in active],
            module_weights=[(p, [row[i] for i in active]) for p, row in module_weights],
            accumulate_dtype=DTYPES[agg.accumulate_dtype],
            out_dtype=DTYPES[agg.out_dtype] if agg.out_dtype else None, seed=agg.seed,
            exclude=agg.screening.exclude, max_cosine_distance=agg.screening.max_cosine_distance,
            max_norm_ratio=agg.screening.max_norm_ratio,
        )
        used_params.pop("checkpoints", None)  # paths differ between machines; the input hashes identify the inputs
        used_params.pop("source", None)
        metadata = {
            "format": "pt",
            "fedwhisper.strategy": agg.strategy,
            "fedwhisper.params": json.dumps(used_params, sort_keys=True),
            "fedwhisper.clients": json.dumps([all_names[i] for i in active]),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(metrics_file)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        report = merge_checkpoints([all_names[i] for i in active], readers, base_reader, plan,
                                   tmp / "model.safetensors", metadata)
        _refuse_duplicate_inputs(report)
        if openai_form is not None:
            write_openai_pt(tmp / "model.safetensors", tmp / "model.pt", readers[0].openai_dims)
        else:
            _copy_model_files(config_src, tmp, plan.out_dtype)
            carry_generation_language(tmp, [all_paths[i] for i in active if all_paths[i].is_dir()])
        if agg.export_openai and openai_form is None:
            export_openai(tmp, tmp / "model.pt")
        metrics = metrics_from_report(report, all_names, weights, agg, weight_source, used_params)
        metrics["client_order"] = ",".join(all_names)
        metrics["client_order_source"] = order_source
        if openai_form is not None:
            metrics["output"] = f"model.pt ({openai_form})"
        if metrics_tmp is not None:
            try:
                metrics_tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(metrics_tmp)) from None
        _swap_outputs(tmp, out, metrics_tmp, metrics_file)
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else tmp
        writing = any(where == p or p in where.parents for p in (tmp, out, out.parent / out.name)) or (
            metrics_file is not None and where.name.startswith(metrics_file.name))
        if not writing:
            raise CheckpointError(f"{where}: cannot read ({exc.strerror or exc}); re-copy it or fix its "
                                  "permissions") from None
        raise MergeError(f"{where}: cannot write the merged model or its metrics ({exc.strerror or exc}); the "
                         f"previous {out} is untouched. Free space / fix permissions and re-run") from None
    finally:
        for r in opened.values():
            r.close()
        if base_reader is not None:
            base_reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if metrics_tmp is not None:
            metrics_tmp.unlink(missing_ok=True)
    used = ", ".join(f"{nm}={w:.3f}" for nm, w in zip(report.client_names, report.weights_used))
    log.info("aggregate: %s (%s) over %d/%d clients [%s] in %.1f s -> %s", agg.strategy, weight_source,
             metrics["n_merged"], n, used, report.seconds, out)
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
    from fedwhisper.single_model import pass_through, single_client_input

    params_path = Path(params_path)
    params = load_params(params_path, stage="aggregate") if params_path.exists() else Params()
    agg = with_overrides(params.aggregation, **overrides)
    single = single_client_input(replace_aggregation(params, agg), checkpoints)
    if single is not None:  # one client, nothing to merge (seed 003's single model)
        return pass_through(*single, out, metrics)
    return aggregate(replace_aggregation(params, agg), checkpoints=checkpoints, names=names, base_dir=base,
                     out_dir=out, metrics_path=metrics)
