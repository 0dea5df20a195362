"""The text of the demo data set: captions and short answers templated from a clip's facts, as MusicQA
items (the format MU-LLaMA trains on). Every text names its classes with the words of
:mod:`examples.demo_model.facts`, so the evaluator can match them.

Questions per clip: one of the four MusicQA caption questions plus "What is the tempo of this
music?", "Which instrument is playing?", "Is this a solo or an ensemble?", "What key is this in?"
and "From which era is this music?".
"""

from __future__ import annotations

import numpy as np

from examples.demo_model.facts import ClipFacts
from examples.demo_model.instruments import ENSEMBLE_NOUN, INSTRUMENTS
from mullama_sdk.prompt import CAPTION_QUESTIONS

QUESTIONS: dict[str, str] = {
    "tempo": "What is the tempo of this music?",
    "instrument": "Which instrument is playing?",
    "solo": "Is this a solo or an ensemble?",
    "key": "What key is this in?",
    "era": "From which era is this music?",
}
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
    return f"a {ENSEMBLE_NOUN[f.family]} ensemble of {_join(words)}"


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
        instrument = f"A {ENSEMBLE_NOUN[f.family]} ensemble: {_join(words)}{with_drums}."
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
