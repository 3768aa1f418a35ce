"""Official QA metrics (VQA, GQA, NLVR2) and the answer tables' normalisation / soft scores.

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import pytest

from vlpipe.data.answers import (
    answer_label,
    build_answer_vocab,
    normalize_answer,
    restrict_label,
    soft_score,
    top_answer,
)
from vlpipe.eval import gqa_accuracy, nlvr2_metrics, vqa_accuracy
from vlpipe.eval.nlvr2 import sentence_key
from vlpipe.eval.vqa import process_prediction, process_punctuation, question_accuracy

# ------------------------------------------------------------------------------ VQA


def _gt(matching: str, k: int, other: str = "blue", n: int = 10) -> list[str]:
    return [matching] * k + [other] * (n - k)


def test_two_of_ten_annotators_give_exactly_point_six():
    # Leaving out one of the 2 matching annotators (2 subsets): 1 match -> 1/3.
    # Leaving out one of the 8 others (8 subsets): 2 matches -> 2/3.
    # (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6
    assert question_accuracy("2", _gt("2", 2, "3")) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets with 1 match (1/3), 1 subset with 0: 3/10
        (3, 0.9),  # 3 subsets with 2 matches (2/3), 7 with 3 (1): (2 + 7) / 10
        (4, 1.0),  # every subset keeps >= 3 matches
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy_by_number_of_matching_annotators(k, expected):
    assert question_accuracy("red", _gt("red", k)) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_accuracy_equals_the_soft_score_rule():
    for k in range(11):
        # ("a" would not do: the official processing drops it as an article)
        assert question_accuracy("x", _gt("x", k, "y")) == pytest.approx(soft_score(k), abs=1e-12)


def test_prediction_is_normalised_like_the_official_evaluator():
    gt = _gt("2", 2, "3")
    # "Two." -> period stripped -> lowercased -> number word to digit -> "2"
    assert question_accuracy("Two.", gt) == pytest.approx(0.6)
    assert question_accuracy("  two\n", gt) == pytest.approx(0.6)
    # articles are dropped, "!" inside a token becomes a space, then whitespace is collapsed
    assert question_accuracy("A circle", _gt("circle", 4)) == 1.0
    assert question_accuracy("yes!", _gt("yes", 4, "no")) == 1.0
    # contractions get the official (curly) apostrophe
    assert process_prediction("dont") == "don’t"
    assert process_prediction("none") == "0"


def test_punctuation_rules_of_the_official_evaluator():
    assert process_punctuation("1,000") == "1000"  # a digit,digit comma deletes punctuation
    assert process_punctuation("3.5") == "3.5"  # a period before a digit stays
    assert process_punctuation("red.") == "red"
    assert process_punctuation("black/white") == "black white"  # inside a word: a space
    assert process_punctuation("black / white") == "black  white"  # next to a space: deleted


def test_ground_truth_gets_punctuation_processing_only_when_annotators_disagree():
    # Disagreeing: "red." -> "red", so 4 annotators match.
    assert question_accuracy("red", ["red."] * 3 + ["red"] + ["blue"] * 6) == 1.0
    # The official code never maps number words in the ground truth: "two" stays "two",
    # while the prediction "two" becomes "2" and matches nothing.
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0
    # All identical: not processed at all, so "red." (with its period) never matches.
    assert question_accuracy("red", ["red."] * 10) == 0.0
    assert question_accuracy("Yes", ["yes"] * 10) == 1.0


def test_vqa_accuracy_aggregates_overall_and_per_type():
    gt = {
        1: {"answers": _gt("yes", 10, "no"), "answer_type": "yes/no", "question_type": "is there"},
        2: {"answers": _gt("2", 2, "3"), "answer_type": "number", "question_type": "how many"},
        3: {"answers": _gt("red", 1), "answer_type": "other", "question_type": "what color is the"},
    }
    preds = {1: "yes", 2: "2", 3: "red", 99: "ignored"}
    result = vqa_accuracy(preds, gt)
    assert result["overall"] == pytest.approx((1.0 + 0.6 + 0.3) / 3)
    assert result["per_answer_type"] == pytest.approx({"yes/no": 1.0, "number": 0.6, "other": 0.3})
    assert result["per_question_type"]["how many"] == pytest.approx(0.6)
    assert result["n"] == 3


def test_vqa_accuracy_refuses_missing_predictions():
    gt = {1: {"answers": _gt("yes", 10), "answer_type": "yes/no"}}
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({2: "yes"}, gt)


# ------------------------------------------------------------------- answer tables


def test_soft_score_rule():
    assert [soft_score(k) for k in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert soft_score(10) == 1.0
    with pytest.raises(ValueError):
        soft_score(-1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Two.", "2"), ("A circle", "circle"), ("an orange", "orange"), ("the  Red ", "red"),
     ("Grey", "gray"), ("zero", "0"), ("yes", "yes"), ("red.", "red")],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_label_counts_normalised_answers():
    raw = ["2", "two", "Two.", "3"] + ["4"] * 6
    assert answer_label(raw) == {"2": 0.9, "3": 0.3, "4": 1.0}
    assert top_answer({"a": 0.6, "b": 1.0, "c": 1.0}) == "b"


def test_answer_vocab_is_ordered_by_frequency_then_name():
    labels = [{"yes": 1.0}, {"no": 1.0, "yes": 0.3}, {"2": 1.0}, {"no": 0.6}, {"b": 1.0}, {"a": 1.0}]
    ans2label, label2ans = build_answer_vocab(labels)
    assert label2ans == ["no", "yes", "2", "a", "b"]
    assert ans2label == {a: i for i, a in enumerate(label2ans)}
    assert build_answer_vocab(labels, min_count=2)[1] == ["no", "yes"]
    assert restrict_label({"no": 1.0, "maybe": 0.3}, ans2label) == {"no": 1.0}


# ------------------------------------------------------------------------------ GQA


def test_gqa_accuracy_is_exact_match():
    gt = {"q1": "red", "q2": "yes", "q3": "circle", "q4": "no"}
    pred = {"q1": "red", "q2": "no", "q3": "Circle", "q4": "no", "extra": "x"}
    assert gqa_accuracy(pred, gt) == {"accuracy": 0.5, "n": 4}  # "Circle" != "circle"
    with pytest.raises(ValueError, match="no prediction"):
        gqa_accuracy({"q1": "red"}, gt)


# ---------------------------------------------------------------------------- NLVR2


def test_sentence_key_drops_the_pair_id():
    assert sentence_key("dev-850-3-1") == "dev-850-1"
    assert sentence_key("test-P-12-0-2") == "test-P-12-2"  # split names may contain "-"
    with pytest.raises(ValueError):
        sentence_key("dev-850-1")


def test_nlvr2_accuracy_and_consistency_on_a_hand_made_case():
    gt = {
        # sentence dev-0-0: 4 pairs, all predicted right
        "dev-0-0-0": True, "dev-0-1-0": False, "dev-0-2-0": True, "dev-0-3-0": False,
        # sentence dev-0-1 (same set, other sentence): one pair wrong
        "dev-0-0-1": True, "dev-0-1-1": True,
        # sentence dev-1-0: both right
        "dev-1-0-0": False, "dev-1-1-0": False,
    }
    pred = dict(gt)
    pred["dev-0-1-1"] = False
    result = nlvr2_metrics(pred, gt)
    assert result["accuracy"] == pytest.approx(7 / 8)
    assert result["consistency"] == pytest.approx(2 / 3)
    all_wrong = {k: not v for k, v in gt.items()}
    assert nlvr2_metrics(all_wrong, gt) == {"accuracy": 0.0, "consistency": 0.0}
    with pytest.raises(ValueError, match="no prediction"):
        nlvr2_metrics({}, gt)
