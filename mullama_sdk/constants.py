"""Numbers with units that the runtime, the export and the training code must agree on."""

from __future__ import annotations

#: MERT's input rate; every waveform is resampled to this before anything else (spec section 1).
SAMPLE_RATE_HZ = 24_000

#: Longest waveform the encoder sees in one pass; longer audio is split into windows.
MAX_WINDOW_SECONDS = 30.0

#: Shortest waveform the encoder accepts (MERT's conv stack needs 400 samples for one frame;
#: below half a second the time-mean rests on too few frames to mean anything).
MIN_WINDOW_SECONDS = 0.5

#: Defaults of the original inference script (spec section 4).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_NEW_TOKENS = 512

#: LLaMA's SentencePiece special ids.
BOS_ID = 1
EOS_ID = 2
