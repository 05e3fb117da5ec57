"""Streaming merge engine: reads one tensor name at a time from every input, merges it, and streams it to disk.

Memory: the inputs are read one tensor at a time (see ``formats.checkpoints``), and the output is streamed into a
safetensors file whose header is written first (shapes and dtypes are known up front), so peak memory is
O(N x the largest tensor), not N models, and not even one whole output model.

Elementwise strategies (all but TIES, whose top-k trim looks at a whole tensor) and the screening statistics work
on flat chunks of ``CHUNK_ELEMENTS`` entries, read straight from the files, so their memory does not even grow with
the largest tensor. Each input chunk is converted to the accumulator dtype once.

Passes:
- one pass when no decision needs whole-model statistics: merge, screening statistics and non-finite checks
  together;
- two passes when ``screening.exclude`` is on, or for a strategy that ``needs_distances`` (Krum): a first pass
  accumulates the statistics (and the pairwise squared distances), clients are excluded / selected, then the
  second pass merges.

Where every client has weight 0 for a tensor (``module_weights`` after exclusion or selection), the base tensor
is kept. Every merged tensor is checked for NaN/Inf before it is written.

The sha256 of every input is computed in a background thread while merging and patched into the header at the end
(fixed-length hex, so the header length does not change). The same inputs and params give the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from fedwhisper.errors import CheckpointError, MergeError
from fedwhisper.formats.checkpoints import DTYPE_TO_SAFETENSORS, CheckpointReader
from fedwhisper.merge.screening import ScreeningStats, count_nonfinite, flag_clients
from fedwhisper.merge.strategies import Strategy, TensorContext

log = logging.getLogger(__name__)

HASH_PLACEHOLDER = "0" * 64
BASE_KEY = "base"  # the base model's entry in the input hashes; no client may take this name
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Fix glibc's mmap threshold at 32 MiB and keep freed heap: the per-chunk buffers (1 MiB each) are then
    reused from the heap instead of being mapped and zero-filled afresh for every chunk, and whole tensors above
    32 MiB (TIES) are mapped and returned to the system on free. (glibc otherwise moves the threshold after the
    first large free, and fragmentation keeps freed whole tensors resident.)"""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: chunk buffers are reused from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep freed heap for the next chunk (no page faults)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


# --------------------------------------------------------------------------- writer


class SafetensorsStreamWriter:
    """Writes a safetensors file tensor by tensor, in the order of ``entries``, to an open binary file."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str]):
        self.path = Path(path)
        self.entries = list(entries)
        self._layout: dict[str, dict[str, Any]] = {}
        offset = 0
        for name, shape, dtype in self.entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self._layout[name] = {"dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape),
                                  "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        header = self._header(metadata)
        self._header_len = len(header)
        self._f = open(self.path, "wb")
        self._write(struct.pack("<Q", len(header)) + header)
        self._next = 0
        self._written = 0

    def _header(self, metadata: dict[str, str]) -> bytes:
        body = {"__metadata__": dict(sorted(metadata.items())), **self._layout}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the whole tensor ``name``, or its next flat chunk; entries must come in order."""
        if self._next >= len(self.entries):
            raise MergeError(f"internal: writer got {name} after the last entry")
        expected_name, shape, dtype = self.entries[self._next]
        begin, end = self._layout[expected_name]["data_offsets"]
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if name != expected_name or tensor.dtype != dtype or self._written + data.nbytes > end - begin:
            raise MergeError(f"internal: writer expected {expected_name} {shape} {dtype}, "
                             f"got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._write(memoryview(data))
        self._written += data.nbytes
        if self._written == end - begin:
            self._next += 1
            self._written = 0

    def finish(self, metadata: dict[str, str]) -> None:
        """Patch the final metadata into the header (same length) and close the file."""
        if self._next != len(self.entries):
            raise MergeError(f"internal: {len(self.entries) - self._next} tensors were not written")
        header = self._header(metadata)
        if len(header) != self._header_len:
            raise MergeError("internal: final safetensors header changed length")
        self._f.seek(8)
        self._write(header)
        try:
            self._f.close()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def _write(self, data: bytes | memoryview) -> None:
        """Write, naming this file in the error (ENOSPC, a file size limit, EIO carry no file name)."""
        try:
            self._f.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:  # the buffered tail could not be written either
            pass
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- plan and report


@dataclass
class MergePlan:
    """What to merge and how. ``weights`` and each module-weight row are normalised, one per client."""

    strategy: Strategy
    weights: list[float]
    module_weights: list[tuple[str, list[float]]] = field(default_factory=list)
    accumulate_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None
    seed: int = 0
    exclude: bool = False
    max_cosine_distance: float = 1.0
    max_norm_ratio: float = 5.0

    def weights_for(self, name: str, weights: list[float], module_weights: list[tuple[str, list[float]]]
                    ) -> list[float]:
        for pattern, row in module_weights:
            if re.search(pattern, name):
                return row
        return weights


@dataclass
class MergeReport:
    client_names: list[str]
    weights_used: list[float]
    excluded: list[bool]
    flags: list[str | None]
    l2_to_base: list[float | None]
    cosine_to_mean: list[float | None]
    cosine_to_clipped_mean: list[float | None]
    nonfinite: list[int]
    selected: list[int] | None
    sha256: dict[str, str]
    n_tensors: int
    n_params: int
    passes: int
    seconds: float


# --------------------------------------------------------------------------- validation


def _short(names: Sequence[str], k: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def validate_inputs(readers: Sequence[CheckpointReader], base: CheckpointReader | None) -> list[str]:
    """Check that every input (and the base) has the same tensor names, shapes and architecture; return names."""
    if not readers:
        raise MergeError("no inputs to merge; give at least one checkpoint with a positive weight")
    ref = base or readers[0]
    ref_role = "base" if base is not None else "first input"
    ref_names = set(ref.names())
    for r in readers if base is not None else readers[1:]:
        names = set(r.names())
        if names != ref_names:
            missing, extra = ref_names - names, names - ref_names
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {_short(missing)}")
            if extra:
                parts.append(f"extra {len(extra)}: {_short(extra)}")
            raise CheckpointError(
                f"{r.path}: tensor names differ from the {ref_role} {ref.path} ({'; '.join(parts)}); "
                "all checkpoints must be the same Whisper architecture"
            )
        if ref.arch and r.arch:
            diff = {k: (r.arch[k], ref.arch[k]) for k in ref.arch if k in r.arch and r.arch[k] != ref.arch[k]}
            if diff:
                raise CheckpointError(
                    f"{r.path}: architecture differs from the {ref_role} {ref.path} "
                    f"({', '.join(f'{k}={a} vs {b}' for k, (a, b) in sorted(diff.items()))}); "
                    "merge only fine-tunes of the same base model"
                )
        for name in sorted(names):
            a, b = r.info(name), ref.info(name)
            if a.shape != b.shape:
                raise CheckpointError(
                    f"{r.path}: tensor '{name}' has shape {list(a.shape)} but the {ref_role} {ref.path} has "
                    f"{list(b.shape)}; all checkpoints must be the same Whisper architecture"
                )
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise CheckpointError(
                    f"{r.path}: tensor '{name}' is {a.dtype} but the {ref_role} {ref.path} has {b.dtype}"
                )
    return sorted(ref_names)


def _out_dtype(name: str, readers: Sequence[CheckpointReader], plan: MergePlan) -> torch.dtype:
    dtypes = {r.info(name).dtype for r in readers}
    first = readers[0].info(name).dtype
    if not first.is_floating_point:
        return first
    if plan.out_dtype is not None:
        return plan.out_dtype
    return first if len(dtypes) == 1 else torch.float32


# --------------------------------------------------------------------------- passes


def _nonfinite_error(reader: CheckpointReader, name: str, count: int) -> CheckpointError:
    return CheckpointError(
        f"{reader.path}: tensor '{name}' has {count} NaN/Inf values; fix or drop this client, or set "
        "aggregation.screening.exclude: true to screen it out"
    )


# Elementwise work goes in flat chunks of 256K entries (1 MiB per input in float32): the five-odd float32 copies
# of a chunk and its temporaries then stay in the CPU's caches across the merge and the screening statistics. On
# the 809M-parameter benchmark (4 clients + base, warm page cache, no hashing) a merge took 7.2 s with 4M-entry
# chunks, 5.1 s with 1M, 3.9 s with 256K, 4.4 s with 128K (more Python overhead per entry).
CHUNK_ELEMENTS = 1 << 18


def _ranges(numel: int, chunked: bool) -> list[tuple[int, int] | None]:
    """Flat [start, stop) ranges of a tensor, or [None] for the whole tensor at once."""
    if not chunked or numel <= CHUNK_ELEMENTS:
        return [None]
    return [(a, min(a + CHUNK_ELEMENTS, numel)) for a in range(0, numel, CHUNK_ELEMENTS)]


def _read(reader: CheckpointReader, name: str, rng: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    t = reader.read(name) if rng is None else reader.read_flat(name, *rng)
    return t.to(dtype) if t.is_floating_point() else t


def _stats_pass(names, readers, base, plan: MergePlan, pairwise: bool) -> ScreeningStats:
    stats = ScreeningStats(len(readers), with_base=base is not None, pairwise=pairwise,
                           dtype=plan.accumulate_dtype)
    dt = plan.accumulate_dtype
    for name in tqdm(names, desc="screen", unit="tensor", leave=False):
        info = readers[0].info(name)
        if not info.dtype.is_floating_point:
            continue
        for rng in _ranges(math.prod(info.shape), True):
            b = _read(base, name, rng, dt) if base is not None else None
            if b is not None:
                bad = count_nonfinite(b)
                if bad:
                    raise _nonfinite_error(base, name, bad)
            xs = [_read(r, name, rng, dt) for r in readers]
            stats.update(name, xs, b)
            del xs, b
    return stats


def merge_checkpoints(client_names: Sequence[str], readers: Sequence[CheckpointReader],
                      base: CheckpointReader | None, plan: MergePlan, out_file: Path,
                      metadata: dict[str, str]) -> MergeReport:
    """Merge ``readers`` (one per client, every one with a positive weight somewhere) into ``out_file``.

    ``metadata`` goes into the safetensors header; ``"fedwhisper.inputs"`` is added with every input's sha256.
    """
    threads = torch.get_num_threads()
    # The per-chunk ops are memory-bound and gain little from intra-op threads, while the sha256 thread wants a
    # core of its own; on a busy machine OpenMP's spinning threads made them 5-25x slower (measured on 2 cores).
    torch.set_num_threads(1)
    try:
        return _merge_checkpoints(client_names, readers, base, plan, out_file, metadata)
    finally:
        torch.set_num_threads(threads)


def _merge_checkpoints(client_names, readers, base, plan: MergePlan, out_file: Path,
                       metadata: dict[str, str]) -> MergeReport:
    t0 = time.perf_counter()
    _tune_malloc()
    n = len(readers)
    strategy = plan.strategy
    if strategy.needs_base and base is None:
        raise MergeError(f"strategy '{strategy.name}' works on deltas and needs a base model; "
                         "pass --base DIR or run the base stage (models/base)")
    if BASE_KEY in client_names:
        raise MergeError(f"client name {BASE_KEY!r} is reserved for the base model (its input hash, its evaluation); "
                         "rename that client")
    names = validate_inputs(readers, base)

    hasher = ThreadPoolExecutor(max_workers=1)
    hashes: dict[str, Future] = {cn: hasher.submit(r.sha256) for cn, r in zip(client_names, readers)}
    if base is not None:
        hashes[BASE_KEY] = hasher.submit(base.sha256)

    weights = list(plan.weights)
    module_weights = [(p, list(row)) for p, row in plan.module_weights]
    pairwise = strategy.needs_distances
    two_pass = plan.exclude or pairwise
    excluded = [False] * n
    selected: list[int] | None = None
    stats: ScreeningStats | None = None
    dt = plan.accumulate_dtype
    try:
        if two_pass:
            stats = _stats_pass(names, readers, base, plan, pairwise=pairwise)
            flags = flag_clients(stats, plan.max_cosine_distance, plan.max_norm_ratio)
            if plan.exclude:
                excluded = [f is not None for f in flags]
            for i in range(n):
                if stats.nonfinite[i] and not excluded[i]:
                    raise _nonfinite_error(readers[i], stats.first_nonfinite[i] or "?", stats.nonfinite[i])
            keep = [i for i in range(n) if not excluded[i]]
            if pairwise:
                if stats.dist2 is None:  # pragma: no cover
                    raise MergeError(f"internal: {strategy.name} needs pairwise distances")
                sub = stats.dist2[keep][:, keep]
                selected = [keep[j] for j in strategy.select(sub)]
                keep = selected
            drop = [i for i in range(n) if i not in keep]
            weights = _zero_and_renormalise(weights, drop, "aggregation.weights", client_names, flags)
            module_weights = [(p, _zero_and_renormalise(row, drop, f"aggregation.module_weights[{p!r}]",
                                                        client_names, flags, allow_empty=True))
                              for p, row in module_weights]

        entries = [(name, readers[0].info(name).shape, _out_dtype(name, readers, plan)) for name in names]
        meta = dict(metadata)
        meta["fedwhisper.weights"] = json.dumps(dict(zip(client_names, weights)), sort_keys=True)
        if module_weights:
            meta["fedwhisper.module_weights"] = json.dumps(
                [[p, dict(zip(client_names, row))] for p, row in module_weights], sort_keys=True)
        meta["fedwhisper.inputs"] = json.dumps({k: HASH_PLACEHOLDER for k in hashes}, sort_keys=True)
        writer = SafetensorsStreamWriter(out_file, entries, meta)
        try:
            if not two_pass:
                stats = ScreeningStats(n, with_base=base is not None, dtype=dt)
            n_params = 0
            for (name, shape, out_dtype) in tqdm(entries, desc=f"merge ({strategy.name})", unit="tensor",
                                                 leave=False):
                w_all = plan.weights_for(name, weights, module_weights)
                idx = [i for i in range(n) if w_all[i] > 0]
                if not readers[0].info(name).dtype.is_floating_point:
                    writer.write(name, _copy_equal(name, readers, excluded))
                    n_params += math.prod(shape)
                    continue
                for rng in _ranges(math.prod(shape), strategy.elementwise):
                    # the base is also read where no client has a weight (kept as is), in either mode
                    read_base = base is not None and (strategy.needs_base or not two_pass or not idx)
                    b = _read(base, name, rng, dt) if read_base else None
                    if not two_pass:  # screening statistics and non-finite checks in the same pass
                        if b is not None and (bad := count_nonfinite(b)):
                            raise _nonfinite_error(base, name, bad)
                        xs = [_read(r, name, rng, dt) for r in readers]
                        merged = _merge_one(strategy, [xs[i] for i in idx], [w_all[i] for i in idx], b, name,
                                            plan, 0 if rng is None else rng[0], [client_names[i] for i in idx])
                        counts = stats.update(name, xs, b)  # consumes xs (deltas in place), after the merge
                        for i in idx:
                            if counts[i]:
                                raise _nonfinite_error(readers[i], name, counts[i])
                    else:
                        xs = [_read(readers[i], name, rng, dt) for i in idx]
                        merged = _merge_one(strategy, xs, [w_all[i] for i in idx], b, name, plan,
                                            0 if rng is None else rng[0], [client_names[i] for i in idx])
                    del xs, b
                    merged = merged.to(out_dtype)
                    if bad := count_nonfinite(merged):
                        raise MergeError(
                            f"merged tensor '{name}' has {bad} NaN/Inf values (strategy {strategy.name}); nothing "
                            "was written. Check aggregation.lambda_ / weights and the inputs' scale, or a smaller "
                            "out_dtype's range")
                    writer.write(name, merged)
                    n_params += merged.numel()
                    del merged
            sha = {k: f.result() for k, f in hashes.items()}
            meta["fedwhisper.inputs"] = json.dumps(sha, sort_keys=True)
            writer.finish(meta)
        except BaseException:
            writer.abort()
            raise
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)

    if stats is None:  # pragma: no cover
        raise MergeError("internal: no screening statistics")
    flags = flag_clients(stats, plan.max_cosine_distance, plan.max_norm_ratio)
    report = MergeReport(
        client_names=list(client_names), weights_used=weights, excluded=excluded, flags=flags,
        l2_to_base=stats.l2_to_base, cosine_to_mean=stats.cosine_to_mean,
        cosine_to_clipped_mean=stats.cosine_to_clipped_mean, nonfinite=stats.nonfinite,
        selected=selected, sha256=sha, n_tensors=len(entries), n_params=n_params,
        passes=2 if two_pass else 1, seconds=time.perf_counter() - t0,
    )
    log.info("merged %d clients with %s: %d tensors, %.1fM params, %d pass(es), %.1f s -> %s",
             n - sum(excluded), strategy.name, len(entries), n_params / 1e6, report.passes, report.seconds, out_file)
    return report


def _zero_and_renormalise(weights: list[float], drop: list[int], key: str, client_names: Sequence[str],
                          flags: Sequence[str | None], allow_empty: bool = False) -> list[float]:
    out = [0.0 if i in drop else w for i, w in enumerate(weights)]
    total = math.fsum(out)
    if total <= 0:
        if allow_empty:
            return out
        reasons = "; ".join(f"{client_names[i]}: {flags[i] or 'not selected'}" for i in drop)
        raise MergeError(f"{key}: every client with a positive weight was screened out ({reasons}); "
                         "loosen aggregation.screening or fix the inputs")
    return [w / total for w in out]


def _copy_equal(name: str, readers: Sequence[CheckpointReader], excluded: Sequence[bool]) -> torch.Tensor:
    """Non-float tensors are not merged: every input must hold the same values, which are copied."""
    ref = None
    ref_reader = None
    for r, ex in zip(readers, excluded):
        if ex:
            continue
        t = r.read(name)
        if ref is None:
            ref, ref_reader = t, r
        elif not torch.equal(ref, t):
            raise CheckpointError(f"{r.path}: non-float tensor '{name}' differs from {ref_reader.path}; "
                                  "integer/bool tensors are copied, not merged, so they must be equal")
    if ref is None:  # pragma: no cover
        raise MergeError(f"internal: no input for tensor '{name}'")
    return ref


def _merge_one(strategy: Strategy, xs: list[torch.Tensor], w: list[float], base: torch.Tensor | None,
               name: str, plan: MergePlan, offset: int = 0, clients: Sequence[str] = ()) -> torch.Tensor:
    if not xs:
        if base is not None:  # every client has weight 0 for this module: keep the base
            return base
        raise MergeError(f"tensor '{name}': every client has weight 0 here (aggregation.module_weights); "
                         "give at least one client a positive weight for it")
    total = math.fsum(w)
    w = [wi / total for wi in w]
    ctx = TensorContext(name=name, dtype=plan.accumulate_dtype, seed=plan.seed, offset=offset, clients=tuple(clients))
    return strategy.merge(xs, w, base, ctx)
