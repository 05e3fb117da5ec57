"""Federated rounds in one process: the same client and server steps the Flower apps run, without a transport.

Each round: ``select_clients`` picks the round's clients; each one loads the current global model and trains
``federated.local_steps`` optimizer steps with our trainer and collator (``finetune.*`` sets everything else; with
``proximal_mu > 0`` the FedProx term is added to its loss); the server merges the returned models with the merge
engine (``aggregation.aggregate_round``) and applies the server optimiser to the aggregated delta.

Local training restarts the client's optimiser and learning-rate schedule every round (warm-up and decay over the
round's ``local_steps``), and its data order is seeded with ``finetune.seed + 1000 * round``, so the rounds do not
replay the same first batches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from fedwhisper.errors import FederatedError
from fedwhisper.federated.aggregation import ClientUpdate, aggregate_round
from fedwhisper.federated.sampling import select_clients
from fedwhisper.federated.server_optimizer import ServerOptimizer
from fedwhisper.params import FederatedParams, FinetuneParams

log = logging.getLogger(__name__)

TIED_KEY = "proj_out.weight"  # tied to the token embedding; never sent, never aggregated


def model_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors (canonical HF names, without the tied output projection), detached CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k != TIED_KEY}


def load_state(model, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``; every tensor but the tied projection must be there, nothing else."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if k != TIED_KEY]
    if missing or unexpected:
        raise FederatedError(f"{where}: the model does not fit the global model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")


class LocalClient:
    """One site: its base model (as a template), tokenizer and prepared splits, loaded once."""

    def __init__(self, ft: FinetuneParams, name: str, base_dir: str | Path, data_root: str | Path):
        from fedwhisper.train.client_data import load_client_splits
        from fedwhisper.train.collator import label_prefix
        from fedwhisper.train.model_setup import load_base

        self.ft, self.name = ft, name
        self.template, self.tokenizer, self.multilingual = load_base(Path(base_dir))
        prefix = label_prefix(self.tokenizer, self.multilingual, ft.language, ft.task)
        eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.train_ds, self.eval_ds, _ = load_client_splits(ft, name, Path(data_root), self.tokenizer, prefix, eot,
                                                            self.template.config)
        self.normalizer = "english" if ft.language in (None, "en", "english") or ft.task == "translate" else "basic"

    def _model(self, state: Mapping[str, torch.Tensor]):
        model = copy.deepcopy(self.template)  # hooks of an earlier round's encoder cache stay on that copy
        load_state(model, state, f"client {self.name}")
        return model

    def train(self, server_round: int, global_state: Mapping[str, torch.Tensor], local_steps: int,
              proximal_mu: float = 0.0) -> ClientUpdate:
        """Train ``local_steps`` steps from ``global_state``; the update holds the whole trained model."""
        from transformers import Seq2SeqTrainer

        from fedwhisper.federated.proximal import proximal_trainer_class
        from fedwhisper.train.trainer import build_trainer

        model = self._model(global_state)
        ft = dataclasses.replace(self.ft, max_steps=local_steps, eval_steps=0, seed=self.ft.seed + 1000 * server_round)
        trainer_cls = None
        if proximal_mu > 0:
            anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
            trainer_cls = proximal_trainer_class(Seq2SeqTrainer, anchor, proximal_mu)
        scratch = Path(tempfile.mkdtemp(prefix=f"fedwhisper-{self.name}-r{server_round}-"))
        try:
            trainer = build_trainer(ft, model, self.tokenizer, self.multilingual, self.train_ds, None, scratch,
                                    normalizer=self.normalizer, trainer_cls=trainer_cls)
            result = trainer.train()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return ClientUpdate(self.name, model_state(trainer.model), len(self.train_ds), float(result.training_loss),
                            {"global_step": float(trainer.state.global_step)})

    def evaluate(self, global_state: Mapping[str, torch.Tensor]) -> Optional[dict[str, float]]:
        """Validation loss and generated-text WER of ``global_state`` on this client's validation split."""
        from fedwhisper.train.trainer import build_trainer

        if self.eval_ds is None:
            return None
        model = self._model(global_state)
        scratch = Path(tempfile.mkdtemp(prefix=f"fedwhisper-{self.name}-eval-"))
        try:
            trainer = build_trainer(self.ft, model, self.tokenizer, self.multilingual, self.train_ds, self.eval_ds,
                                    scratch, normalizer=self.normalizer, cache_encoder=False)
            out = trainer.evaluate()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"eval_loss": float(out["eval_loss"]), "eval_wer": float(out["eval_wer"]),
                "eval_items": float(len(self.eval_ds))}


@dataclass
class RoundRecord:
    """Per-round figures: who trained, their losses, the global model's validation figures."""

    server_round: int
    clients: list[str]
    client_loss: dict[str, float]
    client_examples: dict[str, int]
    train_loss: float
    eval_loss: Optional[float] = None
    eval_wer: Optional[float] = None
    seconds: float = 0.0
    merge: dict = field(default_factory=dict)


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = math.fsum(weights)
    return math.fsum(v * w for v, w in zip(values, weights)) / total


def pooled_eval(results: Sequence[Optional[dict[str, float]]]) -> tuple[Optional[float], Optional[float]]:
    """(validation loss, WER) over all clients, weighted by their validation item counts."""
    rows = [r for r in results if r]
    if not rows:
        return None, None
    n = [r["eval_items"] for r in rows]
    return weighted_mean([r["eval_loss"] for r in rows], n), weighted_mean([r["eval_wer"] for r in rows], n)


def run_rounds(fed: FederatedParams, clients: Sequence[LocalClient], initial_state: Mapping[str, torch.Tensor], *,
               work_dir: str | Path | None = None, evaluate: bool = True,
               on_round: Callable[[RoundRecord, dict[str, torch.Tensor]], None] | None = None,
               ) -> tuple[dict[str, torch.Tensor], list[RoundRecord]]:
    """``fed.rounds`` rounds from ``initial_state``; returns the final global model and one record per round.

    ``on_round(record, global_state)`` runs after each finished round (curves, a resume point)."""
    by_name = {c.name: c for c in clients}
    optimizer = ServerOptimizer(fed.server_optimizer, fed.server_lr, fed.beta_1, fed.beta_2, fed.tau)
    state = dict(initial_state)
    records = []
    for rnd in range(1, fed.rounds + 1):
        t0 = time.monotonic()
        chosen = select_clients(list(by_name), rnd, fed.fraction_fit, fed.min_fit_clients, fed.seed)
        updates = [by_name[c].train(rnd, state, fed.local_steps, fed.proximal_mu) for c in chosen]
        merged, report = aggregate_round(rnd, state, updates, fed, work_dir)
        state = optimizer.step(rnd, state, merged)
        del merged
        examples = [u.num_examples for u in updates]
        record = RoundRecord(
            server_round=rnd, clients=chosen, client_loss={u.name: u.train_loss for u in updates},
            client_examples={u.name: u.num_examples for u in updates},
            train_loss=weighted_mean([u.train_loss for u in updates], examples),
            merge={"weights": dict(zip(report.client_names, report.weights_used)),
                   "excluded": [n for n, x in zip(report.client_names, report.excluded) if x]})
        del updates
        if evaluate:
            record.eval_loss, record.eval_wer = pooled_eval([c.evaluate(state) for c in clients])
        record.seconds = time.monotonic() - t0
        wer = f"{record.eval_wer:.1f}%" if record.eval_wer is not None else "n/a"
        log.info("round %d/%d: %s trained (loss %.3f), %s + %s, validation WER %s, %.0f s", rnd, fed.rounds,
                 ", ".join(chosen), record.train_loss, fed.strategy, fed.server_optimizer, wer, record.seconds)
        records.append(record)
        if on_round is not None:
            on_round(record, state)
    return state, records
