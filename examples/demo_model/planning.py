"""Every random choice about a clip that does not need its score (family, tempo, solo, drums), and the
held-out split; made once in the parent process, so the workers only parse and render.

Held-out split by piece (about 20 % of the pieces, stratified by era and chosen so that held-out
clips cover every family, tempo class, solo/ensemble and drums/no drums present): no piece has clips
in both splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from examples.demo_model.facts import ERAS, FAMILIES, TEMPO_CLASSES, ClipPlan
from examples.demo_model.instruments import POLYPHONIC_FAMILIES
from examples.demo_model.pieces import Piece

#: Renderings per piece by default: one per family (:data:`FAMILIES`), each at its own excerpt.
DEFAULT_RENDERINGS = 7
#: Fraction of the pieces held out.
HELDOUT_FRACTION = 0.2
#: Fraction of the clips with drums.
DRUMS_FRACTION = 0.37


def plan_clips(pieces: Sequence[Piece], renderings: int, seed: int) -> list[ClipPlan]:
    """Family, tempo, solo and drums of every clip.

    Renderings of a piece rotate through the families and the tempo classes from a random start,
    so with 7 renderings every piece is heard once in every family, and tempo classes are balanced.
    """
    if renderings < 1:
        raise ValueError(f"renderings must be >= 1, got {renderings}")
    rng = np.random.default_rng([seed, 1])
    families, tempi = list(FAMILIES), list(TEMPO_CLASSES)
    plans = []
    for pi, piece in enumerate(pieces):
        fam_off, tempo_off = int(rng.integers(len(families))), int(rng.integers(len(tempi)))
        n_drums = min(renderings, int(DRUMS_FRACTION * renderings + rng.random()))
        drums = {int(r) for r in rng.choice(renderings, size=n_drums, replace=False)}
        for r in range(renderings):
            family = families[(fam_off + r) % len(families)]
            tempo_class = tempi[(tempo_off + r) % len(tempi)]
            lo, hi = TEMPO_CLASSES[tempo_class]
            bpm = int(rng.integers(lo, hi + 1))
            ensemble_draw = rng.random()
            if family in POLYPHONIC_FAMILIES:
                solo = True
            elif family == "choir":
                solo = False
            else:
                solo = ensemble_draw < 0.4
            plans.append(ClipPlan(f"{piece.slug}-{r}", pi, r, family, solo, tempo_class, bpm, r in drums,
                                  int(rng.integers(2**62))))
    return plans


def _coverage(plans: Sequence[ClipPlan]) -> set:
    return ({("family", p.family) for p in plans} | {("tempo", p.tempo_class) for p in plans}
            | {("solo", p.solo) for p in plans} | {("drums", p.drums) for p in plans})


def choose_heldout(pieces: Sequence[Piece], plans: Sequence[ClipPlan], seed: int,
                   fraction: float = HELDOUT_FRACTION) -> set[int]:
    """Indices of the held-out pieces: ``fraction`` of each era (rounded by largest remainder, at least
    one piece in all), drawn until the held-out clips cover every family, tempo class, solo/ensemble
    and drums/no drums of the whole set (else the best-covering of 200 draws is kept)."""
    if len(pieces) < 2:
        raise ValueError("a held-out split needs at least 2 pieces")
    rng = np.random.default_rng([seed, 2])
    eras = [e for e in ERAS if any(p.era == e for p in pieces)]
    members = {e: [i for i, p in enumerate(pieces) if p.era == e] for e in eras}
    total = max(1, min(len(pieces) - 1, round(fraction * len(pieces))))
    exact = {e: fraction * len(members[e]) for e in eras}
    quota = {e: int(exact[e]) for e in eras}
    for e in sorted(eras, key=lambda e: (-(exact[e] - quota[e]), eras.index(e))):
        if sum(quota.values()) >= total:
            break
        quota[e] += 1
    by_piece: dict[int, list[ClipPlan]] = {}
    for p in plans:
        by_piece.setdefault(p.piece_index, []).append(p)
    want = _coverage(plans)
    best: tuple[int, set[int]] | None = None
    for _ in range(200):
        held = set()
        for e in eras:
            held.update(int(i) for i in rng.permutation(members[e])[: quota[e]])
        covered = len(_coverage([c for i in held for c in by_piece[i]]) & want)
        if best is None or covered > best[0]:
            best = (covered, held)
        if covered == len(want):
            break
    assert best is not None
    return best[1]
