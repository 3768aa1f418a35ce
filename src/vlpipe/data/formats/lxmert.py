"""LXMERT pre-training JSON (formats.md §2): one record per image.

``{"img_id", "sentf": {source: [sentences]}, "labelf": {source: [{answer: score}, ...]}}``.
Caption sources (``mscoco``, ``vg``) have no labels; question sources (``vqa``, ``gqa``,
``visual7w``) have one label per sentence, index-aligned with ``sentf[source]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_unique,
    describe,
    dict_of,
    is_nonempty_str,
    is_number,
    is_str,
    list_of,
    read_records,
    write_records,
)
from vlpipe.errors import InputError

CAPTION_SOURCES: tuple[str, ...] = ("mscoco", "vg")
QUESTION_SOURCES: tuple[str, ...] = ("vqa", "gqa", "visual7w")

_SPEC: dict[str, Check] = {
    "img_id": is_nonempty_str,
    "sentf": dict_of(list_of(is_str)),
    "labelf": dict_of(list_of(dict_of(is_number))),
}


def _check_alignment(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Every labelled source must be a sentence source with exactly one label per sentence."""
    for i, rec in enumerate(records):
        for source, labels in rec["labelf"].items():
            where = describe(i, rec, "img_id")
            if source not in rec["sentf"]:
                raise InputError(path, f"{where}: labelf source {source!r} has no sentences in sentf")
            if len(labels) != len(rec["sentf"][source]):
                raise InputError(
                    path,
                    f"{where}: labelf[{source!r}] has {len(labels)} labels for "
                    f"{len(rec['sentf'][source])} sentences",
                )


def read_lxmert(path: str | Path) -> list[dict]:
    """Read LXMERT pre-training records, checking keys, types and label alignment."""
    records = read_records(path, _SPEC, id_key="img_id")
    check_unique(path, (r["img_id"] for r in records), "img_id")
    _check_alignment(path, records)
    return records


def write_lxmert(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write LXMERT pre-training records atomically after checking them."""
    _check_alignment(path, records)
    write_records(path, records, _SPEC, id_key="img_id")
