"""RefCOCO-style referring expressions in X-VLM's grounding format (formats.md §5).

Records ``{"image", "text", "ref_id": int, "bbox": [x, y, w, h]}`` (box in pixels, COCO
convention); test records carry no ``bbox``. Models regress (cx, cy, w, h) normalised to
[0, 1]; see :func:`box_to_cxcywh`. Hidden test boxes (``hidden/refcoco_{testA,testB}.json``) map
``str(ref_id)`` to the box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_unique,
    expect_dict,
    is_box,
    is_int,
    is_nonempty_str,
    read_records,
    write_records,
)
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

_REQUIRED: dict[str, Check] = {"image": is_nonempty_str, "text": is_nonempty_str, "ref_id": is_int}


def _spec(labelled: bool | None) -> tuple[dict[str, Check], dict[str, Check]]:
    if labelled is None:
        return _REQUIRED, {"bbox": is_box}
    return ({**_REQUIRED, "bbox": is_box}, {}) if labelled else (_REQUIRED, {})


def read_refcoco(path: str | Path, labelled: bool | None = None) -> list[dict]:
    """Read referring expressions; ``labelled`` True/False demands/forbids boxes, None accepts both."""
    records = read_records(path, *_spec(labelled), id_key="ref_id")
    check_unique(path, (r["ref_id"] for r in records), "ref_id")
    return records


def write_refcoco(path: str | Path, records: Sequence[Mapping[str, Any]], labelled: bool) -> None:
    """Write referring expressions atomically after checking them against the reader's schema."""
    write_records(path, records, *_spec(labelled), id_key="ref_id")


def read_refcoco_hidden(path: str | Path) -> dict[int, list[float]]:
    """Read hidden boxes ``{ref_id: [x, y, w, h]}``."""
    data = expect_dict(path, read_json(path), "ref_id -> box")
    out: dict[int, list[float]] = {}
    for key, box in data.items():
        if not key.lstrip("-").isdigit():
            raise InputError(path, f"key {key!r}: expected an integer ref_id")
        problem = is_box(box)
        if problem:
            raise InputError(path, f"ref_id {key}: {problem}")
        out[int(key)] = box
    return out


def write_refcoco_hidden(path: str | Path, boxes: Mapping[int, Sequence[float]]) -> None:
    write_json(path, {str(k): list(v) for k, v in boxes.items()}, indent=None)


def box_to_cxcywh(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Pixel ``[x, y, w, h]`` -> ``(cx, cy, w, h)`` normalised by the image size (X-VLM's targets)."""
    x, y, w, h = box
    return (x + w / 2) / width, (y + h / 2) / height, w / width, h / height
