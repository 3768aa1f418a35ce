"""NLVR2-style statements over image pairs (Suhr et al., 2019).

A statement is true or false of an ordered image pair (left = ``img0``, right = ``img1``).
Each template is a small class with a ``text`` and a ``truth(left, right)`` predicate over the
two scene graphs, so every label is computed, never guessed:

| template | example |
|---|---|
| OneImage | The left image contains exactly two red objects. |
| Both | Both images contain a star. |
| ExactlyOne | Exactly one image contains no circles. |
| Connective | The left image contains a large square and the right image contains at least two stars. |
| MoreThan | The right image contains more blue objects than the left image. |
| SameNumber | Both images contain the same number of triangles. |

Clauses about one image: ``a/an D`` (>= 1), ``no Ds`` (0), ``exactly n D(s)``, ``at least n
Ds``; D is a description by up to two attributes (``red objects``, ``large stars``). A count
involving an object too hidden to count is undefined, and so is any statement that uses it:
such pairs are never labelled. Every sentence is paired with ``nlvr2_pairs_per_sentence``
image pairs of its split, half of them true (labels balanced per sentence, hence overall).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlpipe.data.answers import NUMBER_WORDS
from vlpipe.data.language.scene import ATTRIBUTES, Desc, SceneView, Vocab, capitalize

SIDES: tuple[str, str] = ("left", "right")
# Sampling weights of clause quantifiers and of template classes: existence-heavy, with
# small counts, so that a good model can reach high accuracy while counting still matters.
_QUANTIFIERS: dict[str, float] = {"a": 0.35, "no": 0.2, "exactly": 0.25, "at least": 0.2}
_DESC_LENGTHS: dict[int, float] = {0: 0.15, 1: 0.5, 2: 0.35}
# Range of n in "exactly n" / "at least n", for a bare "objects" count (about the whole
# image: 2..6 objects) and for a count of described objects (small numbers).
_COUNT_RANGES: dict[tuple[str, bool], tuple[int, int]] = {
    ("exactly", True): (2, 5), ("exactly", False): (1, 3),
    ("at least", True): (3, 5), ("at least", False): (2, 3),
}
# Pairs tried per statement before giving up on it, statements tried per sentence.
_PAIR_TRIES = 400
_STATEMENT_TRIES = 50


@dataclass(frozen=True)
class Clause:
    """What one image contains: ``quantifier`` (a | no | exactly | at least), ``n`` and ``desc``."""

    quantifier: str
    n: int
    desc: Desc

    @property
    def text(self) -> str:
        if self.quantifier == "a":
            return self.desc.with_article()
        if self.quantifier == "no":
            return f"no {self.desc.words(True)}"
        return f"{self.quantifier} {NUMBER_WORDS[self.n]} {self.desc.words(self.n != 1)}"

    def holds(self, view: SceneView) -> bool | None:
        count = view.count(self.desc)
        if count is None:
            return None
        return {"a": count >= 1, "no": count == 0, "exactly": count == self.n, "at least": count >= self.n}[
            self.quantifier
        ]


class Statement(ABC):
    """A sentence about an image pair with a precise truth value."""

    @property
    @abstractmethod
    def text(self) -> str: ...

    @abstractmethod
    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        """True/False of the pair, None when undefined (an object too hidden to count)."""

    @property
    def sentence(self) -> str:
        return capitalize(self.text) + "."


def _both(a: bool | None, b: bool | None) -> tuple[bool, bool] | None:
    return None if a is None or b is None else (a, b)


@dataclass(frozen=True)
class OneImage(Statement):
    side: str
    clause: Clause

    @property
    def text(self) -> str:
        return f"the {self.side} image contains {self.clause.text}"

    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        return self.clause.holds(left if self.side == "left" else right)


@dataclass(frozen=True)
class Both(Statement):
    clause: Clause

    @property
    def text(self) -> str:
        return f"both images contain {self.clause.text}"

    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        values = _both(self.clause.holds(left), self.clause.holds(right))
        return None if values is None else all(values)


@dataclass(frozen=True)
class ExactlyOne(Statement):
    clause: Clause

    @property
    def text(self) -> str:
        return f"exactly one image contains {self.clause.text}"

    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        values = _both(self.clause.holds(left), self.clause.holds(right))
        return None if values is None else values[0] != values[1]


@dataclass(frozen=True)
class Connective(Statement):
    left_clause: Clause
    right_clause: Clause
    connective: str  # "and" | "or"

    @property
    def text(self) -> str:
        return (
            f"the left image contains {self.left_clause.text} {self.connective} "
            f"the right image contains {self.right_clause.text}"
        )

    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        values = _both(self.left_clause.holds(left), self.right_clause.holds(right))
        if values is None:
            return None
        return all(values) if self.connective == "and" else any(values)


@dataclass(frozen=True)
class MoreThan(Statement):
    side: str  # the image said to contain more
    desc: Desc

    @property
    def text(self) -> str:
        other = "right" if self.side == "left" else "left"
        return f"the {self.side} image contains more {self.desc.words(True)} than the {other} image"

    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        counts = left.count(self.desc), right.count(self.desc)
        if None in counts:
            return None
        more, less = counts if self.side == "left" else counts[::-1]
        return more > less


@dataclass(frozen=True)
class SameNumber(Statement):
    desc: Desc

    @property
    def text(self) -> str:
        return f"both images contain the same number of {self.desc.words(True)}"

    def truth(self, left: SceneView, right: SceneView) -> bool | None:
        counts = left.count(self.desc), right.count(self.desc)
        return None if None in counts else counts[0] == counts[1]


def _weighted(options: dict, rng: np.random.Generator):
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sample_desc(vocab: Vocab, rng: np.random.Generator, min_attrs: int = 0) -> Desc:
    length = max(min_attrs, _weighted(_DESC_LENGTHS, rng))
    attrs = sorted(rng.permutation(len(ATTRIBUTES))[:length])
    values = {}
    for i in attrs:
        choices = vocab.values(ATTRIBUTES[i])
        values[ATTRIBUTES[i]] = choices[int(rng.integers(len(choices)))]
    return Desc(**values)


def _sample_clause(vocab: Vocab, rng: np.random.Generator) -> Clause:
    quantifier = _weighted(_QUANTIFIERS, rng)
    if quantifier in ("a", "no"):
        # "an object" / "no objects" would be true / false of every image: describe something.
        return Clause(quantifier, 1, _sample_desc(vocab, rng, min_attrs=1))
    desc = _sample_desc(vocab, rng)
    low, high = _COUNT_RANGES[quantifier, not desc.attrs]
    return Clause(quantifier, int(rng.integers(low, high + 1)), desc)


def sample_statement(vocab: Vocab, rng: np.random.Generator) -> Statement:
    """A random statement from the templates above."""
    template = _weighted(
        {"one": 0.2, "both": 0.2, "exactly_one": 0.15, "and": 0.15, "or": 0.1, "more": 0.1, "same": 0.1}, rng
    )
    side = SIDES[int(rng.integers(2))]
    if template == "one":
        return OneImage(side, _sample_clause(vocab, rng))
    if template == "both":
        return Both(_sample_clause(vocab, rng))
    if template == "exactly_one":
        return ExactlyOne(_sample_clause(vocab, rng))
    if template in ("and", "or"):
        return Connective(_sample_clause(vocab, rng), _sample_clause(vocab, rng), template)
    desc = _sample_desc(vocab, rng, min_attrs=1)
    return MoreThan(side, desc) if template == "more" else SameNumber(desc)


@dataclass(frozen=True)
class Example:
    """One labelled pair of a sentence: indices into the split's scenes."""

    left: int
    right: int
    label: bool


def _find_pairs(
    statement: Statement, views: Sequence[SceneView], n_true: int, n_false: int, rng: np.random.Generator
) -> list[Example] | None:
    """``n_true`` true and ``n_false`` false distinct pairs, or None if not found in time."""
    found: dict[bool, list[Example]] = {True: [], False: []}
    need = {True: n_true, False: n_false}
    used: set[tuple[int, int]] = set()
    for _ in range(_PAIR_TRIES):
        i = int(rng.integers(len(views)))
        j = int(rng.integers(len(views) - 1))
        j += j >= i  # a second, different image
        if (i, j) in used:
            continue
        truth = statement.truth(views[i], views[j])
        if truth is not None and len(found[truth]) < need[truth]:
            found[truth].append(Example(i, j, truth))
            used.add((i, j))
            if all(len(found[k]) == need[k] for k in need):
                examples = found[True] + found[False]
                return [examples[int(k)] for k in rng.permutation(len(examples))]
    return None


def generate_nlvr2(
    views: Sequence[SceneView], vocab: Vocab, n_sentences: int, pairs_per_sentence: int, rng: np.random.Generator
) -> list[tuple[Statement, list[Example]]]:
    """Up to ``n_sentences`` distinct statements, each with its balanced labelled pairs.

    Fewer sentences come back only when the split is too small to find balanced pairs.
    """
    if len(views) < 2:
        return []
    out: list[tuple[Statement, list[Example]]] = []
    texts: set[str] = set()
    for k in range(n_sentences):
        # Odd pair counts: alternate which label gets the extra pair, so labels stay balanced.
        n_true = pairs_per_sentence // 2 + (pairs_per_sentence % 2) * (k % 2)
        for _ in range(_STATEMENT_TRIES):
            statement = sample_statement(vocab, rng)
            if statement.text in texts:
                continue
            examples = _find_pairs(statement, views, n_true, pairs_per_sentence - n_true, rng)
            if examples is not None:
                texts.add(statement.text)
                out.append((statement, examples))
                break
    return out
