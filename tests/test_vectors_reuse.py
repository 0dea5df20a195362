"""Encodings reused across processes answer about their own clip (issue #17, point 1).

The single-sequence KV cache is reused for the prompt when the same clip is asked again. Reuse used to be keyed
on a per-process counter: an encoding pickled in one process and captioned in another could match the counter
of a different clip there and get that clip's cached prompt, answering about the wrong music with no error.
The key is now a digest of the injection vectors (`MusicVectors.key`).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from mullama_sdk.results import MusicVectors

ROOT = Path(__file__).resolve().parents[1]
# Exact arithmetic on the tiny random model: its answers depend on every prompt token's cached keys and values
# (the demo model's greedy answers happen to survive a stale prompt cache, so they would prove nothing).
GREEDY = {"max_new_tokens": 16, "temperature": 0}

_OPEN = 'Captioner.from_pretrained(bundle, n_threads=1, quant="f32", encoder_precision="fp32", exact=True)'

# Process 1: encodes A then B, pickles B, prints both greedy captions.
_FIRST = textwrap.dedent(f"""
    import json, pickle, sys
    from mullama_sdk import Captioner
    bundle, a, b, out, greedy = sys.argv[1:4] + [sys.argv[4], json.loads(sys.argv[5])]
    with {_OPEN} as cap:
        va, vb = cap.encode(a), cap.encode(b)
        pickle.dump(vb, open(out, "wb"))
        print(json.dumps({{"a": cap.caption(va, **greedy).tokens, "b": cap.caption(vb, **greedy).tokens}}))
""")

# Process 2: encodes A twice (the second encoding gets the number a per-process counter gave B in process 1),
# captions it so that the KV cache holds A's prompt, then captions the unpickled B.
_SECOND = textwrap.dedent(f"""
    import json, pickle, sys
    from mullama_sdk import Captioner
    bundle, a, vectors, greedy = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    with {_OPEN} as cap:
        cap.encode(a)
        cap.caption(cap.encode(a), **greedy)
        vb = pickle.load(open(vectors, "rb"))
        print(json.dumps({{"b": cap.caption(vb, **greedy).tokens}}))
""")


def _run(script: str, *args: object) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_pickled_encoding_answers_about_its_own_clip_in_another_process(tiny_bundle, tiny_assets, tmp_path):
    vectors = tmp_path / "b.pkl"
    a, b = tiny_assets.audio["music_24k_mono.wav"], tiny_assets.audio["music_44k_stereo.wav"]
    first = _run(_FIRST, tiny_bundle, a, b, vectors, json.dumps(GREEDY))
    assert first["a"] != first["b"], "precondition: the two clips get different captions"
    second = _run(_SECOND, tiny_bundle, a, vectors, json.dumps(GREEDY))
    assert second["b"] == first["b"]


def test_the_reuse_key_follows_the_vectors_content():
    rng = np.random.default_rng(0)
    inj = rng.standard_normal((4, 8)).astype(np.float32)
    q = rng.standard_normal(8).astype(np.float32)
    v = MusicVectors(inj, q, 1.0, 10, 0.0, 0.0)
    same = MusicVectors(inj.copy(), q.copy(), 2.0, 20, 5.0, 5.0)
    assert v.key == same.key == pickle.loads(pickle.dumps(v)).key
    changed = inj.copy()
    changed[3, 7] = np.nextafter(changed[3, 7], np.float32(np.inf))  # one ulp of one value
    assert MusicVectors(changed, q, 1.0, 10, 0.0, 0.0).key != v.key
    assert MusicVectors(inj.reshape(8, 4), q, 1.0, 10, 0.0, 0.0).key != v.key  # same bytes, other shape
