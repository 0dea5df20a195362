"""The General MIDI instruments of the demo data set: which programs play a family's solos and
ensembles, the range each one's notes are folded into, and the drum kit's notes and channel."""

from __future__ import annotations

from dataclasses import dataclass


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
ENSEMBLE_NOUN = {"strings": "string", "woodwind": "woodwind", "brass": "brass"}
GM_DRUMS = {"kick": 36, "snare": 38, "hihat": 42}
DRUM_CHANNEL = 9
