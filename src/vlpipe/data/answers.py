"""Answer normalisation, soft scores and answer vocabularies of the QA tables.

LXMERT (Tan & Bansal, 2019) trains its QA heads on *soft* targets: an answer given by
1/2/3/>=4 of the 10 VQA annotators scores 0.3/0.6/0.9/1.0 (formats.md §2), after a light
normalisation of the raw annotator strings (lowercase, trailing "." and a leading article
stripped, number words to digits, "grey" -> "gray"). The answer table of a task
(``trainval_ans2label.json`` dict / ``trainval_label2ans.json`` list) indexes the answers seen
in train + val.

This normalisation builds *training* labels. Leaderboard scores use the official VQA
evaluator's own processing instead (:mod:`vlpipe.eval.vqa`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
# Answer rewrites applied after lowercasing and article stripping (LXMERT's answer table).
_REWRITES: dict[str, str] = {**{w: str(i) for i, w in enumerate(NUMBER_WORDS)}, "grey": "gray"}
_ARTICLES: tuple[str, ...] = ("a ", "an ", "the ")
# Soft score of an answer given by k annotators (k >= 4 scores 1.0); a table, not 0.3 * k,
# so that 3 annotators give exactly 0.9 and not 0.8999999999999999.
_SOFT_SCORES: tuple[float, ...] = (0.0, 0.3, 0.6, 0.9)


def normalize_answer(answer: str) -> str:
    """LXMERT-style answer normalisation for answer tables.

    ``"Two."`` -> ``"2"``, ``"A circle"`` -> ``"circle"``, ``"Grey"`` -> ``"gray"``.
    """
    ans = " ".join(answer.lower().split())  # lowercase, collapse whitespace
    if ans.endswith("."):
        ans = ans[:-1].strip()
    for article in _ARTICLES:
        if ans.startswith(article):
            ans = ans[len(article):].strip()
            break
    return _REWRITES.get(ans, ans)


def soft_score(count: int) -> float:
    """VQA soft score of an answer given by ``count`` annotators: 0/0.3/0.6/0.9, then 1.0."""
    if count < 0:
        raise ValueError(f"annotator count must be >= 0, got {count}")
    return _SOFT_SCORES[count] if count < len(_SOFT_SCORES) else 1.0


def answer_label(raw_answers: Sequence[str]) -> dict[str, float]:
    """Soft label ``{normalised answer: score}`` from raw annotator answers (formats.md §2)."""
    counts = Counter(normalize_answer(a) for a in raw_answers)
    return {ans: soft_score(n) for ans, n in sorted(counts.items())}


def top_answer(label: Mapping[str, float]) -> str:
    """The best-scored answer of a soft label; ties broken alphabetically (deterministic)."""
    if not label:
        raise ValueError("empty label has no top answer")
    return min(label, key=lambda a: (-label[a], a))


def build_answer_vocab(
    labels: Iterable[Mapping[str, float]], min_count: int = 1
) -> tuple[dict[str, int], list[str]]:
    """Answer table ``(ans2label, label2ans)`` of answers seen in at least ``min_count`` labels.

    Ordered by decreasing frequency, then alphabetically, so the table is the same on every run.
    LXMERT's VQA table keeps answers seen >= 9 times (3129 answers on VQA v2).
    """
    counts: Counter[str] = Counter()
    for label in labels:
        counts.update(label.keys())
    label2ans = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(label2ans)}, label2ans


def restrict_label(label: Mapping[str, float], ans2label: Mapping[str, int]) -> dict[str, float]:
    """Drop the answers of a label that are not in the answer table (LXMERT does the same)."""
    return {a: s for a, s in label.items() if a in ans2label}
