"""The `evaluate:` params section, with command-line overrides, for the evaluate stage and the transcribe CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from fedwhisper.errors import ParamsError
from fedwhisper.params import EvaluateParams, load_params, params_from_dict, to_dict


LANGUAGE_AUTO = "auto"  # --language auto on the command line: evaluate.language null (auto-detect)
LANGUAGE_HELP = "Whisper language code (de, en, ...), or 'auto' to detect each clip's language (evaluate.language null)"


def evaluate_params_with_overrides(params_path: str | Path | None, overrides: Mapping[str, Any]) -> EvaluateParams:
    """``evaluate:`` from ``params_path`` (defaults when the file is absent), then every non-None override whose
    name is an EvaluateParams field, validated like params.yaml (``language="auto"`` means null: auto-detect)."""
    path = Path(params_path) if params_path else None
    base = load_params(path, stage="evaluate").evaluate if path is not None and path.is_file() else EvaluateParams()
    if path is not None and not path.is_file() and str(path) != "params.yaml":
        raise ParamsError(f"{path}: params file not found; pass an existing --params file or omit it")
    fields = {f.name for f in dataclasses.fields(EvaluateParams)}
    changes = {k: v for k, v in overrides.items() if k in fields and v is not None}
    if changes.get("language") == LANGUAGE_AUTO:
        changes["language"] = None  # auto-detect; any other value is checked by params.check_language
    if not changes:
        return base
    return params_from_dict({"evaluate": {**to_dict(base), **changes}}).evaluate
