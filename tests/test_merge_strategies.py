"""Merge strategies on small plain tensors, against results computed by hand."""

import math

import numpy as np
import pytest
import torch

from fedwhisper.errors import MergeError
from fedwhisper.merge.presets import PRESETS, preset_weights
from fedwhisper.merge.screening import ScreeningStats, flag_clients
from fedwhisper.merge.strategies import (
    DareLinear, DareTies, Krum, Median, TaskArithmetic, TensorContext, Ties, TrimmedMean, WeightedMean,
    make_strategy, normalise_weights,
)

CTX = TensorContext(name="t", dtype=torch.float32, seed=0)


def T(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_normalise_weights_scales_any_nonnegative_numbers():
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    assert normalise_weights([0, 2, 2], 3) == [0.0, 0.5, 0.5]


@pytest.mark.parametrize("weights, match", [
    ([0.5, 0.5, 0.5], r"aggregation.weights: got 3 weights for 2 clients"),
    ([1.0, -0.1], r"aggregation.weights\[1\]: got -0.1; weights must be non-negative"),
    ([0.0, 0.0], r"aggregation.weights: all weights are zero"),
    ([float("nan"), 1.0], r"aggregation.weights\[0\]: got nan; every weight must be a finite number"),
    ([float("inf"), 1.0], r"finite"),
])
def test_normalise_weights_rejects_bad_lists(weights, match):
    with pytest.raises(MergeError, match=match):
        normalise_weights(weights, 2)


def test_weighted_mean_by_hand():
    out = WeightedMean().merge([T(1, 2), T(3, 4)], [0.25, 0.75], None, CTX)
    assert torch.allclose(out, T(2.5, 3.5))


def test_weighted_mean_accumulates_half_inputs_in_float32_and_float64():
    xs = [torch.full((3,), 1.0, dtype=torch.float16), torch.full((3,), 2.0, dtype=torch.float16)]
    out32 = WeightedMean().merge(xs, [0.1, 0.9], None, CTX)
    out64 = WeightedMean().merge(xs, [0.1, 0.9], None, TensorContext(dtype=torch.float64))
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert torch.allclose(out64, torch.full((3,), 1.9, dtype=torch.float64), atol=1e-12)


def test_task_arithmetic_by_hand():
    # tau1 = [1, 2], tau2 = [-1, 0]; mean tau = [0, 1]; b + 2 * [0, 1] = [1, 3]
    out = TaskArithmetic(lambda_=2.0).merge([T(2, 3), T(0, 1)], [0.5, 0.5], T(1, 1), CTX)
    assert torch.allclose(out, T(1, 3))


def test_delta_strategies_need_a_base():
    with pytest.raises(MergeError, match="needs a base model"):
        TaskArithmetic().merge([T(1)], [1.0], None, CTX)


def test_ties_by_hand():
    # density 0.5 keeps the top 2 of 4 entries per client:
    # x1 [3,-1,.5,2] -> [3,0,0,2]; x2 [-2,-2,1,.1] -> [-2,-2,0,0]; x3 [1,3,-.2,.3] -> [1,3,0,0]
    # sum [2,1,0,2] -> gamma [+,+,0,+]; disjoint means: [(3+1)/2, 3, 0, 2]
    xs = [T(3, -1, 0.5, 2), T(-2, -2, 1, 0.1), T(1, 3, -0.2, 0.3)]
    out = Ties(density=0.5, lambda_=1.0).merge(xs, [1 / 3] * 3, torch.zeros(4), CTX)
    assert torch.allclose(out, T(2, 3, 0, 2))
    out = Ties(density=0.5, lambda_=0.5).merge([x + 10 for x in xs], [1 / 3] * 3, torch.full((4,), 10.0), CTX)
    assert torch.allclose(out, T(11, 11.5, 10, 11))


def test_ties_weights_count_in_election_and_mean():
    # weights [.8,.2]: gamma = sign(.8*1 + .2*(-3)) = +; only client 1 agrees -> 1
    out = Ties(density=1.0).merge([T(1.0), T(-3.0)], [0.8, 0.2], T(0.0), CTX)
    assert torch.allclose(out, T(1.0))


def test_dare_linear_full_density_equals_task_arithmetic():
    xs, b = [T(2, 3), T(0, 1)], T(1, 1)
    assert torch.allclose(DareLinear(density=1.0, lambda_=2.0).merge(xs, [0.5, 0.5], b, CTX),
                          TaskArithmetic(lambda_=2.0).merge(xs, [0.5, 0.5], b, CTX))


def test_dare_drops_and_rescales_seeded():
    tau = torch.full((20000,), 1.0)
    out = DareLinear(density=0.25).merge([tau], [1.0], torch.zeros(20000), CTX)
    kept = out != 0
    assert torch.all(out[kept] == 4.0)  # rescaled by 1 / density
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = DareLinear(density=0.25).merge([tau], [1.0], torch.zeros(20000), CTX)
    other = DareLinear(density=0.25).merge([tau], [1.0], torch.zeros(20000), TensorContext(name="t", seed=1))
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


def test_dare_ties_full_density_equals_ties():
    xs = [T(3, -1, 0.5, 2), T(-2, -2, 1, 0.1), T(1, 3, -0.2, 0.3)]
    assert torch.allclose(DareTies(density=1.0).merge(xs, [1 / 3] * 3, torch.zeros(4), CTX),
                          Ties(density=1.0).merge(xs, [1 / 3] * 3, torch.zeros(4), CTX))


def test_median_odd_and_even():
    assert torch.allclose(Median().merge([T(1, 9), T(5, 0), T(3, 4)], [1 / 3] * 3, None, CTX), T(3, 4))
    assert torch.allclose(Median().merge([T(1), T(2), T(10), T(20)], [0.25] * 4, None, CTX), T(6))


def test_trimmed_mean_by_hand():
    # beta .25 of 4 -> trim 1 from each end: mean(2, 10) = 6
    out = TrimmedMean(beta=0.25).merge([T(100), T(2), T(1), T(10)], [0.25] * 4, None, CTX)
    assert torch.allclose(out, T(6))
    # beta .2 of 4 -> trim 0: plain mean
    assert torch.allclose(TrimmedMean(beta=0.2).merge([T(100), T(2), T(1), T(10)], [0.25] * 4, None, CTX),
                          T(113 / 4))


def _dist2(points):
    p = np.array(points, dtype=float)
    return ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)


def test_krum_scores_and_selection_by_hand():
    # 1-D points 0, 1, 2, 3, 100; n=5, f=1 -> each score sums the n-f-2 = 2 nearest squared distances
    d = _dist2([[0], [1], [2], [3], [100]])
    k = Krum(f=1, m=1)
    assert list(k.scores(d)) == [1 + 4, 1 + 1, 1 + 1, 1 + 4, 97 ** 2 + 98 ** 2]
    assert k.select(d) == [1]
    assert Krum(f=1, m=None).select(d) == [1, 2, 0, 3]  # m = n - f = 4; the outlier is dropped


def test_krum_needs_more_than_2f_plus_2_clients():
    with pytest.raises(MergeError, match=r"needs more than 2f \+ 2 = 4 clients, got 4"):
        Krum(f=1).select(_dist2([[0], [1], [2], [3]]))


def test_make_strategy_unknown_name():
    with pytest.raises(MergeError, match="unknown strategy 'avg'"):
        make_strategy("avg")


def test_presets_are_the_seed_weightings():
    assert len(PRESETS) == 10
    assert preset_weights("bias_best_heavy", 4) == [0.7, 0.1, 0.1, 0.1]
    assert preset_weights("poisson_weights", 4) == [0.537, 0.268, 0.134, 0.061]
    for name, w in PRESETS.items():
        assert math.isclose(sum(w), 1.0, abs_tol=1e-9), name
    with pytest.raises(MergeError, match="defined for 4 clients, but 3 were given"):
        preset_weights("equal_avg", 3)
    with pytest.raises(MergeError, match="unknown preset"):
        preset_weights("nope", 4)


def test_screening_statistics_by_hand():
    base = torch.zeros(2)
    xs = [T(1, 0), T(0, 1), T(-2, -2)]
    stats = ScreeningStats(3, with_base=True, pairwise=True)
    stats.update("t", xs, base)
    # mean delta = [-1/3, -1/3]
    assert stats.l2_to_base == pytest.approx([1.0, 1.0, math.sqrt(8)])
    c = -1 / 3 / (math.sqrt(2) / 3)
    assert stats.cosine_to_mean == pytest.approx([c, c, 1.0])
    r = 1 / math.sqrt(2)
    # norms 1, 1, 2.83 (median 1): clipped, the third counts 1/2.83 of itself, and the clipped mean is
    # ((1, 0) + (0, 1) + (-1, -1)/sqrt(2)) / 3, along (1, 1): the large client is the one that points away
    assert stats.cosine_to_clipped_mean == pytest.approx([r, r, -1.0])
    assert stats.dist2[0, 1] == pytest.approx(2.0) and stats.dist2[0, 2] == pytest.approx(13.0)
    flags = flag_clients(stats, max_cosine_distance=1.0, max_norm_ratio=5.0)
    assert flags == [None, None, "cosine to the norm-clipped mean delta -1.000 < 0.000"]

    xs = [T(1, 0), T(1, 1), T(0, 1), T(-2, -2)]  # median norm (1 + 1.414) / 2: the clipped mean is along (1, 1)
    stats = ScreeningStats(4, with_base=True)
    stats.update("t", xs, base)
    assert stats.cosine_to_clipped_mean == pytest.approx([r, 1.0, r, -1.0])
    assert flag_clients(stats, max_cosine_distance=1.0, max_norm_ratio=5.0)[:3] == [None, None, None]
    assert flag_clients(stats, max_cosine_distance=0.25, max_norm_ratio=5.0)[:3] == [
        "cosine to the norm-clipped mean delta 0.707 < 0.750", None, "cosine to the norm-clipped mean delta 0.707 < 0.750"]


def test_screening_is_not_steered_by_a_scaled_sign_flip():
    """Four honest, correlated updates and a fifth client sending base - 4.5 x their mean update. Against the mean
    delta the attacker looked perfect (cosine 1.0) and every honest client pointed away (this happened on the
    default clients: exclusion by the mean dropped all four and kept the attacker, whose norm was only 3.3x the
    median). Against the norm-clipped mean only the attacker is flagged."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, generator=g)
    shared = torch.randn(4000, generator=g)
    honest = [base + shared + 0.8 * torch.randn(4000, generator=g) for _ in range(4)]
    attacker = base - 4.5 * torch.stack([h - base for h in honest]).mean(0)
    stats = ScreeningStats(5, with_base=True)
    stats.update("t", [x.clone() for x in [*honest, attacker]], base)
    assert stats.cosine_to_mean[4] > 0.99 and max(stats.cosine_to_mean[:4]) < -0.5  # the mean is captured
    assert stats.l2_to_base[4] < 5 * sorted(stats.l2_to_base)[2]  # and the norm check does not catch it
    assert min(stats.cosine_to_clipped_mean[:4]) > 0.5 and stats.cosine_to_clipped_mean[4] < -0.9
    flags = flag_clients(stats, max_cosine_distance=1.0, max_norm_ratio=5.0)
    assert flags[:4] == [None] * 4 and flags[4].startswith("cosine to the norm-clipped mean delta -")


def test_screening_keeps_honest_clients_with_orthogonal_deltas():
    """Independent (nearly orthogonal) honest deltas, as task vectors of different tasks often are, all agree with
    the clipped mean they are part of (here 0.18-0.53: the smallest delta counts least); none is flagged."""
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(20000)
    xs = [torch.randn(20000, generator=g) * (1 + i) for i in range(5)]
    stats = ScreeningStats(5, with_base=True)
    stats.update("t", xs, base)
    assert min(stats.cosine_to_clipped_mean) > 0.1
    assert flag_clients(stats, max_cosine_distance=1.0, max_norm_ratio=5.0) == [None] * 5


@pytest.mark.parametrize("n", range(1, 21))
def test_sort_coordinates_equals_msort(n):
    """The sorting network (up to 16 inputs) and the msort fallback give exactly msort's values, ties included."""
    from fedwhisper.merge.strategies import sort_coordinates

    g = torch.Generator().manual_seed(n)
    xs = [torch.randint(-3, 4, (3, 500), generator=g).float() if n % 2 else torch.randn(3, 500, generator=g)
          for _ in range(n)]
    got = sort_coordinates(xs)
    assert len(got) == n
    assert torch.equal(torch.stack(got), torch.msort(torch.stack(xs)))


def test_screening_counts_nonfinite_and_flags_norm_outlier():
    base = torch.zeros(3)
    xs = [T(1, 1, 1), T(1, 1, 1.1), T(float("nan"), 1, float("inf")), T(50, 50, 50)]
    stats = ScreeningStats(4, with_base=True)
    stats.update("model.decoder.x", xs, base)
    assert stats.nonfinite == [0, 0, 2, 0]
    flags = flag_clients(stats, max_cosine_distance=1.0, max_norm_ratio=5.0)
    assert "non-finite" in flags[2] and "model.decoder.x" in flags[2]
    assert "norm" in flags[3]
    assert flags[0] is None and flags[1] is None
