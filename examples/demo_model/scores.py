"""A corpus score as notes, and what a clip takes from it (runs in the worker processes).

Parsing (music21) and the score's key; the beat of an excerpt, which its BPM counts (see
:func:`excerpt_beat`); where an excerpt starts; and the arrangement of its parts for the planned
instruments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from examples.demo_model.errors import DemoDataError
from examples.demo_model.facts import CLIP_SECONDS, MODES, ClipPlan
from examples.demo_model.instruments import (
    DRUM_CHANNEL,
    ENSEMBLES,
    INSTRUMENTS,
    POLYPHONIC_FAMILIES,
    SOLO_PROGRAMS,
    Instrument,
)
from examples.demo_model.pieces import Piece


@dataclass(frozen=True)
class Note:
    start: float      # quarter notes from the start of the score
    end: float
    pitch: int


@dataclass
class Score:
    title: str
    parts: list[list[Note]]          # non-empty parts, ordered high to low by mean pitch
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


def _estimate_key(parts: list[list[Note]], sharps: int | None, declared: str | None = None) -> tuple[str, str]:
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


def load_score(piece: Piece) -> Score:
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
                notes.extend(Note(start, end, int(p.midi)) for p in n.pitches)
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
    return Score(title.strip(), parts, measures, end, key_name, mode, pulse_quarters(parts, _excerpt_limit(measures)))


def pulse_quarters(parts: list[list[Note]], until: float) -> float:
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


def excerpt_beat(notes: Sequence[Note], start: float, bpm: float, end: float) -> float:
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


def _window_quality(parts: list[list[Note]], start: float, length: float) -> tuple[int, float]:
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


def choose_excerpt(score: Score, length: float, rng: np.random.Generator) -> float:
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


def _skyline(part: list[Note]) -> list[Note]:
    """The highest note of each onset (a melody line for a one-voice instrument)."""
    top: dict[float, Note] = {}
    for n in part:
        if n.start not in top or n.pitch > top[n.start].pitch:
            top[n.start] = n
    line = [top[s] for s in sorted(top)]
    return [Note(n.start, min(n.end, nxt.start) if nxt else n.end, n.pitch)
            for n, nxt in zip(line, [*line[1:], None])]


def arrange(score: Score, plan: ClipPlan, rng: np.random.Generator, start: float,
            length: float) -> list[tuple[int, list[Note]]]:
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
            doubled = [Note(n.start, n.end, n.pitch - 12) for n in melody]
            lines = [(lineup[0], melody), (lineup[-1], doubled)]
        else:
            groups = np.array_split(np.arange(len(parts)), len(lineup))
            lines = [(lineup[g], parts[int(i)]) for g, group in enumerate(groups) for i in group]
    out = []
    for program, notes in lines[:DRUM_CHANNEL]:      # channels 0..8; 9 is the drum kit
        inst = INSTRUMENTS[program]
        out.append((program, [Note(n.start, n.end, _fold(n.pitch, inst)) for n in notes]))
    return out
