"""The frozen-encoder cache: what a frozen, deterministic part of the encoder gives for an item is computed once, not
once per epoch.

- ``freeze_encoder``: the cache holds the encoder's final output. The collator hands it to the model as
  ``encoder_outputs`` (the model's own argument), and the encoder does not run.
- ``freeze_encoder_layers = N``: the cache holds the output of the convolution stem and the lowest N layers, read
  with a forward hook on layer N-1 while the encoder's own ``forward`` runs. The collator hands it over as
  ``encoder_outputs=LowerEncoderStates(...)``; a forward pre-hook on the base model (``EncoderTop``) runs the
  trainable layers above N and the final layer norm on it, inside the model's forward (so autocast, DDP and
  gradient checkpointing see them as usual), and passes their output on as ordinary ``encoder_outputs``.

Nothing here re-implements HF's encoder: the stem runs in ``WhisperEncoder.forward``, and each layer is called as a
module. Validation generation and uncached items take the usual log-mel path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from fedwhisper.params import FinetuneParams
from fedwhisper.train.collator import WhisperCollator
from fedwhisper.train.model_setup import frozen_encoder_depth

log = logging.getLogger(__name__)

ENCODER_CACHE_MAX_BYTES = 4 << 30


def cacheable_encoder_depth(model, ft: FinetuneParams) -> int:
    """How many of the lowest encoder layers give the same output for an item every epoch (0 = none).

    That needs them frozen, and no dropout, layer drop or SpecAugment anywhere in the encoder. With
    ``freeze_encoder`` it is every layer, and the cache then holds the encoder's final output.
    """
    c = model.config
    drops = (c.dropout, c.attention_dropout, c.activation_dropout, c.encoder_layerdrop)
    if ft.spec_augment or any(float(d or 0.0) != 0.0 for d in drops):
        return 0
    return frozen_encoder_depth(model, ft)


def encoder_is_constant(model, ft: FinetuneParams) -> bool:
    """The whole encoder is frozen and deterministic, so its final output can be cached."""
    return ft.freeze_encoder and cacheable_encoder_depth(model, ft) > 0


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return a tuple, 5.x a tensor


class _LowerLayersDone(Exception):
    """Raised by the hook on the last cached layer: the layers above it are not needed."""


def lower_encoder_output(encoder, features: torch.Tensor, depth: int) -> torch.Tensor:
    """Output of the convolution stem and the lowest ``depth`` layers, from the encoder's own forward."""
    captured: list[torch.Tensor] = []

    def keep_and_stop(module, args, out):
        captured.append(_layer_output(out))
        raise _LowerLayersDone

    handle = encoder.layers[depth - 1].register_forward_hook(keep_and_stop)
    try:
        encoder(features)
    except _LowerLayersDone:
        pass
    finally:
        handle.remove()
    return captured[0]


def cache_encoder_outputs(model, ds, batch_size: int, max_bytes: int = ENCODER_CACHE_MAX_BYTES,
                          depth: Optional[int] = None):
    """Encoder output per item id, computed once, or None when the cache would exceed ``max_bytes``.

    ``depth=None`` caches the whole encoder's output (frozen encoder: about half the work of a 2-epoch run);
    ``depth=N`` caches the output of the convolution stem and the lowest N layers (see ``EncoderTop``).
    """
    from tqdm.auto import tqdm

    from fedwhisper.decode.features import log_mel_batch

    c = model.config
    need = len(ds) * c.max_source_positions * c.d_model * 4
    if need > max_bytes:
        log.info("encoder cache would need %.1f GiB; running the frozen encoder every step instead", need / 2**30)
        return None
    device = str(next(model.parameters()).device)
    encoder = model.get_encoder()
    cache: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    rows = ds.with_format("numpy", columns=["audio"], output_all_columns=True)
    with torch.no_grad():  # not inference_mode: the decoder's backward reads these tensors
        for start in tqdm(range(0, len(ds), batch_size), desc="encoder cache", unit="batch"):
            batch = rows[start : start + batch_size]
            features = log_mel_batch([np.array(a, dtype=np.float32) for a in batch["audio"]], c.num_mel_bins, device)
            if depth is None:
                hidden = encoder(features).last_hidden_state
            else:
                hidden = lower_encoder_output(encoder, features, depth)
            hidden = hidden.float().cpu()
            cache.update({str(i): h.clone() for i, h in zip(batch["id"], hidden)})
    model.train(was_training)
    return cache


@dataclass
class LowerEncoderStates(BaseModelOutput):
    """Cached output of the frozen lower encoder layers, passed as ``encoder_outputs``; ``EncoderTop`` finishes it."""


class EncoderTop(torch.nn.Module):
    """The encoder layers above ``depth`` and the final layer norm: the same modules as the encoder's, not copies."""

    def __init__(self, encoder, depth: int):
        super().__init__()
        self.layers = encoder.layers[depth:]
        self.layer_norm = encoder.layer_norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = _layer_output(layer(hidden, attention_mask=None))
        return self.layer_norm(hidden)


def finish_lower_encoder_states(model, depth: int):
    """Make ``model`` accept ``encoder_outputs=LowerEncoderStates(...)``: a forward pre-hook on its base model runs
    ``EncoderTop`` on them. Other inputs are untouched. Returns the hook's handle (``.remove()`` undoes it)."""
    top = EncoderTop(model.get_encoder(), depth)

    def finish(module, args, kwargs):
        states = kwargs.get("encoder_outputs")
        if not isinstance(states, LowerEncoderStates):
            return None
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=top(states.last_hidden_state))
        return args, kwargs

    return model.base_model.register_forward_pre_hook(finish, with_kwargs=True)


def attach_encoder_cache(model, ft: FinetuneParams, collator: WhisperCollator, train_ds, eval_ds, device) -> None:
    """Fill ``collator.encoder_cache`` when part of the encoder is frozen and deterministic (see the module doc).

    With the whole encoder frozen, validation items are cached too (unless they share ids with training items);
    otherwise validation generation needs the whole encoder, so only training items are cached.
    """
    depth = cacheable_encoder_depth(model, ft)
    if depth == 0:
        return
    batch_size = max(ft.batch_size, 8)
    if ft.freeze_encoder:
        to_cache = train_ds
        if eval_ds is not None and not set(map(str, eval_ds["id"])) & set(map(str, train_ds["id"])):
            import datasets

            to_cache = datasets.concatenate_datasets([train_ds, eval_ds.select_columns(train_ds.column_names)])
        collator.encoder_cache = cache_encoder_outputs(model.to(device), to_cache, batch_size)
        return
    cache = cache_encoder_outputs(model.to(device), train_ds, batch_size, depth=depth)
    if cache is not None:
        finish_lower_encoder_states(model, depth)
        collator.encoder_cache, collator.cached_states = cache, LowerEncoderStates
