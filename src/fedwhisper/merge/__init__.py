"""Merging client models: strategies (maths), a streaming engine (I/O), screening, presets, and the stage call."""

from fedwhisper.merge.aggregate import aggregate, run_aggregate_stage
from fedwhisper.merge.engine import MergePlan, MergeReport, merge_checkpoints, validate_inputs
from fedwhisper.merge.presets import PRESETS, preset_weights
from fedwhisper.merge.strategies import STRATEGIES, Strategy, TensorContext, make_strategy, normalise_weights

__all__ = [
    "aggregate", "run_aggregate_stage", "MergePlan", "MergeReport", "merge_checkpoints", "validate_inputs",
    "PRESETS", "preset_weights", "STRATEGIES", "Strategy", "TensorContext", "make_strategy", "normalise_weights",
]
