"""finetune.encoder_window: training batches on the longest clip's window, validation and the saved model on 30 s."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fedwhisper.errors import ParamsError
from fedwhisper.params import FinetuneParams
from fedwhisper.train.encoder_window import (
    WindowedWhisperEncoder,
    enable_encoder_windows,
    full_frames,
    window_frames,
)

from test_finetune import CLIENT, FAST, finetune, prepared  # noqa: F401  (module fixture)


def _encoder_model(tiny_random_dir):
    from fedwhisper.train.model_setup import load_base

    model, tokenizer, _ = load_base(tiny_random_dir)
    return model.eval(), tokenizer


def test_window_frames_hold_the_longest_clip_and_are_even():
    assert window_frames([16000, 3200], 3000) == 100  # 1 s = 100 frames
    assert window_frames([16001], 3000) == 102  # 100.006 frames -> 101 -> even
    assert window_frames([161], 3000) == 2 and window_frames([1], 3000) == 2 and window_frames([], 3000) == 2
    assert window_frames([40 * 16000], 3000) == 3000  # longer than 30 s: Whisper's window, the clip is cut as ever
    for n in range(1, 2000, 37):
        frames = window_frames([n], 3000)
        assert frames % 2 == 0 and frames * 160 >= n and (frames - 2) * 160 < n


def test_short_window_equals_an_encoder_built_for_that_window(tiny_random_dir):
    """N frames through the windowed encoder == HF's encoder whose config has N / 2 positions, same weights."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, _ = _encoder_model(tiny_random_dir)
    encoder = model.get_encoder()
    reference_full = encoder(torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))).last_hidden_state
    enable_encoder_windows(model)
    assert type(model.get_encoder()) is WindowedWhisperEncoder
    enable_encoder_windows(model)  # idempotent
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encoder(features).last_hidden_state, reference_full)  # the full window runs HF's path as is

    frames = 412
    config = copy.deepcopy(model.config)
    config.max_source_positions = frames // 2
    short = WhisperEncoder(config).eval()
    state = {k: (v[: frames // 2] if k == "embed_positions.weight" else v) for k, v in encoder.state_dict().items()}
    short.load_state_dict(state)
    with torch.no_grad():
        got = encoder(features[..., :frames]).last_hidden_state
        want = short(features[..., :frames]).last_hidden_state
    assert got.shape == (2, frames // 2, model.config.d_model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the lent table and config are put back, also after a refused window
    assert encoder.embed_positions.num_embeddings == 1500 and model.config.max_source_positions == 1500
    for bad in (411, 3002):
        with pytest.raises(ValueError, match=f"{bad} log-mel frames"):
            encoder(features[..., :1].repeat(1, 1, bad))
    assert encoder.embed_positions.num_embeddings == 1500 and model.config.max_source_positions == 1500
    assert model.state_dict()["model.encoder.embed_positions.weight"].shape[0] == 1500
    assert type(copy.deepcopy(model).get_encoder()) is WindowedWhisperEncoder


def test_positions_get_no_gradient_and_the_rest_of_the_encoder_does(tiny_random_dir):
    model, _ = _encoder_model(tiny_random_dir)
    enable_encoder_windows(model)
    model.train()
    table = model.get_encoder().embed_positions.weight.detach().clone()
    out = model.get_encoder()(torch.randn(1, 80, 200)).last_hidden_state
    out.sum().backward()
    encoder = model.get_encoder()
    assert encoder.embed_positions.weight.grad is None
    assert encoder.conv1.weight.grad is not None and encoder.layers[0].fc1.weight.grad is not None
    assert torch.equal(encoder.embed_positions.weight, table)


def test_collator_cuts_to_the_longest_clip_bit_for_bit(tiny_random_dir):
    from fedwhisper.train.collator import WhisperCollator, label_prefix

    model, tok = _encoder_model(tiny_random_dir)
    prefix = label_prefix(tok, False, "en", "transcribe")
    rows = [{"text": "alpha", "audio": np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1}
            for i, n in enumerate([16000 * 3 + 5, 16000 * 1, 800])]
    full = WhisperCollator(tok, prefix, 50256, model.config.decoder_start_token_id)
    cut = dataclasses.replace(full, encoder_window="longest")
    a, b = full(rows), cut(rows)
    assert a["input_features"].shape[-1] == 3000 and b["input_features"].shape[-1] == 302
    assert torch.equal(b["input_features"], a["input_features"][..., :302]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ParamsError, match="finetune.encoder_window"):
        dataclasses.replace(full, encoder_window="shortest")
    assert full_frames(model.config) == 3000


def test_trainer_cuts_training_batches_only(tmp_path, tiny_random_dir, prepared):  # noqa: F811
    """Training batches come on the window; validation (generation) keeps 30 s; the model saves 1500 positions."""
    from fedwhisper.train.model_setup import load_base
    from fedwhisper.train.trainer import build_trainer

    model, tok, multilingual = load_base(tiny_random_dir)
    from fedwhisper.data.prepared import load_split

    train, valid = load_split(prepared, CLIENT, "train"), load_split(prepared, CLIENT, "validation")
    ft = FinetuneParams(**{**FAST, "freeze_encoder": False, "encoder_window": "longest"})
    trainer = build_trainer(ft, model, tok, multilingual, train, valid, tmp_path / "ckpt")
    batch = next(iter(trainer.get_train_dataloader()))
    longest = max(len(a) for a in train["audio"])
    assert batch["input_features"].shape[-1] < 3000 and batch["input_features"].shape[-1] <= window_frames([longest], 3000)
    assert next(iter(trainer.get_eval_dataloader()))["input_features"].shape[-1] == 3000
    assert trainer.data_collator.encoder_window == "full"
    plain = build_trainer(dataclasses.replace(ft, encoder_window="full"), load_base(tiny_random_dir)[0], tok,
                          multilingual, train, valid, tmp_path / "ckpt2")
    assert next(iter(plain.get_train_dataloader()))["input_features"].shape[-1] == 3000


def test_windowed_finetune_trains_the_encoder_and_saves_a_plain_whisper(tmp_path, tiny_random_dir, prepared):  # noqa: F811
    from transformers import WhisperForConditionalGeneration

    from fedwhisper.formats.hf import read_state_dict

    metrics = finetune(tmp_path, tiny_random_dir, prepared, freeze_encoder=False, encoder_window="longest")
    assert metrics["global_step"] == 4 and metrics["eval_wer"] is not None
    base = read_state_dict(tiny_random_dir)
    out_dir = tmp_path / "clients" / CLIENT
    trained = read_state_dict(out_dir)
    key = "model.encoder.embed_positions.weight"
    assert torch.equal(trained[key], base[key])  # fixed sinusoids: all 1500 rows, untouched
    assert not torch.equal(trained["model.encoder.layers.0.fc1.weight"], base["model.encoder.layers.0.fc1.weight"])
    model = WhisperForConditionalGeneration.from_pretrained(str(out_dir))
    assert type(model.get_encoder()).__name__ == "WhisperEncoder"


def test_encoder_window_param_is_checked():
    from fedwhisper.params import params_from_dict

    with pytest.raises(ParamsError, match="finetune.encoder_window"):
        params_from_dict({"finetune": {"encoder_window": "short"}})


def test_windows_compose_with_the_fedprox_trainer(tmp_path, tiny_random_dir, prepared):  # noqa: F811
    """Federated rounds pass their own trainer class (FedProx); the window wraps it and keeps its loss."""
    from transformers import Seq2SeqTrainer

    from fedwhisper.data.prepared import load_split
    from fedwhisper.federated.proximal import proximal_trainer_class
    from fedwhisper.train.model_setup import load_base
    from fedwhisper.train.trainer import build_trainer

    model, tok, multilingual = load_base(tiny_random_dir)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    proximal = proximal_trainer_class(Seq2SeqTrainer, anchor, 0.1)
    ft = FinetuneParams(**{**FAST, "freeze_encoder": False, "encoder_window": "longest", "max_steps": 1})
    trainer = build_trainer(ft, model, tok, multilingual, load_split(prepared, CLIENT, "train"), None,
                            tmp_path / "ckpt", trainer_cls=proximal)
    assert isinstance(trainer, proximal) and type(trainer).__name__.startswith("TrainCollatorProximal")
    assert next(iter(trainer.get_train_dataloader()))["input_features"].shape[-1] < 3000
    assert trainer.train().global_step == 1
