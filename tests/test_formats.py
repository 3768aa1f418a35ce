"""Readers/writers of the reference formats: exact keys and types, clear errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpipe.data.formats import coco_captions, gqa, karpathy, lxmert, nlvr2, refcoco, retrieval, vqa
from vlpipe.data.formats.refcoco import box_to_cxcywh
from vlpipe.errors import InputError

ANSWERS = ["red"] * 9 + ["blue"]
VQA_REC = {
    "answer_type": "other", "img_id": "img_0", "label": {"red": 1.0, "blue": 0.3}, "question_id": 7,
    "question_type": "what color is the", "sent": "What color is the circle?", "answers": ANSWERS,
}
GQA_REC = {"img_id": "img_0", "label": {"red": 1.0}, "question_id": "q7", "sent": "What color is it?"}
NLVR2_REC = {"identifier": "train-3-1-0", "img0": "a", "img1": "b", "label": 1, "sent": "Both images.", "uid": "u0"}
LXMERT_REC = {
    "img_id": "img_0",
    "sentf": {"mscoco": ["A red circle."], "vqa": ["What color?", "How many?"]},
    "labelf": {"vqa": [{"red": 1.0}, {"2": 0.9, "3": 0.3}]},
}
REF_REC = {"image": "images/img_0.png", "text": "the red circle", "ref_id": 3, "bbox": [1, 2, 10, 12]}


def _write(tmp_path: Path, data, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _without(rec: dict, key: str) -> dict:
    return {k: v for k, v in rec.items() if k != key}


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    ("write", "read", "records"),
    [
        (lambda p, r: vqa.write_vqa(p, r, labelled=True), lambda p: vqa.read_vqa(p, labelled=True), [VQA_REC]),
        (lambda p, r: gqa.write_gqa(p, r, labelled=True), lambda p: gqa.read_gqa(p, labelled=True), [GQA_REC]),
        (lambda p, r: nlvr2.write_nlvr2(p, r, True), lambda p: nlvr2.read_nlvr2(p, True), [NLVR2_REC]),
        (lxmert.write_lxmert, lxmert.read_lxmert, [LXMERT_REC]),
        (lambda p, r: refcoco.write_refcoco(p, r, True), lambda p: refcoco.read_refcoco(p, True), [REF_REC]),
        (
            lambda p, r: retrieval.write_retrieval(p, r, train=True),
            retrieval.read_retrieval,
            [{"image": "images/a.png", "caption": "A red circle.", "image_id": "a"}],
        ),
        (
            lambda p, r: retrieval.write_retrieval(p, r, train=False),
            retrieval.read_retrieval,
            [{"image": "images/a.png", "caption": ["A red circle.", "A circle."]}],
        ),
    ],
)
def test_round_trip(tmp_path, write, read, records):
    path = tmp_path / "out.json"
    write(path, records)
    assert json.loads(path.read_text(encoding="utf-8")) == records
    assert read(path) == records


def test_unlabelled_test_records(tmp_path):
    test_rec = _without(_without(VQA_REC, "label"), "answers")
    vqa.write_vqa(tmp_path / "t.json", [test_rec], labelled=False)
    assert vqa.read_vqa(tmp_path / "t.json", labelled=False) == [test_rec]
    with pytest.raises(InputError, match="missing key"):
        vqa.read_vqa(tmp_path / "t.json", labelled=True)
    with pytest.raises(InputError, match=r"unknown key\(s\) \['answers', 'label'\]"):
        vqa.read_vqa(_write(tmp_path, [VQA_REC]), labelled=False)
    with pytest.raises(InputError, match="unknown key"):
        nlvr2.read_nlvr2(_write(tmp_path, [NLVR2_REC]), labelled=False)
    with pytest.raises(InputError, match="unknown key"):
        refcoco.read_refcoco(_write(tmp_path, [REF_REC]), labelled=False)


# ------------------------------------------------------------------ bad input


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"img_id": "x", ', encoding="utf-8")
    with pytest.raises(InputError, match="broken.json: malformed JSON"):
        vqa.read_vqa(path)
    with pytest.raises(InputError, match="file not found"):
        gqa.read_gqa(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (_without(VQA_REC, "sent"), r"record 1 \(question_id=7\): missing key\(s\) \['sent'\]"),
        ({**VQA_REC, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({**VQA_REC, "question_id": "7"}, "key 'question_id': expected an integer, got str"),
        ({**VQA_REC, "question_id": True}, "key 'question_id': expected an integer, got bool"),
        ({**VQA_REC, "answer_type": "color"}, "key 'answer_type': expected one of"),
        ({**VQA_REC, "answers": ANSWERS[:9]}, "key 'answers': expected 10 items, got 9"),
        ({**VQA_REC, "label": {"red": 1.5}}, r"key 'label': entry 'red': expected a score in \[0, 1\]"),
        ({**VQA_REC, "sent": ""}, "key 'sent': expected a non-empty string"),
    ],
)
def test_vqa_record_errors_name_file_record_and_key(tmp_path, record, problem):
    other = {**VQA_REC, "question_id": 1}
    path = _write(tmp_path, [other, record], "vqa_train.json")
    with pytest.raises(InputError, match=problem) as err:
        vqa.read_vqa(path)
    assert "vqa_train.json" in str(err.value)


def test_other_record_errors(tmp_path):
    cases = [
        (gqa.read_gqa, [{**GQA_REC, "question_id": 7}], "key 'question_id': expected a string"),
        (gqa.read_gqa, [GQA_REC, GQA_REC], "duplicate question_id 'q7'"),
        (nlvr2.read_nlvr2, [{**NLVR2_REC, "label": True}], r"key 'label': expected one of \[0, 1\]"),
        (nlvr2.read_nlvr2, [{**NLVR2_REC, "identifier": "train-3-1"}], "not an NLVR2 identifier"),
        (nlvr2.read_nlvr2, [{**NLVR2_REC, "img1": "a"}], "img0 and img1 are the same image"),
        (lxmert.read_lxmert, [{**LXMERT_REC, "labelf": {"vqa": [{"red": 1.0}]}}], "has 1 labels for 2 sentences"),
        (lxmert.read_lxmert, [{**LXMERT_REC, "labelf": {"gqa": []}}], "labelf source 'gqa' has no sentences"),
        (refcoco.read_refcoco, [{**REF_REC, "bbox": [1, 2, 0, 4]}], "box width/height must be > 0"),
        (refcoco.read_refcoco, [{**REF_REC, "bbox": [1, 2, 3]}], "expected 4 items"),
        (retrieval.read_retrieval, [{"image": "a", "caption": "x"}], r"missing key\(s\) \['image_id'\]"),
        (retrieval.read_retrieval, [{"image": "a", "caption": ["x"]}, {"image": "a", "caption": ["y"]}],
         "duplicate image"),
        (vqa.read_vqa, {"not": "a list"}, "expected a JSON list of records, got dict"),
    ]
    for reader, data, problem in cases:
        with pytest.raises(InputError, match=problem):
            reader(_write(tmp_path, data))


def test_writer_refuses_bad_records_and_leaves_nothing(tmp_path):
    path = tmp_path / "vqa" / "train.json"
    with pytest.raises(InputError, match="missing key"):
        vqa.write_vqa(path, [_without(VQA_REC, "img_id")], labelled=True)
    assert not path.exists()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------ answer tables / hidden


def test_answer_table_round_trip_and_mismatch(tmp_path):
    vqa.write_answer_table(tmp_path, {"yes": 0, "no": 1}, ["yes", "no"])
    a2l, l2a = tmp_path / "trainval_ans2label.json", tmp_path / "trainval_label2ans.json"
    assert vqa.read_answer_table(a2l, l2a) == ({"yes": 0, "no": 1}, ["yes", "no"])
    a2l.write_text(json.dumps({"yes": 1, "no": 0}), encoding="utf-8")
    with pytest.raises(InputError, match="does not match"):
        vqa.read_answer_table(a2l, l2a)


def test_hidden_files(tmp_path):
    gt = {5: {"answers": ANSWERS, "answer_type": "other"}}
    vqa.write_vqa_hidden(tmp_path / "v.json", gt)
    assert json.loads((tmp_path / "v.json").read_text()) == {"5": gt[5]}
    assert vqa.read_vqa_hidden(tmp_path / "v.json") == gt
    with pytest.raises(InputError, match="expected an integer question_id"):
        vqa.read_vqa_hidden(_write(tmp_path, {"q5": gt[5]}))
    with pytest.raises(InputError, match=r"question_id 5: missing key\(s\) \['answer_type'\]"):
        vqa.read_vqa_hidden(_write(tmp_path, {"5": {"answers": ANSWERS}}))

    gqa.write_gqa_hidden(tmp_path / "g.json", {"q1": "red"})
    assert gqa.read_gqa_hidden(tmp_path / "g.json") == {"q1": "red"}
    nlvr2.write_nlvr2_hidden(tmp_path / "n.json", {"test-0-0-0": True})
    assert nlvr2.read_nlvr2_hidden(tmp_path / "n.json") == {"test-0-0-0": True}
    with pytest.raises(InputError, match="expected true/false"):
        nlvr2.read_nlvr2_hidden(_write(tmp_path, {"test-0-0-0": 1}))
    refcoco.write_refcoco_hidden(tmp_path / "r.json", {3: [1.0, 2.0, 3.0, 4.0]})
    assert refcoco.read_refcoco_hidden(tmp_path / "r.json") == {3: [1.0, 2.0, 3.0, 4.0]}


def test_box_to_cxcywh():
    assert box_to_cxcywh([10, 20, 20, 10], 100, 50) == (0.2, 0.5, 0.2, 0.2)


# ------------------------------------------------------------------ captions


def _karpathy() -> dict:
    sentence = {"raw": "A red circle.", "tokens": ["a", "red", "circle"], "imgid": 0, "sentid": 0}
    return {
        "images": [
            {"filepath": "images", "filename": "a.png", "imgid": 0, "cocoid": 11, "split": "train",
             "sentids": [0], "sentences": [sentence]},
            {"filepath": "images", "filename": "b.png", "imgid": 1, "cocoid": 12, "split": "test",
             "sentids": [], "sentences": []},
        ],
        "dataset": "coco",
    }


def test_karpathy_round_trip_and_errors(tmp_path):
    data = _karpathy()
    karpathy.write_karpathy(tmp_path / "d.json", data)
    assert karpathy.read_karpathy(tmp_path / "d.json") == data
    assert karpathy.tokenize("From left to right, a Red circle.") == ["from", "left", "to", "right", "a", "red", "circle"]
    bad = _karpathy()
    bad["images"][0]["sentids"] = [5]
    with pytest.raises(InputError, match=r"record 0 \(filename='a.png'\): sentids do not match"):
        karpathy.read_karpathy(_write(tmp_path, bad))
    bad = _karpathy()
    bad["images"][1]["split"] = "dev"
    with pytest.raises(InputError, match="key 'split': expected one of"):
        karpathy.read_karpathy(_write(tmp_path, bad))
    bad = _karpathy()
    del bad["images"][0]["sentences"][0]["tokens"]
    with pytest.raises(InputError, match=r"sentence 0: missing key\(s\) \['tokens'\]"):
        karpathy.read_karpathy(_write(tmp_path, bad))


def test_coco_caption_ground_truth(tmp_path):
    images = [{"id": 11, "file_name": "images/a.png"}]
    annotations = [{"image_id": 11, "id": 1, "caption": "A red circle."}, {"image_id": 11, "id": 2, "caption": "A circle."}]
    coco_captions.write_caption_gt(tmp_path / "c.json", images, annotations)
    gt = coco_captions.read_caption_gt(tmp_path / "c.json")
    assert set(gt) == {"images", "annotations"}
    assert coco_captions.captions_by_image(gt) == {11: ["A red circle.", "A circle."]}
    with pytest.raises(InputError, match="image_id 12 is not in images"):
        coco_captions.read_caption_gt(_write(tmp_path, {"images": images, "annotations": [
            {"image_id": 12, "id": 1, "caption": "x"}]}))
    results = [{"image_id": 11, "caption": "a red circle"}]
    assert coco_captions.read_caption_results(_write(tmp_path, results, "res.json")) == results
    with pytest.raises(InputError, match="duplicate image_id 11"):
        coco_captions.read_caption_results(_write(tmp_path, results * 2, "res.json"))
