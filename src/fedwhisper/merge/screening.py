"""Client screening: streaming statistics of each client against the base, and which clients to flag.

Accumulated tensor by tensor (one pass, O(N x tensor) memory), with tau_i = x_i - b the client's delta and
tau_bar = (1/N) sum_i tau_i the mean delta over the clients read:

- ``l2_to_base``      ||tau_i||_2 over the whole model;
- ``cosine_to_mean``  <tau_i, tau_bar> / (||tau_i|| ||tau_bar||) (tau_bar over the clients finite there);
- ``nonfinite``       number of NaN/Inf entries in x_i;
- ``dist2`` (optional) d_ij = ||x_i - x_j||^2, the pairwise squared distances Krum needs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


def count_nonfinite(x: torch.Tensor) -> int:
    """NaN/Inf entries of a float tensor; a cheap finite-sum check first, an exact count only when it fails."""
    if not x.is_floating_point():
        return 0
    if math.isfinite(float(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        return 0
    return int((~torch.isfinite(x)).sum())


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


@dataclass
class ScreeningStats:
    """Running sums for N clients; ``update`` once per tensor, then read the properties."""

    n: int
    with_base: bool
    pairwise: bool = False
    dtype: torch.dtype = torch.float32
    norm2: list[float] = field(default_factory=list)
    dot_mean: list[float] = field(default_factory=list)
    mean_norm2: float = 0.0
    nonfinite: list[int] = field(default_factory=list)
    first_nonfinite: list[str | None] = field(default_factory=list)
    dist2: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.norm2 = [0.0] * self.n
        self.dot_mean = [0.0] * self.n
        self.nonfinite = [0] * self.n
        self.first_nonfinite = [None] * self.n
        if self.pairwise:
            self.dist2 = np.zeros((self.n, self.n))

    def update(self, name: str, xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> list[int]:
        """Add one tensor's (or chunk's) contribution; returns its non-finite count per client.

        ``xs`` must already be in ``self.dtype`` and are consumed: they are overwritten with the deltas in place.
        """
        if not xs[0].is_floating_point():
            return [0] * len(xs)
        # A finite <x, x> (BLAS, no temporary) proves x finite; count exactly only when it is not.
        counts = [0 if math.isfinite(_dot(x, x)) else count_nonfinite(x) for x in xs]
        for i, c in enumerate(counts):
            if c:
                self.nonfinite[i] += c
                if self.first_nonfinite[i] is None:
                    self.first_nonfinite[i] = name
        if self.pairwise and self.dist2 is not None:
            for i in range(len(xs)):
                for j in range(i + 1, len(xs)):
                    d = xs[i] - xs[j]
                    v = _dot(d, d)
                    self.dist2[i, j] += v
                    self.dist2[j, i] += v
        if self.with_base and base is not None:
            b = base if base.dtype == self.dtype else base.to(self.dtype)
            finite = [x for x, c in zip(xs, counts) if not c] or list(xs)
            mean = torch.add(finite[0], finite[1]) if len(finite) > 1 else finite[0].clone()
            for x in finite[2:]:
                mean.add_(x)
            mean.mul_(1.0 / len(finite)).sub_(b)
            for i, x in enumerate(xs):
                tau = x.sub_(b)  # in place: the caller is done with x
                self.norm2[i] += _dot(tau, tau)
                self.dot_mean[i] += _dot(tau, mean)
            self.mean_norm2 += _dot(mean, mean)
        return counts

    @property
    def l2_to_base(self) -> list[float | None]:
        return [math.sqrt(v) if self.with_base and math.isfinite(v) else None for v in self.norm2]

    @property
    def cosine_to_mean(self) -> list[float | None]:
        out: list[float | None] = []
        for nn, d in zip(self.norm2, self.dot_mean):
            den = math.sqrt(nn) * math.sqrt(self.mean_norm2)
            out.append(d / den if self.with_base and den > 0 and math.isfinite(den) and math.isfinite(d) else None)
        return out


def flag_clients(stats: ScreeningStats, max_cosine_distance: float, max_norm_ratio: float) -> list[str | None]:
    """Reason each client is flagged (None = fine): non-finite values, a delta pointing away from the mean
    delta (cosine < 1 - max_cosine_distance), or a delta norm above max_norm_ratio x the median norm."""
    reasons: list[str | None] = [None] * stats.n
    norms = stats.l2_to_base
    finite_norms = [v for v in norms if v is not None]
    median = statistics.median(finite_norms) if finite_norms else None
    for i in range(stats.n):
        if stats.nonfinite[i]:
            reasons[i] = f"{stats.nonfinite[i]} non-finite values (first in '{stats.first_nonfinite[i]}')"
            continue
        cos = stats.cosine_to_mean[i]
        if cos is not None and cos < 1.0 - max_cosine_distance:
            reasons[i] = f"cosine to the mean delta {cos:.3f} < {1.0 - max_cosine_distance:.3f}"
            continue
        if norms[i] is not None and median and norms[i] > max_norm_ratio * median:
            reasons[i] = f"delta norm {norms[i]:.4g} > {max_norm_ratio} x median {median:.4g}"
    return reasons
