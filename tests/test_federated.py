"""Federated rounds: server optimisers and aggregation against Flower's own implementations on the same arrays,
client selection, the FedProx term, and two real rounds on a tiny random Whisper."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from fedwhisper.errors import FederatedError
from fedwhisper.federated.aggregation import ClientUpdate, aggregate_round
from fedwhisper.federated.proximal import proximal_term, proximal_trainer_class
from fedwhisper.federated.sampling import select_clients
from fedwhisper.federated.server_optimizer import ServerOptimizer
from fedwhisper.params import FederatedParams, params_from_dict

flwr_strategy = pytest.importorskip("flwr.serverapp.strategy")
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

# Whisper tensor names: the merge engine reads the round's models as Whisper checkpoints
SHAPES = {"model.encoder.layers.0.fc1.weight": (5, 7), "model.encoder.layers.0.fc1.bias": (5,),
          "model.decoder.layer_norm.weight": (7,)}


@pytest.fixture
def flower_messages(monkeypatch):
    """Build Flower reply messages outside a running app (Message needs a run id)."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    def make(arrays: dict[str, np.ndarray], n: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, dst_node_id=1, message_type="train")

    return make


def _arrays(rng, scale=1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _torch(arrays):
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


@pytest.mark.parametrize("name, cls", [("fedadam", "FedAdam"), ("fedyogi", "FedYogi"), ("fedadagrad", "FedAdagrad")])
def test_server_optimisers_match_flower(name, cls, flower_messages):
    rng = np.random.default_rng(0)
    kwargs = dict(eta=0.05, tau=1e-3) | ({} if name == "fedadagrad" else dict(beta_1=0.8, beta_2=0.95))
    flower = getattr(flwr_strategy, cls)(**kwargs)
    ours = ServerOptimizer(name, kwargs["eta"], kwargs.get("beta_1", 0.9), kwargs.get("beta_2", 0.99), kwargs["tau"])
    current = _arrays(rng)
    for rnd in range(1, 5):
        aggregate = {k: v + _arrays(rng, 0.1)[k] for k, v in current.items()}
        flower.current_arrays = {k: v.copy() for k, v in current.items()}
        record = ArrayRecord({k: Array(v.copy()) for k, v in aggregate.items()})
        with mock.patch.object(flwr_strategy.FedAvg, "aggregate_train", return_value=(record, None)):
            theirs, _ = flower.aggregate_train(rnd, [])
        mine = ours.step(rnd, _torch(current), _torch(aggregate))
        for k in SHAPES:
            np.testing.assert_allclose(mine[k].numpy(), theirs[k].numpy(), rtol=2e-6, atol=1e-7)
            assert not np.allclose(mine[k].numpy(), aggregate[k])  # an adaptive step, not plain FedAvg
        current = {k: theirs[k].numpy() for k in SHAPES}


def test_fedavg_server_step_is_the_aggregate_bit_for_bit_and_scales_with_lr():
    rng = np.random.default_rng(1)
    x, a = _torch(_arrays(rng)), _torch(_arrays(rng))
    out = ServerOptimizer("fedavg").step(1, x, a)
    assert all(torch.equal(out[k], a[k]) for k in SHAPES)
    half = ServerOptimizer("fedavg", eta=0.5).step(1, x, a)
    assert all(torch.allclose(half[k], x[k] + 0.5 * (a[k] - x[k])) for k in SHAPES)


def test_server_optimiser_refuses_a_mismatched_aggregate():
    x = {"a": torch.zeros(2, 2)}
    with pytest.raises(FederatedError, match="shape"):
        ServerOptimizer("fedadam").step(1, x, {"a": torch.zeros(2, 3)})
    with pytest.raises(FederatedError, match="different tensors"):
        ServerOptimizer("fedadam").step(1, x, {"b": torch.zeros(2, 2)})
    with pytest.raises(FederatedError, match="server_optimizer"):
        ServerOptimizer("sgd")


def _updates(rng, n=3):
    return [ClientUpdate(f"c{i}", _torch(_arrays(rng)), num_examples=3 + 4 * i, train_loss=1.0) for i in range(n)]


def test_fedavg_and_median_aggregation_match_flower(tmp_path, flower_messages):
    rng = np.random.default_rng(2)
    global_state = _torch(_arrays(rng))
    updates = _updates(rng, 4)
    for strategy, flower in [("fedavg", flwr_strategy.FedAvg()), ("median", flwr_strategy.FedMedian())]:
        fed = FederatedParams(strategy=strategy)
        mine, report = aggregate_round(1, global_state, updates, fed, tmp_path)
        theirs, _ = flower.aggregate_train(1, [flower_messages({k: v.numpy() for k, v in u.state.items()},
                                                               u.num_examples) for u in updates])
        for k in SHAPES:
            np.testing.assert_allclose(mine[k].numpy(), theirs[k].numpy(), rtol=1e-6, atol=1e-7)
        assert len(report.client_names) == 4
    assert not list(tmp_path.iterdir())  # the round's temporary files are gone


def test_aggregation_refuses_a_client_model_with_other_tensors(tmp_path):
    rng = np.random.default_rng(3)
    updates = _updates(rng, 2)
    del updates[1].state["model.decoder.layer_norm.weight"]
    with pytest.raises(FederatedError, match="client 'c1' sent a model whose tensors differ"):
        aggregate_round(1, _torch(_arrays(rng)), updates, FederatedParams(), tmp_path)


def test_unknown_strategy_names_the_federated_key(tmp_path):
    rng = np.random.default_rng(4)
    with pytest.raises(FederatedError, match="federated.strategy: unknown strategy 'fedsgd'"):
        aggregate_round(1, _torch(_arrays(rng)), _updates(rng, 2), FederatedParams(strategy="fedsgd"), tmp_path)


def test_client_selection_is_seeded_sized_and_order_independent():
    names = [f"c{i}" for i in range(10)]
    a = select_clients(names, 3, 0.3, 1, seed=7)
    assert len(a) == 3 and a == select_clients(names, 3, 0.3, 1, seed=7)
    assert set(a) == set(select_clients(list(reversed(names)), 3, 0.3, 1, seed=7))
    picks = {tuple(select_clients(names, r, 0.3, 1, seed=7)) for r in range(1, 9)}
    assert len(picks) > 1  # rounds differ
    assert select_clients(names, 1, 0.01, 4, seed=0).__len__() == 4  # min_fit_clients wins
    assert select_clients(names, 1, 1.0, 1, seed=0) == names
    with pytest.raises(FederatedError, match="12 clients needed"):
        select_clients(names, 1, 0.5, 12, seed=0)


def test_federated_params_validate_once():
    assert params_from_dict({}).federated == FederatedParams()
    with pytest.raises(Exception, match="federated.fraction_fit: got 0.0; must be > 0.0"):
        params_from_dict({"federated": {"fraction_fit": 0.0}})
    with pytest.raises(Exception, match="federated.server_optimizer: got 'adam'"):
        params_from_dict({"federated": {"server_optimizer": "adam"}})


def test_proximal_term_value_and_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert proximal_term(model, anchor, 0.5).item() == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    model.bias.requires_grad_(False)  # frozen parameters are not pulled back
    with torch.no_grad():
        model.bias.add_(5.0)
    term = proximal_term(model, anchor, 0.5)
    assert term.item() == pytest.approx(0.25 * 6)  # mu/2 * sum of 6 squared unit differences
    term.backward()
    torch.testing.assert_close(model.weight.grad, 0.5 * torch.ones(2, 3))


def test_proximal_trainer_adds_the_term_only_in_training():
    class Base:
        accelerator = mock.Mock(unwrap_model=lambda m: m)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = torch.tensor(1.0)
            return (loss, "out") if return_outputs else loss

    model = torch.nn.Linear(2, 1)
    anchor = {k: v.detach().clone() - 1.0 for k, v in model.named_parameters()}  # 3 entries, each 1 apart
    trainer = proximal_trainer_class(Base, anchor, 2.0)()
    assert trainer.compute_loss(model.train(), {}).item() == pytest.approx(1.0 + 3.0)
    loss, out = trainer.compute_loss(model, {}, return_outputs=True)
    assert out == "out" and loss.item() == pytest.approx(4.0)
    assert trainer.compute_loss(model.eval(), {}).item() == 1.0


# --------------------------------------------------------------------------- real rounds on a tiny random Whisper

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel".split()
TINY_FT = dict(batch_size=2, eval_max_items=2, learning_rate=1e-3, freeze_encoder=True, max_label_length=64)


def _rows(client: str, n: int, seed: int, split: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        samples = int(16000 * rng.uniform(0.4, 0.8))
        t = np.arange(samples) / 16000
        audio = (0.1 * np.sin(2 * np.pi * (150 + 40 * i + 300 * seed) * t)).astype(np.float32)
        rows.append({"id": f"{client}-{split}-{i:03d}", "client": client, "text": " ".join(rng.choice(WORDS, 3)),
                     "audio": audio, "duration_s": samples / 16000})
    return rows


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> Path:
    from fedwhisper.data.prepared import write_manifest, write_split

    root = tmp_path_factory.mktemp("fed_prepared")
    counts = {}
    for c, (n_train, seed) in {"s1": (4, 0), "s2": (6, 1)}.items():
        counts[c] = {split: write_split(root / c / f"{split}.arrow", _rows(c, n, seed + 10 * k, split))
                     for k, (split, n) in enumerate([("train", n_train), ("validation", 2), ("test", 2)])}
    write_manifest(root, counts, list(counts))
    return root


@pytest.fixture(scope="module")
def sites(tiny_random_dir, two_sites):
    from fedwhisper.federated.rounds import LocalClient
    from fedwhisper.params import FinetuneParams

    ft = FinetuneParams(**TINY_FT)
    return [LocalClient(ft, c, tiny_random_dir, two_sites) for c in ("s1", "s2")]


def test_two_rounds_change_the_global_model_and_record_per_round_metrics(sites, tmp_path):
    from fedwhisper.federated.rounds import model_state, run_rounds

    start = model_state(sites[0].template)
    seen = []
    fed = FederatedParams(rounds=2, local_steps=1, strategy="fedavg", server_optimizer="fedadam", server_lr=0.01)
    final, records = run_rounds(fed, sites, start, work_dir=tmp_path, evaluate=False,
                                on_round=lambda r, s: seen.append(r.server_round))
    assert seen == [1, 2] and [r.server_round for r in records] == [1, 2]
    changed = [k for k in start if not torch.equal(start[k], final[k])]
    assert any(k.startswith("model.decoder.") for k in changed)
    assert not any(k.startswith("model.encoder.") for k in changed)  # freeze_encoder: the encoder is never sent back changed
    for r in records:
        assert r.clients == ["s1", "s2"] and set(r.client_loss) == {"s1", "s2"}
        assert all(np.isfinite(v) for v in r.client_loss.values())
        assert r.client_examples == {"s1": 4, "s2": 6}
        assert r.merge["weights"] == pytest.approx({"s1": 0.4, "s2": 0.6})  # fedavg: by sample counts
        assert r.eval_wer is None  # evaluation off here; the Flower test below evaluates every round
    assert not list(tmp_path.iterdir())


def test_fedprox_changes_local_training_and_mu_zero_uses_the_plain_trainer(sites):
    from fedwhisper.federated.rounds import model_state

    site = sites[0]
    start = model_state(site.template)
    with mock.patch("fedwhisper.federated.proximal.proximal_trainer_class", wraps=proximal_trainer_class) as spy:
        plain = site.train(1, start, 2, proximal_mu=0.0)
        assert spy.call_count == 0
        again = site.train(1, start, 2, proximal_mu=0.0)
        prox = site.train(1, start, 2, proximal_mu=100.0)
        assert spy.call_count == 1
    assert all(torch.equal(plain.state[k], again.state[k]) for k in start)  # deterministic
    name = "model.decoder.layers.0.fc1.weight"
    assert not torch.equal(plain.state[name], prox.state[name])
    assert plain.num_examples == 4 and np.isfinite(prox.train_loss)


# --------------------------------------------------------------------------- the Flower apps

@pytest.fixture(scope="module")
def site_configs(tiny_random_dir, two_sites, tmp_path_factory):
    import yaml

    params = tmp_path_factory.mktemp("site") / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": TINY_FT}))
    return [{"client": c, "data-root": str(two_sites), "base-dir": str(tiny_random_dir), "params": str(params)}
            for c in ("s2", "s1")]


def test_flower_apps_run_two_rounds_in_process(site_configs, tmp_path):
    from fedwhisper.federated.flower import InProcessGrid, ensure_task_identity, run_server
    from fedwhisper.federated.rounds import model_state
    from fedwhisper.train.model_setup import load_base

    ensure_task_identity()
    start = model_state(load_base(Path(site_configs[0]["base-dir"]))[0])
    fed = FederatedParams(rounds=2, local_steps=1, strategy="median")
    grid = InProcessGrid(site_configs)
    final, records = run_server(grid, fed, start, work_dir=tmp_path, wait_for_nodes_s=5)
    assert [r.server_round for r in records] == [1, 2]
    assert all(r.clients == ["s1", "s2"] for r in records)  # selected and aggregated by name, not node id
    assert all(r.eval_wer is not None and np.isfinite(r.train_loss) for r in records)
    assert any(not torch.equal(start[k], final[k]) for k in start)


def test_flower_round_with_a_node_gone_keeps_the_last_global_model(site_configs, tmp_path):
    from fedwhisper.federated.flower import FedWhisperStrategy, InProcessGrid, ensure_task_identity, to_record
    from fedwhisper.federated.rounds import model_state
    from fedwhisper.train.model_setup import load_base

    ensure_task_identity()
    start = model_state(load_base(Path(site_configs[0]["base-dir"]))[0])
    grid = InProcessGrid(site_configs)
    finished = []
    strategy = FedWhisperStrategy(FederatedParams(rounds=2, local_steps=1, min_fit_clients=2), evaluate=False,
                                  work_dir=tmp_path, on_round=lambda r, s, opt: finished.append((r.server_round, s)),
                                  wait_for_nodes_s=1)
    arrays = to_record(start)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(),
                                                             grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [r for r, _ in finished] == [1]
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    grid.down.add(messages[0].metadata.dst_node_id)  # a SuperNode dies mid-round: its reply never comes
    gone = grid.nodes[messages[0].metadata.dst_node_id]["client"]
    with pytest.raises(FederatedError, match="1 client model.s. came back, fewer than federated.min_fit_clients=2"
                       ) as failed:
        strategy.aggregate_train(2, grid.send_and_receive(messages))
    assert f"({gone}: no reply in time)" in str(failed.value)  # the site that failed, by client name
    assert [r for r, _ in finished] == [1]  # round 1's model is the last finished one, untouched
    assert all(torch.equal(finished[0][1][k], strategy.current[k]) for k in start)


def test_federate_stage_writes_a_loadable_model_and_round_curves(tiny_random_dir, two_sites, tmp_path):
    import yaml

    from fedwhisper.federated.stage import run_federate
    from fedwhisper.formats.hf import is_hf_whisper_dir, load_whisper_model

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"clients": ["s1", "s2"], "finetune": TINY_FT,
                                      "federated": {"rounds": 2, "local_steps": 1, "fraction_fit": 0.5}}))
    out, metrics_dir = tmp_path / "models" / "federated", tmp_path / "metrics" / "federated"
    metrics = run_federate(params, base_dir=tiny_random_dir, data_root=two_sites, out_dir=out,
                           metrics_dir=metrics_dir, evaluate=False)
    assert is_hf_whisper_dir(out) and load_whisper_model(out) is not None
    assert metrics["rounds_done"] == 2 and all(len(c) == 1 for c in metrics["clients_per_round"])
    rounds = (metrics_dir / "rounds.tsv").read_text().splitlines()
    assert rounds[0].split("\t") == ["round", "train_loss", "eval_loss", "eval_wer", "seconds"] and len(rounds) == 3
    assert len((metrics_dir / "client_loss.tsv").read_text().splitlines()) == 3  # header + one client per round
    live = metrics_dir / "live" / "plots" / "metrics"  # the DVCLive curves, x = step = round
    assert (live / "train" / "loss.tsv").read_text().splitlines()[0].split("\t")[:2] == ["step", "loss"]
    assert [ln.split("\t")[0] for ln in (live / "train" / "loss.tsv").read_text().splitlines()[1:]] == ["1", "2"]
    picked = [c for (c,) in metrics["clients_per_round"]]
    for client in set(picked):
        steps = [ln.split("\t")[0] for ln in (live / "client" / client / "train_loss.tsv").read_text().splitlines()[1:]]
        assert steps == [str(r + 1) for r, c in enumerate(picked) if c == client]
    assert not (live / "global").exists()  # evaluate=False: no validation curves
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["client_loss.tsv", "live", "metrics.json", "rounds.tsv"]
    assert json.loads((metrics_dir / "metrics.json").read_text())["rounds_done"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["federated", "federated_resume"]  # no temp files left


def test_federate_resumes_after_the_last_finished_round(tiny_random_dir, two_sites, tmp_path):
    """Raising federated.rounds continues the run: only the new round trains, and the result equals a run of all
    rounds at once (training and the server optimiser's moments are restored exactly)."""
    import yaml

    from fedwhisper.federated.stage import run_federate
    from fedwhisper.formats.hf import read_state_dict

    def run(tag: str, rounds: int, resume: Path) -> dict:
        params = tmp_path / f"{tag}.yaml"
        params.write_text(yaml.safe_dump({"clients": ["s1", "s2"], "finetune": TINY_FT, "federated": {
            "rounds": rounds, "local_steps": 1, "server_optimizer": "fedadam", "server_lr": 0.01}}))
        return run_federate(params, base_dir=tiny_random_dir, data_root=two_sites, out_dir=tmp_path / tag,
                            metrics_dir=tmp_path / f"metrics-{tag}", resume_dir=resume, evaluate=False)

    assert run("a", 1, tmp_path / "resume-a")["resumed_after_round"] == 0
    again = run("a", 2, tmp_path / "resume-a")
    assert again["resumed_after_round"] == 1 and again["rounds_done"] == 2
    assert len((tmp_path / "metrics-a" / "rounds.tsv").read_text().splitlines()) == 3  # rounds 1 and 2
    loss_curve = tmp_path / "metrics-a" / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(loss_curve.read_text().splitlines()) == 3  # the resumed run's curve has round 1 too
    straight = run("b", 2, tmp_path / "resume-b")
    assert straight["resumed_after_round"] == 0
    a, b = read_state_dict(tmp_path / "a"), read_state_dict(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
