"""dvc.yaml cannot drift from the code: every stage lists the fedwhisper modules its command can import, and the
params sections its code reads.

Modules: for each stage (foreach stages expanded, ``${item}`` / ``${key}`` / ``${a.b}`` resolved from params.yaml),
the static closure of ``fedwhisper`` imports of its ``stages/X.py`` (imports inside functions included, since they
run on some path), every module of which must be covered by a dep (a directory dep covers everything under it).

Params: a stage script reads params.yaml only through ``load_params(..., stage=...)``, which hands out only the
sections ``params.STAGE_SECTIONS`` declares for it (any other section raises when touched, so the declaration is
checked every time the stage runs); here those declarations are compared with each stage's ``params:``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedwhisper.errors import ParamsError
from fedwhisper.params import STAGE_SECTIONS, Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


# --------------------------------------------------------------------------- dvc.yaml, expanded


def _lookup(data, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _resolve(value, context: dict):
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{([^}]+)\}", value.strip())
        if whole:
            return _lookup(context, whole.group(1).strip())
        return re.sub(r"\$\{([^}]+)\}", lambda m: str(_lookup(context, m.group(1).strip())), value)
    if isinstance(value, list):
        return [_resolve(v, context) for v in value]
    if isinstance(value, dict):
        return {_resolve(k, context): _resolve(v, context) for k, v in value.items()}
    return value


def expanded_stages(root: Path = ROOT) -> dict[str, dict]:
    """``{stage name: {cmd, deps, params}}`` with foreach stages expanded as DVC does (``name@key``).

    The stages of the pipelines kept apart from the default one (``pipelines/*/dvc.yaml``, run from the project
    root with ``wdir: ../..``) are included as ``<file>:<name>``, as DVC names them."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    out = {}
    for path in [root / "dvc.yaml", *sorted(root.glob("pipelines/*/dvc.yaml"))]:
        dvc = yaml.safe_load(path.read_text())
        prefix = "" if path.parent == root else f"{path.relative_to(root).as_posix()}:"
        for name, st in dvc["stages"].items():
            if "foreach" in st:
                items = _resolve(st["foreach"], params)
                pairs = items.items() if isinstance(items, dict) else ((str(v), v) for v in items)
                for key, item in pairs:
                    out[f"{prefix}{name}@{key}"] = _resolve(st["do"], {**params, "item": item, "key": key})
            else:
                out[f"{prefix}{name}"] = _resolve(st, params)
    return out


def _dep_path(dep) -> str:
    return str(next(iter(dep)) if isinstance(dep, dict) else dep).rstrip("/")


def stage_script(stage: dict) -> str | None:
    return next((w for w in str(stage["cmd"]).split() if w.startswith("stages/") and w.endswith(".py")), None)


# --------------------------------------------------------------------------- import closure


def module_file(module: str, src: Path = SRC) -> Path | None:
    base = src.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    """Every fedwhisper module named by an import in ``path`` (``from a import b`` also tries ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "fedwhisper"}


def import_closure(script: Path, src: Path = SRC) -> set[Path]:
    """Source files of every fedwhisper module ``script`` can import, transitively (parent packages included)."""
    seen: set[str] = set()
    todo = list(imported_modules(script, ""))
    files: set[Path] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod, src)
        if path is None:  # `from fedwhisper.x import some_function`
            continue
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        files.add(path)
        package = mod if path.name == "__init__.py" else ".".join(parts[:-1])
        todo += list(imported_modules(path, package))
    return files


def holds_no_code(path: Path) -> bool:
    """A module of only a docstring and dunder string constants (``__version__``) cannot change an output."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue
        if (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__") for t in node.targets)
                and isinstance(node.value, ast.Constant)):
            continue
        return False
    return True


def uncovered_modules(stage: dict, root: Path = ROOT) -> list[str]:
    script = stage_script(stage)
    deps = [_dep_path(d) for d in stage.get("deps", [])]
    missing = []
    for f in sorted(import_closure(root / script, root / "src")):
        rel = f.relative_to(root).as_posix()
        if holds_no_code(f):
            continue
        if not any(rel == d or rel.startswith(d + "/") for d in deps):
            missing.append(rel)
    return missing


STAGES = expanded_stages()
SCRIPT_STAGES = {name: st for name, st in STAGES.items() if stage_script(st)}


def test_every_stage_runs_a_stage_script():
    assert SCRIPT_STAGES.keys() == STAGES.keys()
    assert {"base", "prepare", "aggregate", "report", "evaluate@aggregated", "finetune@en-us"} <= STAGES.keys()


@pytest.mark.parametrize("name", sorted(SCRIPT_STAGES))
def test_stage_deps_cover_every_imported_module(name):
    stage = SCRIPT_STAGES[name]
    assert stage_script(stage) in [_dep_path(d) for d in stage["deps"]], f"{name}: the stage script is not a dep"
    missing = uncovered_modules(stage)
    assert not missing, f"dvc.yaml stage '{name}' imports {', '.join(missing)} but its deps do not cover them"


@pytest.mark.parametrize("name", sorted(SCRIPT_STAGES))
def test_stage_params_match_the_sections_its_code_reads(name):
    stage = SCRIPT_STAGES[name]
    script = Path(stage_script(stage)).stem
    assert script in STAGE_SECTIONS, f"{name}: params.STAGE_SECTIONS has no entry for stages/{script}.py"
    declared = set()
    for entry in stage.get("params", []):
        if isinstance(entry, dict):  # {other_file.yaml: [keys]}
            continue
        declared.add(str(entry).split(".")[0])
    read = set(STAGE_SECTIONS[script])
    for section in sorted(read - declared):
        pytest.fail(f"dvc.yaml stage '{name}' reads params section '{section}' but does not list it in params")
    for section in sorted(declared - read):
        pytest.fail(f"dvc.yaml stage '{name}' lists params section '{section}' that its code never reads "
                    "(a change there would re-run it for nothing)")


def test_every_stage_script_loads_params_for_its_own_stage():
    """Each stage script that reads params.yaml does so through load_params(..., stage=<its name>), so that the
    STAGE_SECTIONS guard applies to it (and evaluate through its settings helper)."""
    for script in sorted((ROOT / "stages").glob("*.py")):
        src = script.read_text()
        for call in re.findall(r"load_params\(([^)]*)\)", src):
            assert f'stage="{script.stem}"' in call, f"{script.name}: load_params({call}) without stage=\"{script.stem}\""
    for module, stage in (("decode/settings.py", "evaluate"), ("merge/aggregate.py", "aggregate")):
        for call in re.findall(r"load_params\(([^)]*)\)", (SRC / "fedwhisper" / module).read_text()):
            assert f'stage="{stage}"' in call, f"{module}: load_params({call}) without stage=\"{stage}\""


# --------------------------------------------------------------------------- the checks can fail


def test_missing_module_and_section_are_named(tmp_path):
    (tmp_path / "stages").mkdir()
    pkg = tmp_path / "src/fedwhisper"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""doc"""\n__version__ = "1"\n')
    (pkg / "sub/__init__.py").write_text("")
    (pkg / "sub/a.py").write_text("def f():\n    from fedwhisper.sub import b\n")
    (pkg / "sub/b.py").write_text("X = 1\n")
    (tmp_path / "stages/s.py").write_text("from fedwhisper.sub.a import f\n")
    stage = {"cmd": "python stages/s.py", "deps": ["stages/s.py", "src/fedwhisper/sub/a.py"]}
    assert uncovered_modules(stage, tmp_path) == ["src/fedwhisper/sub/b.py"]
    stage["deps"] = ["stages/s.py", "src/fedwhisper/sub"]
    assert uncovered_modules(stage, tmp_path) == []


def test_foreach_stages_are_expanded_with_item_and_key(tmp_path):
    (tmp_path / "params.yaml").write_text("clients: [a, b]\nagg: {source: models/x}\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  f:\n    foreach: ${clients}\n    do:\n      cmd: python stages/f.py ${item}\n      deps: ['data/${item}']\n"
        "  e:\n    foreach: {m: models/m}\n    do:\n      cmd: python stages/e.py ${key}\n      deps: ['${item}']\n"
        "  g:\n    cmd: python stages/g.py\n    deps: ['${agg.source}']\n")
    st = expanded_stages(tmp_path)
    assert st["f@b"]["deps"] == ["data/b"] and st["e@m"]["deps"] == ["models/m"] and st["g"]["deps"] == ["models/x"]


def test_undeclared_section_read_by_a_stage_raises_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("clients: [a]\naggregation: {strategy: median}\n")
    params = load_params(path, stage="aggregate")
    assert params.aggregation.strategy == "median" and params.clients == ["a"]
    with pytest.raises(ParamsError, match=r"stage 'aggregate' read params section 'finetune'.*STAGE_SECTIONS"):
        params.finetune.learning_rate
    with pytest.raises(ParamsError, match="section 'evaluate'"):
        bool(params.evaluate)
    report = load_params(path, stage="report")
    with pytest.raises(ParamsError, match="section 'aggregation'"):
        report.aggregation.strategy
    assert isinstance(load_params(path), Params) and load_params(path).finetune.learning_rate == 1e-4


def test_aggregate_stage_runs_under_the_section_guard(tmp_path):
    """The stage script, run as DVC runs it, touches no undeclared section (it would fail here if it did)."""
    (tmp_path / "params.yaml").write_text("clients: [a, b]\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, str(ROOT / "stages/aggregate.py"), "--params", "params.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "finetune outputs missing" in proc.stderr and "params section" not in proc.stderr


def test_python_bytecode_in_a_source_dep_does_not_make_a_stage_look_changed():
    """Stages list source folders (src/fedwhisper/decode, ...) as deps. Python writes __pycache__/*.pyc into them on
    import unless PYTHONDONTWRITEBYTECODE is set, and DVC hashes every file of a folder dep that .dvcignore does not
    exclude: without the exclusion a user's first import would make up-to-date stages re-run."""
    from dvc.repo import Repo

    repo = Repo(str(ROOT))
    try:
        for rel in ("src/fedwhisper/decode/__pycache__/backends.cpython-311.pyc", "src/fedwhisper/train/x.pyc"):
            assert repo.dvcignore.is_ignored(repo.fs, str(ROOT / rel)), rel
        assert not repo.dvcignore.is_ignored(repo.fs, str(ROOT / "src/fedwhisper/decode/backends.py"))
    finally:
        repo.close()
