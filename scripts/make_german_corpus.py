"""Synthesise the offline German sample corpus in data/sample-de/ with espeak-ng.

Four espeak-ng German voice variants stand in for four "regions" (one client each). They differ in voice, not in
dialect: this is a small, offline stand-in for seed 000's Swiss German regions, with Standard German references.
Each region speaks a seeded draw from a train sentence pool and all of a shared, disjoint test pool, at varied rate
and pitch, stored as MP3, Ogg Vorbis and FLAC with .txt/.json sidecars and an HF audiofolder metadata.csv, in the
same layout as data/sample/ (seed 003's local layout). The same seed gives byte-identical files (with the same
espeak-ng, libsndfile, LAME and libvorbis versions). The audio helpers are make_sample_corpus.py's.

    python scripts/make_german_corpus.py --out data/sample-de --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_corpus import (  # noqa: E402  (the English corpus script, next to this one)
    LOSSY_ENCODINGS,
    TARGET_SR,
    CorpusError,
    Encoding,
    check_pools,
    directory_bytes,
    encode,
    espeak_version,
    replace_directory,
    sidecar_text,
    trim_and_pad,
)

# region (client name, the metadata `region` column) -> espeak-ng voice
REGIONS = {"de-m3": "de+m3", "de-f2": "de+f2", "de-klatt3": "de+klatt3", "de-f4": "de+f4"}
TRAIN_PER_REGION = 40
RATE_WPM = (140, 185)
PITCH = (35, 65)
METADATA_COLUMNS = ("file_name", "region", "voice", "split", "speaking_rate", "pitch", "sampling_rate", "format")
ENCODINGS = (
    (0.5, LOSSY_ENCODINGS["mp3"]),
    (0.4, LOSSY_ENCODINGS["ogg"]),
    (0.1, Encoding("FLAC", "flac", TARGET_SR, 1, "PCM_16")),
)
JSON_SIDECAR_SHARE = 0.5

TRAIN_SENTENCES = (
    "Der Bäcker öffnet seinen Laden schon sehr früh am Morgen.",
    "Wir haben am Wochenende einen langen Spaziergang im Wald gemacht.",
    "Kannst du bitte das Fenster schließen, es zieht so stark?",
    "Meine Großmutter kocht jeden Sonntag eine große Suppe.",
    "Der Zug nach Zürich fährt heute leider mit Verspätung ab.",
    "Im Garten blühen schon die ersten Tulpen und Narzissen.",
    "Ich muss noch schnell Milch und Brot im Laden kaufen.",
    "Die Kinder spielen draußen im Schnee, bis es dunkel wird.",
    "Er hat seinen Schlüssel auf dem Küchentisch liegen lassen.",
    "Nach dem Essen trinken wir gerne einen heißen Kaffee.",
    "Der Hund bellt jedes Mal, wenn der Briefträger kommt.",
    "Unsere Nachbarn fahren im Sommer immer an den Bodensee.",
    "Das Museum ist montags geschlossen und dienstags länger geöffnet.",
    "Sie liest abends gerne ein spannendes Buch im Bett.",
    "Auf dem Markt gibt es frisches Gemüse und süße Äpfel.",
    "Die Straße war nach dem Gewitter voller Pfützen.",
    "Mein Bruder repariert sein Fahrrad in der Garage.",
    "Bitte vergiss nicht, die Blumen auf dem Balkon zu gießen.",
    "Der Arzt sagt, ich soll mich ein paar Tage ausruhen.",
    "Wir treffen uns um halb acht vor dem Kino.",
    "Im Herbst fallen die bunten Blätter von den Bäumen.",
    "Die Lehrerin erklärt den Schülern eine schwierige Aufgabe.",
    "Ich hätte gern ein Glas Wasser und die Rechnung, bitte.",
    "Der Bus hält direkt vor dem Rathaus in der Stadtmitte.",
    "Am Abend hörten wir das Rauschen des Flusses.",
    "Meine Schwester lernt seit einem Jahr Geige spielen.",
    "Die Katze schläft am liebsten auf dem warmen Sofa.",
    "Es regnet schon den ganzen Tag, und es ist ziemlich kühl.",
    "Wir müssen morgen früh aufstehen, weil unser Flug so zeitig geht.",
    "Der Koch würzt die Soße mit Salz, Pfeffer und frischen Kräutern.",
    "Auf dem Berg liegt noch Schnee, obwohl es schon Frühling ist.",
    "Sie hat ihrer Freundin eine lange Nachricht geschrieben.",
    "Der Bauer fährt mit dem Traktor langsam über das Feld.",
    "Ich suche seit einer Stunde überall meine Brille.",
    "In der Bibliothek muss man bitte leise sein.",
    "Die alte Brücke wird im nächsten Monat renoviert.",
    "Unser Sohn möchte später einmal Pilot werden.",
    "Der Wind weht heute sehr kalt vom See herüber.",
    "Kannst du mir sagen, wo der nächste Bahnhof ist?",
    "Wir haben den Kuchen mit Sahne und Erdbeeren gegessen.",
    "Die Ärztin untersucht das Knie des jungen Fußballspielers.",
    "Am Samstag feiern wir den Geburtstag meines Vaters.",
    "Das Wasser im Bergsee ist klar und eiskalt.",
    "Er schließt die Tür ab, bevor er zur Arbeit geht.",
    "Die Glocken der Kirche läuten jeden Mittag.",
    "Ich habe mir im Geschäft einen warmen Pullover gekauft.",
    "Die Vögel singen schon früh am Morgen vor dem Fenster.",
    "Wir fahren mit der Fähre über den See nach Hause.",
    "Mein Onkel erzählt beim Essen immer dieselben Witze.",
    "Der Kühlschrank ist fast leer, wir müssen einkaufen.",
    "Sie trägt einen grünen Schal, den ihre Mutter gestrickt hat.",
    "Die Touristen fotografieren die alte Burg auf dem Hügel.",
    "Nach der Schule machen die Kinder ihre Hausaufgaben.",
    "Das Konzert im Park wurde wegen des Regens abgesagt.",
    "Der Postbote bringt heute ein großes Paket.",
    "Im Winter heizen wir mit Holz im alten Ofen.",
    "Die Kellnerin bringt uns Brot und Oliven an den Tisch.",
    "Er läuft jeden Morgen eine Runde um den Weiher.",
    "Wir haben im Urlaub viele schöne Dörfer besucht.",
    "Der Fernseher ist kaputt, deshalb hören wir Radio.",
    "Bitte zieh deine Schuhe aus, bevor du hereinkommst.",
    "Die Äpfel von unserem Baum schmecken süß und saftig.",
    "Der Zahnarzt hat heute leider keinen Termin mehr frei.",
    "Unsere Tochter fährt jeden Tag mit dem Velo zur Schule.",
)

TEST_SENTENCES = (
    "Die Köchin schneidet die Zwiebeln und brät sie in Butter.",
    "Heute Morgen war der Himmel grau und es nieselte.",
    "Der Schlüssel passt nicht mehr in das alte Schloss.",
    "Wir warten an der Haltestelle auf den nächsten Bus.",
    "Meine Mutter trinkt ihren Tee immer ohne Zucker.",
    "Die Schüler hören dem Lehrer aufmerksam zu.",
    "Im Sommer schwimmen wir gern im kühlen Fluss.",
    "Er hat sein Fahrrad vor der Bäckerei stehen lassen.",
    "Die Straßenbahn ist am Morgen immer sehr voll.",
    "Ich möchte gerne zwei Brötchen und ein Stück Käse.",
    "Der Hund läuft fröhlich über die grüne Wiese.",
    "Das Flugzeug landet pünktlich auf dem Flughafen.",
    "Unsere Nachbarin gießt jeden Abend ihre Rosen.",
    "Nach dem Gewitter riecht die Luft ganz frisch.",
    "Die Großeltern wohnen in einem kleinen Haus am Waldrand.",
    "Kannst du mir bitte das Salz und den Pfeffer geben?",
    "Der Weg zum Gipfel ist steil und sehr anstrengend.",
    "Am Freitag gehen wir zusammen ins Theater.",
    "Die Verkäuferin packt die Gläser in dickes Papier.",
    "Wir frühstücken am Sonntag gemütlich auf der Terrasse.",
)


@dataclass(frozen=True)
class Utterance:
    id: str
    region: str
    voice: str
    split: str
    text: str
    speaking_rate: int
    pitch: int
    gain: float
    encoding: Encoding
    sidecar: str


def check_sentences(train: tuple[str, ...], test: tuple[str, ...]) -> None:
    allowed = re.compile(r"^[A-ZÄÖÜ][A-Za-zÄÖÜäöüß ,]*[a-zäöüß][.?]$")
    for sentence in train + test:
        if not allowed.match(sentence) or not 5 <= len(sentence.split()) <= 14:
            raise CorpusError(f"sentence {sentence!r}: needs 5-14 plain words, letters, commas and final . or ?")
    check_pools(train, test)
    for letter in "äöüß":
        if not any(letter in s.lower() for s in train) or not any(letter in s.lower() for s in test):
            raise CorpusError(f"both pools must use {letter!r}, so normalisation of it is tested")


def check_voices(voices: list[str]) -> None:
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng not found: install it (apt-get install espeak-ng)")
    for voice in voices:
        probe = subprocess.run(["espeak-ng", "-v", voice, "-q", "Hallo"], capture_output=True, text=True)
        if probe.returncode != 0 or probe.stderr.strip():
            raise CorpusError(f"espeak-ng voice {voice!r} is not usable: {probe.stderr.strip()}")


def choose_encoding(rng: np.random.Generator) -> Encoding:
    return ENCODINGS[rng.choice(len(ENCODINGS), p=[w for w, _ in ENCODINGS])][1]


def plan_region(region: str, region_index: int, seed: int) -> list[Utterance]:
    rng = np.random.default_rng([seed, region_index])
    picks = rng.choice(len(TRAIN_SENTENCES), size=TRAIN_PER_REGION, replace=False)
    texts = {"train": [TRAIN_SENTENCES[i] for i in picks], "test": list(TEST_SENTENCES)}
    return [
        Utterance(
            id=f"{region}_{split}_{n:03d}",
            region=region,
            voice=REGIONS[region],
            split=split,
            text=text,
            speaking_rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
            pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
            gain=round(float(rng.uniform(0.5, 0.9)), 3),
            encoding=choose_encoding(rng),
            sidecar="json" if rng.random() < JSON_SIDECAR_SHARE else "txt",
        )
        for split in ("train", "test")
        for n, text in enumerate(texts[split])
    ]


def render(utt: Utterance) -> np.ndarray:
    command = ["espeak-ng", "-v", utt.voice, "-s", str(utt.speaking_rate), "-p", str(utt.pitch), "--stdout", utt.text]
    wav = subprocess.run(command, capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.size == 0:
        raise CorpusError(f"espeak-ng produced no audio for {utt.id} ({utt.text!r})")
    audio = trim_and_pad(audio, sr)
    if sr != utt.encoding.sampling_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=sr, target_sr=utt.encoding.sampling_rate)
    return (audio * (utt.gain / max(float(np.max(np.abs(audio))), 1e-6))).astype(np.float32)


def write_utterance(root: Path, utt: Utterance, serial: int) -> dict:
    audio = render(utt)
    audio_name = f"{utt.id}.{utt.encoding.extension}"
    (root / utt.split / audio_name).write_bytes(encode(audio, utt.encoding, serial))
    (root / utt.split / f"{utt.id}.{utt.sidecar}").write_text(sidecar_text(utt), encoding="utf-8")
    return {
        "file_name": f"{utt.split}/{audio_name}",
        "region": utt.region,
        "voice": utt.voice,
        "split": utt.split,
        "speaking_rate": utt.speaking_rate,
        "pitch": utt.pitch,
        "sampling_rate": utt.encoding.sampling_rate,
        "format": utt.encoding.extension,
        "seconds": len(audio) / utt.encoding.sampling_rate,
    }


README_TEMPLATE = """# German sample corpus (synthetic, offline)

A small Standard German corpus in four espeak-ng German voice variants standing in for four "regions", one federated
client each: {regions}. The variants differ in voice (timbre, synthesiser), not in dialect; this is an offline
stand-in for seed 000's Swiss German regions, which the README's German profile (`params-de.yaml`) trains on.
Made by `scripts/make_german_corpus.py` with {version}:

    python scripts/make_german_corpus.py --out data/sample-de --seed {seed}

- `train/` and `test/`: audio files `<region>_<split>_<nnn>.<mp3|ogg|flac>`, each with one sidecar of the same stem,
  either `<id>.txt` (plain transcript) or `<id>.json` (`{{"text": ...}}`), UTF-8, with umlauts and ß.
- Per region: {train_n} train utterances drawn (seeded) from a pool of {train_pool} sentences, and the same {test_n}
  test sentences, which no train utterance uses, so per-region WER is comparable. {spoken} distinct sentences are
  spoken ({pool} in the pools).
- Speaking rate {rate_lo}-{rate_hi} wpm and pitch {pitch_lo}-{pitch_hi} vary per utterance. Formats: MP3, Ogg Vorbis
  and FLAC (16-bit), all 16 kHz mono.
- `metadata.csv`: Hugging Face audiofolder columns `file_name`, `region`, `voice` (the espeak-ng voice), `split`,
  `speaking_rate`, `pitch`, `sampling_rate`, `format`.

License: the speech is synthetic (espeak-ng, GPL-3.0 program; its output audio carries no license restriction) and the
sentences were written for this project; the corpus is released under CC0-1.0.
"""


def build_corpus(root: Path, seed: int) -> list[dict]:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    plan = [utt for i, region in enumerate(REGIONS) for utt in plan_region(region, i, seed)]
    rows = []
    for n, utt in enumerate(plan):
        rows.append(write_utterance(root, utt, serial=seed * 100003 + n))
        if (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(plan)} utterances", file=sys.stderr)
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["file_name"]))
    readme = README_TEMPLATE.format(
        regions=", ".join(f"`{r}` (`{v}`)" for r, v in REGIONS.items()), version=espeak_version(), seed=seed,
        train_n=TRAIN_PER_REGION, train_pool=len(TRAIN_SENTENCES), test_n=len(TEST_SENTENCES),
        spoken=len({utt.text for utt in plan}), pool=len(TRAIN_SENTENCES) + len(TEST_SENTENCES),
        rate_lo=RATE_WPM[0], rate_hi=RATE_WPM[1], pitch_lo=PITCH[0], pitch_hi=PITCH[1],
    )
    (root / "README.md").write_text(readme, encoding="utf-8")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/sample-de"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_sentences(TRAIN_SENTENCES, TEST_SENTENCES)
    check_voices(list(REGIONS.values()))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        rows = build_corpus(tmp, args.seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out)
    for key in ("region", "split", "format"):
        counts = Counter(row[key] for row in rows)
        print(f"{key:>7}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    seconds = sum(row["seconds"] for row in rows)
    print(f"{len(rows)} utterances, {seconds:.1f} s of audio, {directory_bytes(out)} bytes in {out}")


if __name__ == "__main__":
    main()
