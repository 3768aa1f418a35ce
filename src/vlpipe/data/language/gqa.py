"""GQA-style compositional questions (Hudson & Manning, 2019) over the scene's relations.

Templates (the balancing families):

| family | example | answer |
|---|---|---|
| relate_color | What color is the object left of the star? | colour |
| relate_shape | What shape is the small object with the same color as the blue square? | shape |
| verify_relation | Is the red circle above the blue square? | yes/no |
| exist_relation | Is there a green object right of the large star? | yes/no |
| compare_attribute | Are the circle and the large square the same color? | yes/no |

Relations: left of, right of, above, below (box centres with a margin), with the same
color/shape as (see :mod:`.scene`). A subject is described so that exactly one object fits
the description *and* the relation; questions whose truth depends on a relation that is
undefined (boxes too close) are never asked. A description never names the attribute the
question is about.
"""

from __future__ import annotations

import numpy as np

from vlpipe.data.answers import normalize_answer
from vlpipe.data.language.balance import Question
from vlpipe.data.language.scene import (
    SPATIAL,
    Desc,
    Obj,
    SceneView,
    capitalize,
)

_QUERY_RELATIONS: dict[str, tuple[str, ...]] = {
    # Asking a colour through "with the same color as" would give the anchor's colour away.
    "color": (*SPATIAL, "with the same shape as"),
    "shape": (*SPATIAL, "with the same color as"),
}
_COMPARED: tuple[str, ...] = ("color", "shape")


def _question(family: str, group: str, text: str, answer: str, kind: str = "yes/no") -> Question:
    return Question(family=family, group=group, text=capitalize(text), answer=normalize_answer(answer), kind=kind)


def _relate_questions(view: SceneView, rng: np.random.Generator) -> list[Question]:
    """What <attr> is the <subject> <relation> the <anchor>?"""
    out = []
    for attr, relations in _QUERY_RELATIONS.items():
        family = f"relate_{attr}"
        for obj in view.askable:
            descs = view.relational_descs(obj, exclude=[attr], relations=relations)
            if descs:
                rel = descs[int(rng.integers(len(descs)))]
                text = f"what {attr} is the {rel.words()}?"
                out.append(_question(family, family, text, obj.get(attr), kind=attr))
    return out


def _pick_desc(descs: list[Desc], rng: np.random.Generator) -> Desc | None:
    return descs[int(rng.integers(len(descs)))] if descs else None


def _verify_questions(view: SceneView, rng: np.random.Generator) -> list[Question]:
    """Is the <A> <relation> the <B>? for uniquely described A, B and a defined relation."""
    out = []
    descs = {o.index: view.unique_descs(o, min_attrs=1) for o in view.askable}
    for a in view.askable:
        for b in view.askable:
            if a is b:
                continue
            da, db = _pick_desc(descs[a.index], rng), _pick_desc(descs[b.index], rng)
            if da is None or db is None:
                continue
            for relation in SPATIAL:
                truth = view.relate(relation, a, b)
                if truth is not None:
                    text = f"is the {da.words()} {relation} the {db.words()}?"
                    out.append(_question("verify_relation", f"verify/{relation}", text, "yes" if truth else "no"))
    return out


def _exist_questions(view: SceneView, rng: np.random.Generator) -> list[Question]:
    """Is there a <D> <relation> the <anchor>? Yes: a matching object satisfies the relation;
    no: every matching object clearly does not. D describes some object of the scene; one
    "yes" and one "no" description are drawn per (anchor, relation)."""
    out = []
    for anchor in view.askable:
        anchor_desc = _pick_desc(view.unique_descs(anchor, min_attrs=1), rng)
        if anchor_desc is None:
            continue
        for relation in SPATIAL:
            true, undefined = view.related(relation, anchor)
            by_answer: dict[str, list[Desc]] = {"yes": [], "no": []}
            for desc in _scene_descs(view, anchor):
                if not any(desc.matches(o) for o in undefined):
                    by_answer["yes" if any(desc.matches(o) for o in true) else "no"].append(desc)
            for answer, descs in by_answer.items():
                desc = _pick_desc(descs, rng)
                if desc is not None:
                    text = f"is there {desc.with_article()} {relation} the {anchor_desc.words()}?"
                    out.append(_question("exist_relation", f"exist/{relation}", text, answer))
    return out


def _scene_descs(view: SceneView, anchor: Obj) -> list[Desc]:
    """Descriptions of the scene's objects that ``anchor`` does not match itself (so they
    describe other objects, and there is no "Is there a star left of the star?")."""
    return [d for d in view.object_descs() if not d.matches(anchor)]


def _compare_questions(view: SceneView, rng: np.random.Generator) -> list[Question]:
    """Are the <A> and the <B> the same <attr>? (A and B described without that attribute)."""
    out = []
    objs = view.askable
    for attr in _COMPARED:
        descs = {o.index: view.unique_descs(o, exclude=[attr], min_attrs=1) for o in objs}
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                da, db = _pick_desc(descs[a.index], rng), _pick_desc(descs[b.index], rng)
                if da is None or db is None:
                    continue
                answer = "yes" if a.get(attr) == b.get(attr) else "no"
                text = f"are the {da.words()} and the {db.words()} the same {attr}?"
                out.append(_question("compare_attribute", f"compare/{attr}", text, answer))
    return out


def gqa_candidates(view: SceneView, rng: np.random.Generator) -> list[Question]:
    """All compositional questions one image can answer unambiguously."""
    return (
        _relate_questions(view, rng)
        + _verify_questions(view, rng)
        + _exist_questions(view, rng)
        + _compare_questions(view, rng)
    )
