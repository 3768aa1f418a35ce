"""Exact-key, typed checks of reference-format records, shared by the format readers/writers.

A *check* is a function ``value -> problem | None``. :func:`check_record` requires exactly
the keys of ``required`` (plus any of ``optional``) and raises
:class:`~vlpipe.errors.InputError` naming the file, the record and the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

Check = Callable[[Any], str | None]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_type_name(value)}"


def is_nonempty_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_type_name(value)}"
    return None if value.strip() else "expected a non-empty string"


def is_int(value: Any) -> str | None:
    # bool is a subclass of int in Python; JSON true/false is not an id.
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"expected an integer, got {_type_name(value)}"


def is_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {_type_name(value)}"
    return None if math.isfinite(value) else f"expected a finite number, got {value}"


def is_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true/false, got {_type_name(value)}"


def is_object(value: Any) -> str | None:
    """Any JSON object (its entries are checked separately)."""
    return None if isinstance(value, dict) else f"expected an object, got {_type_name(value)}"


def is_list(value: Any) -> str | None:
    """Any JSON list (its items are checked separately)."""
    return None if isinstance(value, list) else f"expected a list, got {_type_name(value)}"


def one_of(*allowed: Any) -> Check:
    """A value equal to one of ``allowed`` (with the same JSON type)."""

    def check(value: Any) -> str | None:
        ok = any(value == a and type(value) is type(a) for a in allowed)
        return None if ok else f"expected one of {list(allowed)}, got {value!r}"

    return check


def list_of(item: Check, length: int | None = None, min_length: int = 0) -> Check:
    """A list whose items pass ``item``; exactly ``length`` items if given."""

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"expected a list, got {_type_name(value)}"
        if length is not None and len(value) != length:
            return f"expected {length} items, got {len(value)}"
        if len(value) < min_length:
            return f"expected at least {min_length} items, got {len(value)}"
        for i, v in enumerate(value):
            problem = item(v)
            if problem:
                return f"item {i}: {problem}"
        return None

    return check


def dict_of(value_check: Check) -> Check:
    """A JSON object (string keys) whose values pass ``value_check``."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"expected an object, got {_type_name(value)}"
        for k, v in value.items():
            problem = value_check(v)
            if problem:
                return f"entry {k!r}: {problem}"
        return None

    return check


def is_box(value: Any) -> str | None:
    """A box ``[x, y, w, h]`` in pixels: 4 finite numbers, w and h > 0."""
    problem = list_of(is_number, length=4)(value)
    if problem:
        return problem
    return None if value[2] > 0 and value[3] > 0 else f"box width/height must be > 0, got {value}"


def describe(index: int, record: Any, id_key: str | None) -> str:
    """``record 3`` or ``record 3 (question_id=17)``: how an error names the record."""
    if id_key and isinstance(record, dict) and id_key in record:
        return f"record {index} ({id_key}={record[id_key]!r})"
    return f"record {index}"


def check_record(
    path: str | Path,
    where: str,
    record: Any,
    required: Mapping[str, Check],
    optional: Mapping[str, Check] | None = None,
) -> None:
    """Raise :class:`InputError` unless ``record`` has exactly the keys and types of the spec."""
    optional = optional or {}
    if not isinstance(record, dict):
        raise InputError(path, f"{where}: expected an object, got {_type_name(record)}")
    missing = [k for k in required if k not in record]
    if missing:
        raise InputError(path, f"{where}: missing key(s) {missing}")
    unknown = sorted(k for k in record if k not in required and k not in optional)
    if unknown:
        raise InputError(path, f"{where}: unknown key(s) {unknown}")
    for key, value in record.items():
        problem = (required.get(key) or optional[key])(value)
        if problem:
            raise InputError(path, f"{where}: key {key!r}: {problem}")


def expect_list(path: str | Path, data: Any, what: str = "records") -> list:
    if not isinstance(data, list):
        raise InputError(path, f"expected a JSON list of {what}, got {_type_name(data)}")
    return data


def expect_dict(path: str | Path, data: Any, what: str = "entries") -> dict:
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object of {what}, got {_type_name(data)}")
    return data


def check_records(
    path: str | Path,
    records: Any,
    required: Mapping[str, Check],
    optional: Mapping[str, Check] | None = None,
    id_key: str | None = None,
) -> list[dict]:
    """Check a list of records against one spec; return it."""
    for i, rec in enumerate(expect_list(path, records)):
        check_record(path, describe(i, rec, id_key), rec, required, optional)
    return records


def check_unique(path: str | Path, values: Iterable[Any], what: str) -> None:
    """Raise :class:`InputError` on the first repeated ``what`` (e.g. a question_id)."""
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise InputError(path, f"duplicate {what} {v!r}")
        seen.add(v)


def read_records(
    path: str | Path,
    required: Mapping[str, Check],
    optional: Mapping[str, Check] | None = None,
    id_key: str | None = None,
) -> list[dict]:
    """Read a JSON list of records and check every one of them."""
    return check_records(path, read_json(path), required, optional, id_key)


def write_records(
    path: str | Path,
    records: Sequence[Mapping[str, Any]],
    required: Mapping[str, Check],
    optional: Mapping[str, Check] | None = None,
    id_key: str | None = None,
) -> None:
    """Check records against the spec (what the reader will demand), then write them atomically."""
    check_records(path, list(records), required, optional, id_key)
    write_json(path, list(records), indent=None)
