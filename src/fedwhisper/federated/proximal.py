"""FedProx (Li et al. 2020): each client minimises its loss plus ``mu/2 * ||w - w_global||^2`` over the parameters
it trains. Only used when ``federated.proximal_mu > 0``; with mu = 0 clients train with the plain trainer class."""

from __future__ import annotations

from typing import Mapping

import torch


def proximal_term(model: torch.nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 * sum over trainable parameters p of ||p - anchor[p]||^2 (differentiable in the parameters)."""
    total = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ref = anchor[name]
        term = torch.sum((param - ref.to(param.device, param.dtype)) ** 2)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


def proximal_trainer_class(base_cls: type, anchor: Mapping[str, torch.Tensor], mu: float) -> type:
    """A subclass of ``base_cls`` (a HF Trainer) whose training loss adds ``proximal_term``."""

    class ProximalTrainer(base_cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if not model.training:
                return result
            loss, outputs = result if return_outputs else (result, None)
            loss = loss + proximal_term(self.accelerator.unwrap_model(model), anchor, mu)
            return (loss, outputs) if return_outputs else loss

    ProximalTrainer.__name__ = ProximalTrainer.__qualname__ = f"Proximal{base_cls.__name__}"
    return ProximalTrainer
