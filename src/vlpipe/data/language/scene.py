"""What the text generators may say about a scene: descriptions, counts and relations.

Every sentence we generate must be decidable from the image alone, so this module gives each
query a precise semantics and says when it has none:

- an object is *askable* when at least ``1 - max_occlusion`` of it is visible; counts and
  existence claims that would involve a less visible object are undefined (``None``);
- a *description* (some of size, colour, shape) refers to an object only if it matches exactly
  one object of the scene (all objects count, askable or not);
- spatial relations compare box centres with a margin: ``a left of b`` is true when
  ``cx(a) < cx(b) - margin``, false when ``cx(a) > cx(b) + margin`` and undefined in between
  (likewise ``right of``, ``above``, ``below`` with y growing downwards); ``with the same
  color/shape as`` compare attributes and are never undefined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Any

# Attribute order inside a noun phrase: "large red circle".
ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape")
SPATIAL: tuple[str, ...] = ("left of", "right of", "above", "below")
SAME_ATTRIBUTE: dict[str, str] = {"with the same color as": "color", "with the same shape as": "shape"}
RELATIONS: tuple[str, ...] = SPATIAL + tuple(SAME_ATTRIBUTE)


def plural(noun: str) -> str:
    """English plural of a shape noun: circle -> circles, cross -> crosses, ..."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` (by its first letter, enough for our vocabulary)."""
    return "an" if word[:1] in "aeiou" else "a"


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Vocab:
    """The world's attribute values (from ``world.scene``)."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]

    def values(self, attr: str) -> tuple[str, ...]:
        return {"shape": self.shapes, "color": self.colors, "size": self.sizes}[attr]


@dataclass(frozen=True, eq=False)
class Obj:
    """One object of a scene, as the text generators see it (compared by identity)."""

    index: int
    shape: str
    color: str
    size: str
    x: float
    y: float
    w: float
    h: float
    askable: bool

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def bbox(self) -> list[float]:
        return [self.x, self.y, self.w, self.h]

    def get(self, attr: str) -> str:
        return {"shape": self.shape, "color": self.color, "size": self.size}[attr]


@dataclass(frozen=True)
class Desc:
    """A description by some of size, colour and shape (``None``: not said)."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    @classmethod
    def of(cls, obj: Obj, attrs: Iterable[str]) -> Desc:
        """The description of ``obj`` by the attributes ``attrs``."""
        attrs = tuple(attrs)
        return cls(
            obj.size if "size" in attrs else None,
            obj.color if "color" in attrs else None,
            obj.shape if "shape" in attrs else None,
        )

    @cached_property
    def attrs(self) -> tuple[str, ...]:
        """The attributes this description names, in ATTRIBUTES order."""
        return tuple(a for a in ATTRIBUTES if getattr(self, a) is not None)

    def matches(self, obj: Obj) -> bool:
        # Spelled out: this is the innermost test of every generator.
        return (
            (self.size is None or self.size == obj.size)
            and (self.color is None or self.color == obj.color)
            and (self.shape is None or self.shape == obj.shape)
        )

    def words(self, plural_form: bool = False) -> str:
        """``large red circle`` / ``red objects`` / ``object``."""
        noun = self.shape or "object"
        if plural_form:
            noun = plural(noun)
        return " ".join([w for w in (self.size, self.color) if w is not None] + [noun])

    def with_article(self) -> str:
        """``a large red circle``, ``an orange object``."""
        words = self.words()
        return f"{article(words)} {words}"


def attribute_subsets(allowed: Sequence[str], min_size: int = 0) -> list[tuple[str, ...]]:
    """All subsets of ``allowed`` attributes, smallest first, in ATTRIBUTES order."""
    allowed = [a for a in ATTRIBUTES if a in allowed]
    return [c for k in range(min_size, len(allowed) + 1) for c in combinations(allowed, k)]


@dataclass(frozen=True)
class RelDesc:
    """``the <subject> <relation> the <anchor>``: an object described through another one."""

    subject: Desc
    relation: str
    anchor: Obj
    anchor_desc: Desc

    def words(self) -> str:
        return f"{self.subject.words()} {self.relation} the {self.anchor_desc.words()}"


class SceneView:
    """Read-only queries over one scene graph (docs/layout.md schema)."""

    def __init__(self, scene: Mapping[str, Any], max_occlusion: float, margin: float) -> None:
        """``margin``: fraction of the image side under which a spatial relation is undefined."""
        self.img_id: str = scene["img_id"]
        self.width = float(scene["width"])
        self.height = float(scene["height"])
        self.margin_x = margin * self.width
        self.margin_y = margin * self.height
        min_visible = 1.0 - max_occlusion - 1e-9  # visible fractions are rounded to 4 digits
        self.objects: list[Obj] = [
            Obj(i, o["shape"], o["color"], o["size"], *map(float, o["bbox"]), askable=o["visible"] >= min_visible)
            for i, o in enumerate(scene["objects"])
        ]
        # Memos of the queries every generator repeats (per view, so no shared state).
        self._counts: dict[Desc, int | None] = {}
        self._unique: dict[tuple[int, tuple[str, ...], int], list[Desc]] = {}
        self._related: dict[tuple[str, int], tuple[list[Obj], list[Obj]]] = {}
        self._relational: dict[int, list[RelDesc]] = {}
        self._descs: list[Desc] | None = None

    @property
    def askable(self) -> list[Obj]:
        return [o for o in self.objects if o.askable]

    def matching(self, desc: Desc) -> list[Obj]:
        return [o for o in self.objects if desc.matches(o)]

    def count(self, desc: Desc) -> int | None:
        """How many objects match; ``None`` when one of them is too hidden to be counted."""
        if desc not in self._counts:
            found = self.matching(desc)
            self._counts[desc] = None if any(not o.askable for o in found) else len(found)
        return self._counts[desc]

    def object_descs(self) -> list[Desc]:
        """Distinct descriptions (1-3 attributes) of the scene's objects, in object order."""
        if self._descs is None:
            subsets = attribute_subsets(ATTRIBUTES, 1)
            self._descs = list(dict.fromkeys(Desc.of(o, s) for o in self.objects for s in subsets))
        return list(self._descs)

    def unique_descs(self, obj: Obj, exclude: Iterable[str] = (), min_attrs: int = 0) -> list[Desc]:
        """Descriptions (not using ``exclude``) that match ``obj`` and no other object."""
        allowed = tuple(a for a in ATTRIBUTES if a not in set(exclude))
        key = (obj.index, allowed, min_attrs)
        if key not in self._unique:
            descs = [Desc.of(obj, s) for s in attribute_subsets(allowed, min_attrs)]
            self._unique[key] = [d for d in descs if self.matching(d) == [obj]]
        return list(self._unique[key])

    def relate(self, relation: str, a: Obj, b: Obj) -> bool | None:
        """Truth of ``a <relation> b``; ``None`` when the boxes are too close to tell."""
        if relation in SAME_ATTRIBUTE:
            attr = SAME_ATTRIBUTE[relation]
            return a.get(attr) == b.get(attr)
        if relation in ("left of", "right of"):
            delta, margin = b.cx - a.cx, self.margin_x  # > 0: a is left of b
        elif relation in ("above", "below"):
            delta, margin = b.cy - a.cy, self.margin_y  # > 0: a is above b (y grows downwards)
        else:
            raise ValueError(f"unknown relation {relation!r}")
        if relation in ("right of", "below"):
            delta = -delta
        if delta > margin:
            return True
        if delta < -margin:
            return False
        return None

    def related(self, relation: str, anchor: Obj) -> tuple[list[Obj], list[Obj]]:
        """(objects for which ``o <relation> anchor`` holds, objects for which it is undefined).

        An object that is too hidden and not clearly on the false side counts as undefined.
        """
        key = (relation, anchor.index)
        if key not in self._related:
            self._related[key] = self._compute_related(relation, anchor)
        true, undefined = self._related[key]
        return list(true), list(undefined)

    def _compute_related(self, relation: str, anchor: Obj) -> tuple[list[Obj], list[Obj]]:
        true: list[Obj] = []
        undefined: list[Obj] = []
        for o in self.objects:
            if o is anchor:
                continue
            truth = self.relate(relation, o, anchor)
            if truth is None or (truth and not o.askable):
                undefined.append(o)
            elif truth:
                true.append(o)
        return true, undefined

    def relational_descs(
        self, obj: Obj, exclude: Iterable[str] = (), relations: Sequence[str] = RELATIONS
    ) -> list[RelDesc]:
        """``subject relation anchor`` descriptions that single out ``obj`` (and no other object).

        The subject uses neither ``exclude`` nor the attribute a same-attribute relation
        compares; the anchor gets its shortest unique attribute description.
        """
        if obj.index not in self._relational:
            self._relational[obj.index] = self._compute_relational(obj)
        exclude = set(exclude)
        return [
            r for r in self._relational[obj.index]
            if r.relation in relations and not exclude.intersection(r.subject.attrs)
        ]

    def _compute_relational(self, obj: Obj) -> list[RelDesc]:
        out: list[RelDesc] = []
        subjects = {subset: Desc.of(obj, subset) for subset in attribute_subsets(ATTRIBUTES)}
        for anchor in self.askable:
            anchor_descs = self.unique_descs(anchor, min_attrs=1) if anchor is not obj else []
            if not anchor_descs:
                continue
            for relation in RELATIONS:
                true, undefined = self.related(relation, anchor)
                if obj not in true:
                    continue
                compared = SAME_ATTRIBUTE.get(relation, "")
                for subset, subject in subjects.items():
                    if compared in subset:
                        continue
                    hits = [o for o in true if subject.matches(o)]
                    if hits == [obj] and not any(subject.matches(o) for o in undefined):
                        out.append(RelDesc(subject, relation, anchor, anchor_descs[0]))
        return out
