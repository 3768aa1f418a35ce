"""GQA annotation JSON in LXMERT's re-distributed format (formats.md §2).

Records ``{"img_id": str, "label": {answer: 1.0}, "question_id": str, "sent"}``; test
records carry no ``label``. Hidden test answers (``hidden/gqa_test.json``) map
``question_id`` to the answer string, the ground truth of :func:`vlpipe.eval.gqa.gqa_accuracy`.
The answer table uses the same two files as VQA's (:func:`vlpipe.data.formats.vqa.write_answer_table`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_unique,
    dict_of,
    expect_dict,
    is_nonempty_str,
    is_number,
    is_str,
    read_records,
    write_records,
)
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

_REQUIRED: dict[str, Check] = {"img_id": is_nonempty_str, "question_id": is_nonempty_str, "sent": is_nonempty_str}
LABEL: Check = dict_of(is_number)


def _spec(labelled: bool | None) -> tuple[dict[str, Check], dict[str, Check]]:
    if labelled is None:
        return _REQUIRED, {"label": LABEL}
    if labelled:
        return {**_REQUIRED, "label": LABEL}, {}
    return _REQUIRED, {}


def read_gqa(path: str | Path, labelled: bool | None = None) -> list[dict]:
    """Read GQA records; ``labelled`` True/False demands/forbids labels, None accepts both."""
    records = read_records(path, *_spec(labelled), id_key="question_id")
    check_unique(path, (r["question_id"] for r in records), "question_id")
    return records


def write_gqa(path: str | Path, records: Sequence[Mapping[str, Any]], labelled: bool) -> None:
    """Write GQA records atomically after checking them against the reader's schema."""
    write_records(path, records, *_spec(labelled), id_key="question_id")


def read_gqa_hidden(path: str | Path) -> dict[str, str]:
    """Read hidden GQA answers ``{question_id: answer}``."""
    data = expect_dict(path, read_json(path), "question_id -> answer")
    for qid, ans in data.items():
        problem = is_str(ans)
        if problem:
            raise InputError(path, f"question_id {qid!r}: {problem}")
    return data


def write_gqa_hidden(path: str | Path, gt: Mapping[str, str]) -> None:
    write_json(path, dict(gt), indent=None)
