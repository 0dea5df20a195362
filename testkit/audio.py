"""Synthesised test music: three short songs (chords, bass, melody, drums) as WAV, FLAC and Ogg Vorbis.

Deterministic to the byte (the Ogg stream serial, which libsndfile draws from the clock, is fixed), and
different enough in tempo, key, timbre and drums that tests can tell the clips apart.
"""

from __future__ import annotations

import dataclasses
import io
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = ["SONGS", "Song", "render_song", "to_pcm16", "write_test_audio"]


@dataclasses.dataclass(frozen=True)
class Song:
    """Musical parameters of one synthesised clip."""

    seconds: float
    sample_rate: int
    stereo: bool
    tempo_bpm: float
    tonic_midi: int
    minor: bool
    rolloff: float  # partial k has amplitude k ** -rolloff: small = bright, large = mellow
    drums: float  # gain of the drum kit
    seed: int


#: Three clips that differ in tempo, key, mode, timbre and drum level so tests can tell them apart. The drum
#: level matters most to the tiny random MERT: its GroupNorm standardises every channel over the clip, which
#: hides spectral balance and leaves mostly the transient-versus-sustained character.
SONGS = {
    "music_24k_mono": Song(
        seconds=4.0,
        sample_rate=24000,
        stereo=False,
        tempo_bpm=76,
        tonic_midi=45,
        minor=True,
        rolloff=2.5,
        drums=0.3,
        seed=1,
    ),
    "music_44k_stereo": Song(
        seconds=3.0,
        sample_rate=44100,
        stereo=True,
        tempo_bpm=128,
        tonic_midi=62,
        minor=False,
        rolloff=1.0,
        drums=1.0,
        seed=2,
    ),
    "music_24k_mono_10s": Song(
        seconds=10.0,
        sample_rate=24000,
        stereo=False,
        tempo_bpm=150,
        tonic_midi=65,
        minor=False,
        rolloff=0.7,
        drums=2.5,
        seed=3,
    ),
}

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
_OGG_SERIAL = 0x4D4C4C41  # fixed Ogg stream serial: libsndfile draws a time-seeded one


def write_test_audio(out: Path) -> dict[str, Path]:
    """Write the synthesised test clips into ``out`` (PCM_16); deterministic, independent of any seed.

    Files: ``music_24k_mono.wav`` (4 s, 24 kHz mono; A minor, 76 BPM, dark, soft drums),
    ``music_44k_stereo.wav`` (3 s, 44.1 kHz stereo; D major, 128 BPM, bright) and the same stereo content as
    ``music_44k_stereo.flac`` (identical samples) and ``music_44k_stereo.ogg`` (Vorbis),
    ``music_24k_mono_10s.wav`` (10 s, 24 kHz mono; F major, 150 BPM, brightest, loud drums).

    Args:
        out: Output folder (created if needed).

    Returns:
        Paths by file name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for stem, song in SONGS.items():
        # Quantise once: libsndfile's float->PCM_16 rounding differs between WAV and FLAC by one LSB.
        pcm = to_pcm16(render_song(song))
        wav = out / f"{stem}.wav"
        sf.write(wav, pcm, song.sample_rate, subtype="PCM_16")
        paths[wav.name] = wav
        if song.stereo:
            flac = out / f"{stem}.flac"
            sf.write(flac, pcm, song.sample_rate, format="FLAC", subtype="PCM_16")
            paths[flac.name] = flac
            buffer = io.BytesIO()
            sf.write(buffer, pcm / 32768, song.sample_rate, format="OGG", subtype="VORBIS")
            ogg = out / f"{stem}.ogg"
            ogg.write_bytes(_fix_ogg_serial(buffer.getvalue(), _OGG_SERIAL))
            paths[ogg.name] = ogg
    return paths


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1) -> int16, rounded and clipped: the one quantisation every clip goes through."""
    return np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)


def render_song(song: Song) -> np.ndarray:
    """Synthesise a clip: chord pad, bass, melody with vibrato, kick/snare/hat; peak 0.5.

    Returns:
        ``(n,)`` for mono or ``(n, 2)`` for stereo, float64.
    """
    sr = song.sample_rate
    rng = np.random.default_rng(song.seed)
    n = round(song.seconds * sr)
    mix = np.zeros((n, 2))
    beat = 60.0 / song.tempo_bpm
    scale = _MINOR if song.minor else _MAJOR
    progression = (0, 5, 2, 6) if song.minor else (0, 4, 5, 3)  # i-VI-III-VII / I-V-vi-IV

    def pitch(degree: int) -> int:
        octave, step = divmod(degree, 7)
        return song.tonic_midi + 12 * octave + scale[step]

    for bar in range(int(np.ceil(song.seconds / (4 * beat)))):
        t0 = bar * 4 * beat
        root = progression[bar % len(progression)]
        pad = {"length": 4 * beat, "amp": 0.10, "rolloff": song.rolloff, "adsr": (0.08, 0.3, 0.7, 0.3)}
        for voice, pan in zip((root, root + 2, root + 4), (-0.4, 0.0, 0.4)):
            _add_note(mix, sr, start=t0, midi=pitch(voice), pan=pan, **pad)
        bass = {
            "length": 1.5 * beat,
            "amp": 0.22,
            "rolloff": song.rolloff + 0.5,
            "adsr": (0.01, 0.2, 0.6, 0.1),
        }
        for b in (0, 2):
            _add_note(mix, sr, start=t0 + b * beat, midi=pitch(root - 14), pan=0.0, **bass)
        lead = {"length": 0.45 * beat, "amp": 0.16, "rolloff": song.rolloff, "adsr": (0.005, 0.1, 0.5, 0.08)}
        for eighth in range(8):
            if rng.random() < 0.2:
                continue  # a rest
            degree = root + 7 + int(rng.choice((0, 2, 4, 7, 9, 11, 1, 3)))
            _add_note(
                mix,
                sr,
                start=t0 + eighth * beat / 2,
                midi=pitch(degree),
                pan=0.25,
                vibrato_cents=25.0,
                **lead,
            )
        for b in range(4):
            _add_drum(mix, sr, t0 + b * beat, "kick" if b % 2 == 0 else "snare", song.drums, rng)
            for half in (0.0, 0.5):
                _add_drum(mix, sr, t0 + (b + half) * beat, "hat", song.drums, rng)
    out = mix if song.stereo else mix.mean(axis=1)
    return out * (0.5 / np.abs(out).max())


def _pan_gains(pan: float) -> tuple[float, float]:
    """Constant-power gains for ``pan`` in [-1 (left), 1 (right)]."""
    angle = (pan + 1.0) * np.pi / 4.0
    return float(np.cos(angle)), float(np.sin(angle))


def _add_note(
    mix: np.ndarray,
    sr: int,
    *,
    start: float,
    length: float,
    midi: int,
    amp: float,
    pan: float,
    rolloff: float,
    adsr: tuple[float, float, float, float],
    vibrato_cents: float = 0.0,
) -> None:
    """Add a harmonic tone with an ADSR envelope (attack, decay, sustain level, release) to ``mix``.

    Args:
        mix: ``(n, 2)`` buffer to add into.
        sr: Sample rate.
        start: Onset in seconds.
        length: Seconds until the release starts.
        midi: MIDI pitch.
        amp: Peak amplitude.
        pan: Stereo position in [-1, 1].
        rolloff: Partial ``k`` has amplitude ``k ** -rolloff``.
        adsr: Attack and decay in seconds, sustain level, release in seconds.
        vibrato_cents: Depth of a 5.5 Hz vibrato.
    """
    attack, decay, sustain, release = adsr
    i0 = round(start * sr)
    count = min(round((length + release) * sr), mix.shape[0] - i0)
    if count <= 0:
        return
    t = np.arange(count) / sr
    freq = 440.0 * 2.0 ** ((midi - 69) / 12) * 2.0 ** (vibrato_cents / 1200 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    tone = np.zeros(count)
    # At most 12 partials: enough for a distinct timbre, and they dominate the build time.
    for k in range(1, min(12, int(0.45 * sr / freq.max())) + 1):
        tone += k**-rolloff * np.sin(k * phase)
    env = np.interp(
        t,
        (0.0, attack, attack + decay, max(length, attack + decay), length + release),
        (0.0, 1.0, sustain, sustain, 0.0),
    )
    left, right = _pan_gains(pan)
    mix[i0 : i0 + count] += (amp * env * tone)[:, None] * (left, right)


def _add_drum(
    mix: np.ndarray, sr: int, start: float, kind: str, gain: float, rng: np.random.Generator
) -> None:
    """Add a kick (pitch-swept sine), snare (noise + body tone) or hat (differentiated noise) hit."""
    i0 = round(start * sr)
    count = min(round({"kick": 0.3, "snare": 0.2, "hat": 0.06}[kind] * sr), mix.shape[0] - i0)
    if count <= 0:
        return
    t = np.arange(count) / sr
    if kind == "kick":
        phase = 2 * np.pi * np.cumsum(50.0 + 90.0 * np.exp(-t / 0.03)) / sr
        hit, pan = 0.5 * np.sin(phase) * np.exp(-t / 0.12), 0.0
    elif kind == "snare":
        noise = rng.standard_normal(count)
        hit = 0.2 * noise * np.exp(-t / 0.05) + 0.25 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.08)
        pan = -0.1
    else:
        noise = np.diff(rng.standard_normal(count + 1))  # differencing tilts white noise towards the highs
        hit, pan = 0.06 * noise * np.exp(-t / 0.012), 0.35
    left, right = _pan_gains(pan)
    mix[i0 : i0 + count] += gain * hit[:, None] * (left, right)


def _ogg_crc_table() -> tuple[int, ...]:
    """Table of Ogg's page CRC-32 (polynomial 0x04C11DB7, not reflected, init 0)."""
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_OGG_CRC_TABLE = _ogg_crc_table()


def _fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """Set the stream serial number of every Ogg page to ``serial`` and recompute the page CRCs."""
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos : pos + 4] != b"OggS":
            raise RuntimeError(f"not an Ogg page at byte {pos}")
        segments = out[pos + 26]
        end = pos + 27 + segments + sum(out[pos + 27 : pos + 27 + segments])
        out[pos + 14 : pos + 18] = struct.pack("<I", serial)
        out[pos + 22 : pos + 26] = bytes(4)
        crc = 0
        for byte in out[pos:end]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[(crc >> 24) ^ byte]
        out[pos + 22 : pos + 26] = struct.pack("<I", crc)
        pos = end
    return bytes(out)
