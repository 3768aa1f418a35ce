"""The official VQA accuracy (Antol et al., 2015; VQA v2, Goyal et al., 2017).

Re-implements the behaviour of the VQA evaluation server's ``vqaEval.py`` (not its code):

- the *prediction* is cleaned of newlines/tabs, stripped, then goes through punctuation
  processing and digit/article processing (lowercase, number words ``zero``..``ten`` and
  ``none`` to digits, articles removed, contractions restored);
- the 10 *ground-truth* answers go through punctuation processing only, and only when they
  are not all identical (the annotation files are pre-normalised by the VQA team);
- acc = mean over the 10 leave-one-out subsets of 9 annotators of min(#matches / 3, 1).

Two quirks of the official code are kept on purpose because they change scores: the period
regex ``(?!<=\\d)(\\.)(?!\\d)`` (a mistyped look-behind: it removes every "." not followed by a
digit) and ``re.UNICODE`` passed as the *count* of ``re.sub`` (at most 32 periods removed).
Scores are fractions in [0, 1], not the server's rounded percentages.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as count
_NUMBERS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Apostrophe-less spellings -> the official evaluator's spelling (which mixes ' and ’).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s",
    "howd": "how’d", "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll",
    "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve",
    "mightn’tve": "mightn’t’ve", "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve",
    "neednt": "needn’t", "notve": "not’ve", "oclock": "o’clock", "oughtnt": "oughtn’t",
    "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at", "shant": "shan’t",
    "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve", "therere": "there’re",
    "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve",
    "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t",
    "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll",
    "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll",
    "whyre": "why’re", "whys": "why’s", "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve",
    "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re",
    "youve": "you’ve",
}


def process_punctuation(text: str) -> str:
    """Official punctuation processing: drop or space out punctuation, strip periods."""
    out = text
    # A mark touching a space (or any "digit,digit") is deleted; one inside a word becomes a
    # space. The test looks at the *original* text, as the official code does.
    delete = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official word processing: lowercase, number words to digits, drop articles, contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def process_prediction(answer: str) -> str:
    """What the official evaluator compares a predicted answer as."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def process_ground_truth(answers: Sequence[str]) -> list[str]:
    """What the official evaluator compares the annotators' answers as (punctuation only)."""
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the annotators' answers (10 in VQA).

    Mean over the leave-one-out subsets of min(#annotators in the subset who gave it / 3, 1).
    """
    if not answers:
        raise ValueError("a question needs at least one ground-truth answer")
    pred = process_prediction(prediction)
    gts = process_ground_truth(answers)
    matches = sum(g == pred for g in gts)
    # Leaving out a matching annotator leaves matches - 1 in the subset, any other leaves matches.
    total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


def vqa_accuracy(predictions: Mapping[int, str], ground_truth: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Official VQA accuracy of ``predictions`` ``{question_id: answer}``.

    ``ground_truth``: ``{question_id: {"answers": [10 raw strings], "answer_type": str}}``,
    optionally with ``"question_type"``. Every ground-truth question needs a prediction
    (like the official evaluator, which refuses incomplete results); extra predictions are
    ignored. Returns ``{"overall", "per_answer_type": {type: acc}, "per_question_type"
    (when given), "n"}``, accuracies as fractions in [0, 1].
    """
    missing = [q for q in ground_truth if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ground_truth)} questions have no prediction, e.g. {missing[:5]}")
    if not ground_truth:
        raise ValueError("no ground-truth questions to evaluate")
    scores: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for qid, gt in ground_truth.items():
        acc = question_accuracy(predictions[qid], gt["answers"])
        scores.append(acc)
        by_answer_type[gt["answer_type"]].append(acc)
        if "question_type" in gt:
            by_question_type[gt["question_type"]].append(acc)
    result: dict[str, Any] = {
        "overall": _mean(scores),
        "per_answer_type": {t: _mean(v) for t, v in sorted(by_answer_type.items())},
        "n": len(scores),
    }
    if by_question_type:
        result["per_question_type"] = {t: _mean(v) for t, v in sorted(by_question_type.items())}
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
