"""Greedy answer balancing of generated questions (after CLEVR / GQA's balancing step).

A question-only model must not be able to guess answers from the question's wording
(design.md: the blind baseline of metrics/world.json). Each image offers many candidate
questions; we pick a few so that, over the split, (1) the question *families* (VQA question
types, GQA templates) are used about equally often and (2) within each answer-balancing
*group* the answers are as uniform as the images allow: always pick a least-used answer
among the ones this image can give.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Question:
    """A generated question with its correct (normalised) answer."""

    family: str  # what the type mix is balanced over (VQA: the question_type)
    group: str  # what answers are balanced within (a family or a finer split of it)
    text: str
    answer: str
    kind: str  # answer kind, decides plausible wrong answers: color|shape|size|number|yes/no
    question_type: str = ""  # VQA question_type (prefix of the question, lowercase)
    answer_type: str = ""  # VQA answer_type: yes/no | number | other


def _choose(items: Sequence, rng: np.random.Generator):
    return items[int(rng.integers(len(items)))]


class AnswerBalancer:
    """Picks questions image after image, keeping running counts over the whole split.

    ``weights``: target share of each family (unlisted families weigh 1); the next family is
    one furthest behind its share, i.e. with the lowest ``count / weight``.
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights: dict[str, float] = dict(weights or {})
        self.family_counts: Counter[str] = Counter()
        self.answer_counts: dict[str, Counter[str]] = {}

    def pick(self, candidates: Sequence[Question], k: int, rng: np.random.Generator) -> list[Question]:
        """Up to ``k`` questions of distinct text from ``candidates`` (fewer if there are fewer)."""
        pool = list(candidates)
        chosen: list[Question] = []
        while pool and len(chosen) < k:
            question = self._pick_one(pool, rng)
            chosen.append(question)
            self.family_counts[question.family] += 1
            self.answer_counts.setdefault(question.group, Counter())[question.answer] += 1
            pool = [q for q in pool if q.text != question.text]
        return chosen

    def _pick_one(self, pool: Sequence[Question], rng: np.random.Generator) -> Question:
        # Families in first-seen order (deterministic; no set iteration).
        families = list(dict.fromkeys(q.family for q in pool))
        usage = {f: self.family_counts[f] / self.weights.get(f, 1.0) for f in families}
        lowest = min(usage.values())
        family = _choose([f for f in families if usage[f] == lowest], rng)
        in_family = [q for q in pool if q.family == family]
        group = _choose(list(dict.fromkeys(q.group for q in in_family)), rng)
        in_group = [q for q in in_family if q.group == group]
        counts = self.answer_counts.get(group, Counter())
        answers = list(dict.fromkeys(q.answer for q in in_group))
        least = min(counts[a] for a in answers)
        answer = _choose([a for a in answers if counts[a] == least], rng)
        return _choose([q for q in in_group if q.answer == answer], rng)
