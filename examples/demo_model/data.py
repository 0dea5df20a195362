"""A small, realistic and deterministic music dataset for training the demo model.

Renders a few hundred 5-second clips from real scores of music21's bundled corpus (Renaissance
chansons and masses, Monteverdi, Bach chorales, Corelli, Mozart, Haydn, early Beethoven, the Schumanns,
Chopin, Schubert, Verdi, folk tunes from the Essen, O'Neill and Ryan collections, ...) through
fluidsynth with the FluidR3 General MIDI soundfont, on several instrument families, at several tempi,
with drums on some, and writes MusicQA-format JSON whose captions and answers are templated from the
known facts of each clip::

    python -m examples.demo_model.data OUT [--seed N] [--pieces N] [--renderings N] [--jobs N] [--overwrite]
                                     [--examples DIR [--n-examples N]]

Output folder ``OUT`` (assembled in a temporary sibling folder and renamed at the end)::

    audio/<clip_id>.wav   24 kHz mono 16-bit PCM, exactly 5.0 s
    train.json            MusicQA items (one QA pair each) of the training pieces
    heldout.json          the same for the held-out pieces
    clips.json            the facts of every clip (see :class:`ClipFacts`)

Where each part lives (this module is the data set's command line and re-exports their public names):

* :mod:`examples.demo_model.facts`: the facts of a clip and the vocabulary that names them
  (:data:`FAMILIES`, :data:`TEMPO_CLASSES`, :data:`ERAS`, :func:`mentioned`, ...);
* :mod:`examples.demo_model.pieces`: the corpus scores (:data:`PIECES`);
* :mod:`examples.demo_model.instruments`: the General MIDI instruments and drums;
* :mod:`examples.demo_model.planning`: the random choices made before parsing, the held-out split;
* :mod:`examples.demo_model.scores`: parsing, key, beat, excerpt and arrangement;
* :mod:`examples.demo_model.fluidsynth`: the libfluidsynth binding;
* :mod:`examples.demo_model.rendering`: one clip's events, audio and facts;
* :mod:`examples.demo_model.musicqa`: captions, answers and MusicQA items;
* :mod:`examples.demo_model.dataset`: the build (:func:`build_demo_data`) and :class:`DemoData`;
* :mod:`examples.demo_model.example_clips`: the committed example clips.

Determinism: the same seed, pieces and renderings give byte-identical files on the same machine,
whatever ``jobs``. Every random choice comes from numpy Generators seeded from ``seed`` (one per
clip), results are keyed by piece, music21's parse cache is neither read nor written. Needs the
Debian packages ``fluidsynth`` (libfluidsynth) and ``fluid-soundfont-gm`` and the ``demo`` extra
(music21).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from examples.demo_model.dataset import DemoData, build_demo_data, check_renderer, check_split, summary
from examples.demo_model.errors import DemoDataError
from examples.demo_model.example_clips import EXAMPLE_CLIPS_DIR, EXAMPLE_FAMILIES, write_example_clips
from examples.demo_model.facts import (
    CLIP_SAMPLES,
    CLIP_SECONDS,
    ERAS,
    FAMILIES,
    MODES,
    TEMPO_CLASSES,
    TEMPO_WORDS,
    ClipFacts,
    ClipPlan,
    first_mentioned,
    mentioned,
)
from examples.demo_model.fluidsynth import SOUNDFONT, Event, synthesize
from examples.demo_model.instruments import (
    DRUM_CHANNEL,
    ENSEMBLES,
    GM_DRUMS,
    INSTRUMENTS,
    POLYPHONIC_FAMILIES,
    SOLO_PROGRAMS,
    Instrument,
)
from examples.demo_model.musicqa import QUESTIONS, answers, caption, qa_items
from examples.demo_model.pieces import PIECES, Piece, select_pieces
from examples.demo_model.planning import (
    DEFAULT_RENDERINGS,
    DRUMS_FRACTION,
    HELDOUT_FRACTION,
    choose_heldout,
    plan_clips,
)
from examples.demo_model.rendering import (
    GAIN_JITTER_DB,
    PEAK_LIMIT,
    TARGET_RMS,
    RenderedClip,
    choose_clip,
    clip_events,
    finish,
    onset_times,
    render_clip,
)
from examples.demo_model.scores import (
    BEAT_VALUES,
    Note,
    Score,
    arrange,
    beat_name,
    choose_excerpt,
    excerpt_beat,
    load_score,
    pulse_quarters,
)

__all__ = [
    "BEAT_VALUES", "CLIP_SAMPLES", "CLIP_SECONDS", "DEFAULT_RENDERINGS", "DRUMS_FRACTION", "DRUM_CHANNEL",
    "ENSEMBLES", "ERAS", "EXAMPLE_CLIPS_DIR", "EXAMPLE_FAMILIES", "FAMILIES", "GAIN_JITTER_DB", "GM_DRUMS",
    "HELDOUT_FRACTION", "INSTRUMENTS", "MODES", "PEAK_LIMIT", "PIECES", "POLYPHONIC_FAMILIES", "QUESTIONS",
    "SOLO_PROGRAMS", "SOUNDFONT", "TARGET_RMS", "TEMPO_CLASSES", "TEMPO_WORDS", "ClipFacts", "ClipPlan",
    "DemoData", "DemoDataError", "Event", "Instrument", "Note", "Piece", "RenderedClip", "Score", "answers",
    "arrange", "beat_name", "build_demo_data", "caption", "check_renderer", "check_split", "choose_clip",
    "choose_excerpt", "choose_heldout", "clip_events", "excerpt_beat", "finish", "first_mentioned",
    "load_score", "main", "mentioned", "onset_times", "plan_clips", "pulse_quarters", "qa_items",
    "render_clip", "select_pieces", "summary", "synthesize", "write_example_clips",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.demo_model.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pieces", type=int, default=None, help=f"number of pieces (default all {len(PIECES)})")
    ap.add_argument("--renderings", type=int, default=DEFAULT_RENDERINGS, help="clips per piece")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--examples", type=Path, default=None,
                    help="also copy a few held-out clips of different families into this folder")
    ap.add_argument("--n-examples", type=int, default=4, help="how many (with --examples)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        data = build_demo_data(args.out, seed=args.seed, pieces=args.pieces, renderings=args.renderings,
                               jobs=args.jobs, overwrite=args.overwrite, progress=lambda m: print(m, flush=True))
    except (DemoDataError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(data))
    print(f"built in {time.perf_counter() - t0:.1f} s")
    if args.examples is not None:
        for path in write_example_clips(data, args.examples, args.n_examples):
            print(f"example clip: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
