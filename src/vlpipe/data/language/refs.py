"""Referring expressions (RefCOCO-style, Kazemzadeh et al., 2014; Yu et al., 2016).

Each expression refers to exactly one object (its box is the target): either by attributes
alone (``the large red circle``) or through a relation to another object (``the object left
of the blue star``, ``the small object with the same color as the square``); see
:mod:`.scene` for when a description is unique.

Test split: RefCOCO splits its test set into testA (people) and testB (other objects). Our
world has no people, so we split by the kind of expression instead: **testA holds the
attribute-only expressions, testB the relational ones**. Each image alternates the two kinds
(falling back to the other kind when an image offers none), so testA and testB are about the
same size; train and val mix both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlpipe.data.language.scene import Obj, SceneView

KINDS: tuple[str, str] = ("attribute", "relational")


@dataclass(frozen=True)
class Ref:
    text: str
    target: Obj
    kind: str  # attribute | relational


def _candidates(view: SceneView, kind: str) -> list[Ref]:
    out = []
    for obj in view.askable:
        if kind == "attribute":
            out.extend(Ref(f"the {d.words()}", obj, kind) for d in view.unique_descs(obj, min_attrs=1))
        else:
            out.extend(Ref(f"the {r.words()}", obj, kind) for r in view.relational_descs(obj))
    return out


def image_refs(view: SceneView, n: int, rng: np.random.Generator) -> list[Ref]:
    """Up to ``n`` expressions of one image, alternating kinds, distinct targets while possible."""
    pools = {kind: _candidates(view, kind) for kind in KINDS}
    first = int(rng.integers(2))
    refs: list[Ref] = []
    for k in range(n):
        kind = KINDS[(first + k) % 2]
        pool = pools[kind] or pools[KINDS[(first + k + 1) % 2]]
        taken = {r.target.index for r in refs}
        texts = {r.text for r in refs}
        fresh = [r for r in pool if r.target.index not in taken] or [r for r in pool if r.text not in texts]
        if not fresh:
            break
        refs.append(fresh[int(rng.integers(len(fresh)))])
    return refs
