"""One planned clip -> its audio and facts: excerpt, events, synthesis, loudness (worker processes).

Rendering: libfluidsynth (through ctypes; a fresh synthesizer per clip) plays the excerpt's notes,
tempo overridden, velocities varied, offline at 24 kHz (events land on fluidsynth's 64-sample
blocks), reverb fixed, chorus off; the stereo output is averaged to mono, faded (3 ms in, 40 ms out),
brought to -20 dBFS RMS +- 1.5 dB and limited to -1 dBFS peak. Excerpts start on a bar line.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from examples.demo_model.errors import DemoDataError
from examples.demo_model.facts import CLIP_SAMPLES, CLIP_SECONDS, ClipFacts, ClipPlan
from examples.demo_model.fluidsynth import SOUNDFONT, Event, synthesize
from examples.demo_model.instruments import DRUM_CHANNEL, GM_DRUMS, INSTRUMENTS
from examples.demo_model.pieces import Piece
from examples.demo_model.scores import Note, Score, arrange, choose_excerpt, excerpt_beat, load_score
from mullama_sdk.constants import SAMPLE_RATE_HZ

#: Loudness after rendering: RMS -20 dBFS (+- a small random gain), peaks at most -1 dBFS.
TARGET_RMS = 0.1
GAIN_JITTER_DB = 1.5
PEAK_LIMIT = 10 ** (-1 / 20)


def clip_events(score: Score, plan: ClipPlan, lines: list[tuple[int, list[Note]]], start: float, beat: float,
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
        dc, beat_q = DRUM_CHANNEL, beat
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
                events += [(at(q), 2, 0x90 | dc, GM_DRUMS[name], velocity),
                           (at(q + beat_q / 4), 1, 0x80 | dc, GM_DRUMS[name], 0)]
    return sorted(events)




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


def choose_clip(score: Score, plan: ClipPlan, rng: np.random.Generator
                ) -> tuple[float, list[tuple[int, list[Note]]], float]:
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
    hihat = GM_DRUMS["hihat"]
    samples = {sample for sample, _, status, key, velocity in events          # velocity 0 is a note-off
               if status & 0xF0 == 0x90 and velocity > 0 and not ((status & 0x0F) == DRUM_CHANNEL and key == hihat)}
    return tuple(round(sample / SAMPLE_RATE_HZ, 4) for sample in sorted(samples))


def render_clip(score: Score, plan: ClipPlan, soundfont: Path = SOUNDFONT) -> RenderedClip:
    """Audio and facts of one planned clip."""
    rng = np.random.default_rng(plan.seed)
    start, lines, beat = choose_clip(score, plan, rng)
    events = clip_events(score, plan, lines, start, beat, rng)
    try:
        pcm = finish(synthesize(events, soundfont), rng)
    except DemoDataError as e:
        raise DemoDataError(f"{plan.clip_id} (from quarter {start}): {e}") from e
    return RenderedClip(pcm, start, list(dict.fromkeys(p for p, _ in lines)), beat, onset_times(events))


def render_piece(task: tuple[Piece, list[ClipPlan], dict[str, str], str, str]) -> list[ClipFacts]:
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
