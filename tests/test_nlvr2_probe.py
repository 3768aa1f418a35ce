"""The NLVR2 probe: parsing the world's statements back, and scoring a VQA answerer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from conftest import deep_update, tiny_overrides
from vlpipe.analysis.nlvr2_probe import (
    ParseError,
    answer_count,
    count_question,
    exists_question,
    parse_desc,
    parse_statement,
    probe,
    statement_descs,
)
from vlpipe.config import WorldParams
from vlpipe.data.language.corpus import scene_views, vocab_of
from vlpipe.data.language.nlvr2 import Clause, Connective, MoreThan, OneImage, sample_statement
from vlpipe.data.language.scene import Desc, Vocab
from vlpipe.io import read_json

VOCAB = Vocab(shapes=("circle", "square", "cross"), colors=("red", "orange"), sizes=("small", "large"))


def test_every_generated_statement_parses_back_to_itself() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        s = sample_statement(VOCAB, rng)
        parsed = parse_statement(s.sentence, VOCAB)
        # the same template, descriptions and sentence ("a" / "no" clauses carry an unused n)
        assert type(parsed) is type(s) and parsed.sentence == s.sentence
        assert statement_descs(parsed) == statement_descs(s)
        seen.add(type(s).__name__)
    assert len(seen) == 6  # every template was drawn


def test_parse_by_hand() -> None:
    assert parse_statement("The left image contains exactly two large red crosses.", VOCAB) == OneImage(
        "left", Clause("exactly", 2, Desc("large", "red", "cross"))
    )
    assert parse_statement("The right image contains more objects than the left image.", VOCAB) == MoreThan(
        "right", Desc()
    )
    assert parse_statement(
        "The left image contains an orange object or the right image contains no circles.", VOCAB
    ) == Connective(Clause("a", 1, Desc(color="orange")), Clause("no", 0, Desc(shape="circle")), "or")


@pytest.mark.parametrize(
    "sentence",
    [
        "The middle image contains a circle.",
        "The left image contains a blue circle.",  # colour not in the vocabulary
        "The left image contains a red large circle.",  # size after colour
        "The left image contains many circles.",
        "The left image contains exactly eleventy circles.",
        "The left image contains more circles than the left image.",
        "The left image contains a circle",  # no full stop
    ],
)
def test_sentences_outside_the_templates_are_refused(sentence: str) -> None:
    with pytest.raises(ParseError):
        parse_statement(sentence, VOCAB)


def test_questions_use_the_vqa_wording() -> None:
    assert exists_question(Desc(color="orange")) == "Is there an orange object?"
    assert count_question(Desc("large", None, "cross")) == "How many large crosses are there?"
    assert parse_desc("large crosses", VOCAB) == Desc("large", None, "cross")


@pytest.mark.parametrize(
    ("exists", "count", "expected"),
    [("no", "3", 0), ("yes", "0", 1), ("yes", "3", 3), ("yes", "red", 1), ("yes", "1", 1)],
)
def test_count_is_zero_unless_is_there_says_yes(exists: str, count: str, expected: int) -> None:
    assert answer_count(exists, count) == expected


@pytest.fixture(scope="module")
def world_split(tiny_world: Path) -> tuple[list, dict, Vocab]:
    params = WorldParams.model_validate(deep_update(WorldParams().model_dump(mode="json"), tiny_overrides()["world"]))
    pairs = read_json(tiny_world / "nlvr2" / "val.json")
    views = {v.img_id: v for v in scene_views(read_json(tiny_world / "scenes" / "val.json"), params)}
    return pairs, views, vocab_of(params)


def _scene_answerer(views: dict, vocab: Vocab, off_by_one_attrs: int | None = None):
    """Answers from the scene graph; counts of descriptions naming ``off_by_one_attrs``
    attributes are said one too many (existence stays right)."""

    def answer(questions: Sequence[tuple[str, str]]) -> list[str]:
        out = []
        for img, q in questions:
            if m := re.fullmatch(r"Is there an? (.+)\?", q):
                out.append("yes" if (views[img].count(parse_desc(m.group(1), vocab)) or 0) > 0 else "no")
            else:
                desc = parse_desc(re.fullmatch(r"How many (.+) are there\?", q).group(1), vocab)
                n = views[img].count(desc) or 0
                out.append(str(n + 1 if len(desc.attrs) == off_by_one_attrs else n))
        return out

    return answer


def test_scene_graph_answers_decide_every_pair(world_split) -> None:
    pairs, views, vocab = world_split
    result = probe(pairs, views, vocab, _scene_answerer(views, vocab))
    assert result["n_pairs"] == len(pairs) > 0
    assert result["decomposed_accuracy"] == 1.0
    assert set(result["decomposed_by_template"].values()) == {1.0}
    assert result["perception"]["exists"] == result["perception"]["count"] == 1.0


def test_wrong_counts_show_in_perception_by_attribute_count(world_split) -> None:
    pairs, views, vocab = world_split
    asked: list[tuple[str, str]] = []
    inner = _scene_answerer(views, vocab, off_by_one_attrs=1)

    def answer(questions: Sequence[tuple[str, str]]) -> list[str]:
        asked.extend(questions)
        return inner(questions)

    result = probe(pairs, views, vocab, answer)
    perception = result["perception"]
    assert perception["exists"] == 1.0
    assert perception.get("count_0_attrs", 1.0) == 1.0 and perception.get("count_2_attrs", 1.0) == 1.0
    # A one-attribute count is right only where the object is absent ("Is there" says no).
    one_attr = [views[img].count(d) for img, q in asked if q.startswith("How many")
                if len((d := parse_desc(q[9:-11], vocab)).attrs) == 1 and views[img].count(d) is not None]  # fmt: skip
    absent = sum(n == 0 for n in one_attr) / len(one_attr)
    assert 0 < absent < 1 and perception["count_1_attrs"] == pytest.approx(absent, abs=1e-6)
    assert result["decomposed_accuracy"] < 1.0  # some statement turns on a one-attribute count


def test_answerer_that_drops_answers_is_an_error(world_split) -> None:
    pairs, views, vocab = world_split
    with pytest.raises(ValueError, match="answers to"):
        probe(pairs, views, vocab, lambda qs: ["yes"] * (len(qs) - 1))
