"""Mirrored layouts: a training example again with its boxes reflected and its spatial words swapped.

Reflecting every box of an image across the vertical axis (x -> 1 - x) and swapping "left" /
"right" in the question and the answers keeps the answer true: "Is the D left of the E?" on
the reflected layout becomes "Is the D right of the E?", with the same answer. The same holds
across the horizontal axis with "above" / "below" (and "top" / "bottom").

Only the *positions* (``visual_pos``, x1y1x2y2 in [0, 1]) are reflected; each region's (or
grid cell's) feature stays as it is. The mirrored example is therefore the same objects, with
the same appearance, at reflected places: a consistent scene, not an approximation of a
flipped photograph (a right-pointing triangle stays right-pointing). For a grid source,
reflecting the cell boxes is the same as moving each cell's feature to the reflected cell,
since the encoder knows a cell only by its box.

This is the spatial-relation analogue of NLVR2's ``swap_sides``: GQA's relational yes/no
questions are the last thing a small LXMERT learns (README), and each mirror axis gives it
every relational question again with the other word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from vlpipe.data.examples import Example

# axis -> word pairs it swaps (both directions, any capitalisation of the first letter)
_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "horizontal": (("left", "right"),),
    "vertical": (("above", "below"), ("top", "bottom")),
}

# params value -> the reflections added to the training set (each one a full copy)
MIRROR_COPIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "none": (),
    "horizontal": (("horizontal",),),
    "vertical": (("vertical",),),
    "both": (("horizontal",), ("vertical",), ("horizontal", "vertical")),
}


def _swapper(axes: Sequence[str]) -> tuple[re.Pattern[str], dict[str, str]]:
    table: dict[str, str] = {}
    for axis in axes:
        for a, b in _PAIRS[axis]:
            for x, y in ((a, b), (b, a)):
                table[x], table[x.capitalize()] = y, y.capitalize()
    return re.compile(r"\b(" + "|".join(sorted(table, key=len, reverse=True)) + r")\b"), table


def swap_words(text: str, axes: Sequence[str]) -> str:
    """``text`` with the spatial words of ``axes`` swapped ("left of" <-> "right of", ...)."""
    pattern, table = _swapper(axes)
    return pattern.sub(lambda m: table[m.group(1)], text)


def mirror_examples(examples: Sequence[Example], mode: str) -> list[Example]:
    """The extra training examples of params ``mirror`` = ``mode`` (none / horizontal /
    vertical / both): per reflection a copy of every example with its sentence and answer
    words swapped, its key suffixed and ``info["mirror"]`` naming the axes that
    :func:`mirror_positions` reflects in the collate."""
    if mode not in MIRROR_COPIES:
        raise ValueError(f"mirror must be one of {sorted(MIRROR_COPIES)}, got {mode!r}")
    out = []
    for axes in MIRROR_COPIES[mode]:
        tag = "-".join(a[0] for a in axes)  # h, v, h-v
        for ex in examples:
            target: Any = ex.target
            if isinstance(target, dict):  # soft answer scores: the answers name sides too
                target = {swap_words(a, axes): s for a, s in target.items()}
            out.append(replace(ex, key=f"{ex.key}-mirror-{tag}", sent=swap_words(ex.sent, axes),
                               target=target, info={**ex.info, "mirror": axes}))  # fmt: skip
    return out


def mirror_positions(pos: torch.Tensor, axes: Sequence[str]) -> torch.Tensor:
    """(..., 4) boxes x1y1x2y2 in [0, 1] reflected across the image's vertical axis
    (``horizontal``: x -> 1 - x) and / or horizontal axis (``vertical``: y -> 1 - y)."""
    x1, y1, x2, y2 = pos.unbind(-1)
    if "horizontal" in axes:
        x1, x2 = 1.0 - x2, 1.0 - x1
    if "vertical" in axes:
        y1, y2 = 1.0 - y2, 1.0 - y1
    return torch.stack([x1, y1, x2, y2], dim=-1)
