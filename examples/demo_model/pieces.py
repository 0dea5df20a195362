"""The scores the demo data set is rendered from: a fixed selection of music21's bundled corpus, five
eras, chosen to parse quickly, and how a smaller subset of them is taken."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from examples.demo_model.facts import ERAS


@dataclass(frozen=True)
class Piece:
    """A score of music21's corpus.

    Attributes:
        path: Corpus path as ``corpus.parse`` takes it.
        composer: Display name (``"traditional"`` for folk tunes).
        era: One of :data:`ERAS`.
        kind: What it is, in captions ("chorale", "minuet", "reel", ...).
        number: Tune number inside a multi-tune ABC file, else ``None``.
    """

    path: str
    composer: str
    era: str
    kind: str
    number: int | None = None

    @property
    def slug(self) -> str:
        base = re.sub(r"\.(mxl|xml|musicxml|krn|abc)$", "", self.path)
        base = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")
        return base if self.number is None else f"{base}_n{self.number}"

    @property
    def name(self) -> str:
        """The corpus path, with ``#number`` for a tune of a multi-tune file."""
        return self.path if self.number is None else f"{self.path}#{self.number}"


def _p(path: str, composer: str, era: str, kind: str, number: int | None = None) -> Piece:
    return Piece(path, composer, era, kind, number)


_BACH, _MOZART, _HAYDN = "J. S. Bach", "W. A. Mozart", "J. Haydn"
_JOSQUIN, _PALESTRINA, _TRAD = "Josquin des Prez", "G. P. da Palestrina", "traditional"

#: The corpus pieces, chosen to parse in well under 2 s each (music21 10.5.1 on one core). Order
#: within an era matters only for ``--pieces`` (the subset is taken round-robin over eras).
PIECES: tuple[Piece, ...] = (
    # Renaissance
    _p("josquin/milleRegrets", _JOSQUIN, "Renaissance", "chanson"),
    _p("palestrina/Kyrie_00", _PALESTRINA, "Renaissance", "mass movement"),
    _p("josquin/petiteCamusette", _JOSQUIN, "Renaissance", "chanson"),
    _p("palestrina/Agnus_01", _PALESTRINA, "Renaissance", "mass movement"),
    _p("lusitano/allor_che_ignuda", "V. Lusitano", "Renaissance", "madrigal"),
    _p("palestrina/Benedictus_00", _PALESTRINA, "Renaissance", "mass movement"),
    _p("josquin/fortunaDunGranTempo", _JOSQUIN, "Renaissance", "chanson"),
    _p("palestrina/Agnus_03", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Sanctus_07", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Kyrie_02", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Benedictus_06", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Agnus_05", _PALESTRINA, "Renaissance", "mass movement"),
    _p("palestrina/Benedictus_02", _PALESTRINA, "Renaissance", "mass movement"),
    # Baroque
    _p("bach/bwv66.6", _BACH, "Baroque", "chorale"),
    _p("monteverdi/madrigal.5.3.mxl", "C. Monteverdi", "Baroque", "madrigal"),
    _p("bach/bwv269", _BACH, "Baroque", "chorale"),
    _p("corelli/opus3no1/1grave", "A. Corelli", "Baroque", "trio sonata movement"),
    _p("bach/bwv26.6", _BACH, "Baroque", "chorale"),
    _p("bach/bwv846", _BACH, "Baroque", "prelude"),
    _p("bach/bwv310", _BACH, "Baroque", "chorale"),
    _p("bach/bwv322", _BACH, "Baroque", "chorale"),
    _p("bach/bwv40.8", _BACH, "Baroque", "chorale"),
    _p("bach/bwv1.6", _BACH, "Baroque", "chorale"),
    _p("bach/bwv10.7", _BACH, "Baroque", "chorale"),
    _p("bach/bwv101.7", _BACH, "Baroque", "chorale"),
    _p("bach/bwv250", _BACH, "Baroque", "chorale"),
    _p("bach/bwv251", _BACH, "Baroque", "chorale"),
    _p("bach/bwv40.6", _BACH, "Baroque", "chorale"),
    # Classical
    _p("mozart/k545/movement1_exposition", _MOZART, "Classical", "sonata"),
    _p("haydn/opus1no1/movement2", _HAYDN, "Classical", "minuet"),
    _p("mozart/k155/movement2", _MOZART, "Classical", "movement"),
    _p("haydn/opus1no1/movement1", _HAYDN, "Classical", "movement"),
    _p("mozart/k156/movement4", _MOZART, "Classical", "movement"),
    _p("haydn/opus1no1/movement3", _HAYDN, "Classical", "adagio"),
    _p("mozart/k80/movement3", _MOZART, "Classical", "minuet"),
    _p("beethoven/opus18no1/movement3.mxl", "L. van Beethoven", "Classical", "scherzo"),
    _p("haydn/opus1no1/movement4", _HAYDN, "Classical", "minuet"),
    _p("mozart/k156/movement2", _MOZART, "Classical", "adagio"),
    _p("haydn/opus1no1/movement5", _HAYDN, "Classical", "finale"),
    _p("mozart/k80/movement4", _MOZART, "Classical", "rondo"),
    _p("mozart/k458/movement2", _MOZART, "Classical", "minuet"),
    _p("mozart/k155/movement3", _MOZART, "Classical", "movement"),
    # Romantic
    _p("schumann_robert/opus48no2", "R. Schumann", "Romantic", "song"),
    _p("chopin/mazurka06-2", "F. Chopin", "Romantic", "mazurka"),
    _p("schumann_clara/polonaise_op1n1", "C. Schumann", "Romantic", "polonaise"),
    _p("verdi/laDonnaEMobile", "G. Verdi", "Romantic", "aria"),
    _p("schubert/Lindenbaum", "F. Schubert", "Romantic", "song"),
    _p("schumann_clara/polonaise_op1n2", "C. Schumann", "Romantic", "polonaise"),
    _p("schumann_robert/dichterliebe_no2", "R. Schumann", "Romantic", "song"),
    _p("beach/prayer_of_a_tired_child", "A. Beach", "Romantic", "song"),
    _p("schumann_clara/polonaise_op1n3", "C. Schumann", "Romantic", "polonaise"),
    _p("liliuokalani/aloha_oe", "Liliuokalani", "Romantic", "song"),
    _p("schumann_clara/polonaise_op1n4", "C. Schumann", "Romantic", "polonaise"),
    _p("johnson_j_r/lift_every_voice", "J. R. Johnson", "Romantic", "hymn"),
    # folk
    _p("ryansMammoth/AdmiralsHornpipe", _TRAD, "folk", "dance"),
    _p("essenFolksong/altdeu10", _TRAD, "folk", "song", 1),
    _p("oneills1850/0001-0050", _TRAD, "folk", "tune", 1),
    _p("ryansMammoth/ButchersMarchJig", _TRAD, "folk", "jig"),
    _p("essenFolksong/zuccal0", _TRAD, "folk", "song", 1),
    _p("oneills1850/0051-0100", _TRAD, "folk", "air", 60),
    _p("ryansMammoth/AcaciaReel", _TRAD, "folk", "reel"),
    _p("essenFolksong/folkHaydn", _TRAD, "folk", "song", 1),
    _p("oneills1850/0201-0300", _TRAD, "folk", "tune", 210),
    _p("ryansMammoth/CastlesInTheAirJig", _TRAD, "folk", "jig"),
    _p("essenFolksong/irl", _TRAD, "folk", "song", 1),
    _p("airdsAirs/book1", _TRAD, "folk", "tune", 1),
    _p("essenFolksong/erk5", _TRAD, "folk", "song", 1),
    _p("miscFolk/americanfifeopus", _TRAD, "folk", "march", 1),
    _p("essenFolksong/han1", _TRAD, "folk", "song", 1),
    _p("ryansMammoth/AfterTheHareReel", _TRAD, "folk", "reel"),
)



def select_pieces(n: int | Sequence[Piece] | None) -> list[Piece]:
    """``n`` pieces (all when ``None``), taken round-robin over the eras in :data:`PIECES` order;
    a sequence of pieces is used as it is."""
    if n is not None and not isinstance(n, int):
        return list(n)
    if n is None or n >= len(PIECES):
        return list(PIECES)
    if n < 1:
        raise ValueError(f"pieces must be >= 1, got {n}")
    by_era = {era: [p for p in PIECES if p.era == era] for era in ERAS}
    out: list[Piece] = []
    i = 0
    while len(out) < n:
        for era in ERAS:
            if i < len(by_era[era]) and len(out) < n:
                out.append(by_era[era][i])
        i += 1
    return out

