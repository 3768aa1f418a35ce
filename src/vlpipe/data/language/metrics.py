"""Statistics of the generated text for metrics/world.json, with question-only baselines.

The *blind* baseline answers every question with the most frequent training answer of its
question type (VQA ``question_type``; GQA template family), never looking at the image. Its
val accuracy (official VQA accuracy for VQA) shows how much the wording alone gives away;
answer balancing (:mod:`.balance`) keeps it low.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlpipe.data.answers import top_answer
from vlpipe.data.language.corpus import QA
from vlpipe.eval.gqa import gqa_accuracy
from vlpipe.eval.vqa import vqa_accuracy


def entropy_bits(values: Iterable[str]) -> float:
    """Shannon entropy (bits) of the empirical distribution of ``values``."""
    counts = Counter(values)
    total = sum(counts.values())
    return -sum(n / total * math.log2(n / total) for n in counts.values()) if total else 0.0


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{type: most frequent answer}`` of (type, answer) pairs; ties to the first alphabetically."""
    counts: dict[str, Counter[str]] = {}
    for qtype, answer in pairs:
        counts.setdefault(qtype, Counter())[answer] += 1
    return {t: min(c, key=lambda a: (-c[a], a)) for t, c in sorted(counts.items())}


def _public_answer(qa: QA) -> str:
    """The answer a model trained on the public files sees: the best-scored one of the label
    (VQA's soft label from 10 noisy annotators), or the single answer (GQA)."""
    return top_answer(qa.label) if qa.label else qa.question.answer


def _blind(train: Sequence[QA], key: str) -> tuple[dict[str, str], str]:
    """Majority answer per type (``key``: Question attribute) and overall (for unseen types)."""
    per_type = majority_answers((getattr(qa.question, key), _public_answer(qa)) for qa in train)
    overall = majority_answers(("", _public_answer(qa)) for qa in train).get("", "")
    return per_type, overall


def vqa_blind_accuracy(train: Sequence[QA], val: Sequence[QA]) -> dict[str, Any]:
    """Official VQA accuracy on val of the majority train answer per question_type."""
    if not val:
        return {"overall": 0.0, "per_question_type": {}}
    per_type, overall = _blind(train, "question_type")
    preds = {qa.question_id: per_type.get(qa.question.question_type, overall) for qa in val}
    gt = {
        qa.question_id: {
            "answers": list(qa.answers),
            "answer_type": qa.question.answer_type,
            "question_type": qa.question.question_type,
        }
        for qa in val
    }
    result = vqa_accuracy(preds, gt)
    return {"overall": result["overall"], "per_question_type": result["per_question_type"]}


def gqa_blind_accuracy(train: Sequence[QA], val: Sequence[QA]) -> float:
    """GQA accuracy on val of the majority train answer per template family."""
    if not val:
        return 0.0
    per_type, overall = _blind(train, "family")
    preds = {str(qa.question_id): per_type.get(qa.question.family, overall) for qa in val}
    return gqa_accuracy(preds, {str(qa.question_id): qa.question.answer for qa in val})["accuracy"]


def qa_stats(splits: Mapping[str, Sequence[QA]], type_key: str) -> dict[str, Any]:
    """Question counts per split and answer entropies (train) overall and per type."""
    train = splits["train"]
    by_type: dict[str, list[str]] = {}
    for qa in train:
        by_type.setdefault(getattr(qa.question, type_key), []).append(qa.question.answer)
    return {
        "questions": {s: len(v) for s, v in splits.items()},
        "answer_entropy_bits": entropy_bits(qa.question.answer for qa in train),
        "answer_entropy_bits_by_type": {t: entropy_bits(v) for t, v in sorted(by_type.items())},
    }
