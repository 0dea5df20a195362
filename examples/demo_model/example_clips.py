"""The committed example clips (``examples/clips``): a few held-out clips of contrasting families,
copied from a built data set with a README of their facts, for ``make demo`` to caption."""

from __future__ import annotations

import shutil
from pathlib import Path

from examples.demo_model.dataset import DemoData, write_json
from examples.demo_model.facts import ClipFacts
from examples.demo_model.scores import beat_name

#: Where the committed example clips live (``make demo`` captions them).
EXAMPLE_CLIPS_DIR = Path(__file__).resolve().parents[1] / "clips"
#: Families of the example clips, most contrasting first.
EXAMPLE_FAMILIES = ("piano", "strings", "choir", "brass", "woodwind", "organ", "guitar")


def write_example_clips(data: DemoData, dest: Path, n: int = 4) -> list[Path]:
    """Copy ``n`` held-out clips of different families into ``dest``, with a README.md of their facts.

    Deterministic: families in :data:`EXAMPLE_FAMILIES` order; for each, the first held-out clip (in
    dataset order) that adds the most variety (an era, tempo class, drums or solo/ensemble value not
    shown yet), ensembles first among equals.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    heldout = data.split("heldout")
    chosen: list[ClipFacts] = []
    for family in EXAMPLE_FAMILIES:
        cands = [c for c in heldout if c.family == family]
        if len(chosen) >= n or not cands:
            continue
        novelty = lambda c: (-sum(getattr(c, k) not in {getattr(x, k) for x in chosen}
                                  for k in ("era", "tempo_class", "drums", "solo")), c.solo)
        chosen.append(min(cands, key=novelty))
    paths = []
    lines = ["# Example clips",
             "",
             "Held-out clips of the demo data set, copied by `examples.demo_model.example_clips.write_example_clips`",
             f"(`python -m examples.demo_model.data OUT --examples examples/clips --n-examples {n}`, default seed):",
             "real scores of music21's corpus rendered with fluidsynth and the FluidR3 GM soundfont; 5 s,",
             "24 kHz mono 16-bit. The demo model never saw these pieces in training. Their facts, as",
             "`clips.json` records them:",
             "",
             "| file | piece | era | family | instruments | solo | drums | tempo | key |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in chosen:
        path = dest / c.audio_name
        shutil.copyfile(data.audio_dir / c.audio_name, path)
        paths.append(path)
        names = ", ".join(name for _, name in c.instruments)
        lines.append(f"| {c.audio_name} | {c.piece} ({c.composer}) | {c.era} | {c.family} | {names} | "
                     f"{'solo' if c.solo else 'ensemble'} | {'yes' if c.drums else 'no'} | "
                     f"{c.tempo_class}, {c.bpm} BPM of {beat_name(c.beat_quarters)} notes | {c.key} |")
    (dest / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(dest / "clips.json", [c.to_json() for c in chosen])
    return paths
