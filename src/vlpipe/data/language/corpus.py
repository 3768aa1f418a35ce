"""All the text of the world, generated in memory from the scene graphs of every split.

Randomness: every (task, split) has its own generator derived from the world's master seed
by ``np.random.SeedSequence(seed, spawn_key=(TEXT_STREAM, task, split))``. The renderer's
spawn keys start with the split index (0..2), ours with ``TEXT_STREAM``, so the two never
share a stream; and changing, say, the NLVR2 settings leaves the VQA questions unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vlpipe.config import WorldParams
from vlpipe.data.answers import answer_label
from vlpipe.data.language.balance import AnswerBalancer, Question
from vlpipe.data.language.captions import image_captions
from vlpipe.data.language.gqa import gqa_candidates
from vlpipe.data.language.nlvr2 import Example, Statement, generate_nlvr2
from vlpipe.data.language.refs import Ref, image_refs
from vlpipe.data.language.scene import SceneView, Vocab
from vlpipe.data.language.vqa import TYPE_WEIGHTS, Annotators, vqa_candidates

SPLITS: tuple[str, ...] = ("train", "val", "test")
TEXT_STREAM = 0x7E47
_TASKS: tuple[str, ...] = ("vqa", "gqa", "nlvr2", "captions", "refs")


def text_rng(seed: int, task: str, split: str) -> np.random.Generator:
    """The generator of one (task, split) text stream."""
    seq = np.random.SeedSequence(seed, spawn_key=(TEXT_STREAM, _TASKS.index(task), SPLITS.index(split)))
    return np.random.default_rng(seq)


@dataclass(frozen=True)
class QA:
    """A question asked about one image; ``answers`` are the raw annotator strings (VQA only)."""

    img_id: str
    question_id: int | str
    question: Question
    answers: tuple[str, ...] = ()
    label: Mapping[str, float] = field(default_factory=dict)  # VQA soft label of the answers


@dataclass(frozen=True)
class Pair:
    """One labelled image pair of an NLVR2 sentence."""

    sentence_index: int
    pair_index: int
    img0: str
    img1: str
    label: bool


@dataclass
class SplitText:
    """Everything generated for one split."""

    img_ids: list[str]
    vqa: list[QA] = field(default_factory=list)
    gqa: list[QA] = field(default_factory=list)
    nlvr2: list[tuple[str, list[Pair]]] = field(default_factory=list)  # (sentence, pairs)
    captions: dict[str, list[str]] = field(default_factory=dict)  # img_id -> captions
    refs: dict[str, list[Ref]] = field(default_factory=dict)  # img_id -> expressions


def vocab_of(params: WorldParams) -> Vocab:
    s = params.scene
    return Vocab(shapes=tuple(s.shapes), colors=tuple(s.colors), sizes=tuple(s.sizes))


def scene_views(scenes: Sequence[Mapping], params: WorldParams) -> list[SceneView]:
    return [SceneView(s, params.scene.max_occlusion, params.text.relation_margin) for s in scenes]


def _vqa(views: Sequence[SceneView], vocab: Vocab, params: WorldParams, split: str, first_id: int) -> list[QA]:
    rng, balancer = text_rng(params.seed, "vqa", split), AnswerBalancer(TYPE_WEIGHTS)
    annotators = Annotators(vocab, params.text, rng)
    out: list[QA] = []
    for view in views:
        for q in balancer.pick(vqa_candidates(view, vocab, rng), params.text.questions_per_image, rng):
            answers = annotators.answer(q.answer, q.kind)
            out.append(QA(view.img_id, first_id + len(out), q, tuple(answers), answer_label(answers)))
    return out


def _gqa(views: Sequence[SceneView], params: WorldParams, split: str) -> list[QA]:
    rng, balancer = text_rng(params.seed, "gqa", split), AnswerBalancer()
    out: list[QA] = []
    for view in views:
        picked = balancer.pick(gqa_candidates(view, rng), params.text.gqa_per_image, rng)
        out.extend(QA(view.img_id, f"{view.img_id}_{k}", q) for k, q in enumerate(picked))
    return out


def _nlvr2(views: Sequence[SceneView], vocab: Vocab, params: WorldParams, split: str) -> list[tuple[str, list[Pair]]]:
    rng = text_rng(params.seed, "nlvr2", split)
    n = params.text.nlvr2_sentences.get(split, 0)
    generated: list[tuple[Statement, list[Example]]] = generate_nlvr2(
        views, vocab, n, params.text.nlvr2_pairs_per_sentence, rng
    )
    return [
        (st.sentence, [Pair(s, p, views[e.left].img_id, views[e.right].img_id, e.label) for p, e in enumerate(ex)])
        for s, (st, ex) in enumerate(generated)
    ]


def generate_corpus(scenes: Mapping[str, Sequence[Mapping]], params: WorldParams) -> dict[str, SplitText]:
    """Generate the text of every split (``scenes`` keyed train/val/test, in image order)."""
    missing = [s for s in SPLITS if s not in scenes]
    if missing:
        raise ValueError(f"scenes lack split(s) {missing}; expected {list(SPLITS)}")
    vocab = vocab_of(params)
    out: dict[str, SplitText] = {}
    next_qid = 0  # VQA question ids are unique over all splits
    for split in SPLITS:
        views = scene_views(scenes[split], params)
        text = SplitText([v.img_id for v in views])
        text.vqa = _vqa(views, vocab, params, split, next_qid)
        next_qid += len(text.vqa)
        text.gqa = _gqa(views, params, split)
        text.nlvr2 = _nlvr2(views, vocab, params, split)
        cap_rng, ref_rng = text_rng(params.seed, "captions", split), text_rng(params.seed, "refs", split)
        text.captions = {v.img_id: image_captions(v, params.text.captions_per_image, cap_rng) for v in views}
        text.refs = {v.img_id: image_refs(v, params.text.refs_per_image, ref_rng) for v in views}
        out[split] = text
    return out
