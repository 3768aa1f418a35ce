"""NLVR2 metrics (Suhr et al., 2019): accuracy and consistency.

An NLVR2 identifier is ``split-setid-pairid-sentid``; the same sentence (same
``split-setid-sentid``) is paired with several image pairs. Consistency is the fraction of
unique sentences whose every pair is classified correctly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from vlpipe.data.formats.nlvr2 import parse_identifier


def sentence_key(identifier: str) -> str:
    """``split-setid-pairid-sentid`` -> ``split-setid-sentid`` (the sentence it belongs to)."""
    return parse_identifier(identifier).sentence()


def nlvr2_metrics(pred: Mapping[str, bool], gt: Mapping[str, bool]) -> dict[str, float]:
    """``{"accuracy", "consistency"}`` of ``pred`` ``{identifier: label}`` against ``gt``.

    Every ground-truth identifier needs a prediction; extra predictions are ignored.
    """
    if not gt:
        raise ValueError("no ground-truth examples to evaluate")
    missing = [k for k in gt if k not in pred]
    if missing:
        raise ValueError(f"{len(missing)} of {len(gt)} examples have no prediction, e.g. {missing[:5]}")
    right = {k: bool(pred[k]) == bool(label) for k, label in gt.items()}
    by_sentence: dict[str, list[bool]] = defaultdict(list)
    for k, ok in right.items():
        by_sentence[sentence_key(k)].append(ok)
    return {
        "accuracy": sum(right.values()) / len(right),
        "consistency": sum(all(v) for v in by_sentence.values()) / len(by_sentence),
    }
