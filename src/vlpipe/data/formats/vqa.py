"""VQA annotation JSON in LXMERT's re-distributed format (formats.md §2).

Records ``{"answer_type", "img_id", "label": {answer: score}, "question_id": int,
"question_type", "sent"}``; test records carry no ``label``. Our world's train/val records
also carry ``"answers"``: the 10 raw annotator strings, which the official VQA accuracy needs.
The answer table is ``trainval_ans2label.json`` (dict) + ``trainval_label2ans.json`` (list).
The hidden test answers (``hidden/vqa_test.json``) map ``str(question_id)`` to
``{"answers": [10 strings], "answer_type"}``, the ground truth of :func:`vlpipe.eval.vqa.vqa_accuracy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.data.formats.schema import (
    Check,
    check_record,
    check_unique,
    dict_of,
    expect_dict,
    expect_list,
    is_int,
    is_nonempty_str,
    is_number,
    is_str,
    list_of,
    one_of,
    read_records,
    write_records,
)
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")
NUM_ANNOTATORS = 10


def _score(value: Any) -> str | None:
    problem = is_number(value)
    if problem:
        return problem
    return None if 0.0 <= value <= 1.0 else f"expected a score in [0, 1], got {value}"


LABEL: Check = dict_of(_score)
ANSWERS: Check = list_of(is_str, length=NUM_ANNOTATORS)
_REQUIRED: dict[str, Check] = {
    "answer_type": one_of(*ANSWER_TYPES),
    "img_id": is_nonempty_str,
    "question_id": is_int,
    "question_type": is_str,
    "sent": is_nonempty_str,
}


def _spec(labelled: bool | None) -> tuple[dict[str, Check], dict[str, Check]]:
    """(required, optional) keys: labelled records need a label; test records have none."""
    if labelled is None:
        return _REQUIRED, {"label": LABEL, "answers": ANSWERS}
    if labelled:
        return {**_REQUIRED, "label": LABEL}, {"answers": ANSWERS}
    return _REQUIRED, {}


def read_vqa(path: str | Path, labelled: bool | None = None) -> list[dict]:
    """Read VQA records; ``labelled`` True/False demands/forbids labels, None accepts both."""
    records = read_records(path, *_spec(labelled), id_key="question_id")
    check_unique(path, (r["question_id"] for r in records), "question_id")
    return records


def write_vqa(path: str | Path, records: Sequence[Mapping[str, Any]], labelled: bool) -> None:
    """Write VQA records atomically after checking them against the reader's schema."""
    write_records(path, records, *_spec(labelled), id_key="question_id")


def read_answer_table(ans2label_path: str | Path, label2ans_path: str | Path) -> tuple[dict[str, int], list[str]]:
    """Read ``trainval_ans2label.json`` / ``trainval_label2ans.json`` and check they agree."""
    ans2label = expect_dict(ans2label_path, read_json(ans2label_path), "answer -> label")
    label2ans = expect_list(label2ans_path, read_json(label2ans_path), "answers")
    for i, ans in enumerate(label2ans):
        if not isinstance(ans, str):
            raise InputError(label2ans_path, f"entry {i}: expected a string answer, got {ans!r}")
    check_unique(label2ans_path, label2ans, "answer")
    if len(ans2label) != len(label2ans):
        raise InputError(ans2label_path, f"{len(ans2label)} answers but {label2ans_path} lists {len(label2ans)}")
    for ans, idx in ans2label.items():
        if is_int(idx) is not None or not 0 <= idx < len(label2ans) or label2ans[idx] != ans:
            raise InputError(ans2label_path, f"answer {ans!r}: label {idx!r} does not match {label2ans_path}")
    return ans2label, label2ans


def write_answer_table(directory: str | Path, ans2label: Mapping[str, int], label2ans: Sequence[str]) -> None:
    """Write ``trainval_ans2label.json`` and ``trainval_label2ans.json`` into ``directory``."""
    directory = Path(directory)
    write_json(directory / "trainval_ans2label.json", dict(ans2label), indent=None)
    write_json(directory / "trainval_label2ans.json", list(label2ans), indent=None)


_HIDDEN: dict[str, Check] = {"answers": ANSWERS, "answer_type": one_of(*ANSWER_TYPES)}


def read_vqa_hidden(path: str | Path) -> dict[int, dict[str, Any]]:
    """Read hidden VQA answers: ``{question_id: {"answers": [10 str], "answer_type"}}``."""
    data = expect_dict(path, read_json(path), "question_id -> answers")
    out: dict[int, dict[str, Any]] = {}
    for key, entry in data.items():
        if not key.lstrip("-").isdigit():
            raise InputError(path, f"key {key!r}: expected an integer question_id")
        check_record(path, f"question_id {key}", entry, _HIDDEN)
        out[int(key)] = entry
    return out


def write_vqa_hidden(path: str | Path, gt: Mapping[int, Mapping[str, Any]]) -> None:
    """Write hidden VQA answers keyed by ``str(question_id)`` (JSON keys are strings)."""
    for qid, entry in gt.items():
        check_record(path, f"question_id {qid}", dict(entry), _HIDDEN)
    write_json(path, {str(q): dict(e) for q, e in gt.items()}, indent=None)
