"""Synthesise the offline sample corpus in data/sample/ with espeak-ng.

Four English accents (one client each) speak seeded draws from a train sentence pool and all of a shared, disjoint
test pool, at varied rate and pitch, stored in a seeded mix of FLAC, WAV, MP3 and OGG Vorbis with .txt/.json sidecars
and an HF audiofolder metadata.csv. The same seed gives byte-identical files (with the same espeak-ng, libsndfile,
LAME and libvorbis versions).

    python scripts/make_sample_corpus.py --out data/sample --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

ACCENTS = ("en-us", "en-gb-scotland", "en-029", "en-gb-x-gbcwmd")
TRAIN_PER_ACCENT = 72
TARGET_SR = 16000
RATE_WPM = (130, 190)
PITCH = (30, 70)
EDGE_PAD_S = 0.2
METADATA_COLUMNS = ("file_name", "accent", "split", "speaking_rate", "pitch", "sampling_rate", "format")

TRAIN_SENTENCES = (
    "The kettle was still warm when we came back from the garden.",
    "Please leave the spare keys under the flower pot by the door.",
    "She painted the fence before the rain started on Sunday afternoon.",
    "The family next door has a small dog that barks at every passing bicycle.",
    "I forgot my umbrella and walked home through the heavy rain.",
    "The library closes early on Fridays during the summer holidays.",
    "He bought fresh bread and a jar of honey at the market.",
    "Could you turn the music down while I am on the phone?",
    "The train was delayed because of a fallen tree on the line.",
    "We planted tomatoes along the sunny side of the garden wall.",
    "My grandmother keeps her old letters in a wooden box.",
    "The children built a sandcastle and watched the tide wash it away.",
    "Remember to water the plants while we are away next week.",
    "The soup needs a little more salt and some black pepper.",
    "A thick fog rolled in from the sea just after sunset.",
    "He fixed the squeaky hinge with a drop of oil.",
    "The museum has a new room full of ancient pottery.",
    "I usually read a few pages of a novel before I fall asleep.",
    "The bus driver waited patiently for the old man to sit down.",
    "They painted the kitchen a pale shade of yellow last spring.",
    "We found a quiet table in the corner of the busy restaurant.",
    "The cat sleeps by the window whenever the sun comes out.",
    "Please write your name clearly at the top of the form.",
    "The river was so calm that it looked like a mirror.",
    "My brother learned to swim when he was very young.",
    "She keeps a small notebook in her pocket for new ideas.",
    "The farmer drove his tractor slowly down the narrow lane.",
    "We watched the birds gather on the roof before they flew south.",
    "I would like a cup of tea with milk and no sugar.",
    "The old bridge was closed for repairs for most of the year.",
    "He always whistles a cheerful tune while he cooks dinner.",
    "The shop on the corner sells the best apples in town.",
    "A gentle breeze carried the smell of cut grass across the field.",
    "She finished the puzzle just as the clock struck midnight.",
    "The hotel room had a lovely view over the bay.",
    "Our teacher read us a story about a brave little mouse.",
    "The baker wakes up very early to prepare the morning bread.",
    "They argued for hours about where to go on holiday.",
    "Please close the gate so the sheep do not escape.",
    "I lost one glove somewhere between the station and the office.",
    "The garden looks wonderful after a week of warm weather.",
    "He carried the heavy boxes up the narrow stairs.",
    "The doctor told him to rest and drink plenty of water.",
    "We could hear thunder rumbling far away over the hills.",
    "Her bicycle has a basket on the front and a shiny bell.",
    "The meeting was moved to the large room on the top floor.",
    "The little boy hid behind the curtain and giggled.",
    "Fresh snow covered the roads and the schools stayed closed.",
    "My aunt grows lavender and roses in her front garden.",
    "The waiter brought us bread and olives while we waited.",
    "I need to buy new shoes before the wedding next month.",
    "The lighthouse flashed its beam across the dark water.",
    "He spent the whole afternoon cleaning out the garage.",
    "The orchestra played softly while the guests found their seats.",
    "She wrapped the present in bright paper and tied a ribbon around it.",
    "The path through the woods was muddy after the storm.",
    "Please remind me to call the plumber in the morning.",
    "The students listened carefully as the professor explained the experiment.",
    "We ate our sandwiches on a bench overlooking the lake.",
    "The radio said that the roads would be icy tonight.",
    "My sister collects smooth pebbles from every beach she visits.",
    "The painter mixed blue and white to match the sky.",
    "A family of ducks crossed the road in a neat line.",
    "He promised to return the book by the end of the week.",
    "The wind blew the washing off the line and into the hedge.",
    "The market is crowded on Saturday mornings with families and tourists.",
    "I listened to the rain on the roof until I fell asleep.",
    "The chef tasted the sauce and added a pinch of sugar.",
    "Our flight was delayed so we stayed another night at the hotel.",
    "The farmer sold eggs and honey from a table by the road.",
    "She opened the window to let in some fresh air.",
    "The new bakery on the high street smells of cinnamon.",
    "He checked the map twice before turning down the quiet road.",
    "The puppy chewed a hole in my new slipper.",
    "We walked along the cliffs and watched the waves below.",
    "The kitchen tap has been dripping all night long.",
    "My friend plays the violin in a small band on weekends.",
    "The librarian helped me find a book about old ships.",
    "The children laughed when the clown slipped on a banana skin.",
    "Please take your shoes off before you come inside.",
    "The moon was bright enough to read by.",
    "A robin sang from the top of the apple tree.",
    "He ironed his shirt carefully before the job interview.",
    "The fishermen returned at dawn with their nets full.",
    "I always feel calmer after a long walk by the river.",
    "The roof leaks whenever there is a heavy storm.",
    "She learned to bake bread from her grandfather.",
    "The queue outside the cinema stretched around the corner.",
    "Our car would not start on the coldest morning of the year.",
    "The village holds a summer fair with games and music.",
    "He left a note on the table saying he would be late.",
    "The baby finally fell asleep after a warm bath.",
    "We picked wild blackberries along the edge of the field.",
    "The candle flickered and went out when the door opened.",
    "The mechanic said the brakes needed to be replaced soon.",
    "I keep a spare pair of socks in my backpack.",
    "The gardener trimmed the hedges into neat round shapes.",
    "The kids built a den out of blankets and chairs.",
    "The water in the pond was cold and very clear.",
    "She forgot her password and had to choose a new one.",
    "The mountain road twists and turns all the way to the top.",
    "He poured the coffee and sat down to read the newspaper.",
    "The streets were quiet after the festival ended.",
    "We heard an owl calling from the woods at night.",
    "The nurse smiled and told me everything would be fine.",
    "The window cleaner comes round once a month.",
    "My uncle tells the same jokes at every family dinner.",
    "The horse trotted happily across the green meadow.",
    "A strong smell of smoke drifted over from the bonfire.",
    "Please put the milk back in the fridge when you are done.",
    "The tailor shortened the sleeves of my winter coat.",
    "They sat by the fire and told stories until late.",
    "The printer ran out of paper in the middle of my report.",
    "I prefer walking to work when the weather is mild.",
    "The old clock in the hall chimes every hour.",
    "She planted a row of sunflowers along the back fence.",
    "The kitten chased a ball of wool under the sofa.",
    "We should leave early to avoid the evening traffic.",
    "The postman delivered a parcel while we were out.",
    "The lake froze over and people went skating on it.",
    "He spilled orange juice all over the breakfast table.",
    "The tour guide told us the history of the castle.",
    "My phone battery died just as the taxi arrived.",
    "The scent of pine trees filled the cool mountain air.",
    "The builder measured the wall twice before cutting the wood.",
    "She hummed quietly to herself while folding the laundry.",
    "Our garden gate creaks loudly every time someone opens it.",
    "The pilot announced that we would land in a few minutes.",
    "The market stall sold cheese, olives and fresh herbs.",
    "I found an old photograph tucked inside a library book.",
    "The dog waited by the door for his owner to come home.",
    "We spent the afternoon flying kites on the windy hill.",
    "The shop assistant wrapped the glasses in thick paper.",
    "He plays the piano for an hour every evening.",
    "The rain stopped and a rainbow appeared over the valley.",
    "She carried a basket of apples back from the orchard.",
    "The engine made a strange noise as we climbed the hill.",
    "Please speak a little louder so everyone can hear you.",
    "The leaves turned red and gold in the autumn sunshine.",
    "The family next door invited us over for dinner on Friday.",
    "The boat rocked gently as we rowed across the harbor.",
    "I could smell fresh coffee as soon as I woke up.",
    "The factory whistle sounded at the end of every shift.",
    "He cleaned his glasses and looked again at the sign.",
    "The children lined up quietly for the school photo.",
    "The soup was too hot so we let it cool for a while.",
    "The flowers on the balcony need watering every morning.",
    "My cousin moved to a small town near the coast.",
    "The actor forgot his lines but carried on bravely.",
    "We waited under a tree until the shower passed.",
    "The cook sliced the onions and fried them in butter.",
    "The wooden floor creaked as I crept down the stairs.",
    "She sent a postcard to her friends from the seaside.",
    "The cold wind made our cheeks turn bright red.",
    "He hung the painting above the fireplace in the living room.",
    "The sheep huddled together in the corner of the field.",
    "I asked the waiter for a glass of water and the bill.",
    "The trees along the avenue were full of blossom.",
    "The carpenter built a bookshelf for the spare bedroom.",
    "Our holiday cottage had a thatched roof and a tiny garden.",
    "The storm knocked out the power for most of the evening.",
    "She tied her hair back and started to run.",
    "The bells rang out across the town on the wedding day.",
    "We shared a large bowl of noodles at the night market.",
    "The fox slipped silently through the gap in the fence.",
    "The bakery sells warm pies every day at noon.",
    "He tripped over a loose stone on the garden path.",
    "The choir sang beautifully in the old stone church.",
    "I turned off the lights and listened to the quiet house.",
    "The ferry crossed the river slowly in the thick mist.",
    "My mother always hums when she is making jam.",
    "The wet dog shook itself all over the clean floor.",
    "The campers lit a small fire to keep warm at night.",
    "She borrowed a ladder to reach the top shelf.",
    "The mail arrived late because of the snow.",
    "The bread smelled wonderful this morning.",
    "Nobody answered when I knocked twice.",
    "Close the curtains before it gets dark.",
    "The soup simmered while we talked.",
    "When the snow finally melted, the whole valley turned green and the rivers filled with water.",
    "We stayed up late talking about the places we would like to visit one day.",
    "If you follow the path past the old mill, you will reach a small waterfall.",
    "The market traders packed away their stalls as the evening light faded over the square.",
)

TEST_SENTENCES = (
    "The museum guard asked us not to touch the paintings.",
    "A small boat drifted slowly towards the rocky shore.",
    "My father repaired the broken chair with glue and string.",
    "The children ran outside as soon as the bell rang.",
    "After dinner we walked down to the beach and watched the sun disappear behind the hills.",
    "The forest was silent except for the sound of falling leaves.",
    "We bought a map and a compass before the long hike.",
    "The teacher wrote the answer in big letters on the board.",
    "He opened the letter and smiled at the good news.",
    "The hot sun dried the washing in less than an hour.",
    "Please lock the back door before you go to bed.",
    "The old farmer knew the name of every bird in the valley.",
    "Our dog loves chasing the waves on the beach.",
    "Everyone cheered when the team finally won.",
    "She wore a long green scarf that her sister knitted.",
    "The baker gave each of the children a free cookie.",
    "A loud crash woke everyone in the house.",
    "The garden party was moved indoors because of the wind.",
    "I left my wallet on the counter at the bookshop.",
    "The swans glided gracefully across the still pond.",
    "He tried to catch the bus but it had already left.",
    "The village square was decorated with lanterns and flowers.",
    "We cooked pancakes for breakfast and ate them with lemon.",
    "The nurse checked his temperature and wrote it down.",
    "A cold wind blew under the kitchen door all night.",
    "The musician tuned his guitar before the concert started.",
    "The cat knocked a glass of water off the table.",
    "My friends and I watched the fireworks from the hill.",
    "The river flooded the fields after a week of heavy rain.",
    "She whispered the secret so nobody else could hear.",
)


@dataclass(frozen=True)
class Encoding:
    format: str
    extension: str
    sampling_rate: int
    channels: int
    subtype: str | None
    quality: float | None = None


LOSSY_ENCODINGS = {
    "mp3": Encoding("MP3", "mp3", TARGET_SR, 1, "MPEG_LAYER_III", quality=0.7),
    "ogg": Encoding("OGG", "ogg", TARGET_SR, 1, "VORBIS", quality=0.7),
}
LOSSLESS_VARIANTS = {
    "flac": (
        (0.45, Encoding("FLAC", "flac", 16000, 1, "PCM_16")),
        (0.15, Encoding("FLAC", "flac", 22050, 1, "PCM_16")),
        (0.10, Encoding("FLAC", "flac", 44100, 1, "PCM_16")),
        (0.10, Encoding("FLAC", "flac", 16000, 2, "PCM_16")),
        (0.10, Encoding("FLAC", "flac", 16000, 1, "PCM_24")),
        (0.10, Encoding("FLAC", "flac", 16000, 1, "PCM_S8")),
    ),
    "wav": (
        (0.35, Encoding("WAV", "wav", 16000, 1, "PCM_16")),
        (0.35, Encoding("WAV", "wav", 16000, 1, "PCM_U8")),
        (0.10, Encoding("WAV", "wav", 22050, 1, "PCM_U8")),
        (0.10, Encoding("WAV", "wav", 16000, 2, "PCM_U8")),
        (0.10, Encoding("WAV", "wav", 16000, 1, "PCM_24")),
    ),
}
FORMAT_WEIGHTS = {"mp3": 0.46, "ogg": 0.36, "flac": 0.11, "wav": 0.07}
JSON_SIDECAR_SHARE = 0.5


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Utterance:
    id: str
    accent: str
    split: str
    text: str
    speaking_rate: int
    pitch: int
    gain: float
    encoding: Encoding
    sidecar: str


def check_sentences(train: tuple[str, ...], test: tuple[str, ...]) -> None:
    allowed = re.compile(r"^[A-Z][A-Za-z ,]*[a-z][.?]$")
    for sentence in train + test:
        words = len(sentence.split())
        if not allowed.match(sentence) or not 6 <= words <= 16:
            raise CorpusError(f"sentence {sentence!r}: needs 6-16 plain words, letters, commas and final . or ?")
    check_pools(train, test)


def check_pools(train: tuple[str, ...], test: tuple[str, ...]) -> None:
    """No sentence twice in a pool, none in both (test WER is on sentences never trained on)."""
    for pool, name in ((train, "train"), (test, "test")):
        repeated = [s for s, n in Counter(pool).items() if n > 1]
        if repeated:
            raise CorpusError(f"{name} pool repeats {repeated}")
    shared = set(train) & set(test)
    if shared:
        raise CorpusError(f"sentences in both train and test pools: {sorted(shared)}")


def installed_english_voices() -> set[str]:
    listing = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}


def check_voices(accents: tuple[str, ...]) -> None:
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng not found: install it (apt-get install espeak-ng)")
    missing = sorted(set(accents) - installed_english_voices())
    if missing:
        raise CorpusError(f"espeak-ng lacks voices {missing}; see `espeak-ng --voices=en`")


def espeak_version() -> str:
    banner = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return f"{banner.split('Data at')[0].strip()} and libsndfile {sf.__libsndfile_version__}"


def choose_encoding(rng: np.random.Generator) -> Encoding:
    names = list(FORMAT_WEIGHTS)
    name = names[rng.choice(len(names), p=list(FORMAT_WEIGHTS.values()))]
    if name in LOSSY_ENCODINGS:
        return LOSSY_ENCODINGS[name]
    variants = LOSSLESS_VARIANTS[name]
    return variants[rng.choice(len(variants), p=[w for w, _ in variants])][1]


def plan_accent(accent: str, accent_index: int, seed: int) -> list[Utterance]:
    rng = np.random.default_rng([seed, accent_index])
    picks = rng.choice(len(TRAIN_SENTENCES), size=TRAIN_PER_ACCENT, replace=False)
    texts = {"train": [TRAIN_SENTENCES[i] for i in picks], "test": list(TEST_SENTENCES)}
    plan = []
    for split in ("train", "test"):
        for n, text in enumerate(texts[split]):
            plan.append(
                Utterance(
                    id=f"{accent}_{split}_{n:03d}",
                    accent=accent,
                    split=split,
                    text=text,
                    speaking_rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                    pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                    gain=round(float(rng.uniform(0.5, 0.9)), 3),
                    encoding=choose_encoding(rng),
                    sidecar="json" if rng.random() < JSON_SIDECAR_SHARE else "txt",
                )
            )
    return plan


def speak(utt: Utterance) -> tuple[np.ndarray, int]:
    command = ["espeak-ng", "-v", utt.accent, "-s", str(utt.speaking_rate), "-p", str(utt.pitch), "--stdout", utt.text]
    wav = subprocess.run(command, capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.size == 0:
        raise CorpusError(f"espeak-ng produced no audio for {utt.id} ({utt.text!r})")
    return audio, sr


def trim_and_pad(audio: np.ndarray, sr: int) -> np.ndarray:
    trimmed, _ = librosa.effects.trim(audio, top_db=45)
    pad = np.zeros(int(EDGE_PAD_S * sr), dtype=np.float32)
    return np.concatenate([pad, trimmed, pad])


def render(utt: Utterance) -> np.ndarray:
    audio, sr = speak(utt)
    audio = trim_and_pad(audio, sr)
    if utt.encoding.sampling_rate != sr:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=utt.encoding.sampling_rate)
    audio = (audio * (utt.gain / max(float(np.max(np.abs(audio))), 1e-6))).astype(np.float32)
    if utt.encoding.channels == 2:
        audio = np.stack([audio, audio * np.float32(0.8)], axis=1)
    return audio


def ogg_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return tuple(table)


OGG_CRC_TABLE = ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    """CRC-32 of an Ogg page: polynomial 0x04C11DB7, initial 0, no reflection, no final xor."""
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ OGG_CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """libsndfile picks a random Ogg stream serial; pin it and recompute each page's CRC.

    Page header: "OggS", version, flags, granule(8), serial(4) @14, sequence(4), crc(4) @22, nsegs @26, lacing table.
    """
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos : pos + 4] != b"OggS":
            raise CorpusError(f"malformed Ogg page at byte {pos}")
        nsegs = out[pos + 26]
        length = 27 + nsegs + sum(out[pos + 27 : pos + 27 + nsegs])
        struct.pack_into("<I", out, pos + 14, serial)
        struct.pack_into("<I", out, pos + 22, 0)
        struct.pack_into("<I", out, pos + 22, ogg_crc(bytes(out[pos : pos + length])))
        pos += length
    return bytes(out)


def encode(audio: np.ndarray, enc: Encoding, serial: int) -> bytes:
    buffer = io.BytesIO()
    buffer.name = f"audio.{enc.extension}"
    options = {} if enc.quality is None else {"compression_level": enc.quality}
    sf.write(buffer, audio, enc.sampling_rate, format=enc.format, subtype=enc.subtype, **options)
    data = buffer.getvalue()
    return fix_ogg_serial(data, serial) if enc.format == "OGG" else data


def sidecar_text(utt: Utterance) -> str:
    if utt.sidecar == "json":
        return json.dumps({"text": utt.text}, ensure_ascii=False) + "\n"
    return utt.text + "\n"


def write_utterance(root: Path, utt: Utterance, serial: int) -> dict:
    audio = render(utt)
    folder = root / utt.split
    audio_name = f"{utt.id}.{utt.encoding.extension}"
    (folder / audio_name).write_bytes(encode(audio, utt.encoding, serial))
    (folder / f"{utt.id}.{utt.sidecar}").write_text(sidecar_text(utt), encoding="utf-8")
    return {
        "file_name": f"{utt.split}/{audio_name}",
        "accent": utt.accent,
        "split": utt.split,
        "speaking_rate": utt.speaking_rate,
        "pitch": utt.pitch,
        "sampling_rate": utt.encoding.sampling_rate,
        "format": utt.encoding.extension,
        "seconds": len(audio) / utt.encoding.sampling_rate,
    }


def write_metadata(root: Path, rows: list[dict]) -> None:
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["file_name"]))


README_TEMPLATE = """# Sample corpus (synthetic, offline)

A small English corpus in four espeak-ng accents, one federated client each: {accents}.
Made by `scripts/make_sample_corpus.py` with {version}:

    python scripts/make_sample_corpus.py --out data/sample --seed {seed}

- `train/` and `test/`: audio files `<accent>_<split>_<nnn>.<flac|wav|mp3|ogg>`, each with one sidecar of the same
  stem, either `<id>.txt` (plain transcript) or `<id>.json` (`{{"text": ...}}`).
- Per accent: {train_n} train utterances drawn (seeded) from a pool of {train_pool} sentences, and the same {test_n}
  test sentences, which no train utterance uses, so per-accent WER is comparable. {spoken} distinct sentences are
  spoken ({pool} in the pools).
- Speaking rate {rate_lo}-{rate_hi} wpm and pitch {pitch_lo}-{pitch_hi} vary per utterance. Formats: MP3 and Ogg
  Vorbis at 16 kHz mono; FLAC and WAV mostly 16 kHz mono 16-bit, some at 22.05 or 44.1 kHz, 8 or 24 bit, or stereo.
- `metadata.csv`: Hugging Face audiofolder columns `file_name`, `accent`, `split`, `speaking_rate`, `pitch`,
  `sampling_rate`, `format`.

The same seed and the same espeak-ng, libsndfile, LAME and libvorbis versions give byte-identical files (the Ogg
stream serial, random in libsndfile, is pinned).

License: the speech is synthetic (espeak-ng, GPL-3.0 program; its output audio carries no license restriction) and the
sentences were written for this project; the corpus is released under CC0-1.0.
"""


def write_readme(root: Path, seed: int, version: str, spoken: int) -> None:
    text = README_TEMPLATE.format(
        accents=", ".join(f"`{a}`" for a in ACCENTS),
        version=version,
        seed=seed,
        train_n=TRAIN_PER_ACCENT,
        train_pool=len(TRAIN_SENTENCES),
        test_n=len(TEST_SENTENCES),
        spoken=spoken,
        pool=len(TRAIN_SENTENCES) + len(TEST_SENTENCES),
        rate_lo=RATE_WPM[0],
        rate_hi=RATE_WPM[1],
        pitch_lo=PITCH[0],
        pitch_hi=PITCH[1],
    )
    (root / "README.md").write_text(text, encoding="utf-8")


def build_corpus(root: Path, seed: int) -> list[dict]:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    plan = [utt for i, accent in enumerate(ACCENTS) for utt in plan_accent(accent, i, seed)]
    rows = []
    for n, utt in enumerate(plan):
        rows.append(write_utterance(root, utt, serial=seed * 100003 + n))
        if (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(plan)} utterances", file=sys.stderr)
    write_metadata(root, rows)
    write_readme(root, seed, espeak_version(), spoken=len({utt.text for utt in plan}))
    return rows


def replace_directory(tmp: Path, out: Path) -> None:
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def print_summary(rows: list[dict], out: Path) -> None:
    for key in ("accent", "split", "format"):
        counts = Counter(row[key] for row in rows)
        print(f"{key:>7}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    per_accent_split = Counter((row["accent"], row["split"]) for row in rows)
    print("  items: " + ", ".join(f"{a}/{s} {n}" for (a, s), n in sorted(per_accent_split.items())))
    seconds = sum(row["seconds"] for row in rows)
    print(f"{len(rows)} utterances, {seconds:.1f} s of audio, {directory_bytes(out)} bytes in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_sentences(TRAIN_SENTENCES, TEST_SENTENCES)
    check_voices(ACCENTS)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        rows = build_corpus(tmp, args.seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out)
    print_summary(rows, out)


if __name__ == "__main__":
    main()
