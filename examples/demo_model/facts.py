"""What the demo data set says about a clip, and the words that name it.

The facts of a clip (:class:`ClipFacts`, one entry of ``clips.json``; :class:`ClipPlan`, the part decided
before the score is parsed) and the vocabulary its captions and answers use. The evaluator and the demo
encoder read the same constants, so they live apart from the renderer (no music21, no fluidsynth here).

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
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from mullama_sdk.constants import SAMPLE_RATE_HZ

#: Length of every clip.
CLIP_SECONDS = 5.0
CLIP_SAMPLES = round(CLIP_SECONDS * SAMPLE_RATE_HZ)

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
