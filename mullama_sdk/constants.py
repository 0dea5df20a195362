"""Numbers with units that the runtime, the export and the training code must agree on."""

from __future__ import annotations

#: MERT's input rate; every waveform is resampled to this before anything else (docs/model.md section 1).
SAMPLE_RATE_HZ = 24_000

#: Longest waveform the encoder sees in one pass; longer audio is split into windows.
MAX_WINDOW_SECONDS = 30.0

#: Shortest waveform (24 kHz samples, after resampling) the encoder accepts: one frame of MERT's conv
#: feature encoder. Kernels 10,3,3,3,3,2,2 with strides 5,2,2,2,2,2,2 give a receptive field of
#: 400 samples (1/60 s) and a hop of 320, so n >= 400 samples yield (n - 400) // 320 + 1 frames, computed
#: on the real samples (no padding). One-shot samples (drum hits, stabs) are often 50-500 ms long.
#: A bundle states its own minimum (manifest ``audio.min_window_samples``); older bundles say 0.5 s.
MIN_WINDOW_SAMPLES = 400

#: Defaults of the original inference script (docs/model.md section 4).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_NEW_TOKENS = 512

#: LLaMA's SentencePiece special ids.
BOS_ID = 1
EOS_ID = 2
