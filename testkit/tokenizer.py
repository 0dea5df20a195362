"""The test tokenizer: a LLaMA-style SentencePiece model trained in a second on MU-LLaMA's prompt and captions.

Real-width assets need LLaMA's 32000 pieces; :func:`pad_tokenizer` appends unused pieces instead of
training a larger model, so both sizes tokenize alike.
"""

from __future__ import annotations

import random

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from mullama_sdk.prompt import CAPTION_QUESTIONS, PROMPT_TEMPLATE
from training.reference.tokenizer import train_llama_tokenizer

__all__ = ["pad_tokenizer", "piece_count", "train_tokenizer"]

# Vocabulary of the caption corpus, as comma-separated strings to keep the lists short.
_INSTRUMENTS = tuple(
    "piano, acoustic guitar, electric guitar, bass guitar, drums, violin, cello, flute, saxophone, "
    "trumpet, synthesizer, organ, strings, harp, ukulele, clarinet, percussion, choir, vocals, "
    "drum machine".split(", ")
)
_MOODS = tuple(
    "calm, happy, sad, energetic, dark, uplifting, melancholic, relaxing, dreamy, tense, playful, "
    "romantic, epic, mellow, aggressive, nostalgic".split(", ")
)
_GENRES = tuple(
    "rock, jazz, pop, classical, electronic, hip-hop, blues, folk, ambient, funk, reggae, metal, "
    "country, soul, techno, lo-fi".split(", ")
)
_KEYS = tuple(
    "C major, A minor, D major, E minor, F major, G major, B flat major, F# minor, E flat major, "
    "C# minor".split(", ")
)
_PLACES = tuple(
    "a film soundtrack, a video game, a quiet evening, a road trip, a dance party, a coffee shop, "
    "a workout, a meditation session, a wedding, an advertisement".split(", ")
)
_TEMPLATES = (
    "This is a {mood} {genre} song featuring {inst} and {inst2}.",
    "The tempo is {bpm} BPM and the song is in the key of {key}.",
    "The music is {mood} and {mood2}, with a steady beat played on the {inst}.",
    "It starts with a soft {inst} intro, then the {inst2} plays the main melody.",
    "The {inst} carries the melody while the {inst2} keeps the rhythm in {meter}/4 time.",
    "This piece would fit {place}: it sounds {mood} and {mood2}.",
    "The song is about {secs} seconds long; it has a {genre} groove at roughly {bpm} beats per minute.",
    "Instruments: {inst}, {inst2} and drums. Genre: {genre}. Mood: {mood}.",
    "A {mood} {genre} track (in {key}) with a repeating {inst} riff!",
    "You can hear a {inst}, a {inst2}, and some light percussion; the mix is {mood}.",
    "The audio is a {genre} instrumental - the {inst} plays chords and the {inst2} answers.",
    "Is it {mood}? Yes, the {inst} and the {key} harmony make it feel {mood2}.",
)


def _tokenizer_corpus() -> list[str]:
    """Training text: MU-LLaMA's prompt (weighted, so its words become single pieces) and music captions.

    The text is split on newlines: a newline never becomes a character piece and is encoded as the byte
    piece ``<0x0A>``, as LLaMA's tokenizer does.
    """
    prompt_lines = [
        line for q in CAPTION_QUESTIONS for line in PROMPT_TEMPLATE.format(question=q).split("\n")
    ]
    rng = random.Random(0)  # fixed: the tokenizer is the same for every build seed
    captions = []
    for _ in range(600):
        fields = {
            "mood": rng.choice(_MOODS),
            "mood2": rng.choice(_MOODS),
            "genre": rng.choice(_GENRES),
            "inst": rng.choice(_INSTRUMENTS),
            "inst2": rng.choice(_INSTRUMENTS),
            "key": rng.choice(_KEYS),
            "bpm": rng.randint(60, 180),
            "meter": rng.choice((3, 4, 6)),
            "secs": rng.randint(5, 240),
            "place": rng.choice(_PLACES),
        }
        captions.append(rng.choice(_TEMPLATES).format(**fields))
    return prompt_lines * 20 + captions


def train_tokenizer(vocab_size: int) -> bytes:
    """The test tokenizer: LLaMA's conventions (see :func:`training.reference.tokenizer.train_llama_tokenizer`)."""
    return train_llama_tokenizer(_tokenizer_corpus(), vocab_size)


def piece_count(model: bytes) -> int:
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def pad_tokenizer(model: bytes, vocab_size: int) -> bytes:
    """Append normal pieces (unique strings, decreasing scores) until the model has ``vocab_size`` pieces.

    Existing ids do not move, so the padded model tokenizes exactly like the unpadded one.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    score = min(p.score for p in proto.pieces)
    for i in range(vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece = f"\u2581pad{i:05d}"
        piece.score = score - 1.0 - i
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    proto.trainer_spec.vocab_size = vocab_size
    padded = proto.SerializeToString(deterministic=True)
    if piece_count(padded) != vocab_size:
        raise RuntimeError(f"padded tokenizer has {piece_count(padded)} pieces, expected {vocab_size}")
    return padded
