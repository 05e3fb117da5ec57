"""Merge edge cases: one weights rule, screening fallbacks, DARE masks by identity, FedAvg sample counts, reserved
names, exact TIES counts, checks before the merge, params that take effect, and the strategy registry."""

import dataclasses
import importlib
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedwhisper.errors import MergeError, ParamsError
from fedwhisper.formats.naming import hf_to_openai
from fedwhisper.merge import run_aggregate_stage
from fedwhisper.merge.strategies import (
    REGISTRY, DareLinear, Strategy, TensorContext, Ties, _topk_mask, keep_count, make_strategy, register,
    weighted_sum,
)
from fedwhisper.params import params_from_dict
from test_aggregate_stage import K, client_state, project, write_client_dir

aggregate_module = importlib.import_module("fedwhisper.merge.aggregate")
ROOT = Path(__file__).resolve().parents[1]
ENC = "model.encoder.layers.0.fc1.weight"


@pytest.fixture(scope="module")
def base_state(tiny_random_dir):
    return load_file(str(tiny_random_dir / "model.safetensors"))


@pytest.fixture
def four(tmp_path, tiny_random_dir, base_state, monkeypatch):
    """A project with clients a-d (d a scaled outlier that screening flags) in models/clients; cwd = project."""
    def make(aggregation, outlier=False, clients="abcd"):
        proj = project(tmp_path, tiny_random_dir, aggregation, clients=tuple(clients))
        states = [client_state(base_state, s) for s in range(len(clients))]
        if outlier:
            states[-1] = client_state(base_state, 99, scale=1.0)
        for name, s in zip(clients, states):
            write_client_dir(proj / "models" / "clients" / name, tiny_random_dir, s)
        monkeypatch.chdir(proj)
        return states
    return make


def merged(key=K):
    return load_file("models/aggregated/model.safetensors")[key]


# --------------------------------------------------------------------------- one weights rule


@pytest.mark.parametrize("aggregation, match", [
    ({"strategy": "uniform", "preset": "bias_best_light"}, "strategy=uniform weighs every client equally, but "
                                                           "aggregation.preset is set"),
    ({"strategy": "uniform", "weights": [1, 2, 3, 4]}, "strategy=uniform weighs every client equally, but "
                                                        "aggregation.weights is set"),
    ({"strategy": "fedavg", "weights": [1, 2, 3, 4]}, "strategy=fedavg weighs by train sample counts, but "
                                                      "aggregation.weights is set"),
])
def test_weights_that_contradict_the_strategy_are_refused(four, aggregation, match):
    four(aggregation)
    with pytest.raises(MergeError, match=match):
        run_aggregate_stage("params.yaml")
    assert not Path("models/aggregated").exists()


def test_uniform_alone_and_mean_with_weights_work(four):
    states = four({"strategy": "uniform"})
    m = run_aggregate_stage("params.yaml")
    assert [m[f"weight/{c}"] for c in "abcd"] == [0.25] * 4 and m["weight_source"] == "uniform"
    torch.testing.assert_close(merged(), sum(s[K] for s in states) / 4)


# --------------------------------------------------------------------------- screening fallbacks


def test_screening_exclude_with_module_weights_keeps_the_base_where_only_the_excluded_client_weighed(
        four, base_state):
    states = four({"screening": {"exclude": True}, "module_weights": {r"encoder\.": [0, 0, 0, 1]}}, outlier=True)
    m = run_aggregate_stage("params.yaml")
    assert m["excluded/d"] is True
    torch.testing.assert_close(merged(ENC), base_state[ENC])  # d alone weighed the encoder, and d is out
    torch.testing.assert_close(merged(K), sum(s[K] for s in states[:3]) / 3)


def test_krum_with_module_weights_keeps_the_base_where_the_selected_client_has_weight_zero(four, base_state):
    four({"strategy": "krum", "f": 0, "module_weights": {r"encoder\.": [0, 0, 0, 1]}}, outlier=True)
    m = run_aggregate_stage("params.yaml")
    assert m["selected/d"] is False
    torch.testing.assert_close(merged(ENC), base_state[ENC])


# --------------------------------------------------------------------------- DARE masks by identity


def test_dare_masks_follow_the_client_name_not_its_position():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g)
    xa, xb = base + torch.randn(1000, generator=g), base + torch.randn(1000, generator=g)
    dare = DareLinear(density=0.3)

    def alone(x, name):
        return dare.merge([x], [1.0], base, TensorContext(name="t", seed=3, clients=(name,))) - base

    pair = dare.merge([xa, xb], [0.5, 0.5], base, TensorContext(name="t", seed=3, clients=("a", "b")))
    swapped = dare.merge([xb, xa], [0.5, 0.5], base, TensorContext(name="t", seed=3, clients=("b", "a")))
    expected = base + 0.5 * alone(xa, "a") + 0.5 * alone(xb, "b")
    torch.testing.assert_close(pair, expected)
    torch.testing.assert_close(swapped, expected)


def test_dare_merge_of_a_client_is_unchanged_when_another_is_added(four):
    """b and c keep their masks whether a is merged or not (a, first by name, would shift their positions)."""
    four({"strategy": "dare_linear", "density": 0.5, "weights": [0, 1, 1, 0]})
    run_aggregate_stage("params.yaml")
    without_a = merged()
    m = run_aggregate_stage("params.yaml", weights=[1e-9, 1, 1, 0])
    assert m["read/a"] is True
    # a's own contribution at weight 1e-9 is far below the tolerance; b's and c's masks are the same
    torch.testing.assert_close(merged(), without_a, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- FedAvg sample counts


def test_fedavg_reads_train_samples_from_pt_inputs(tmp_path, tiny_random_dir, base_state, monkeypatch):
    proj = project(tmp_path, tiny_random_dir, {"strategy": "fedavg", "source": "checkpoints"}, clients=())
    (proj / "checkpoints").mkdir()
    states = [client_state(base_state, s) for s in range(3)]
    for name, s, n, key in zip("abc", states, (10, 30, 60), ("train_samples", "num_train_samples", "train_samples")):
        torch.save({"model_state_dict": {hf_to_openai(k): v for k, v in s.items()}, key: n},
                   proj / "checkpoints" / f"{name}.pt")
    monkeypatch.chdir(proj)
    m = run_aggregate_stage("params.yaml")
    assert [m[f"weight/{c}"] for c in "abc"] == [0.1, 0.3, 0.6] and m["weight_source"] == "fedavg"
    torch.testing.assert_close(merged(), 0.1 * states[0][K] + 0.3 * states[1][K] + 0.6 * states[2][K])


def test_fedavg_names_a_malformed_training_summary(four):
    four({"strategy": "fedavg"})
    for c in "abcd":
        Path(f"models/clients/{c}/training_summary.json").write_text(json.dumps({"train_samples": 5}))
    Path("models/clients/c/training_summary.json").write_text("{not json")
    with pytest.raises(Exception) as err:
        run_aggregate_stage("params.yaml")
    assert "models/clients/c/training_summary.json: not valid JSON" in str(err.value)


def test_no_unused_training_summary_path_in_aggregate():
    assert not hasattr(aggregate_module, "train_samples")


# --------------------------------------------------------------------------- reserved names


def test_a_client_named_base_is_refused(tmp_path, tiny_random_dir, base_state, monkeypatch):
    with pytest.raises(ParamsError, match="clients: 'base' is reserved"):
        params_from_dict({"clients": ["a", "base"]})
    a = write_client_dir(tmp_path / "a", tiny_random_dir, client_state(base_state, 1))
    b = write_client_dir(tmp_path / "base", tiny_random_dir, client_state(base_state, 2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MergeError, match="client name 'base' .* is reserved for the base model"):
        run_aggregate_stage("none.yaml", checkpoints=[str(a), str(b)], base=str(tiny_random_dir),
                            out=str(tmp_path / "out"), metrics=None)


# --------------------------------------------------------------------------- TIES exact count and ties


def test_ties_keep_count_is_exact():
    assert keep_count(0.55, 100) == 55  # the float product is 55.000000000000007
    assert keep_count(0.1, 30) == 3 and keep_count(0.5, 3) == 2 and keep_count(1.0, 7) == 7
    assert int(_topk_mask(torch.arange(100.0), 0.55).sum()) == 55


def test_ties_trim_breaks_equal_magnitudes_by_lowest_index():
    tau = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0, 1.0])
    # keep 3 of 6: the 2.0, then the two lowest indices among the five magnitudes of 1
    assert _topk_mask(tau, 0.5).tolist() == [True, True, True, False, False, False]
    big = torch.ones(10_000)
    assert _topk_mask(big, 0.25).nonzero().reshape(-1).tolist() == list(range(2500))
    assert "lowest flat indices" in Ties.__doc__


# --------------------------------------------------------------------------- checks before the merge


def test_a_duplicate_input_is_refused_before_any_tensor_is_merged(four, monkeypatch):
    four({})
    shutil.rmtree("models/clients/c")
    shutil.copytree("models/clients/a", "models/clients/c")

    def must_not_merge(*a, **k):
        raise AssertionError("merge started")

    monkeypatch.setattr(aggregate_module, "merge_checkpoints", must_not_merge)
    with pytest.raises(MergeError, match=r"clients 'a' and 'c' are the same file \(sha256 [0-9a-f]{12}\.\.\.: models/clients/a and "):
        run_aggregate_stage("params.yaml")


def test_a_shape_mismatch_is_refused_before_any_tensor_is_merged(four, monkeypatch, base_state):
    four({})
    bad = dict(load_file("models/clients/b/model.safetensors"))
    bad[K] = bad[K][:, :-1].contiguous()
    from safetensors.torch import save_file

    save_file(bad, "models/clients/b/model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(aggregate_module, "merge_checkpoints", lambda *a, **k: pytest.fail("merge started"))
    with pytest.raises(Exception, match=f"tensor '{K}' has shape"):
        run_aggregate_stage("params.yaml")


# --------------------------------------------------------------------------- params that take effect


def test_params_a_strategy_ignores_are_warned_about_and_not_recorded(four, caplog):
    four({"density": 0.3, "lambda_": 2.0})
    with caplog.at_level(logging.WARNING):
        m = run_aggregate_stage("params.yaml")
    assert "aggregation.density=0.3 has no effect on strategy mean" in caplog.text
    assert "aggregation.lambda_=2.0 has no effect" in caplog.text
    assert not any(k.startswith("param/") for k in m)
    with safe_open("models/aggregated/model.safetensors", "pt") as f:
        recorded = json.loads(f.metadata()["fedwhisper.params"])
    assert "density" not in recorded and "lambda_" not in recorded and recorded["strategy"] == "mean"

    caplog.clear()
    m = run_aggregate_stage("params.yaml", strategy="ties")
    assert m["param/density"] == 0.3 and m["param/lambda_"] == 2.0 and "has no effect" not in caplog.text


def test_median_weights_only_select_and_are_recorded_as_such(four, caplog):
    states = four({"strategy": "median", "weights": [1, 2, 0, 1]})
    with caplog.at_level(logging.WARNING):
        m = run_aggregate_stage("params.yaml")
    assert "median is unweighted; aggregation.weights only selects" in caplog.text
    assert [m[f"weight/{c}"] for c in "abcd"] == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])
    assert m["weight_source"] == "weights (selection)"
    torch.testing.assert_close(merged(), torch.stack([states[i][K] for i in (0, 1, 3)]).median(dim=0).values)


# --------------------------------------------------------------------------- the registry


def test_a_new_strategy_is_one_registered_class(four):
    sys.path.insert(0, str(ROOT / "scripts"))
    import sweep

    @register("negated_mean_for_test", sweep=("aggregation.f=0",))
    @dataclasses.dataclass(frozen=True)
    class NegatedMean(Strategy):
        name = "negated_mean_for_test"

        def merge(self, xs, w, base, ctx):
            return -weighted_sum(xs, w, ctx.dtype)

    try:
        states = four({"strategy": "negated_mean_for_test"})
        m = run_aggregate_stage("params.yaml")
        assert m["strategy"] == "negated_mean_for_test"
        torch.testing.assert_close(merged(), -sum(s[K] for s in states) / 4)
        assert isinstance(make_strategy("negated_mean_for_test"), NegatedMean)
        assert sweep.experiments()["sweep-negated-mean-for-test"] == [
            "aggregation.strategy=negated_mean_for_test", "aggregation.f=0"]
    finally:
        REGISTRY.pop("negated_mean_for_test")
    with pytest.raises(MergeError, match="aggregation.strategy: unknown strategy 'negated_mean_for_test'"):
        run_aggregate_stage("params.yaml")


def test_engine_has_no_strategy_special_case():
    engine = (ROOT / "src/fedwhisper/merge/engine.py").read_text()
    assert "Krum" not in engine.split('"""', 2)[2].replace("(Krum)", "")
