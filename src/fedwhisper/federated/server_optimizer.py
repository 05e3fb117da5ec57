"""Server optimisers on the aggregated delta (Reddi et al. 2021, "Adaptive Federated Optimization").

With ``x`` the global model, ``a`` the round's aggregate of the client models and ``d = a - x``:

- ``fedavg``:     x <- x + eta * d   (eta = 1 is plain FedAvg: the global model becomes the aggregate)
- ``fedadam``:    m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;
                  x <- x + eta_t m / (sqrt(v) + tau),  eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
- ``fedyogi``:    m as fedadam;  v <- v - (1 - b2) d^2 sign(v - d^2);  x <- x + eta m / (sqrt(v) + tau)
- ``fedadagrad``: m <- d (b1 = 0);  v <- v + d^2;  x <- x + eta m / (sqrt(v) + tau)

``t`` is the 1-based server round. These are Flower's update rules (``flwr.serverapp.strategy.FedAdam`` and
friends, including FedAdam's bias correction with ``t + 1``); ``tests/test_federated.py`` checks ours against
Flower's on the same arrays. m and v start at zero and live as long as the optimiser (one federated run).
Non-float tensors are not optimised: they must be equal to the global model's and are kept.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from fedwhisper.errors import FederatedError

SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedadagrad")


class ServerOptimizer:
    """One federated run's server optimiser state (m, v) and its step."""

    def __init__(self, name: str, eta: float = 1.0, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):
        if name not in SERVER_OPTIMIZERS:
            raise FederatedError(f"federated.server_optimizer: unknown {name!r}; choose one of "
                                 f"{', '.join(SERVER_OPTIMIZERS)}")
        self.name = name
        self.eta = float(eta)
        self.beta_1 = 0.0 if name == "fedadagrad" else float(beta_1)
        self.beta_2 = float(beta_2)
        self.tau = float(tau)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, server_round: int, current: Mapping[str, torch.Tensor],
             aggregated: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global model from the current one and the round's aggregate (both by tensor name)."""
        if set(current) != set(aggregated):
            missing = sorted(set(current) ^ set(aggregated))
            raise FederatedError(f"round {server_round}: the aggregate and the global model hold different tensors "
                                 f"({', '.join(missing[:5])}); every client must send the whole model")
        out: dict[str, torch.Tensor] = {}
        if self.name == "fedadam":
            eta_t = self.eta * math.sqrt(1 - self.beta_2 ** (server_round + 1.0)) / (
                1 - self.beta_1 ** (server_round + 1.0))
        else:
            eta_t = self.eta
        for name, x in current.items():
            a = aggregated[name]
            if a.shape != x.shape:
                raise FederatedError(f"round {server_round}: tensor '{name}' has shape {tuple(a.shape)} in the "
                                     f"aggregate but {tuple(x.shape)} in the global model")
            if not x.is_floating_point():
                if not torch.equal(a, x):
                    raise FederatedError(f"round {server_round}: non-float tensor '{name}' changed; it is copied, "
                                         "not optimised, so every client must keep it as sent")
                out[name] = x
                continue
            d = a.to(x.dtype) - x
            if self.name == "fedavg":
                out[name] = a.to(x.dtype).clone() if self.eta == 1.0 else x + self.eta * d
                continue
            m = self.m.get(name)
            m = (1 - self.beta_1) * d if m is None else self.beta_1 * m + (1 - self.beta_1) * d
            v = self.v.get(name)
            d2 = d * d
            if v is None:
                v = torch.zeros_like(d)
            if self.name == "fedadam":
                v = self.beta_2 * v + (1 - self.beta_2) * d2
            elif self.name == "fedyogi":
                v = v - (1.0 - self.beta_2) * d2 * torch.sign(v - d2)
            else:  # fedadagrad
                v = v + d2
            self.m[name], self.v[name] = m, v
            out[name] = x + eta_t * m / (torch.sqrt(v) + self.tau)
        return out

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """m and v, to save with a finished round (resume)."""
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))
