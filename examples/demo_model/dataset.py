"""Building the demo data set: all pieces rendered (in worker processes) into a folder that appears
whole or not at all, and reading it back (:class:`DemoData`). The folder's layout is in
:mod:`examples.demo_model.data`'s docstring."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from examples.demo_model.errors import DemoDataError
from examples.demo_model.facts import ClipFacts, ClipPlan
from examples.demo_model.fluidsynth import SOUNDFONT, load_libfluidsynth
from examples.demo_model.musicqa import qa_items
from examples.demo_model.pieces import Piece, select_pieces
from examples.demo_model.planning import DEFAULT_RENDERINGS, choose_heldout, plan_clips
from examples.demo_model.rendering import render_piece


@dataclass(frozen=True)
class DemoData:
    """A built dataset (see the module docstring for the layout)."""

    root: Path
    clips: tuple[ClipFacts, ...]

    @property
    def audio_dir(self) -> Path:
        return self.root / "audio"

    @property
    def train_json(self) -> Path:
        return self.root / "train.json"

    @property
    def heldout_json(self) -> Path:
        return self.root / "heldout.json"

    @property
    def clips_json(self) -> Path:
        return self.root / "clips.json"

    def split(self, name: str) -> list[ClipFacts]:
        """The clips of ``"train"`` or ``"heldout"``."""
        return [c for c in self.clips if c.split == name]

    @property
    def train_pieces(self) -> list[str]:
        return sorted({c.piece for c in self.split("train")})

    @property
    def heldout_pieces(self) -> list[str]:
        return sorted({c.piece for c in self.split("heldout")})

    @classmethod
    def load(cls, root: Path) -> DemoData:
        """Read a dataset written by :func:`build_demo_data`."""
        root = Path(root)
        raw = json.loads((root / "clips.json").read_text(encoding="utf-8"))
        return cls(root, tuple(ClipFacts.from_json(d) for d in raw))


def check_renderer(soundfont: Path = SOUNDFONT) -> None:
    """Raise :class:`DemoDataError` naming the Debian package that is missing."""
    load_libfluidsynth()
    if not Path(soundfont).is_file():
        raise DemoDataError(f"soundfont {soundfont} not found; install it: apt-get install fluid-soundfont-gm")


def build_demo_data(out: Path, *, seed: int = 0, progress: Callable[[str], None] | None = None,
                    pieces: int | Sequence[Piece] | None = None, renderings: int = DEFAULT_RENDERINGS, jobs: int = 2,
                    overwrite: bool = False, soundfont: Path = SOUNDFONT) -> DemoData:
    """Render the dataset into ``out`` (built in a temporary sibling folder, renamed at the end).

    Args:
        out: Folder to create.
        seed: Seed of every random choice; same seed, pieces and renderings -> identical bytes.
        progress: Called with one line per rendered piece.
        pieces: Use only this many pieces of :data:`PIECES` (round-robin over eras), or these pieces;
            default all.
        renderings: Clips per piece (7 = one per family).
        jobs: Worker processes (1 renders in this process).
        overwrite: Replace ``out`` if it exists (otherwise that is an error).
        soundfont: The GM soundfont.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        DemoDataError: fluidsynth or the soundfont is missing, or a piece fails to render.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    check_renderer(soundfont)
    say = progress or (lambda msg: None)
    selected = select_pieces(pieces)
    plans = plan_clips(selected, renderings, seed)
    held = choose_heldout(selected, plans, seed)
    splits = {p.clip_id: "heldout" if p.piece_index in held else "train" for p in plans}
    by_piece: dict[int, list[ClipPlan]] = {}
    for p in plans:
        by_piece.setdefault(p.piece_index, []).append(p)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)                                    # mkdtemp makes it private
    try:
        audio_dir = tmp / "audio"
        audio_dir.mkdir()
        tasks = [(selected[i], by_piece[i], splits, str(audio_dir), str(soundfont)) for i in range(len(selected))]
        # Longest first (file size is a good proxy for parse time); results are keyed by piece.
        order = sorted(range(len(tasks)), key=lambda i: -_score_size(selected[i]))
        results: dict[int, list[ClipFacts]] = {}
        t0 = time.perf_counter()
        if jobs <= 1:
            mapped = map(render_piece, (tasks[i] for i in order))
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
            mapped = pool.map(render_piece, [tasks[i] for i in order])
        try:
            for n, (i, facts) in enumerate(zip(order, mapped), 1):
                results[i] = facts
                say(f"[{n}/{len(tasks)}] {selected[i].name}: {len(facts)} clips "
                    f"({time.perf_counter() - t0:.0f} s)")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        clips = tuple(f for i in range(len(selected)) for f in results[i])
        check_split(clips)
        for name in ("train", "heldout"):
            items = [item for f in clips if f.split == name for item in qa_items(f, seed)]
            write_json(tmp / f"{name}.json", items)
        write_json(tmp / "clips.json", [f.to_json() for f in clips])
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoData(out, clips)


def _score_size(piece: Piece) -> int:
    from music21 import corpus

    paths = corpus.getWork(piece.path)
    path = paths[0] if isinstance(paths, list) else paths
    return Path(path).stat().st_size


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def check_split(clips: Sequence[ClipFacts]) -> None:
    """Assert that no piece has clips in both splits."""
    train = {c.piece for c in clips if c.split == "train"}
    heldout = {c.piece for c in clips if c.split == "heldout"}
    assert not train & heldout, f"pieces in both splits: {sorted(train & heldout)}"



def summary(data: DemoData) -> str:
    """Clip counts per split, family, tempo class, era, solo and drums, and the size on disk."""
    from collections import Counter

    lines = []
    for name in ("train", "heldout"):
        clips = data.split(name)
        lines.append(f"{name}: {len(clips)} clips from {len({c.piece for c in clips})} pieces")
        for field in ("family", "tempo_class", "era", "solo", "drums"):
            counts = Counter(getattr(c, field) for c in clips)
            lines.append(f"  {field}: " + ", ".join(f"{k}={counts[k]}" for k in sorted(counts, key=str)))
    size = sum(p.stat().st_size for p in data.root.rglob("*") if p.is_file())
    lines.append(f"total {size / 1e6:.1f} MB in {data.root}")
    return "\n".join(lines)
