"""The generated corpus as records of the reference formats (formats.md §2, §4, §5).

Pure functions from :class:`~.corpus.SplitText` to plain JSON-able records; writing (and
schema checking) is done by :mod:`vlpipe.data.formats`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vlpipe.data.answers import build_answer_vocab
from vlpipe.data.formats.karpathy import tokenize
from vlpipe.data.language.corpus import QA, SPLITS, SplitText


def image_path(img_id: str) -> str:
    """Image path relative to data/world, as the retrieval / grounding files give it."""
    return f"images/{img_id}.png"


# ---------------------------------------------------------------------------- VQA / GQA


def vqa_record(qa: QA, labelled: bool) -> dict[str, Any]:
    q = qa.question
    rec: dict[str, Any] = {
        "answer_type": q.answer_type,
        "img_id": qa.img_id,
        "question_id": qa.question_id,
        "question_type": q.question_type,
        "sent": q.text,
    }
    if labelled:
        rec["label"] = dict(qa.label)
        rec["answers"] = list(qa.answers)
    return rec


def vqa_hidden(qas: Sequence[QA]) -> dict[int, dict[str, Any]]:
    """Ground truth of the official VQA accuracy: raw answers and answer type per question."""
    return {int(qa.question_id): {"answers": list(qa.answers), "answer_type": qa.question.answer_type} for qa in qas}


def gqa_label(qa: QA) -> dict[str, float]:
    return {qa.question.answer: 1.0}


def gqa_record(qa: QA, labelled: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"img_id": qa.img_id, "question_id": str(qa.question_id), "sent": qa.question.text}
    if labelled:
        rec["label"] = gqa_label(qa)
    return rec


def answer_table(labels: Sequence[Mapping[str, float]]) -> tuple[dict[str, int], list[str]]:
    """Answer table of the train + val labels (every answer that occurs)."""
    return build_answer_vocab(labels, min_count=1)


# ------------------------------------------------------------------------------ LXMERT


def lxmert_records(text: SplitText) -> list[dict[str, Any]]:
    """One pre-training record per image: captions (``mscoco``), VQA and GQA questions."""
    by_image: dict[str, dict[str, list]] = {i: {"vqa": [], "gqa": [], "vqa_l": [], "gqa_l": []} for i in text.img_ids}
    for qa in text.vqa:
        by_image[qa.img_id]["vqa"].append(qa.question.text)
        by_image[qa.img_id]["vqa_l"].append(dict(qa.label))
    for qa in text.gqa:
        by_image[qa.img_id]["gqa"].append(qa.question.text)
        by_image[qa.img_id]["gqa_l"].append(gqa_label(qa))
    out = []
    for img_id in text.img_ids:
        q = by_image[img_id]
        sentf: dict[str, list[str]] = {"mscoco": list(text.captions[img_id])}
        labelf: dict[str, list[dict[str, float]]] = {}
        for source in ("vqa", "gqa"):
            if q[source]:
                sentf[source], labelf[source] = q[source], q[f"{source}_l"]
        out.append({"img_id": img_id, "sentf": sentf, "labelf": labelf})
    return out


# ------------------------------------------------------------------------------- NLVR2


def nlvr2_records(split: str, text: SplitText, labelled: bool) -> list[dict[str, Any]]:
    """Identifier ``split-setid-pairid-sentid``: one set per sentence (sentid 0), one pairid per pair."""
    out = []
    for sentence, pairs in text.nlvr2:
        for p in pairs:
            rec: dict[str, Any] = {
                "identifier": nlvr2_identifier(split, p.sentence_index, p.pair_index),
                "img0": p.img0,
                "img1": p.img1,
                "sent": sentence,
                "uid": f"nlvr2_{split}_{len(out)}",
            }
            if labelled:
                rec["label"] = int(p.label)
            out.append(rec)
    return out


def nlvr2_identifier(split: str, sentence_index: int, pair_index: int) -> str:
    return f"{split}-{sentence_index}-{pair_index}-0"


def nlvr2_hidden(split: str, text: SplitText) -> dict[str, bool]:
    return {nlvr2_identifier(split, p.sentence_index, p.pair_index): p.label for _, pairs in text.nlvr2 for p in pairs}


# ---------------------------------------------------------------------------- captions


def karpathy_dataset(corpus: Mapping[str, SplitText], coco_id: Callable[[str], int]) -> dict[str, Any]:
    """``dataset_coco.json``: every image of every split; test images without sentences."""
    images, next_sentid = [], 0
    for split in SPLITS:
        for img_id in corpus[split].img_ids:
            imgid = len(images)
            captions = corpus[split].captions[img_id] if split != "test" else []
            sentences = [
                {"raw": c, "tokens": tokenize(c), "imgid": imgid, "sentid": next_sentid + k} for k, c in enumerate(captions)
            ]
            next_sentid += len(sentences)
            images.append({
                "filepath": "images",
                "filename": f"{img_id}.png",
                "imgid": imgid,
                "cocoid": coco_id(img_id),
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            })
    return {"images": images, "dataset": "coco"}


def caption_ground_truth(text: SplitText, coco_id: Callable[[str], int]) -> tuple[list[dict], list[dict]]:
    """COCO caption ground truth (images, annotations) of one split, with integer image ids."""
    images = [{"id": coco_id(i), "file_name": image_path(i)} for i in text.img_ids]
    pairs = [(i, c) for i in text.img_ids for c in text.captions[i]]
    annotations = [{"image_id": coco_id(i), "id": k + 1, "caption": c} for k, (i, c) in enumerate(pairs)]
    return images, annotations


def retrieval_records(text: SplitText, train: bool) -> list[dict[str, Any]]:
    """X-VLM retrieval: one record per caption (train) or per image with all its captions."""
    if train:
        return [
            {"image": image_path(i), "caption": c, "image_id": i} for i in text.img_ids for c in text.captions[i]
        ]
    return [{"image": image_path(i), "caption": list(text.captions[i])} for i in text.img_ids]


# ------------------------------------------------------------------------------ refcoco


def refcoco_records(text: SplitText, first_ref_id: int, kinds: Sequence[str] | None, labelled: bool) -> list[dict]:
    """Referring expressions of one split (only those of ``kinds`` if given); ref ids from ``first_ref_id``.

    ``first_ref_id`` numbers *all* expressions of the split in image order, so testA and testB
    taken from the same split never share an id.
    """
    out, ref_id = [], first_ref_id
    for img_id in text.img_ids:
        for ref in text.refs[img_id]:
            if kinds is None or ref.kind in kinds:
                rec: dict[str, Any] = {"image": image_path(img_id), "text": ref.text, "ref_id": ref_id}
                if labelled:
                    rec["bbox"] = ref.target.bbox
                out.append(rec)
            ref_id += 1
    return out


def refcoco_boxes(text: SplitText, first_ref_id: int, kinds: Sequence[str]) -> dict[int, list[float]]:
    """Hidden boxes ``{ref_id: [x, y, w, h]}`` matching :func:`refcoco_records`."""
    boxes, ref_id = {}, first_ref_id
    for img_id in text.img_ids:
        for ref in text.refs[img_id]:
            if ref.kind in kinds:
                boxes[ref_id] = ref.target.bbox
            ref_id += 1
    return boxes


def count_refs(text: SplitText) -> int:
    return sum(len(r) for r in text.refs.values())
