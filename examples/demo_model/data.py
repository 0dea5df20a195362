"""A small, realistic and deterministic music dataset for training the demo model.

Renders a few hundred 5-second clips from real scores of music21's bundled corpus (Renaissance
chansons and masses, Monteverdi, Bach chorales, Corelli, Mozart, Haydn, early Beethoven, the Schumanns,
Chopin, Schubert, Verdi, folk tunes from the Essen, O'Neill and Ryan collections, ...) through
fluidsynth with the FluidR3 General MIDI soundfont, on several instrument families, at several tempi,
with drums on some, and writes MusicQA-format JSON whose captions and answers are templated from the
known facts of each clip::

    python -m examples.demo_model.data OUT [--seed N] [--pieces N] [--renderings N] [--jobs N] [--overwrite]
                                     [--examples DIR [--n-examples N]]

Output folder ``OUT`` (assembled in a temporary sibling folder and renamed at the end)::

    audio/<clip_id>.wav   24 kHz mono 16-bit PCM, exactly 5.0 s
    train.json            MusicQA items (one QA pair each) of the training pieces
    heldout.json          the same for the held-out pieces
    clips.json            the facts of every clip (see :class:`ClipFacts`)

Vocabulary (the evaluator matches these words; the constants below are the source of truth, and
:func:`mentioned` finds which classes a text names):

* Instrument family, :data:`FAMILIES` (family -> words that name it; every caption and every answer to
  "Which instrument is playing?" contains at least one word of the clip's family and none of another):
  piano ("piano"), organ ("organ"), guitar ("guitar"), strings ("string", "violin", "viola", "cello",
  "contrabass"), woodwind ("woodwind", "flute", "oboe", "clarinet", "bassoon"), brass ("brass",
  "trumpet", "horn", "trombone", "tuba"), choir ("choir", "voices").
* Tempo class, :data:`TEMPO_CLASSES` (name -> BPM range, inclusive): slow 55-75, moderate 85-110,
  fast 125-160. Captions and tempo answers contain the class name verbatim ("slow", "moderate",
  "fast") and no other class name; the BPM is drawn uniformly from the range and overrides the
  score's tempo marks. BPM counts *beats*, and a clip's beat is the note value (plain or dotted, see
  :data:`BEAT_VALUES`) for which its 5 seconds hold as many note onsets as beats
  (:func:`excerpt_beat`; ``beat_quarters`` in ``clips.json``): the tempo is how often notes start,
  which is what one hears. (A quarter-note BPM is not audible: the scores' note values span 16x, from
  Palestrina's half notes to a reel's sixteenths; labelled that way, a probe on the trained encoder
  was at or below chance on drumless held-out clips.)
* Era, :data:`ERAS`: Renaissance, Baroque, Classical, Romantic, folk (from the composer; the
  anonymous tunes are folk), one era word per caption and era answer.
* Solo / ensemble: exactly one of "solo" and "ensemble" appears in every caption and solo answer.
  Piano, organ and guitar clips are always solo (every part on one instrument); choir clips are
  always an ensemble; strings, woodwind and brass clips are solo (about 40 %: one instrument plays
  the melody, i.e. the highest part that sounds through the excerpt) or an ensemble (the parts,
  ordered by register, spread over 2-4 instruments of the family, e.g. violin/viola/cello). A
  one-part tune played by an ensemble is doubled an octave lower by its second instrument. The
  family is always single per clip; notes outside an instrument's range move by octaves into it.
* Drums (about 37 % of clips): "drums" appears in the caption; a GM channel-10 pattern at the clip's
  tempo: kick and snare alternating on the beats (kick on the bar line), closed hi-hat on half beats.
* Key and mode: the real key of the score, not transposed: the key signature gives the major key
  and its relative minor; a score that declares "minor" is minor, otherwise a Krumhansl-Kessler
  correlation of the opening's pitch classes (first 64 quarter notes) chooses between the two (all
  24 keys when there is no signature). Excerpts start in the first 8 bars (or 32 quarter notes), so
  they are in that key. Written as "F-sharp minor", "B-flat major".

Questions per clip: one of the four MusicQA caption questions plus "What is the tempo of this
music?", "Which instrument is playing?", "Is this a solo or an ensemble?", "What key is this in?"
and "From which era is this music?".

Held-out split by piece (about 20 % of the pieces, stratified by era and chosen so that held-out
clips cover every family, tempo class, solo/ensemble and drums/no drums present): no piece has clips
in both splits.

Rendering: libfluidsynth (through ctypes; a fresh synthesizer per clip) plays the excerpt's notes,
tempo overridden, velocities varied, offline at 24 kHz (events land on fluidsynth's 64-sample
blocks), reverb fixed, chorus off; the stereo output is averaged to mono, faded (3 ms in, 40 ms out),
brought to -20 dBFS RMS +- 1.5 dB and limited to -1 dBFS peak. Excerpts start on a bar line.

Determinism: the same seed, pieces and renderings give byte-identical files on the same machine,
whatever ``jobs``. Every random choice comes from numpy Generators seeded from ``seed`` (one per
clip), results are keyed by piece, music21's parse cache is neither read nor written. Needs the
Debian packages ``fluidsynth`` (libfluidsynth) and ``fluid-soundfont-gm`` and the ``demo`` extra
(music21).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.prompt import CAPTION_QUESTIONS

#: Length of every clip.
CLIP_SECONDS = 5.0
CLIP_SAMPLES = round(CLIP_SECONDS * SAMPLE_RATE_HZ)
#: Debian's fluid-soundfont-gm.
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
#: Renderings per piece by default: one per family (:data:`FAMILIES`), each at its own excerpt.
DEFAULT_RENDERINGS = 7
#: Fraction of the pieces held out.
HELDOUT_FRACTION = 0.2
#: Fraction of the clips with drums.
DRUMS_FRACTION = 0.37
#: Loudness after rendering: RMS -20 dBFS (+- a small random gain), peaks at most -1 dBFS.
TARGET_RMS = 0.1
GAIN_JITTER_DB = 1.5
PEAK_LIMIT = 10 ** (-1 / 20)

FAMILIES: dict[str, tuple[str, ...]] = {
    "piano": ("piano",),
    "organ": ("organ",),
    "guitar": ("guitar",),
    "strings": ("string", "violin", "viola", "cello", "contrabass"),
    "woodwind": ("woodwind", "flute", "oboe", "clarinet", "bassoon"),
    "brass": ("brass", "trumpet", "horn", "trombone", "tuba"),
    "choir": ("choir", "voices"),
}
TEMPO_CLASSES: dict[str, tuple[int, int]] = {"slow": (55, 75), "moderate": (85, 110), "fast": (125, 160)}
#: The word naming each tempo class (its name), in the form :func:`mentioned` takes.
TEMPO_WORDS: dict[str, tuple[str, ...]] = {name: (name,) for name in TEMPO_CLASSES}
ERAS: dict[str, tuple[str, ...]] = {
    "Renaissance": ("renaissance",),
    "Baroque": ("baroque",),
    "Classical": ("classical",),
    "Romantic": ("romantic",),
    "folk": ("folk",),
}
MODES = ("major", "minor")

QUESTIONS: dict[str, str] = {
    "tempo": "What is the tempo of this music?",
    "instrument": "Which instrument is playing?",
    "solo": "Is this a solo or an ensemble?",
    "key": "What key is this in?",
    "era": "From which era is this music?",
}


def _first_positions(text: str, vocabulary: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Class -> where a word starting with one of its words first occurs in ``text`` (any case)."""
    low = text.lower()
    found = {}
    for name, words in vocabulary.items():
        hits = [m.start() for w in words for m in [re.search(rf"\b{re.escape(w.lower())}", low)] if m]
        if hits:
            found[name] = min(hits)
    return found


def mentioned(text: str, vocabulary: dict[str, tuple[str, ...]]) -> list[str]:
    """The classes of ``vocabulary`` (e.g. :data:`FAMILIES`, :data:`ERAS`, or :data:`TEMPO_CLASSES`
    via :data:`TEMPO_WORDS`) that ``text`` names: a word starting with one of their words, any case."""
    return list(_first_positions(text, vocabulary))


def first_mentioned(text: str, vocabulary: dict[str, tuple[str, ...]]) -> str | None:
    """The class of ``vocabulary`` that ``text`` names first (as :func:`mentioned` matches), or None."""
    found = _first_positions(text, vocabulary)
    return min(found, key=found.get) if found else None


@dataclass(frozen=True)
class Piece:
    """A score of music21's corpus.

    Attributes:
        path: Corpus path as ``corpus.parse`` takes it.
        composer: Display name (``"traditional"`` for folk tunes).
        era: One of :data:`ERAS`.
        kind: What it is, in captions ("chorale", "minuet", "reel", ...).
        number: Tune number inside a multi-tune ABC file, else ``None``.
    """

    path: str
    composer: str
    era: str
    kind: str
    number: int | None = None

    @property
    def slug(self) -> str:
        base = re.sub(r"\.(mxl|xml|musicxml|krn|abc)$", "", self.path)
        base = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")
        return base if self.number is None else f"{base}_n{self.number}"

    @property
    def name(self) -> str:
        """The corpus path, with ``#number`` for a tune of a multi-tune file."""
        return self.path if self.number is None else f"{self.path}#{self.number}"


def _p(path: str, composer: str, era: str, kind: str, number: int | None = None) -> Piece:
    return Piece(path, composer, era, kind, number)


_BACH, _MOZART, _HAYDN = "J. S. Bach", "W. A. Mozart", "J. Haydn"
_JOSQUIN, _PALESTRINA, _TRAD = "Josquin des Prez", "G. P. da Palestrina", "traditional"

#: The corpus pieces, chosen to parse in well under 2 s each (music21 10.5.1 on one core). Order
#: within an era matters only for ``--pieces`` (the subset is taken round-robin over eras).
PIECES: tuple[Piece, ...] = (
    # Renaissance
    _p("josquin/milleRegrets", _JOSQUIN, "Renaissance", "chanson"),
    _p("palestrina/Kyrie_00", _PALESTRINA, "Renaissance", "mass movement"),
    _p("josquin/petiteCamusette", _JOSQUIN, "Renaissance", "chanson"),
    _p("palestrina/Agnus_01", _PALESTRINA, "Renaissance", "mass movement"),
    _p("lusitano/allor_che_ignuda", "V. Lusitano", "Renaissance", "madrigal"),
    _p("palestrina/Benedictus_00", _PALESTRINA, "Renaissance", "mass movement"),
    _p("josquin/fortunaDunGranTempo", _JOSQUIN, "Renaissance", "chanson"),
    _p("palestrina/Agnus_03", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Sanctus_07", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Kyrie_02", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Benedictus_06", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Agnus_05", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Benedictus_02", _PALESTRINA, "Renaissance", "mass movement"),
    # Baroque
    _p("bach/bwv66.6", _BACH, "Baroque", "chorale"),
    _p("monteverdi/madrigal.5.3.mxl", "C. Monteverdi", "Baroque", "madrigal"),
    _p("bach/bwv269", _BACH, "Baroque", "chorale"),
    _p("corelli/opus3no1/1grave", "A. Corelli", "Baroque", "trio sonata movement"),
    _p("bach/bwv26.6", _BACH, "Baroque", "chorale"),
    _p("bach/bwv846", _BACH, "Baroque", "prelude"),
    _p("bach/bwv310", _BACH, "Baroque", "chorale"),
    _p("bach/bwv322", _BACH, "Baroque", "chorale"),
    _p("bach/bwv40.8", _BACH, "Baroque", "chorale"),
    _p("bach/bwv1.6", _BACH, "Baroque", "chorale"),
    _p("bach/bwv10.7", _BACH, "Baroque", "chorale"),
    _p("bach/bwv101.7", _BACH, "Baroque", "chorale"),
    _p("bach/bwv250", _BACH, "Baroque", "chorale"),
    _p("bach/bwv251", _BACH, "Baroque", "chorale"),
    _p("bach/bwv40.6", _BACH, "Baroque", "chorale"),
    # Classical
    _p("mozart/k545/movement1_exposition", _MOZART, "Classical", "sonata"),
    _p("haydn/opus1no1/movement2", _HAYDN, "Classical", "minuet"),
    _p("mozart/k155/movement2", _MOZART, "Classical", "movement"),
    _p("haydn/opus1no1/movement1", _HAYDN, "Classical", "movement"),
    _p("mozart/k156/movement4", _MOZART, "Classical", "movement"),
    _p("haydn/opus1no1/movement3", _HAYDN, "Classical", "adagio"),
    _p("mozart/k80/movement3", _MOZART, "Classical", "minuet"),
    _p("beethoven/opus18no1/movement3.mxl", "L. van Beethoven", "Classical", "scherzo"),
    _p("haydn/opus1no1/movement4", _HAYDN, "Classical", "minuet"),
    _p("mozart/k156/movement2", _MOZART, "Classical", "adagio"),
    _p("haydn/opus1no1/movement5", _HAYDN, "Classical", "finale"),
    _p("mozart/k80/movement4", _MOZART, "Classical", "rondo"),
    _p("mozart/k458/movement2", _MOZART, "Classical", "minuet"),
    _p("mozart/k155/movement3", _MOZART, "Classical", "movement"),
    # Romantic
    _p("schumann_robert/opus48no2", "R. Schumann", "Romantic", "song"),
    _p("chopin/mazurka06-2", "F. Chopin", "Romantic", "mazurka"),
    _p("schumann_clara/polonaise_op1n1", "C. Schumann", "Romantic", "polonaise"),
    _p("verdi/laDonnaEMobile", "G. Verdi", "Romantic", "aria"),
    _p("schubert/Lindenbaum", "F. Schubert", "Romantic", "song"),
    _p("schumann_clara/polonaise_op1n2", "C. Schumann", "Romantic", "polonaise"),
    _p("schumann_robert/dichterliebe_no2", "R. Schumann", "Romantic", "song"),
    _p("beach/prayer_of_a_tired_child", "A. Beach", "Romantic", "song"),
    _p("schumann_clara/polonaise_op1n3", "C. Schumann", "Romantic", "polonaise"),
    _p("liliuokalani/aloha_oe", "Liliuokalani", "Romantic", "song"),
    _p("schumann_clara/polonaise_op1n4", "C. Schumann", "Romantic", "polonaise"),
    _p("johnson_j_r/lift_every_voice", "J. R. Johnson", "Romantic", "hymn"),
    # folk
    _p("ryansMammoth/AdmiralsHornpipe", _TRAD, "folk", "dance"),
    _p("essenFolksong/altdeu10", _TRAD, "folk", "song", 1),
    _p("oneills1850/0001-0050", _TRAD, "folk", "tune", 1),
    _p("ryansMammoth/ButchersMarchJig", _TRAD, "folk", "jig"),
    _p("essenFolksong/zuccal0", _TRAD, "folk", "song", 1),
    _p("oneills1850/0051-0100", _TRAD, "folk", "air", 60),
    _p("ryansMammoth/AcaciaReel", _TRAD, "folk", "reel"),
    _p("essenFolksong/folkHaydn", _TRAD, "folk", "song", 1),
    _p("oneills1850/0201-0300", _TRAD, "folk", "tune", 210),
    _p("ryansMammoth/CastlesInTheAirJig", _TRAD, "folk", "jig"),
    _p("essenFolksong/irl", _TRAD, "folk", "song", 1),
    _p("airdsAirs/book1", _TRAD, "folk", "tune", 1),
    _p("essenFolksong/erk5", _TRAD, "folk", "song", 1),
    _p("miscFolk/americanfifeopus", _TRAD, "folk", "march", 1),
    _p("essenFolksong/han1", _TRAD, "folk", "song", 1),
    _p("ryansMammoth/AfterTheHareReel", _TRAD, "folk", "reel"),
)


@dataclass(frozen=True)
class Instrument:
    """A General MIDI program as the captions name it, with the MIDI range its notes are folded into."""

    program: int
    gm_name: str
    word: str
    low: int
    high: int


INSTRUMENTS: dict[int, Instrument] = {i.program: i for i in (
    Instrument(0, "Acoustic Grand Piano", "grand piano", 21, 108),
    Instrument(1, "Bright Acoustic Piano", "bright piano", 21, 108),
    Instrument(19, "Church Organ", "church organ", 24, 96),
    Instrument(20, "Reed Organ", "reed organ", 36, 96),
    Instrument(24, "Acoustic Guitar (nylon)", "nylon guitar", 40, 88),
    Instrument(25, "Acoustic Guitar (steel)", "acoustic guitar", 40, 88),
    Instrument(40, "Violin", "violin", 55, 100),
    Instrument(41, "Viola", "viola", 48, 88),
    Instrument(42, "Cello", "cello", 36, 76),
    Instrument(43, "Contrabass", "contrabass", 28, 60),
    Instrument(73, "Flute", "flute", 60, 96),
    Instrument(68, "Oboe", "oboe", 58, 91),
    Instrument(71, "Clarinet", "clarinet", 50, 91),
    Instrument(70, "Bassoon", "bassoon", 34, 72),
    Instrument(56, "Trumpet", "trumpet", 55, 82),
    Instrument(60, "French Horn", "French horn", 41, 77),
    Instrument(57, "Trombone", "trombone", 40, 72),
    Instrument(58, "Tuba", "tuba", 28, 58),
    Instrument(52, "Choir Aahs", "choir", 40, 84),
    Instrument(53, "Voice Oohs", "choir", 40, 84),
)}
#: Families whose instrument plays every part itself (always solo).
POLYPHONIC_FAMILIES = ("piano", "organ", "guitar")
SOLO_PROGRAMS: dict[str, tuple[int, ...]] = {
    "piano": (0, 0, 1), "organ": (19, 19, 20), "guitar": (24, 25),
    "strings": (40, 40, 42, 41), "woodwind": (73, 68, 71), "brass": (56, 60, 57),
}
#: Ensemble line-ups, high to low; a part group goes to each entry (an entry may repeat: two violins).
ENSEMBLES: dict[str, tuple[tuple[int, ...], ...]] = {
    "strings": ((40, 42), (40, 41, 42), (40, 40, 41, 42), (40, 41, 42, 43)),
    "woodwind": ((73, 70), (73, 71, 70), (73, 68, 71, 70), (68, 71, 70)),
    "brass": ((56, 57), (56, 60, 57), (56, 56, 60, 57), (56, 60, 57, 58)),
    "choir": ((52,), (52, 53), (52, 52, 53, 53)),
}
_ENSEMBLE_NOUN = {"strings": "string", "woodwind": "woodwind", "brass": "brass"}
_GM_DRUMS = {"kick": 36, "snare": 38, "hihat": 42}
_DRUM_CHANNEL = 9


@dataclass(frozen=True)
class ClipPlan:
    """What the parent decides about a clip before its piece is parsed (all random choices but the
    excerpt and the line-up, which need the score and come from ``seed``)."""

    clip_id: str
    piece_index: int
    rendering: int
    family: str
    solo: bool
    tempo_class: str
    bpm: int
    drums: bool
    seed: int


@dataclass(frozen=True)
class ClipFacts:
    """Everything known about a rendered clip (one entry of ``clips.json``).

    ``instruments`` lists ``(GM program, GM name)`` of the distinct programs, high to low; drums are
    not in it (see ``drums``). ``start_quarter`` is the excerpt's offset in the score, in quarter notes;
    ``bpm`` counts beats of ``beat_quarters`` quarter notes (:func:`excerpt_beat`); ``onsets`` are the
    seconds at which notes (and kick or snare) start (:func:`onset_times`).
    """

    clip_id: str
    piece: str
    title: str
    composer: str
    era: str
    kind: str
    family: str
    instruments: tuple[tuple[int, str], ...]
    solo: bool
    drums: bool
    bpm: int
    beat_quarters: float
    onsets: tuple[float, ...]
    tempo_class: str
    key: str
    mode: str
    split: str
    start_quarter: float

    @property
    def audio_name(self) -> str:
        return f"{self.clip_id}.wav"

    def to_json(self) -> dict:
        d = asdict(self)
        d["instruments"] = [{"program": p, "name": n} for p, n in self.instruments]
        return d

    @classmethod
    def from_json(cls, d: dict) -> ClipFacts:
        d = dict(d)
        d["instruments"] = tuple((i["program"], i["name"]) for i in d["instruments"])
        d["onsets"] = tuple(d["onsets"])
        return cls(**d)


@dataclass(frozen=True)
class DemoData:
    """A built dataset (see the module docstring for the layout)."""

    root: Path
    clips: tuple[ClipFacts, ...]

    @property
    def audio_dir(self) -> Path:
        return self.root / "audio"

    @property
    def train_json(self) -> Path:
        return self.root / "train.json"

    @property
    def heldout_json(self) -> Path:
        return self.root / "heldout.json"

    @property
    def clips_json(self) -> Path:
        return self.root / "clips.json"

    def split(self, name: str) -> list[ClipFacts]:
        """The clips of ``"train"`` or ``"heldout"``."""
        return [c for c in self.clips if c.split == name]

    @property
    def train_pieces(self) -> list[str]:
        return sorted({c.piece for c in self.split("train")})

    @property
    def heldout_pieces(self) -> list[str]:
        return sorted({c.piece for c in self.split("heldout")})

    @classmethod
    def load(cls, root: Path) -> DemoData:
        """Read a dataset written by :func:`build_demo_data`."""
        root = Path(root)
        raw = json.loads((root / "clips.json").read_text(encoding="utf-8"))
        return cls(root, tuple(ClipFacts.from_json(d) for d in raw))


class DemoDataError(RuntimeError):
    """The dataset cannot be built here (missing fluidsynth or soundfont, a score that fails, ...)."""


# ---- planning (parent process) ------------------------------------------------------------------
def select_pieces(n: int | Sequence[Piece] | None) -> list[Piece]:
    """``n`` pieces (all when ``None``), taken round-robin over the eras in :data:`PIECES` order;
    a sequence of pieces is used as it is."""
    if n is not None and not isinstance(n, int):
        return list(n)
    if n is None or n >= len(PIECES):
        return list(PIECES)
    if n < 1:
        raise ValueError(f"pieces must be >= 1, got {n}")
    by_era = {era: [p for p in PIECES if p.era == era] for era in ERAS}
    out: list[Piece] = []
    i = 0
    while len(out) < n:
        for era in ERAS:
            if i < len(by_era[era]) and len(out) < n:
                out.append(by_era[era][i])
        i += 1
    return out


def plan_clips(pieces: Sequence[Piece], renderings: int, seed: int) -> list[ClipPlan]:
    """Family, tempo, solo and drums of every clip.

    Renderings of a piece rotate through the families and the tempo classes from a random start,
    so with 7 renderings every piece is heard once in every family, and tempo classes are balanced.
    """
    if renderings < 1:
        raise ValueError(f"renderings must be >= 1, got {renderings}")
    rng = np.random.default_rng([seed, 1])
    families, tempi = list(FAMILIES), list(TEMPO_CLASSES)
    plans = []
    for pi, piece in enumerate(pieces):
        fam_off, tempo_off = int(rng.integers(len(families))), int(rng.integers(len(tempi)))
        n_drums = min(renderings, int(DRUMS_FRACTION * renderings + rng.random()))
        drums = {int(r) for r in rng.choice(renderings, size=n_drums, replace=False)}
        for r in range(renderings):
            family = families[(fam_off + r) % len(families)]
            tempo_class = tempi[(tempo_off + r) % len(tempi)]
            lo, hi = TEMPO_CLASSES[tempo_class]
            bpm = int(rng.integers(lo, hi + 1))
            ensemble_draw = rng.random()
            if family in POLYPHONIC_FAMILIES:
                solo = True
            elif family == "choir":
                solo = False
            else:
                solo = ensemble_draw < 0.4
            plans.append(ClipPlan(f"{piece.slug}-{r}", pi, r, family, solo, tempo_class, bpm, r in drums,
                                  int(rng.integers(2**62))))
    return plans


def _coverage(plans: Sequence[ClipPlan]) -> set:
    return ({("family", p.family) for p in plans} | {("tempo", p.tempo_class) for p in plans}
            | {("solo", p.solo) for p in plans} | {("drums", p.drums) for p in plans})


def choose_heldout(pieces: Sequence[Piece], plans: Sequence[ClipPlan], seed: int,
                   fraction: float = HELDOUT_FRACTION) -> set[int]:
    """Indices of the held-out pieces: ``fraction`` of each era (rounded by largest remainder, at least
    one piece in all), drawn until the held-out clips cover every family, tempo class, solo/ensemble
    and drums/no drums of the whole set (else the best-covering of 200 draws is kept)."""
    if len(pieces) < 2:
        raise ValueError("a held-out split needs at least 2 pieces")
    rng = np.random.default_rng([seed, 2])
    eras = [e for e in ERAS if any(p.era == e for p in pieces)]
    members = {e: [i for i, p in enumerate(pieces) if p.era == e] for e in eras}
    total = max(1, min(len(pieces) - 1, round(fraction * len(pieces))))
    exact = {e: fraction * len(members[e]) for e in eras}
    quota = {e: int(exact[e]) for e in eras}
    for e in sorted(eras, key=lambda e: (-(exact[e] - quota[e]), eras.index(e))):
        if sum(quota.values()) >= total:
            break
        quota[e] += 1
    by_piece: dict[int, list[ClipPlan]] = {}
    for p in plans:
        by_piece.setdefault(p.piece_index, []).append(p)
    want = _coverage(plans)
    best: tuple[int, set[int]] | None = None
    for _ in range(200):
        held = set()
        for e in eras:
            held.update(int(i) for i in rng.permutation(members[e])[: quota[e]])
        covered = len(_coverage([c for i in held for c in by_piece[i]]) & want)
        if best is None or covered > best[0]:
            best = (covered, held)
        if covered == len(want):
            break
    assert best is not None
    return best[1]


# ---- scores (worker processes) ------------------------------------------------------------------
@dataclass(frozen=True)
class _Note:
    start: float      # quarter notes from the start of the score
    end: float
    pitch: int


@dataclass
class _Score:
    title: str
    parts: list[list[_Note]]          # non-empty parts, ordered high to low by mean pitch
    measure_starts: list[float]
    end: float
    key: str
    mode: str
    pulse: float                      # a first guess of the beat in quarter notes (:func:`pulse_quarters`)


_KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_SPELLING_MAJOR = ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat", "B")
_SPELLING_MINOR = ("C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A", "B-flat", "B")
#: Quarter notes at the start of a score that decide the key, and the latest excerpt start (unless
#: 8 bars are longer).
_KEY_QUARTERS = 64.0
_EXCERPT_QUARTERS = 32.0


def _spell(name: str) -> str:
    """music21's ``B-`` / ``F#`` -> ``B-flat`` / ``F-sharp``."""
    accidental = {"": "", "-": "-flat", "#": "-sharp", "--": "-double-flat", "##": "-double-sharp"}
    return name[0].upper() + accidental[name[1:]]


def _estimate_key(parts: list[list[_Note]], sharps: int | None, declared: str | None = None) -> tuple[str, str]:
    """Key and mode. ``sharps`` (of the key signature) limits the choice to its major key and relative
    minor; a score that declares "minor" is taken at its word (editors leave "major" as a default)."""
    hist = np.zeros(12)
    for part in parts:
        for n in part:
            if n.start < _KEY_QUARTERS:
                hist[n.pitch % 12] += min(n.end - n.start, 4.0)
    candidates = []
    if sharps is not None:
        major = (7 * sharps) % 12
        candidates = [(major, "major"), ((major + 9) % 12, "minor")]
    else:
        candidates = [(t, m) for m in MODES for t in range(12)]
    scores = []
    for tonic, mode in candidates:
        profile = np.roll(_KK_MAJOR if mode == "major" else _KK_MINOR, tonic)
        scores.append(float(np.corrcoef(hist, profile)[0, 1]) if hist.any() else 0.0)
    tonic, mode = candidates[int(np.argmax(scores))]
    if sharps is not None and declared == "minor":
        tonic, mode = candidates[1]
    if sharps is not None:
        from music21 import key as m21key

        name = m21key.KeySignature(sharps).asKey(mode).tonic.name
        return f"{_spell(name)} {mode}", mode
    return f"{(_SPELLING_MAJOR if mode == 'major' else _SPELLING_MINOR)[tonic]} {mode}", mode


def load_score(piece: Piece) -> _Score:
    """Parse ``piece`` (never reading or writing music21's cache) into notes per part."""
    import warnings

    from music21 import corpus, harmony, stream

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {} if piece.number is None else {"number": piece.number}
        score = corpus.parse(piece.path, forceSource=True, **kwargs)
        if isinstance(score, stream.Opus):
            score = score.mergeScores()
        parts = []
        for part in score.parts:
            notes = []
            for n in part.flatten().stripTies().notes:
                if isinstance(n, harmony.Harmony) or n.duration.isGrace or n.quarterLength <= 0:
                    continue
                start = float(n.offset)
                end = start + float(n.quarterLength)
                notes.extend(_Note(start, end, int(p.midi)) for p in n.pitches)
            if notes:
                notes.sort(key=lambda n: (n.start, n.pitch))
                parts.append(notes)
        if not parts:
            raise DemoDataError(f"{piece.name}: no notes")
        parts.sort(key=lambda notes: -float(np.mean([n.pitch for n in notes])))
        measures = sorted({float(m.offset) for m in score.parts[0].getElementsByClass(stream.Measure)})
        signatures = list(score.parts[0].recurse().getElementsByClass("KeySignature"))
        title = (score.metadata.title if score.metadata is not None else None) or ""
    end = max(n.end for part in parts for n in part)
    sharps = signatures[0].sharps if signatures else None
    key_name, mode = _estimate_key(parts, sharps, getattr(signatures[0], "mode", None) if signatures else None)
    measures = measures or [0.0]
    return _Score(title.strip(), parts, measures, end, key_name, mode, pulse_quarters(parts, _excerpt_limit(measures)))


def pulse_quarters(parts: list[list[_Note]], until: float) -> float:
    """A first guess of a score's beat in quarter notes, used to size the excerpt window before the
    excerpt's own beat is known (:func:`excerpt_beat`): the most common interval between successive
    onsets of all parts before ``until`` (the region excerpts come from), rounded to a power of two
    (ties go to the longer value)."""
    onsets = np.unique([n.start for part in parts for n in part if n.start < until])
    gaps = np.diff(onsets)
    gaps = gaps[gaps > 1e-3]
    if not gaps.size:
        return 1.0
    levels, counts = np.unique(np.round(np.log2(gaps)).astype(int), return_counts=True)
    return float(2.0 ** levels[np.flatnonzero(counts == counts.max())[-1]])


#: The note values a beat may have, in quarter notes: plain and dotted, a thirty-second note to a dotted
#: whole note (dotted values are the beats of compound meters such as a jig's 6/8, and halve the rounding).
BEAT_VALUES = tuple(sorted(m * 2.0**k for k in range(-3, 3) for m in (1.0, 1.5)))


def beat_name(quarters: float) -> str:
    """``0.75`` -> ``"dotted eighth"``: the name of a beat value of :data:`BEAT_VALUES`."""
    plain = {0.125: "thirty-second", 0.25: "sixteenth", 0.5: "eighth", 1.0: "quarter", 2.0: "half", 4.0: "whole"}
    if quarters in plain:
        return plain[quarters]
    if quarters / 1.5 in plain:
        return "dotted " + plain[quarters / 1.5]
    raise ValueError(f"{quarters} quarter notes is not a beat value of {BEAT_VALUES}")


def excerpt_beat(notes: Sequence[_Note], start: float, bpm: float, end: float) -> float:
    """The beat of an excerpt starting at ``start`` played at ``bpm`` beats per minute, in quarter notes:
    the value of :data:`BEAT_VALUES` for which the 5-second clip has as many distinct note onsets
    (of ``notes``, what is actually played) as beats (ties go to the longer value). Values whose clip
    would run past the score's ``end`` are not considered (the shortest is taken if none fits).

    The clips' BPM counts these beats, not quarter notes: how fast music sounds is how often notes
    start, and the scores' note values span 16x (Palestrina moves in half notes, a reel in
    sixteenths), so a quarter-note BPM is not audible without drums.
    """
    beats = CLIP_SECONDS * bpm / 60.0
    onsets = np.unique([n.start for n in notes if n.start >= start])
    fitting = [value for value in BEAT_VALUES if start + beats * value <= end + 1e-9] or [BEAT_VALUES[0]]
    best = min(fitting, key=lambda value: (
        abs(math.log2(max(1, int(np.count_nonzero(onsets < start + beats * value))) / beats)), -value))
    return float(best)


def _window_quality(parts: list[list[_Note]], start: float, length: float) -> tuple[int, float]:
    """(onsets in the window, fraction of the window in which something sounds)."""
    grid = start + (np.arange(64) + 0.5) * length / 64
    sounding = np.zeros(64, dtype=bool)
    onsets = 0
    for part in parts:
        for n in part:
            if n.end <= start or n.start >= start + length:
                continue
            onsets += n.start >= start
            sounding |= (grid >= n.start) & (grid < n.end)
    return onsets, float(sounding.mean())


def _excerpt_limit(measure_starts: list[float]) -> float:
    return max(_EXCERPT_QUARTERS, measure_starts[min(8, len(measure_starts) - 1)])


def choose_excerpt(score: _Score, length: float, rng: np.random.Generator) -> float:
    """A measure start near the beginning (first 8 bars or 32 quarter notes), where the key of the
    score is the key of the excerpt, whose ``length`` quarters are well filled with notes; random
    among the good ones."""
    limit = _excerpt_limit(score.measure_starts)
    starts = [s for s in score.measure_starts if s <= limit and s + length <= score.end + 1e-9] or [0.0]
    quality = [_window_quality(score.parts, s, length) for s in starts]
    good = [s for s, (onsets, filled) in zip(starts, quality) if onsets >= 4 and filled >= 0.85]
    if good:
        return float(good[int(rng.integers(len(good)))])
    return float(starts[int(np.argmax([filled + 0.01 * min(o, 8) for o, filled in quality]))])


def _fold(pitch: int, inst: Instrument) -> int:
    while pitch < inst.low:
        pitch += 12
    while pitch > inst.high:
        pitch -= 12
    return pitch


def _skyline(part: list[_Note]) -> list[_Note]:
    """The highest note of each onset (a melody line for a one-voice instrument)."""
    top: dict[float, _Note] = {}
    for n in part:
        if n.start not in top or n.pitch > top[n.start].pitch:
            top[n.start] = n
    line = [top[s] for s in sorted(top)]
    return [_Note(n.start, min(n.end, nxt.start) if nxt else n.end, n.pitch)
            for n, nxt in zip(line, [*line[1:], None])]


def arrange(score: _Score, plan: ClipPlan, rng: np.random.Generator, start: float,
            length: float) -> list[tuple[int, list[_Note]]]:
    """(GM program, notes) per MIDI channel, notes already folded into each instrument's range.

    A solo melody instrument plays the highest part that sounds through most of the excerpt (the top
    line of all parts if none does).
    """
    parts = score.parts
    if plan.family in POLYPHONIC_FAMILIES:
        program = int(rng.choice(SOLO_PROGRAMS[plan.family]))
        lines = [(program, part) for part in parts]
    elif plan.solo:
        program = int(rng.choice(SOLO_PROGRAMS[plan.family]))
        melody = next((p for p in parts if _window_quality([p], start, length)[1] >= 0.6),
                      [n for p in parts for n in p])
        lines = [(program, _skyline(melody))]
    else:
        lineups = [u for u in ENSEMBLES[plan.family] if len(u) <= max(2, len(parts))]
        lineup = lineups[int(rng.integers(len(lineups)))]
        if len(parts) == 1:
            melody = _skyline(parts[0])
            doubled = [_Note(n.start, n.end, n.pitch - 12) for n in melody]
            lines = [(lineup[0], melody), (lineup[-1], doubled)]
        else:
            groups = np.array_split(np.arange(len(parts)), len(lineup))
            lines = [(lineup[g], parts[int(i)]) for g, group in enumerate(groups) for i in group]
    out = []
    for program, notes in lines[:_DRUM_CHANNEL]:      # channels 0..8; 9 is the drum kit
        inst = INSTRUMENTS[program]
        out.append((program, [_Note(n.start, n.end, _fold(n.pitch, inst)) for n in notes]))
    return out


# ---- fluidsynth ---------------------------------------------------------------------------------
#: An event of a clip: (sample, order, status byte with channel, data 1, data 2); ``order`` puts
#: set-up (0) before note-offs (1) before note-ons (2) at the same sample.
Event = tuple[int, int, int, int, int]


def clip_events(score: _Score, plan: ClipPlan, lines: list[tuple[int, list[_Note]]], start: float, beat: float,
                rng: np.random.Generator) -> list[Event]:
    """MIDI-style events of the excerpt ``[start, start + 5 s)`` at the plan's tempo (``plan.bpm`` beats of
    ``beat`` quarter notes per minute): controllers and program changes, the notes (velocity varied),
    and the drum pattern on channel 10 (kick and snare alternating on the beats from each bar line,
    closed hi-hat on every half beat)."""
    qpm = plan.bpm * beat
    length = CLIP_SECONDS * qpm / 60.0
    at = lambda q: min(CLIP_SAMPLES, max(0, round((q - start) * 60.0 / qpm * SAMPLE_RATE_HZ)))
    events: list[Event] = []
    base = int(rng.integers(72, 101))
    for ch, (program, notes) in enumerate(lines):
        events += [(0, 0, 0xB0 | ch, 7, 100), (0, 0, 0xB0 | ch, 91, 40), (0, 0, 0xB0 | ch, 93, 0),
                   (0, 0, 0xC0 | ch, program, 0)]
        accent = 8 if ch == 0 and len(lines) > 1 else 0
        for n in notes:
            if n.end <= start or n.start >= start + length:
                continue
            on, off = at(n.start), at(n.end)
            if off <= on:
                continue
            velocity = int(np.clip(base + accent + rng.normal(0, 5), 30, 127))
            events += [(on, 2, 0x90 | ch, n.pitch, velocity), (off, 1, 0x80 | ch, n.pitch, 0)]
    if plan.drums:
        dc, beat_q = _DRUM_CHANNEL, beat
        events += [(0, 0, 0xB0 | dc, 7, 110), (0, 0, 0xB0 | dc, 91, 20), (0, 0, 0xC0 | dc, 0, 0)]
        for k in range(int(np.ceil(length / beat_q * 2))):
            q = start + k * beat_q / 2
            if q >= start + length:
                break
            bar = score.measure_starts[max(0, bisect_right(score.measure_starts, q + 1e-9) - 1)]
            beat = (q - bar) / beat_q
            hits = [("hihat", 84 if k % 2 == 0 else 68)]
            if abs(beat - round(beat)) < 1e-6:
                hits.append(("kick", 100) if round(beat) % 2 == 0 else ("snare", 90))
            for name, vel in hits:
                velocity = int(np.clip(vel + rng.normal(0, 4), 30, 127))
                events += [(at(q), 2, 0x90 | dc, _GM_DRUMS[name], velocity),
                           (at(q + beat_q / 4), 1, 0x80 | dc, _GM_DRUMS[name], 0)]
    return sorted(events)


@functools.lru_cache(maxsize=1)
def _load_libfluidsynth():
    """ctypes mirror of the few libfluidsynth 2.x functions used (declarations from fluidsynth/*.h)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("fluidsynth")
    if name is None:
        raise DemoDataError("libfluidsynth not found; install it: apt-get install fluidsynth fluid-soundfont-gm")
    lib = ctypes.CDLL(name)
    P, I, D, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_char_p
    signatures = {
        # fluid_settings_t *new_fluid_settings(void);
        "new_fluid_settings": (P, []),
        # void delete_fluid_settings(fluid_settings_t *settings);
        "delete_fluid_settings": (None, [P]),
        # int fluid_settings_setnum(fluid_settings_t *settings, const char *name, double val);
        "fluid_settings_setnum": (I, [P, S, D]),
        # int fluid_settings_setint(fluid_settings_t *settings, const char *name, int val);
        "fluid_settings_setint": (I, [P, S, I]),
        # fluid_synth_t *new_fluid_synth(fluid_settings_t *settings);
        "new_fluid_synth": (P, [P]),
        # void delete_fluid_synth(fluid_synth_t *synth);
        "delete_fluid_synth": (None, [P]),
        # int fluid_synth_sfload(fluid_synth_t *synth, const char *filename, int reset_presets);
        "fluid_synth_sfload": (I, [P, S, I]),
        # int fluid_synth_noteon(fluid_synth_t *synth, int chan, int key, int vel);
        "fluid_synth_noteon": (I, [P, I, I, I]),
        # int fluid_synth_noteoff(fluid_synth_t *synth, int chan, int key);
        "fluid_synth_noteoff": (I, [P, I, I]),
        # int fluid_synth_cc(fluid_synth_t *synth, int chan, int ctrl, int val);
        "fluid_synth_cc": (I, [P, I, I, I]),
        # int fluid_synth_program_change(fluid_synth_t *synth, int chan, int program);
        "fluid_synth_program_change": (I, [P, I, I]),
        # int fluid_synth_write_float(fluid_synth_t *synth, int len, void *lout, int loff, int lincr,
        #                             void *rout, int roff, int rincr);
        "fluid_synth_write_float": (I, [P, I, P, I, I, P, I, I]),
        # fluid_log_function_t fluid_set_log_function(int level, fluid_log_function_t fun, void *data);
        "fluid_set_log_function": (P, [I, P, P]),
    }
    for fn, (restype, argtypes) in signatures.items():
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    for level in range(5):                       # FLUID_PANIC .. FLUID_DBG: the library stays quiet
        lib.fluid_set_log_function(level, None, None)
    return lib


class _Synth:
    """One fluidsynth synthesizer with the GM soundfont loaded; renders ONE clip, then is closed.

    A fresh synthesizer per clip (about 50 ms to make) keeps every clip a function of its own events
    only: ``fluid_synth_system_reset`` leaves voices releasing and the reverb ringing. Settings are
    fixed: 24 kHz, gain 0.5, reverb on with fluidsynth's default room, chorus off, one core, samples
    loaded on demand.
    """

    def __init__(self, soundfont: Path) -> None:
        self._lib = lib = _load_libfluidsynth()
        self._synth = None
        self._settings = lib.new_fluid_settings()
        for key, value in (("synth.sample-rate", float(SAMPLE_RATE_HZ)), ("synth.gain", 0.5),
                           ("synth.reverb.room-size", 0.2), ("synth.reverb.damp", 0.0),
                           ("synth.reverb.width", 0.5), ("synth.reverb.level", 0.9)):
            lib.fluid_settings_setnum(self._settings, key.encode(), value)
        for key, value in (("synth.reverb.active", 1), ("synth.chorus.active", 0), ("synth.cpu-cores", 1),
                           ("synth.dynamic-sample-loading", 1)):
            lib.fluid_settings_setint(self._settings, key.encode(), value)
        self._synth = lib.new_fluid_synth(self._settings)
        if not self._synth:
            self.close()
            raise DemoDataError("fluidsynth: new_fluid_synth failed")
        if lib.fluid_synth_sfload(self._synth, str(soundfont).encode(), 1) < 0:
            self.close()
            raise DemoDataError(f"fluidsynth cannot load the soundfont {soundfont}")

    def render(self, events: Sequence[Event], n_samples: int) -> np.ndarray:
        lib, synth = self._lib, self._synth
        if synth is None:
            raise RuntimeError("this synthesizer is closed")
        stereo = np.zeros((n_samples, 2), dtype=np.float32)
        ptr = stereo.ctypes.data
        pos = 0
        for sample, _, status, d1, d2 in [*events, (n_samples, 9, 0, 0, 0)]:
            sample = min(sample, n_samples)
            if sample > pos:
                if lib.fluid_synth_write_float(synth, sample - pos, ptr, 2 * pos, 2, ptr, 2 * pos + 1, 2) != 0:
                    raise DemoDataError("fluidsynth: fluid_synth_write_float failed")
                pos = sample
            kind, ch = status & 0xF0, status & 0x0F
            if kind == 0x90:
                lib.fluid_synth_noteon(synth, ch, d1, d2)
            elif kind == 0x80:
                lib.fluid_synth_noteoff(synth, ch, d1)
            elif kind == 0xB0:
                lib.fluid_synth_cc(synth, ch, d1, d2)
            elif kind == 0xC0:
                lib.fluid_synth_program_change(synth, ch, d1)
        self.close()
        return stereo.mean(axis=1, dtype=np.float64)

    def close(self) -> None:
        if self._synth:
            self._lib.delete_fluid_synth(self._synth)
            self._synth = None
        if self._settings:
            self._lib.delete_fluid_settings(self._settings)
            self._settings = None


def synthesize(events: Sequence[Event], soundfont: Path = SOUNDFONT, n_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """Mono float64 audio of ``events`` (sorted; sample positions past ``n_samples`` are clamped),
    rendered by a fresh fluidsynth synthesizer."""
    synth = _Synth(Path(soundfont))
    try:
        return synth.render(events, n_samples)
    finally:
        synth.close()


def finish(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fades (3 ms in, 40 ms out), RMS to :data:`TARGET_RMS` +- a small gain, peaks limited; int16."""
    audio = audio.copy()
    fade_in, fade_out = round(0.003 * SAMPLE_RATE_HZ), round(0.040 * SAMPLE_RATE_HZ)
    audio[:fade_in] *= np.linspace(0.0, 1.0, fade_in)
    audio[-fade_out:] *= np.linspace(1.0, 0.0, fade_out)
    rms = float(np.sqrt(np.mean(audio**2)))
    if rms < 1e-5:
        raise DemoDataError("rendered clip is silent")
    gain = TARGET_RMS / rms * 10 ** (rng.uniform(-GAIN_JITTER_DB, GAIN_JITTER_DB) / 20)
    peak = float(np.max(np.abs(audio))) * gain
    if peak > PEAK_LIMIT:
        gain *= PEAK_LIMIT / peak
    return np.clip(np.round(audio * gain * 32767), -32767, 32767).astype(np.int16)


def choose_clip(score: _Score, plan: ClipPlan, rng: np.random.Generator
                ) -> tuple[float, list[tuple[int, list[_Note]]], float]:
    """(excerpt start in quarters, line-up as :func:`arrange` gives it, beat in quarters) of one planned
    clip: the excerpt and its line-up are chosen for the score's first-guess beat, then the beat is that
    of the notes played (:func:`excerpt_beat`)."""
    length = CLIP_SECONDS * plan.bpm * score.pulse / 60.0
    start = choose_excerpt(score, length, rng)
    lines = arrange(score, plan, rng, start, length)
    return start, lines, excerpt_beat([n for _, notes in lines for n in notes], start, plan.bpm, score.end)


@dataclass(frozen=True)
class RenderedClip:
    pcm: np.ndarray                   # int16, CLIP_SAMPLES
    start_quarter: float              # the excerpt's offset in the score
    programs: list[int]               # GM programs, high to low
    beat_quarters: float              # :func:`excerpt_beat`
    onsets: tuple[float, ...]         # :func:`onset_times`


def onset_times(events: Sequence[Event]) -> tuple[float, ...]:
    """Seconds at which notes or beat-marking drums (kick, snare; not the hi-hat's half beats) start, one
    entry per distinct time: the events a listener counts as the pulse of the music."""
    hihat = _GM_DRUMS["hihat"]
    samples = {sample for sample, _, status, key, velocity in events          # velocity 0 is a note-off
               if status & 0xF0 == 0x90 and velocity > 0 and not ((status & 0x0F) == _DRUM_CHANNEL and key == hihat)}
    return tuple(round(sample / SAMPLE_RATE_HZ, 4) for sample in sorted(samples))


def render_clip(score: _Score, plan: ClipPlan, soundfont: Path = SOUNDFONT) -> RenderedClip:
    """Audio and facts of one planned clip."""
    rng = np.random.default_rng(plan.seed)
    start, lines, beat = choose_clip(score, plan, rng)
    events = clip_events(score, plan, lines, start, beat, rng)
    try:
        pcm = finish(synthesize(events, soundfont), rng)
    except DemoDataError as e:
        raise DemoDataError(f"{plan.clip_id} (from quarter {start}): {e}") from e
    return RenderedClip(pcm, start, list(dict.fromkeys(p for p, _ in lines)), beat, onset_times(events))


def _render_piece(task: tuple[Piece, list[ClipPlan], dict[str, str], str, str]) -> list[ClipFacts]:
    """Worker: parse one piece and render all its clips into ``audio_dir``."""
    import soundfile as sf

    piece, plans, splits, audio_dir, soundfont = task
    score = load_score(piece)
    facts = []
    for plan in plans:
        clip = render_clip(score, plan, Path(soundfont))
        sf.write(Path(audio_dir) / f"{plan.clip_id}.wav", clip.pcm, SAMPLE_RATE_HZ, subtype="PCM_16", format="WAV")
        facts.append(ClipFacts(
            clip_id=plan.clip_id, piece=piece.name, title=score.title, composer=piece.composer,
            era=piece.era, kind=piece.kind, family=plan.family,
            instruments=tuple((p, INSTRUMENTS[p].gm_name) for p in clip.programs),
            solo=plan.solo, drums=plan.drums, bpm=plan.bpm, beat_quarters=clip.beat_quarters,
            onsets=clip.onsets, tempo_class=plan.tempo_class,
            key=score.key, mode=score.mode, split=splits[plan.clip_id], start_quarter=clip.start_quarter))
    return facts


# ---- text ---------------------------------------------------------------------------------------
_TEMPO_ADJ = {"slow": ("slow", "slow, calm"), "moderate": ("moderate-tempo", "moderately paced"),
              "fast": ("fast", "fast, lively")}
_DRUMS_PHRASE = (" with drums", ", backed by drums", ", with a drum kit keeping the beat")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _performer(f: ClipFacts) -> str:
    words = list(dict.fromkeys(INSTRUMENTS[p].word for p, _ in f.instruments))
    if f.family == "choir":
        return "a choir ensemble"
    if f.solo:
        return f"a solo {words[0]}"
    return f"a {_ENSEMBLE_NOUN[f.family]} ensemble of {_join(words)}"


def caption(f: ClipFacts, rng: np.random.Generator, *, detailed: bool = False) -> str:
    """A one-sentence caption with the family, tempo class, solo/ensemble, era, key (and drums) words;
    ``detailed`` adds a sentence with the BPM and the line-up."""
    tempo = _TEMPO_ADJ[f.tempo_class][int(rng.integers(2))]
    drums = _DRUMS_PHRASE[int(rng.integers(len(_DRUMS_PHRASE)))] if f.drums else ""
    perf, era, kind, key = _performer(f), f.era, f.kind, f.key
    templates = (
        f"A {tempo} {era} {kind} played by {perf}{drums}, in {key}.",
        f"{perf[0].upper()}{perf[1:]} plays a {tempo} {era} {kind} in {key}{drums}.",
        f"{tempo[0].upper()}{tempo[1:]} {era} music in {key}: a {kind} performed by {perf}{drums}.",
        f"This is a {tempo} {era} {kind} in {key}, performed by {perf}{drums}.",
    )
    text = templates[int(rng.integers(len(templates)))]
    if detailed:
        how = "a solo performance" if f.solo else "an ensemble performance"
        text += f" The tempo is {f.tempo_class}, about {f.bpm} BPM, and it is {how}."
    return text


def answers(f: ClipFacts, rng: np.random.Generator) -> dict[str, str]:
    """Short answers to :data:`QUESTIONS`, each with its class word verbatim."""
    pick = lambda *options: options[int(rng.integers(len(options)))]
    words = list(dict.fromkeys(INSTRUMENTS[p].word for p, _ in f.instruments))
    with_drums = ", with drums" if f.drums else ""
    if f.family == "choir":
        instrument = f"A choir{with_drums}."
    elif f.solo:
        instrument = pick(f"A {words[0]}{with_drums}.", f"A solo {words[0]}{with_drums}.")
    else:
        instrument = f"A {_ENSEMBLE_NOUN[f.family]} ensemble: {_join(words)}{with_drums}."
    if f.solo:
        solo = pick("It is a solo performance.", f"A solo: one {words[0]}.")
    elif f.family == "choir":
        solo = "It is an ensemble: a choir."
    else:
        solo = pick("It is an ensemble.", f"An ensemble of {_join(words)}.")
    era = (pick("It is a folk tune.", "It sounds like folk music.") if f.era == "folk"
           else pick(f"It sounds {f.era}.", f"It is {f.era} music."))
    return {
        "tempo": pick(f"The tempo is {f.tempo_class}, about {f.bpm} BPM.",
                      f"It is {f.tempo_class}, around {f.bpm} beats per minute."),
        "instrument": instrument,
        "solo": solo,
        "key": pick(f"It is in {f.key}.", f"The key is {f.key}."),
        "era": era,
    }


def qa_items(f: ClipFacts, seed: int) -> list[dict]:
    """MusicQA items of a clip: one caption question and the five targeted ones (one pair per item)."""
    rng = np.random.default_rng([seed, 3, *map(ord, f.clip_id)])
    question = CAPTION_QUESTIONS[int(rng.integers(len(CAPTION_QUESTIONS)))]
    pairs = [(question, caption(f, rng, detailed=question == "Describe the audio in detail"))]
    pairs += [(QUESTIONS[k], a) for k, a in answers(f, rng).items()]
    return [{"audio_name": f.audio_name,
             "conversation": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]


# ---- the build ----------------------------------------------------------------------------------
def check_renderer(soundfont: Path = SOUNDFONT) -> None:
    """Raise :class:`DemoDataError` naming the Debian package that is missing."""
    _load_libfluidsynth()
    if not Path(soundfont).is_file():
        raise DemoDataError(f"soundfont {soundfont} not found; install it: apt-get install fluid-soundfont-gm")


def build_demo_data(out: Path, *, seed: int = 0, progress: Callable[[str], None] | None = None,
                    pieces: int | Sequence[Piece] | None = None, renderings: int = DEFAULT_RENDERINGS, jobs: int = 2,
                    overwrite: bool = False, soundfont: Path = SOUNDFONT) -> DemoData:
    """Render the dataset into ``out`` (built in a temporary sibling folder, renamed at the end).

    Args:
        out: Folder to create.
        seed: Seed of every random choice; same seed, pieces and renderings -> identical bytes.
        progress: Called with one line per rendered piece.
        pieces: Use only this many pieces of :data:`PIECES` (round-robin over eras), or these pieces;
            default all.
        renderings: Clips per piece (7 = one per family).
        jobs: Worker processes (1 renders in this process).
        overwrite: Replace ``out`` if it exists (otherwise that is an error).
        soundfont: The GM soundfont.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        DemoDataError: fluidsynth or the soundfont is missing, or a piece fails to render.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    check_renderer(soundfont)
    say = progress or (lambda msg: None)
    selected = select_pieces(pieces)
    plans = plan_clips(selected, renderings, seed)
    held = choose_heldout(selected, plans, seed)
    splits = {p.clip_id: "heldout" if p.piece_index in held else "train" for p in plans}
    by_piece: dict[int, list[ClipPlan]] = {}
    for p in plans:
        by_piece.setdefault(p.piece_index, []).append(p)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)                                    # mkdtemp makes it private
    try:
        audio_dir = tmp / "audio"
        audio_dir.mkdir()
        tasks = [(selected[i], by_piece[i], splits, str(audio_dir), str(soundfont)) for i in range(len(selected))]
        # Longest first (file size is a good proxy for parse time); results are keyed by piece.
        order = sorted(range(len(tasks)), key=lambda i: -_score_size(selected[i]))
        results: dict[int, list[ClipFacts]] = {}
        t0 = time.perf_counter()
        if jobs <= 1:
            mapped = map(_render_piece, (tasks[i] for i in order))
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
            mapped = pool.map(_render_piece, [tasks[i] for i in order])
        try:
            for n, (i, facts) in enumerate(zip(order, mapped), 1):
                results[i] = facts
                say(f"[{n}/{len(tasks)}] {selected[i].name}: {len(facts)} clips "
                    f"({time.perf_counter() - t0:.0f} s)")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        clips = tuple(f for i in range(len(selected)) for f in results[i])
        check_split(clips)
        for name in ("train", "heldout"):
            items = [item for f in clips if f.split == name for item in qa_items(f, seed)]
            _write_json(tmp / f"{name}.json", items)
        _write_json(tmp / "clips.json", [f.to_json() for f in clips])
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoData(out, clips)


def _score_size(piece: Piece) -> int:
    from music21 import corpus

    paths = corpus.getWork(piece.path)
    path = paths[0] if isinstance(paths, list) else paths
    return Path(path).stat().st_size


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def check_split(clips: Sequence[ClipFacts]) -> None:
    """Assert that no piece has clips in both splits."""
    train = {c.piece for c in clips if c.split == "train"}
    heldout = {c.piece for c in clips if c.split == "heldout"}
    assert not train & heldout, f"pieces in both splits: {sorted(train & heldout)}"


#: Where the committed example clips live (``make demo`` captions them).
EXAMPLE_CLIPS_DIR = Path(__file__).resolve().parents[1] / "clips"
#: Families of the example clips, most contrasting first.
EXAMPLE_FAMILIES = ("piano", "strings", "choir", "brass", "woodwind", "organ", "guitar")


def write_example_clips(data: DemoData, dest: Path, n: int = 4) -> list[Path]:
    """Copy ``n`` held-out clips of different families into ``dest``, with a README.md of their facts.

    Deterministic: families in :data:`EXAMPLE_FAMILIES` order; for each, the first held-out clip (in
    dataset order) that adds the most variety (an era, tempo class, drums or solo/ensemble value not
    shown yet), ensembles first among equals.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    heldout = data.split("heldout")
    chosen: list[ClipFacts] = []
    for family in EXAMPLE_FAMILIES:
        cands = [c for c in heldout if c.family == family]
        if len(chosen) >= n or not cands:
            continue
        novelty = lambda c: (-sum(getattr(c, k) not in {getattr(x, k) for x in chosen}
                                  for k in ("era", "tempo_class", "drums", "solo")), c.solo)
        chosen.append(min(cands, key=novelty))
    paths = []
    lines = ["# Example clips",
             "",
             "Held-out clips of the demo data set, copied by `examples.demo_model.data.write_example_clips`",
             f"(`python -m examples.demo_model.data OUT --examples examples/clips --n-examples {n}`, default seed):",
             "real scores of music21's corpus rendered with fluidsynth and the FluidR3 GM soundfont; 5 s,",
             "24 kHz mono 16-bit. The demo model never saw these pieces in training. Their facts, as",
             "`clips.json` records them:",
             "",
             "| file | piece | era | family | instruments | solo | drums | tempo | key |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in chosen:
        path = dest / c.audio_name
        shutil.copyfile(data.audio_dir / c.audio_name, path)
        paths.append(path)
        names = ", ".join(name for _, name in c.instruments)
        lines.append(f"| {c.audio_name} | {c.piece} ({c.composer}) | {c.era} | {c.family} | {names} | "
                     f"{'solo' if c.solo else 'ensemble'} | {'yes' if c.drums else 'no'} | "
                     f"{c.tempo_class}, {c.bpm} BPM of {beat_name(c.beat_quarters)} notes | {c.key} |")
    (dest / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(dest / "clips.json", [c.to_json() for c in chosen])
    return paths


def summary(data: DemoData) -> str:
    """Clip counts per split, family, tempo class, era, solo and drums, and the size on disk."""
    from collections import Counter

    lines = []
    for name in ("train", "heldout"):
        clips = data.split(name)
        lines.append(f"{name}: {len(clips)} clips from {len({c.piece for c in clips})} pieces")
        for field in ("family", "tempo_class", "era", "solo", "drums"):
            counts = Counter(getattr(c, field) for c in clips)
            lines.append(f"  {field}: " + ", ".join(f"{k}={counts[k]}" for k in sorted(counts, key=str)))
    size = sum(p.stat().st_size for p in data.root.rglob("*") if p.is_file())
    lines.append(f"total {size / 1e6:.1f} MB in {data.root}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.demo_model.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pieces", type=int, default=None, help=f"number of pieces (default all {len(PIECES)})")
    ap.add_argument("--renderings", type=int, default=DEFAULT_RENDERINGS, help="clips per piece")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--examples", type=Path, default=None,
                    help="also copy a few held-out clips of different families into this folder")
    ap.add_argument("--n-examples", type=int, default=4, help="how many (with --examples)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        data = build_demo_data(args.out, seed=args.seed, pieces=args.pieces, renderings=args.renderings,
                               jobs=args.jobs, overwrite=args.overwrite, progress=lambda m: print(m, flush=True))
    except (DemoDataError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(data))
    print(f"built in {time.perf_counter() - t0:.1f} s")
    if args.examples is not None:
        for path in write_example_clips(data, args.examples, args.n_examples):
            print(f"example clip: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
