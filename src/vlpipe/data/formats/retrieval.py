"""Image-text retrieval JSON in X-VLM's (and ALBEF's) format (formats.md §5).

Train: one record per caption ``{"image", "caption": str, "image_id"}``; val/test: one record
per image ``{"image", "caption": [5 strings]}``. ``image`` is a path relative to the data root
(``images/<img_id>.png`` in our world); ``image_id`` is a string or an integer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_records,
    check_unique,
    is_int,
    is_nonempty_str,
    list_of,
    write_records,
)
from vlpipe.io import read_json


def _image_id(value: Any) -> str | None:
    if is_int(value) is None or is_nonempty_str(value) is None:
        return None
    return f"expected a string or integer image_id, got {type(value).__name__}"


TRAIN: dict[str, Check] = {"image": is_nonempty_str, "caption": is_nonempty_str, "image_id": _image_id}
EVAL: dict[str, Check] = {"image": is_nonempty_str, "caption": list_of(is_nonempty_str, min_length=1)}


def _is_train_file(data: Any) -> bool:
    """A train file has one caption string per record; decided by the first record."""
    first = data[0] if isinstance(data, list) and data else None
    return isinstance(first, dict) and isinstance(first.get("caption"), str)


def read_retrieval(path: str | Path, train: bool | None = None) -> list[dict]:
    """Read retrieval records; ``train`` picks the schema (None: decided by the first record)."""
    data = read_json(path)
    if train is None:
        train = _is_train_file(data)
    records = check_records(path, data, TRAIN if train else EVAL, id_key="image")
    if not train:
        check_unique(path, (r["image"] for r in records), "image")
    return records


def write_retrieval(path: str | Path, records: Sequence[Mapping[str, Any]], train: bool) -> None:
    """Write retrieval records atomically after checking them against the reader's schema."""
    if not train:
        check_unique(path, (r["image"] for r in records), "image")
    write_records(path, records, TRAIN if train else EVAL, id_key="image")
