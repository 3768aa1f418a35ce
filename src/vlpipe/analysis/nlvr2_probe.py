"""NLVR2 through a VQA model's eyes: how much of NLVR2 its per-image answers decide.

An NLVR2 statement of the world (:mod:`vlpipe.data.language.nlvr2`) is a logical form over
per-image facts: whether an image contains a description (``a red star``, ``no circles``) and
how many objects match it (``exactly two``, ``more ... than``, ``the same number of``). This
probe asks a VQA model those facts image by image in the VQA questions' own wording ("Is there
a red star?", "How many red stars are there?"), and evaluates each statement's logical form
over its answers instead of over the scene graph, with the generator's own ``truth``.

Two numbers come out:

- *perception*: how often the answers are right against the scene graph (existence and exact
  count), by the number of attributes the description names;
- *decomposed NLVR2 accuracy*: the accuracy of an NLVR2 model that parsed every sentence
  perfectly and combined the VQA model's answers perfectly. It says what the VQA model's
  perception allows; an NLVR2 model fine-tuned from it that scores well below it loses
  in the transfer, one that cannot beat it needs better perception.

Existence is read from "Is there ...?" and a count from "How many ... are there?" only when the
answer to the first is yes: the world's count questions about two-attribute descriptions are
only asked of descriptions present in the image (:func:`vlpipe.data.language.vqa._count_descs`),
so a VQA model has never learnt to answer 0 to them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlpipe.data.answers import NUMBER_WORDS
from vlpipe.data.examples import Example
from vlpipe.data.language.nlvr2 import (
    Both,
    Clause,
    Connective,
    ExactlyOne,
    MoreThan,
    OneImage,
    SameNumber,
    Statement,
)
from vlpipe.data.language.scene import Desc, SceneView, Vocab, capitalize, plural
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

# (img_id, question) pairs -> the VQA model's answer strings, in order
Answerer = Callable[[Sequence[tuple[str, str]]], Sequence[str]]

_QUANTIFIED = re.compile(r"(a|an|no|exactly \w+|at least \w+) (.+)")


class ParseError(ValueError):
    """A sentence that is not one of the world's NLVR2 templates."""


def parse_desc(words: str, vocab: Vocab) -> Desc:
    """``large red circles`` / ``orange object`` / ``objects`` -> :class:`Desc` (inverse of
    ``Desc.words``, singular or plural)."""
    *attrs, noun = words.split()
    shapes = {s: s for s in vocab.shapes} | {plural(s): s for s in vocab.shapes}
    if noun in ("object", "objects"):
        shape = None
    elif noun in shapes:
        shape = shapes[noun]
    else:
        raise ParseError(f"no shape or 'object' in {words!r}")
    size = color = None
    for word in attrs:
        if word in vocab.sizes and size is None and color is None:
            size = word
        elif word in vocab.colors and color is None:
            color = word
        else:
            raise ParseError(f"unexpected word {word!r} in {words!r}")
    return Desc(size=size, color=color, shape=shape)


def parse_clause(text: str, vocab: Vocab) -> Clause:
    """``at least two red stars`` -> :class:`Clause` (inverse of ``Clause.text``)."""
    m = _QUANTIFIED.fullmatch(text)
    if m is None:
        raise ParseError(f"no quantifier in {text!r}")
    quantifier, desc = m.group(1), parse_desc(m.group(2), vocab)
    if quantifier in ("a", "an"):
        return Clause("a", 1, desc)
    if quantifier == "no":
        return Clause("no", 0, desc)
    *q, number = quantifier.split()
    if number not in NUMBER_WORDS:
        raise ParseError(f"not a number word: {number!r} in {text!r}")
    return Clause(" ".join(q), NUMBER_WORDS.index(number), desc)


def parse_statement(sentence: str, vocab: Vocab) -> Statement:
    """A world NLVR2 sentence -> its :class:`Statement`; ``parse(s).sentence == s``."""
    text = sentence.strip()
    if not text.endswith("."):
        raise ParseError(f"not a sentence: {sentence!r}")
    text = text[:-1]
    text = text[:1].lower() + text[1:]
    for connective in ("and", "or"):
        m = re.fullmatch(rf"the left image contains (.+) {connective} the right image contains (.+)", text)
        if m:
            return Connective(parse_clause(m.group(1), vocab), parse_clause(m.group(2), vocab), connective)
    if m := re.fullmatch(r"the (left|right) image contains more (.+) than the (left|right) image", text):
        if m.group(1) == m.group(3):
            raise ParseError(f"compares an image with itself: {sentence!r}")
        return MoreThan(m.group(1), parse_desc(m.group(2), vocab))
    if m := re.fullmatch(r"both images contain the same number of (.+)", text):
        return SameNumber(parse_desc(m.group(1), vocab))
    if m := re.fullmatch(r"the (left|right) image contains (.+)", text):
        return OneImage(m.group(1), parse_clause(m.group(2), vocab))
    if m := re.fullmatch(r"both images contain (.+)", text):
        return Both(parse_clause(m.group(1), vocab))
    if m := re.fullmatch(r"exactly one image contains (.+)", text):
        return ExactlyOne(parse_clause(m.group(1), vocab))
    raise ParseError(f"not an NLVR2 template of the world: {sentence!r}")


def statement_descs(statement: Statement) -> list[Desc]:
    """The descriptions whose per-image facts decide ``statement``."""
    if isinstance(statement, Connective):
        return [statement.left_clause.desc, statement.right_clause.desc]
    if isinstance(statement, (MoreThan, SameNumber)):
        return [statement.desc]
    return [statement.clause.desc]  # type: ignore[attr-defined]


def exists_question(desc: Desc) -> str:
    """The VQA "is there" question about ``desc``: ``Is there a large red star?``."""
    return f"Is there {desc.with_article()}?"


def count_question(desc: Desc) -> str:
    """The VQA "how many" question about ``desc``: ``How many red stars are there?``."""
    return capitalize(f"how many {desc.words(True)} are there?")


def answer_count(exists: str, count: str) -> int:
    """One image's count of a description from the two answers: 0 unless "Is there" says yes,
    else the "How many" answer (at least 1; a non-number answer counts 1)."""
    if exists != "yes":
        return 0
    return max(1, int(count)) if count.isdigit() else 1


@dataclass
class AnswerView:
    """A :class:`SceneView` stand-in (``count`` only) whose counts are a model's answers."""

    img_id: str
    counts: Mapping[Desc, int]

    def count(self, desc: Desc) -> int:
        return self.counts[desc]


def probe(
    pairs: Sequence[Mapping[str, Any]],
    scenes: Mapping[str, SceneView],
    vocab: Vocab,
    answer: Answerer,
) -> dict[str, Any]:
    """Perception and decomposed NLVR2 accuracy of ``answer`` on the NLVR2 ``pairs`` (the
    world's NLVR2 json entries: ``sent``, ``img0``, ``img1``, ``label``)."""
    statements = [parse_statement(p["sent"], vocab) for p in pairs]
    asked = sorted({(img, d) for p, s in zip(pairs, statements, strict=True)
                    for img in (p["img0"], p["img1"]) for d in statement_descs(s)},
                   key=lambda x: (x[0], count_question(x[1])))  # fmt: skip
    questions = [(img, q(d)) for img, d in asked for q in (exists_question, count_question)]
    answers = list(answer(questions))
    if len(answers) != len(questions):
        raise ValueError(f"answerer gave {len(answers)} answers to {len(questions)} questions")
    counts: dict[str, dict[Desc, int]] = defaultdict(dict)
    for i, (img, desc) in enumerate(asked):
        counts[img][desc] = answer_count(answers[2 * i], answers[2 * i + 1])

    perception: dict[str, list[bool]] = defaultdict(list)
    for img, desc in asked:
        truth = scenes[img].count(desc)
        if truth is None:  # an object too hidden to count: no ground truth
            continue
        said = counts[img][desc]
        n_attrs = len(desc.attrs)
        perception["exists"].append((said > 0) == (truth > 0))
        perception["count"].append(said == truth)
        perception[f"exists_{n_attrs}_attrs"].append((said > 0) == (truth > 0))
        perception[f"count_{n_attrs}_attrs"].append(said == truth)

    correct: dict[str, list[bool]] = defaultdict(list)
    for p, s in zip(pairs, statements, strict=True):
        said = s.truth(AnswerView(p["img0"], counts[p["img0"]]), AnswerView(p["img1"], counts[p["img1"]]))  # type: ignore[arg-type]
        ok = bool(said) == bool(p["label"])
        correct["all"].append(ok)
        correct[template_name(s)].append(ok)
    return {
        "n_pairs": len(pairs),
        "n_questions": len(questions),
        "decomposed_accuracy": _mean(correct.pop("all")),
        "decomposed_by_template": {k: _mean(v) for k, v in sorted(correct.items())},
        "perception": {k: _mean(v) for k, v in sorted(perception.items())},
    }


def template_name(statement: Statement) -> str:
    """``one_image``, ``both``, ``exactly_one``, ``and``, ``or``, ``more_than``, ``same_number``."""
    if isinstance(statement, Connective):
        return statement.connective
    return {OneImage: "one_image", Both: "both", ExactlyOne: "exactly_one", MoreThan: "more_than",
            SameNumber: "same_number"}[type(statement)]  # fmt: skip


def _mean(values: Iterable[bool]) -> float:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else float("nan")


# ------------------------------------------------------------- running a model

WORLD = "data/world"
TOKENIZER = "data/tokenizer"


def vqa_answerer(model_dir: Path, root: Path, batch_size: int = 256) -> Any:
    """``answer([(img_id, question), ...]) -> [answer, ...]`` with the fine-tuned VQA model in
    ``model_dir`` (its ``task.json`` names the model family and must name the VQA task)."""
    from vlpipe.data.tokenizer import load_tokenizer
    from vlpipe.tasks import TASKS
    from vlpipe.tasks.base import make_collate, predict_all

    info = read_json(model_dir / "task.json")
    if info.get("task") != "vqa":
        raise InputError(model_dir / "task.json", f"not a VQA model: task {info.get('task')!r}")
    task = TASKS["vqa"](root / WORLD)
    tok = load_tokenizer(root / TOKENIZER)
    family = info.get("model")
    if family in ("lxmert", "xlxmert"):
        from vlpipe.stages import lxmert

        model = lxmert.load_task_model(model_dir, task)
        visual = lxmert.visual_inputs(family, model.encoder.config, root)
        collate = make_collate(task, tok, visual, int(model.encoder.max_text_length), with_targets=False)
    elif family == "xvlm":
        from vlpipe.stages import xvlm

        model = xvlm.load_task_model(model_dir, task)
        visual = xvlm.PixelInputs(root / WORLD, model.encoder.vision.image_size)
        collate = xvlm.make_pixel_collate(task, tok, visual, model.encoder.max_text_length, with_targets=False)
    else:
        raise InputError(model_dir / "task.json", f"probe-nlvr2 reads LXMERT, X-LXMERT or X-VLM models, not {family!r}")

    def answer(questions: Sequence[tuple[str, str]]) -> list[str]:
        examples = [Example(key=i, img_ids=(img,), sent=q) for i, (img, q) in enumerate(questions)]
        with torch.no_grad():
            preds = predict_all(model, task, examples, collate, batch_size)
        return [str(preds[i]) for i in range(len(questions))]

    return answer


def run_probe_nlvr2(model_dir: Path, split: str, out: Path | None, params_path: Path, root: Path) -> dict[str, Any]:
    """Probe ``model_dir`` on the world's NLVR2 ``split``; write ``out`` (JSON) when given."""
    from vlpipe.config import load_section
    from vlpipe.data.language.corpus import scene_views, vocab_of

    world = load_section("world", params_path)
    pairs_path = root / WORLD / "nlvr2" / f"{split}.json"
    pairs = read_json(pairs_path)
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and "label" in p for p in pairs):
        raise InputError(pairs_path, "expected a list of labelled NLVR2 pairs (test labels are hidden: probe train or val)")
    scenes_path = root / WORLD / "scenes" / f"{split}.json"
    if not scenes_path.exists():
        raise InputError(scenes_path, "file not found (the probe scores perception against the scene graphs)")
    views = {v.img_id: v for v in scene_views(read_json(scenes_path), world)}
    result = probe(pairs, views, vocab_of(world), vqa_answerer(model_dir, root))
    result = {"model": str(model_dir), "split": split, **result}
    if out is not None:
        write_json(out, result)  # atomic
    return result

