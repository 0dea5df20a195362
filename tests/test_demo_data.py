"""The demo dataset renderer (examples/demo_model/data.py): audio format, MusicQA JSON, split, text vs facts,
determinism, and that the drums are really there."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("music21", reason="the demo extra (music21) is not installed")

from examples.demo_model import data as dd  # noqa: E402
from mullama_sdk.prompt import CAPTION_QUESTIONS  # noqa: E402

try:
    dd.check_renderer()
except dd.DemoDataError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"cannot render: {e}", allow_module_level=True)

#: Pieces that parse in about 0.1 s each, one per era but the Romantic one.
FAST = [p for p in dd.PIECES if p.path in ("bach/bwv66.6", "mozart/k545/movement1_exposition",
                                            "ryansMammoth/AdmiralsHornpipe", "palestrina/Kyrie_00")]
RENDERINGS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dd.DemoData:
    out = tmp_path_factory.mktemp("demo") / "data"
    return dd.build_demo_data(out, seed=0, pieces=FAST, renderings=RENDERINGS, jobs=1)


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_audio_format(data):
    assert len(FAST) == 4
    assert sorted(p.name for p in data.root.iterdir()) == ["audio", "clips.json", "heldout.json", "train.json"]
    assert len(data.clips) == len(FAST) * RENDERINGS
    assert sorted(p.name for p in data.audio_dir.iterdir()) == sorted(c.audio_name for c in data.clips)
    for clip in data.clips:
        path = data.audio_dir / clip.audio_name
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames, info.subtype, info.format) == \
            (24_000, 1, 120_000, "PCM_16", "WAV"), clip.clip_id
        audio, _ = sf.read(path, dtype="float64")
        rms = float(np.sqrt(np.mean(audio**2)))
        assert 0.05 < rms < 0.15, (clip.clip_id, rms)              # -20 dBFS +- the gain jitter
        assert np.abs(audio).max() <= dd.PEAK_LIMIT + 1e-4
        assert np.abs(audio[: 24_000]).max() > 0.01 and np.abs(audio[-24_000:]).max() > 0.01
    # no temporary folder left next to the output
    assert [p.name for p in data.root.parent.iterdir()] == ["data"]


def test_json_loads_with_the_training_loader(data):
    from training.recipes.data import clip_paths, load_qa_json

    per_split = {}
    for name, path in (("train", data.train_json), ("heldout", data.heldout_json)):
        pairs = load_qa_json(path)
        assert clip_paths(pairs, data.audio_dir)                    # every audio file exists
        per_split[name] = {p.audio_name for p in pairs}
        by_clip = Counter(p.audio_name for p in pairs)
        assert set(by_clip.values()) == {6}                          # 1 caption + 5 targeted questions
        for clip_name in by_clip:
            questions = [p.question for p in pairs if p.audio_name == clip_name]
            assert questions[0] in CAPTION_QUESTIONS
            assert questions[1:] == list(dd.QUESTIONS.values())
    for clip in data.clips:
        assert clip.audio_name in per_split[clip.split]
    reloaded = dd.DemoData.load(data.root)
    assert reloaded.clips == data.clips


def test_split_is_by_piece(data):
    train, heldout = set(data.train_pieces), set(data.heldout_pieces)
    assert train and heldout and not train & heldout
    assert train | heldout == {p.name for p in FAST}
    for piece in train | heldout:
        assert len({c.split for c in data.clips if c.piece == piece}) == 1


def test_captions_and_answers_match_the_facts(data):
    pairs = json.loads(data.train_json.read_text()) + json.loads(data.heldout_json.read_text())
    text = {}
    for item in pairs:
        q, a = item["conversation"][0]["value"], item["conversation"][1]["value"]
        text.setdefault(item["audio_name"], {})["caption" if q in CAPTION_QUESTIONS else q] = a
    for clip in data.clips:
        t = text[clip.audio_name]
        cap = t["caption"]
        lo, hi = dd.TEMPO_CLASSES[clip.tempo_class]
        assert lo <= clip.bpm <= hi
        assert dd.mentioned(cap, dd.FAMILIES) == [clip.family], cap
        assert dd.mentioned(t[dd.QUESTIONS["instrument"]], dd.FAMILIES) == [clip.family]
        assert dd.mentioned(cap, dd.TEMPO_WORDS) == [clip.tempo_class], cap
        assert dd.mentioned(t[dd.QUESTIONS["tempo"]], dd.TEMPO_WORDS) == [clip.tempo_class]
        assert str(clip.bpm) in t[dd.QUESTIONS["tempo"]]
        assert dd.mentioned(cap, dd.ERAS) == [clip.era], cap
        assert dd.mentioned(t[dd.QUESTIONS["era"]], dd.ERAS) == [clip.era]
        assert clip.key in cap and clip.key in t[dd.QUESTIONS["key"]]
        assert clip.key.endswith(clip.mode) and clip.mode in dd.MODES
        solo_words = {"solo": True, "ensemble": False}
        assert [v for w, v in solo_words.items() if w in cap] == [clip.solo], cap
        assert [v for w, v in solo_words.items() if w in t[dd.QUESTIONS["solo"]]] == [clip.solo]
        assert ("drum" in cap) == clip.drums, cap
        # the facts themselves are consistent
        programs = [p for p, _ in clip.instruments]
        assert all(p in dd.INSTRUMENTS for p in programs)
        if clip.solo:
            assert len(programs) == 1 and clip.family != "choir"
        if clip.family in dd.POLYPHONIC_FAMILIES:
            assert clip.solo


def test_same_seed_same_bytes_whatever_the_jobs(data, tmp_path):
    again = dd.build_demo_data(tmp_path / "again", seed=0, pieces=FAST, renderings=RENDERINGS, jobs=2)
    assert _digests(again.root) == _digests(data.root)


def test_existing_output_needs_overwrite(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        dd.build_demo_data(out, pieces=FAST[:2], renderings=1, jobs=1)
    dd.build_demo_data(out, pieces=FAST[:2], renderings=1, jobs=1, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "clips.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _high_band_share(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / 24_000)
    return float(spectrum[freqs > 5_000].sum() / spectrum.sum())


def _pulse(audio: np.ndarray, bpm: int) -> float:
    """Strength of an eighth-note pulse in the high band's energy envelope (peak / median of the
    envelope's spectrum): hi-hats on eighths make it large."""
    frames = np.lib.stride_tricks.sliding_window_view(audio.astype(np.float64), 512)[::240]   # 10 ms hop
    power = np.abs(np.fft.rfft(frames * np.hanning(512), axis=1)) ** 2
    envelope = power[:, np.fft.rfftfreq(512, 1 / 24_000) > 5_000].sum(axis=1)
    spectrum = np.abs(np.fft.rfft(envelope / envelope.mean() - 1, n=4096))
    freqs = np.fft.rfftfreq(4096, 0.01)
    eighths = 2 * bpm / 60
    return float(spectrum[np.abs(freqs - eighths) < 0.03 * eighths].max()
                 / np.median(spectrum[(freqs > 0.5) & (freqs < 20)]))


def test_drums_are_audible():
    score = dd.load_score(FAST[0])
    for plan in dd.plan_clips(FAST[:1], dd.DEFAULT_RENDERINGS, seed=0):
        plan = dataclasses.replace(plan, tempo_class="fast", bpm=140)
        with_drums = dd.render_clip(score, dataclasses.replace(plan, drums=True)).pcm
        without = dd.render_clip(score, dataclasses.replace(plan, drums=False)).pcm
        assert _high_band_share(with_drums) > 1.2 * _high_band_share(without), plan.family
        assert _pulse(with_drums, plan.bpm) > 1.5 * _pulse(without, plan.bpm), plan.family


def _note_onsets(score, plan) -> int:
    """Distinct note-on times of the clip's instruments (the clip rendered without drums)."""
    rng = np.random.default_rng(plan.seed)
    start, lines, beat = dd.choose_clip(score, plan, rng)
    return len(dd.onset_times(dd.clip_events(score, dataclasses.replace(plan, drums=False), lines, start, beat, rng)))


def test_bpm_is_the_rate_of_the_notes_heard():
    """The tempo label is audible without drums: a clip's notes start about once per beat (the beat is
    a plain or dotted note value, so not exactly), whatever the piece's note values; a quarter-note
    BPM would be off by 2-8x for a Palestrina mass or a reel."""
    ratios, beats = [], set()
    for piece in FAST:
        score = dd.load_score(piece)
        for plan in dd.plan_clips([piece], dd.DEFAULT_RENDERINGS, seed=0):
            ratios.append(_note_onsets(score, plan) / (dd.CLIP_SECONDS * plan.bpm / 60))
            beats.add(dd.choose_clip(score, plan, np.random.default_rng(plan.seed))[2])
    assert all(0.5 < r < 2.0 for r in ratios), sorted(ratios)          # never a whole octave off
    assert 0.85 < float(np.median(ratios)) < 1.15, sorted(ratios)
    assert len(beats) >= 3                                  # the pieces really move at different note values
    # the same excerpt 2.4x faster has ~2.4x the onsets
    score = dd.load_score(FAST[0])
    plan = dd.plan_clips(FAST[:1], 1, seed=0)[0]
    slow, fast = (_note_onsets(score, dataclasses.replace(plan, bpm=bpm)) for bpm in (60, 144))
    assert 1.8 < fast / slow < 3.2, (slow, fast)


def test_excerpt_beat():
    eighths = [dd.Note(q / 2, q / 2 + 0.5, 60) for q in range(64)]
    assert dd.excerpt_beat(eighths, 0.0, 120, end=32.0) == 0.5          # 10 beats in 5 s, 10 eighths
    jig = [dd.Note(q * 1.5, q * 1.5 + 1.5, 60) for q in range(40)]     # dotted quarters
    assert dd.excerpt_beat(jig, 0.0, 90, end=60.0) == 1.5
    # the window may not run past the end of the score: a 6-quarter score of eighths at 60 BPM
    assert dd.excerpt_beat(eighths[:12], 0.0, 60, end=6.0) == 0.5
    assert dd.excerpt_beat(eighths[:12], 0.0, 60, end=2.0) == 0.375    # 5 beats of 0.375 fit, 5 of 0.5 not
    assert dd.excerpt_beat(eighths[:12], 0.0, 60, end=0.5) == min(dd.BEAT_VALUES)  # nothing fits


def test_full_plan_is_balanced():
    pieces = dd.select_pieces(None)
    plans = dd.plan_clips(pieces, dd.DEFAULT_RENDERINGS, seed=0)
    assert 400 <= len(plans) <= 600
    assert len({p.clip_id for p in plans}) == len(plans)
    families = Counter(p.family for p in plans)
    assert set(families) == set(dd.FAMILIES) and len(set(families.values())) == 1
    tempi = Counter(p.tempo_class for p in plans)
    assert max(tempi.values()) - min(tempi.values()) < 0.1 * len(plans) / 3
    assert 0.3 < sum(p.drums for p in plans) / len(plans) < 0.45
    held = dd.choose_heldout(pieces, plans, seed=0)
    assert abs(len(held) - 0.2 * len(pieces)) <= 1
    assert {pieces[i].era for i in held} == set(dd.ERAS)
    held_plans = [p for p in plans if p.piece_index in held]
    assert {p.family for p in held_plans} == set(dd.FAMILIES)
    assert {p.tempo_class for p in held_plans} == set(dd.TEMPO_CLASSES)
    assert {p.drums for p in held_plans} == {p.solo for p in held_plans} == {True, False}


def test_vocabularies_do_not_overlap():
    for vocab in (dd.FAMILIES, dd.TEMPO_WORDS, dd.ERAS):
        for name, words in vocab.items():
            for word in words:
                assert dd.mentioned(word, vocab) == [name], word
    for inst in dd.INSTRUMENTS.values():
        family = [f for f in dd.FAMILIES if inst.program in dd.SOLO_PROGRAMS.get(f, ())
                  or any(inst.program in u for u in dd.ENSEMBLES.get(f, ()))]
        assert dd.mentioned(inst.word, dd.FAMILIES) == family, inst
        assert not dd.mentioned(inst.word, dd.ERAS) and not dd.mentioned(inst.word, dd.TEMPO_WORDS)
    for piece in dd.PIECES:
        assert not dd.mentioned(piece.kind, dd.FAMILIES) and not dd.mentioned(piece.kind, dd.TEMPO_WORDS)
        assert not dd.mentioned(piece.kind, dd.ERAS)


def test_example_clips(data, tmp_path):
    paths = dd.write_example_clips(data, tmp_path / "clips", n=2)
    facts = {c.audio_name: c for c in data.clips}
    assert len(paths) == 2 and len({facts[p.name].family for p in paths}) == 2
    assert all(facts[p.name].split == "heldout" for p in paths)
    readme = (tmp_path / "clips" / "README.md").read_text()
    assert all(p.name in readme for p in paths)


def test_onsets_are_the_notes_and_the_beat_drums(data):
    dc, kick, hihat = dd.DRUM_CHANNEL, dd.GM_DRUMS["kick"], dd.GM_DRUMS["hihat"]
    events = [(0, 0, 0xC0, 0, 0), (0, 2, 0x90, 60, 90), (0, 2, 0x90 | 1, 64, 90), (12_000, 2, 0x90 | dc, hihat, 80),
              (24_000, 1, 0x80, 60, 0), (24_000, 2, 0x90 | dc, kick, 100), (36_000, 2, 0x90, 62, 0)]
    # note-ons at 0 (two channels, one onset) and the kick at 1 s; not the hi-hat, not a velocity-0 note-on
    assert dd.onset_times(events) == (0.0, 1.0)
    for clip in data.clips:
        assert list(clip.onsets) == sorted(set(clip.onsets)) and all(0 <= t < dd.CLIP_SECONDS for t in clip.onsets)
        # the beat was chosen so that the notes start about once per beat (drums add kick/snare on beats)
        assert 0.5 < len(clip.onsets) / (dd.CLIP_SECONDS * clip.bpm / 60) < 2.5, clip
