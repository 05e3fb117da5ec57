"""The seed pipeline's ten named weightings (seed 000, ``run_aggregation_configs.py``), for four clients."""

from __future__ import annotations

from fedwhisper.errors import MergeError

PRESETS: dict[str, tuple[float, ...]] = {
    "equal_avg": (0.25, 0.25, 0.25, 0.25),
    "bias_best_light": (0.4, 0.3, 0.2, 0.1),
    "bias_best_heavy": (0.7, 0.1, 0.1, 0.1),
    "diagonal_balance": (0.4, 0.1, 0.1, 0.4),
    "split_cluster_A": (0.5, 0.5, 0.0, 0.0),
    "split_cluster_B": (0.0, 0.0, 0.5, 0.5),
    "drop_model_1": (0.0, 0.33, 0.33, 0.34),
    "drop_model_4": (0.34, 0.33, 0.33, 0.0),
    "bad_run_noise": (0.99, 0.01, 0.0, 0.0),
    "poisson_weights": (0.537, 0.268, 0.134, 0.061),
}


def preset_weights(name: str, n_clients: int) -> list[float]:
    """Raw weights of a named preset; MergeError for an unknown name or a client count other than four."""
    if name not in PRESETS:
        raise MergeError(f"aggregation.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    weights = PRESETS[name]
    if n_clients != len(weights):
        raise MergeError(
            f"aggregation.preset={name!r} is defined for {len(weights)} clients, but {n_clients} were given; "
            "use aggregation.weights instead"
        )
    return list(weights)
