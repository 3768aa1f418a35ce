"""Captions: what an image shows, in a canonical order, with a little phrasing variety.

The content of a caption is fixed by the image: its (askable) objects from left to right,
each as ``a <size> <colour> <shape>``; one template adds the vertical relation between the
topmost and the bottommost object. The 5 captions of an image use 5 different templates
(wrappers around the same object list), like the paraphrases of COCO's 5 annotators but far
more consistent, so a good captioner can reach a high CIDEr-D (Vedantam et al., 2015).
"""

from __future__ import annotations

import numpy as np

from vlpipe.data.language.scene import Desc, Obj, SceneView, capitalize

# "{objs}": the object list; "{relation}": the top/bottom relation (only when it is defined).
TEMPLATES: tuple[str, ...] = (
    "{objs}",
    "there is {objs}",
    "from left to right, {objs}",
    "an image with {objs}",
    "{objs}, from left to right",
    "a picture of {objs}",
    "{objs}; {relation}",
)


def _phrase(obj: Obj) -> str:
    return Desc.of(obj, ("size", "color", "shape")).with_article()


def object_list(view: SceneView) -> str:
    """``a small red circle, a large blue star and a small green square`` (left to right)."""
    objs = sorted(view.askable, key=lambda o: (o.cx, o.cy, o.index))
    phrases = [_phrase(o) for o in objs]
    if not phrases:
        return "an empty dark background"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def vertical_relation(view: SceneView) -> str | None:
    """``the small red circle is above the large blue star`` (topmost vs bottommost object)."""
    objs = view.askable
    if len(objs) < 2:
        return None
    top = min(objs, key=lambda o: (o.cy, o.index))
    bottom = max(objs, key=lambda o: (o.cy, -o.index))
    full = ("size", "color", "shape")
    upper, lower = Desc.of(top, full).words(), Desc.of(bottom, full).words()
    if upper == lower or view.relate("above", top, bottom) is not True:
        return None  # two look-alikes, or no clear vertical order: nothing to say
    return f"the {upper} is above the {lower}"


def image_captions(view: SceneView, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions of one image, each with a different template while templates last."""
    objs, relation = object_list(view), vertical_relation(view)
    usable = [t for t in TEMPLATES if relation is not None or "{relation}" not in t]
    order = [usable[int(i)] for i in rng.permutation(len(usable))]
    chosen = [order[i % len(order)] for i in range(n)]
    return [capitalize(t.format(objs=objs, relation=relation)) + "." for t in chosen]
