"""NLVR2 JSON in LXMERT's re-distributed format (formats.md §2).

Records ``{"identifier", "img0", "img1", "label": 0|1, "sent", "uid"}``; test records carry no
``label``. The identifier is ``split-setid-pairid-sentid``: one sentence (``split-setid-sentid``)
is paired with several image pairs, which is what consistency is computed over. In our world
``img0``/``img1`` are world image ids of the same split (docs/layout.md). Hidden test labels
(``hidden/nlvr2_test.json``) map identifier to true/false.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from vlpipe.data.formats.schema import (
    Check,
    check_unique,
    describe,
    expect_dict,
    is_bool,
    is_nonempty_str,
    one_of,
    read_records,
    write_records,
)
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json


class Identifier(NamedTuple):
    split: str
    setid: str
    pairid: str
    sentid: str

    def sentence(self) -> str:
        """The sentence this example belongs to: ``split-setid-sentid``."""
        return f"{self.split}-{self.setid}-{self.sentid}"

    def __str__(self) -> str:
        return f"{self.split}-{self.setid}-{self.pairid}-{self.sentid}"


def parse_identifier(identifier: str) -> Identifier:
    """Split ``split-setid-pairid-sentid`` (the split name may itself contain ``-``)."""
    parts = identifier.split("-")
    if len(parts) < 4 or not all(parts):
        raise ValueError(f"not an NLVR2 identifier (split-setid-pairid-sentid): {identifier!r}")
    return Identifier("-".join(parts[:-3]), *parts[-3:])


def _identifier(value: Any) -> str | None:
    problem = is_nonempty_str(value)
    if problem:
        return problem
    try:
        parse_identifier(value)
    except ValueError as e:
        return str(e)
    return None


_REQUIRED: dict[str, Check] = {
    "identifier": _identifier,
    "img0": is_nonempty_str,
    "img1": is_nonempty_str,
    "sent": is_nonempty_str,
    "uid": is_nonempty_str,
}


def _spec(labelled: bool | None) -> tuple[dict[str, Check], dict[str, Check]]:
    label = {"label": one_of(0, 1)}
    if labelled is None:
        return _REQUIRED, label
    return ({**_REQUIRED, **label}, {}) if labelled else (_REQUIRED, {})


def read_nlvr2(path: str | Path, labelled: bool | None = None) -> list[dict]:
    """Read NLVR2 records; ``labelled`` True/False demands/forbids labels, None accepts both."""
    records = read_records(path, *_spec(labelled), id_key="identifier")
    check_unique(path, (r["identifier"] for r in records), "identifier")
    for i, r in enumerate(records):
        if r["img0"] == r["img1"]:
            raise InputError(path, f"{describe(i, r, 'identifier')}: img0 and img1 are the same image")
    return records


def write_nlvr2(path: str | Path, records: Sequence[Mapping[str, Any]], labelled: bool) -> None:
    """Write NLVR2 records atomically after checking them against the reader's schema."""
    write_records(path, records, *_spec(labelled), id_key="identifier")


def read_nlvr2_hidden(path: str | Path) -> dict[str, bool]:
    """Read hidden NLVR2 labels ``{identifier: bool}``."""
    data = expect_dict(path, read_json(path), "identifier -> label")
    for key, label in data.items():
        problem = _identifier(key) or is_bool(label)
        if problem:
            raise InputError(path, f"identifier {key!r}: {problem}")
    return data


def write_nlvr2_hidden(path: str | Path, gt: Mapping[str, bool]) -> None:
    write_json(path, {k: bool(v) for k, v in gt.items()}, indent=None)
