"""Write every text file of ``data/world`` (docs/layout.md) and return its statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpipe.config import WorldParams
from vlpipe.data.formats import coco_captions, gqa, karpathy, lxmert, nlvr2, refcoco, retrieval, vqa
from vlpipe.data.language import records
from vlpipe.data.language.corpus import SPLITS, SplitText, generate_corpus
from vlpipe.data.language.metrics import entropy_bits, gqa_blind_accuracy, qa_stats, vqa_blind_accuracy
from vlpipe.data.world import image_int_id

PUBLIC_SPLITS: tuple[str, ...] = ("train", "val")  # splits whose answers are published


def _write_vqa(corpus: Mapping[str, SplitText], out: Path) -> int:
    """vqa/{train,val,test}.json, the answer table and hidden/vqa_test.json; returns #answers."""
    for split in SPLITS:
        labelled = split in PUBLIC_SPLITS
        vqa.write_vqa(out / f"vqa/{split}.json", [records.vqa_record(q, labelled) for q in corpus[split].vqa], labelled)
    labels = [q.label for s in PUBLIC_SPLITS for q in corpus[s].vqa]
    ans2label, label2ans = records.answer_table(labels)
    vqa.write_answer_table(out / "vqa", ans2label, label2ans)
    vqa.write_vqa_hidden(out / "hidden/vqa_test.json", records.vqa_hidden(corpus["test"].vqa))
    return len(label2ans)


def _write_gqa(corpus: Mapping[str, SplitText], out: Path) -> int:
    """gqa/{train,val,test}.json, the answer table and hidden/gqa_test.json; returns #answers."""
    for split in SPLITS:
        labelled = split in PUBLIC_SPLITS
        gqa.write_gqa(out / f"gqa/{split}.json", [records.gqa_record(q, labelled) for q in corpus[split].gqa], labelled)
    labels = [records.gqa_label(q) for s in PUBLIC_SPLITS for q in corpus[s].gqa]
    ans2label, label2ans = records.answer_table(labels)
    vqa.write_answer_table(out / "gqa", ans2label, label2ans)
    gqa.write_gqa_hidden(out / "hidden/gqa_test.json", {str(q.question_id): q.question.answer for q in corpus["test"].gqa})
    return len(label2ans)


def _write_nlvr2(corpus: Mapping[str, SplitText], out: Path) -> None:
    for split in SPLITS:
        labelled = split in PUBLIC_SPLITS
        nlvr2.write_nlvr2(out / f"nlvr2/{split}.json", records.nlvr2_records(split, corpus[split], labelled), labelled)
    nlvr2.write_nlvr2_hidden(out / "hidden/nlvr2_test.json", records.nlvr2_hidden("test", corpus["test"]))


def _write_captions(corpus: Mapping[str, SplitText], out: Path) -> None:
    """Karpathy dataset, retrieval files, hidden COCO caption ground truth of test."""
    karpathy.write_karpathy(out / "karpathy/dataset_coco.json", records.karpathy_dataset(corpus, image_int_id))
    for split in SPLITS:
        train = split == "train"
        retrieval.write_retrieval(out / f"retrieval/{split}.json", records.retrieval_records(corpus[split], train), train)
    images, annotations = records.caption_ground_truth(corpus["test"], image_int_id)
    coco_captions.write_caption_gt(out / "hidden/captions_test.json", images, annotations)


def _write_refcoco(corpus: Mapping[str, SplitText], out: Path) -> dict[str, int]:
    """refcoco/{train,val,testA,testB}.json (+ hidden boxes); testA attribute, testB relational."""
    counts, first_id = {}, 0
    for split in PUBLIC_SPLITS:
        recs = records.refcoco_records(corpus[split], first_id, None, labelled=True)
        refcoco.write_refcoco(out / f"refcoco/{split}.json", recs, labelled=True)
        counts[split], first_id = len(recs), first_id + records.count_refs(corpus[split])
    for name, kind in (("testA", "attribute"), ("testB", "relational")):
        recs = records.refcoco_records(corpus["test"], first_id, [kind], labelled=False)
        refcoco.write_refcoco(out / f"refcoco/{name}.json", recs, labelled=False)
        boxes = records.refcoco_boxes(corpus["test"], first_id, [kind])
        refcoco.write_refcoco_hidden(out / f"hidden/refcoco_{name}.json", boxes)
        counts[name] = len(recs)
    return counts


def _nlvr2_stats(corpus: Mapping[str, SplitText]) -> dict[str, Any]:
    labels = {s: [p.label for _, pairs in corpus[s].nlvr2 for p in pairs] for s in SPLITS}
    return {
        "sentences": {s: len(corpus[s].nlvr2) for s in SPLITS},
        "pairs": {s: len(v) for s, v in labels.items()},
        "true_fraction": {s: (sum(v) / len(v) if v else 0.0) for s, v in labels.items()},
        "label_entropy_bits": entropy_bits(str(b) for b in labels["train"]),
    }


def _caption_stats(corpus: Mapping[str, SplitText]) -> dict[str, Any]:
    words = {w for s in SPLITS for caps in corpus[s].captions.values() for c in caps for w in karpathy.tokenize(c)}
    return {
        "captions": {s: sum(len(c) for c in corpus[s].captions.values()) for s in SPLITS},
        "vocabulary": len(words),
    }


def write_text_data(scenes: Mapping[str, Sequence[Mapping]], params: WorldParams, out_dir: Path) -> dict[str, Any]:
    """Write all text files of ``data/world`` under ``out_dir``; return the text metrics.

    ``scenes``: scene graphs keyed ``train``/``val``/``test`` (docs/layout.md schema, image
    order). Everything is generated in memory first, so a generation error writes nothing;
    each file is written atomically (call this inside the stage's ``atomic_dir``).
    Returns ``{"vqa", "gqa", "nlvr2", "captions", "refcoco"}`` statistics, among them the
    val accuracy of the question-only baselines (``vqa.blind_val_accuracy`` < 0.5).
    """
    out = Path(out_dir)
    corpus = generate_corpus(scenes, params)
    for split in PUBLIC_SPLITS:
        lxmert.write_lxmert(out / f"lxmert/{split}.json", records.lxmert_records(corpus[split]))
    n_vqa_answers = _write_vqa(corpus, out)
    n_gqa_answers = _write_gqa(corpus, out)
    _write_nlvr2(corpus, out)
    _write_captions(corpus, out)
    ref_counts = _write_refcoco(corpus, out)

    vqa_blind = vqa_blind_accuracy(corpus["train"].vqa, corpus["val"].vqa)
    return {
        "vqa": {
            **qa_stats({s: corpus[s].vqa for s in SPLITS}, "question_type"),
            "answers": n_vqa_answers,
            "blind_val_accuracy": vqa_blind["overall"],
            "blind_val_accuracy_by_type": vqa_blind["per_question_type"],
        },
        "gqa": {
            **qa_stats({s: corpus[s].gqa for s in SPLITS}, "family"),
            "answers": n_gqa_answers,
            "blind_val_accuracy": gqa_blind_accuracy(corpus["train"].gqa, corpus["val"].gqa),
        },
        "nlvr2": _nlvr2_stats(corpus),
        "captions": _caption_stats(corpus),
        "refcoco": {"expressions": ref_counts},
    }
