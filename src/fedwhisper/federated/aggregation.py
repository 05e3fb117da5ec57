"""One round's server aggregation: the client models go through the merge engine (``merge/engine.py``) with the
current global model as the base, so every registered strategy (fedavg by sample counts, mean, median,
trimmed_mean, krum, multi_krum, the delta strategies) and the screening work exactly as in one-shot merging."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from fedwhisper.errors import FederatedError, MergeError
from fedwhisper.params import AggregationParams, FederatedParams


@dataclass
class ClientUpdate:
    """What a client sends back after a round: its model, how many training items it has, its mean train loss."""

    name: str
    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def aggregation_params(fed: FederatedParams) -> AggregationParams:
    """The merge engine's view of ``federated``: its strategy and knobs, no fixed weights (fedavg weighs by the
    clients' sample counts; the others are uniform over the round's clients)."""
    from fedwhisper.merge.strategies import strategy_spec

    try:
        strategy_spec(fed.strategy)
    except MergeError as exc:
        raise FederatedError(str(exc).replace("aggregation.strategy", "federated.strategy")) from None
    return dataclasses.replace(AggregationParams(), strategy=fed.strategy, beta=fed.beta, f=fed.f, m=fed.m,
                               screening=fed.screening)


def _save(state: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def aggregate_round(server_round: int, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                    fed: FederatedParams, work_dir: str | Path | None = None):
    """(the aggregate of the clients' models by ``fed.strategy``, the engine's MergeReport).

    The models are written to a temporary folder under ``work_dir`` (safetensors) and merged by the streaming
    engine with ``global_state`` as the base; the folder is removed afterwards. A tensor that no client changed
    (a frozen layer) is the global one exactly: a weighted mean of equal float32 values can be an ulp off, and the
    server optimiser would turn that rounding into drift."""
    from safetensors.torch import load_file

    from fedwhisper.formats.checkpoints import open_checkpoint
    from fedwhisper.merge.aggregate import resolve_weights
    from fedwhisper.merge.engine import DTYPES, MergePlan, merge_checkpoints
    from fedwhisper.merge.strategies import make_strategy

    if not updates:
        raise FederatedError(f"round {server_round}: no client returned a model; nothing to aggregate")
    for u in updates:
        if set(u.state) != set(global_state):
            diff = sorted(set(u.state) ^ set(global_state))
            raise FederatedError(f"round {server_round}: client '{u.name}' sent a model whose tensors differ from "
                                 f"the global model's ({', '.join(diff[:5])})")
    agg = aggregation_params(fed)
    names = [u.name for u in updates]
    weights, _ = resolve_weights(agg, names, lambda i: updates[i].num_examples)
    plan = MergePlan(strategy=make_strategy(agg.strategy, agg), weights=weights, accumulate_dtype=DTYPES[agg.accumulate_dtype],
                     seed=agg.seed, exclude=agg.screening.exclude,
                     max_cosine_distance=agg.screening.max_cosine_distance,
                     max_norm_ratio=agg.screening.max_norm_ratio)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"round-{server_round:04d}-", dir=work_dir))
    opened = []
    try:
        _save(global_state, tmp / "global.safetensors")
        base = open_checkpoint(tmp / "global.safetensors")
        opened.append(base)
        readers = []
        for i, u in enumerate(updates):
            _save(u.state, tmp / f"client-{i}.safetensors")
            readers.append(open_checkpoint(tmp / f"client-{i}.safetensors"))
            opened.append(readers[-1])
        try:
            report = merge_checkpoints(names, readers, base, plan, tmp / "aggregate.safetensors",
                                       {"format": "pt", "fedwhisper.round": str(server_round)})
        except MergeError as exc:
            raise FederatedError(f"round {server_round}: {exc}") from None
        merged = load_file(str(tmp / "aggregate.safetensors"))
        for name, g in global_state.items():  # e.g. a frozen encoder: equal inputs give it back bit for bit
            if all(torch.equal(u.state[name], g) for u in updates):
                merged[name] = g.clone()
    finally:
        for r in opened:
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return merged, report
