"""Which clients train in a round: a seeded choice of ``max(min_fit_clients, ceil(fraction_fit * n))`` of them."""

from __future__ import annotations

import hashlib
import math
import random
from typing import Sequence

from fedwhisper.errors import FederatedError


def select_clients(clients: Sequence[str], server_round: int, fraction_fit: float, min_fit_clients: int,
                   seed: int) -> list[str]:
    """The clients of ``server_round`` (1-based), in the order of ``clients``.

    The choice depends only on (seed, round, the sorted client names), so a resumed run, or the Flower server
    whose nodes connect in any order, selects the same clients."""
    n = len(clients)
    if len(set(clients)) != n:
        raise FederatedError(f"clients: names must be unique, got {list(clients)!r}")
    k = max(min_fit_clients, math.ceil(fraction_fit * n - 1e-9))
    if k > n:
        raise FederatedError(f"round {server_round}: {k} clients needed (federated.fraction_fit={fraction_fit}, "
                             f"min_fit_clients={min_fit_clients}) but only {n} available; lower min_fit_clients "
                             "or add clients")
    if k == n:
        return list(clients)
    digest = hashlib.sha256(f"{seed}\0{server_round}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    chosen = set(rng.sample(sorted(clients), k))
    return [c for c in clients if c in chosen]
