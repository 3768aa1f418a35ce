"""GQA accuracy (Hudson & Manning, 2019): exact match of the predicted answer string.

The official GQA evaluation compares the predicted answer with the single gold answer as
strings, with no normalisation; so do we. Consistency, validity, plausibility and grounding
need GQA's scene-graph annotations and are not computed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def gqa_accuracy(pred: Mapping[str, str], gt: Mapping[str, str]) -> dict[str, Any]:
    """Fraction of questions of ``gt`` ``{question_id: answer}`` whose prediction equals the answer.

    Every ground-truth question needs a prediction; extra predictions are ignored.
    Returns ``{"accuracy", "n"}``.
    """
    if not gt:
        raise ValueError("no ground-truth questions to evaluate")
    missing = [q for q in gt if q not in pred]
    if missing:
        raise ValueError(f"{len(missing)} of {len(gt)} questions have no prediction, e.g. {missing[:5]}")
    correct = sum(pred[q] == answer for q, answer in gt.items())
    return {"accuracy": correct / len(gt), "n": len(gt)}
