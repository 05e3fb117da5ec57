"""Who gets which item: clients (by column, IID, Dirichlet) and train/validation/test splits, all seeded."""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from typing import Sequence

import numpy as np

from fedwhisper.errors import DataError, ParamsError
from fedwhisper.params import PartitionParams, SplitFractions

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DIRICHLET_DRAWS = 1000
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval"),
}


def resolve_split_map(source_splits: Sequence[str], explicit: dict[str, str]) -> dict[str, str]:
    """Our split -> the dataset's split name, from ``data.splits`` or detected by common names."""
    if explicit:
        for ours, theirs in explicit.items():
            if ours not in SPLITS:
                raise ParamsError(f"data.splits.{ours}: unknown split; keys must be among {', '.join(SPLITS)}")
            if theirs not in source_splits:
                raise DataError(
                    f"data.splits.{ours}: the dataset has no split {theirs!r} "
                    f"(it has: {', '.join(repr(s) for s in source_splits)}); fix data.splits"
                )
        return dict(explicit)
    found = {}
    for ours, aliases in SPLIT_ALIASES.items():
        for name in source_splits:
            if name.lower() in aliases:
                found[ours] = name
                break
    return found


def client_names(num_clients: int) -> list[str]:
    return [f"client_{i}" for i in range(num_clients)]


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(n.encode("utf-8")) for n in names)])


def assign_clients(
    ids: Sequence[str],
    groups: Sequence[str | None],
    labels: Sequence[str | None],
    partition: PartitionParams,
    seed: int,
    strata: Sequence[str | None] | None = None,
) -> list[str]:
    """One client name per item: ``groups`` as-is (column mode), or IID / Dirichlet(alpha) over ``labels``.

    ``strata`` (the dataset's own split per item) are partitioned alike, so each client's test items follow the
    same distribution as its training items.
    """
    if partition.mode == "column":
        return [str(g) for g in groups]
    n = partition.num_clients
    names = client_names(n)
    strata = strata if strata is not None else [None] * len(ids)
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for i in sorted(range(len(ids)), key=lambda i: ids[i]):
        by_stratum["" if strata[i] is None else str(strata[i])].append(i)
    out = [""] * len(ids)
    if partition.mode == "iid":
        for stratum in sorted(by_stratum):
            order = by_stratum[stratum]
            perm = _rng(seed, "iid", stratum).permutation(len(order))
            for rank, pos in enumerate(perm):
                out[order[pos]] = names[rank % n]
        return out
    # Dirichlet label skew (Hsu et al. 2019): for each label k draw p_k ~ Dir(alpha * 1_N) and give client j the
    # share p_kj of that label's items (shuffled, contiguous cuts at round(cumsum(p_k) * n_k)), in every stratum.
    # The draw is repeated (seeded) until every client has items in every stratum, as far as that is possible.
    rng = _rng(seed, "dirichlet")
    label_of = ["" if lab is None else str(lab) for lab in labels]
    need = min(len(v) for v in by_stratum.values()) >= n if by_stratum else False
    for _ in range(DIRICHLET_DRAWS):
        shares = {label: rng.dirichlet(np.full(n, partition.alpha)) for label in sorted(set(label_of))}
        for stratum in sorted(by_stratum):
            by_label: dict[str, list[int]] = defaultdict(list)
            for i in by_stratum[stratum]:
                by_label[label_of[i]].append(i)
            for label in sorted(by_label):
                members = by_label[label]
                perm = _rng(seed, "dirichlet", stratum, label).permutation(len(members))
                members = np.asarray([members[j] for j in perm], dtype=np.int64)
                cuts = np.round(np.cumsum(shares[label])[:-1] * len(members)).astype(int)
                for client, part in zip(names, np.split(members, cuts)):
                    for i in part:
                        out[int(i)] = client
        if not need or all(len({out[i] for i in members}) == n for members in by_stratum.values()):
            break
    else:
        log.warning("dirichlet partition: some client has no items in some split after %d draws", DIRICHLET_DRAWS)
    return out


def assign_splits(
    ids: Sequence[str],
    clients: Sequence[str],
    roles: Sequence[str | None],
    fractions: SplitFractions,
    seed: int,
) -> list[str]:
    """Final split per item: the dataset's own split (``roles``) where it has one, else seeded carving per client.

    Items with role None form a pool that is split into test / validation / train by the fractions. When the
    dataset has a train split but no test (or validation) split, that split is carved from each client's train.
    """
    present = {r for r in roles if r is not None}
    out = [r if r is not None else "train" for r in roles]
    carve = [s for s in ("test", "validation") if s not in present]
    if not carve:
        return out
    by_client: dict[str, list[int]] = defaultdict(list)
    for i, (client, role) in enumerate(zip(clients, roles)):
        if role in (None, "train"):
            by_client[client].append(i)
    for client in sorted(by_client):
        members = sorted(by_client[client], key=lambda i: ids[i])
        perm = _rng(seed, "split", client).permutation(len(members))
        members = [members[j] for j in perm]
        n, start = len(members), 0
        for split in carve:
            k = int(round(getattr(fractions, split) * n))
            for i in members[start : start + k]:
                out[i] = split
            start += k
    return out


def subsample(
    indices: Sequence[int], ids: Sequence[str], k: int | None, seed: int, client: str, split: str
) -> list[int]:
    """At most k of ``indices`` (seeded per client and split), sorted by id."""
    ordered = sorted(indices, key=lambda i: ids[i])
    if k is None or len(ordered) <= k:
        return ordered
    keep = _rng(seed, "subsample", client, split).choice(len(ordered), size=k, replace=False)
    return [ordered[j] for j in sorted(keep)]
