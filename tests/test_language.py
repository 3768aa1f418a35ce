"""The world's language: every text file of data/world, checked against the scenes.

Scenes are random dicts built here (not by the renderer). Questions, statements and
referring expressions are checked by *independent* checkers: they parse the text with
regular expressions and evaluate it on the scene graphs with their own geometry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlpipe.config import WorldParams
from vlpipe.data.answers import normalize_answer
from vlpipe.data.language import write_text_data
from vlpipe.data.language.corpus import generate_corpus
from vlpipe.data.language.scene import Desc, SceneView, article, plural
from vlpipe.data.language.vqa import answer_variants
from vlpipe.eval.vqa import vqa_accuracy

SPLITS = ("train", "val", "test")
SIZE = 64
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "gray"]
SIZES = ["small", "large"]
RELATIONS = ("left of", "right of", "above", "below", "with the same color as", "with the same shape as")
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]


# ----------------------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator, split: str, index: int) -> dict:
    """A scene dict of the docs/layout.md schema; attributes drawn from small pools so that
    look-alikes and repeated colours/shapes are common; 5% of objects are mostly hidden."""
    n = int(rng.integers(2, 7))
    shapes = rng.choice(SHAPES, size=3, replace=False)
    colors = rng.choice(COLORS, size=3, replace=False)
    objects = []
    for i in range(n):
        side = int(rng.integers(8, 22))
        x, y = (int(v) for v in rng.integers(0, SIZE - side, size=2))
        objects.append({
            "id": i, "shape": str(rng.choice(shapes)), "color": str(rng.choice(colors)),
            "size": "small" if side < 15 else "large", "texture": "plain", "bbox": [x, y, side, side],
            "visible": 0.3 if rng.random() < 0.05 else round(float(rng.uniform(0.7, 1.0)), 4),
        })
    img_id = f"world_{split}_{index:06d}"
    return {"img_id": img_id, "split": split, "width": SIZE, "height": SIZE, "objects": objects}


def random_scenes(counts: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    return {s: [random_scene(rng, s, i) for i in range(counts[s])] for s in SPLITS}


def make_params(**text) -> WorldParams:
    return WorldParams.model_validate({
        "seed": 3,
        "scene": {"shapes": SHAPES, "colors": COLORS, "sizes": SIZES},
        "text": {"nlvr2_sentences": {"train": 40, "val": 20, "test": 20}, **text},
    })


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[dict]]:
    return random_scenes({"train": 240, "val": 80, "test": 80})


@pytest.fixture(scope="module")
def params() -> WorldParams:
    return make_params()


@pytest.fixture(scope="module")
def world(tmp_path_factory, scenes, params) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    metrics = write_text_data(scenes, params, out)
    return out, metrics


@pytest.fixture(scope="module")
def corpus(scenes, params):
    return generate_corpus(scenes, params)


def load(world_dir: Path, rel: str):
    return json.loads((world_dir / rel).read_text(encoding="utf-8"))


def scene_index(scenes: dict[str, list[dict]]) -> dict[str, dict]:
    return {s["img_id"]: s for split in SPLITS for s in scenes[split]}


# ------------------------------------------------------------- independent semantics


class Checker:
    """Our own reading of the sentences: parse, then evaluate on a scene dict."""

    def __init__(self, params: WorldParams) -> None:
        self.margin = params.text.relation_margin  # fraction of the image side
        self.min_visible = 1 - params.scene.max_occlusion
        self.shapes, self.colors, self.sizes = params.scene.shapes, params.scene.colors, params.scene.sizes

    def parse_desc(self, text: str) -> dict[str, str]:
        """'large red circles' -> {'size': 'large', 'color': 'red', 'shape': 'circle'}."""
        *mods, noun = text.split()
        desc: dict[str, str] = {}
        singular = {s: s for s in self.shapes} | {plural(s): s for s in self.shapes}
        if noun not in ("object", "objects"):
            desc["shape"] = singular[noun]
        for word in mods:
            key = "size" if word in self.sizes else "color"
            assert word in self.sizes + self.colors and key not in desc, text
            desc[key] = word
        return desc

    @staticmethod
    def matches(obj: dict, desc: dict[str, str]) -> bool:
        return all(obj[k] == v for k, v in desc.items())

    def askable(self, obj: dict) -> bool:
        return obj["visible"] >= self.min_visible - 1e-9

    def unique(self, scene: dict, desc_text: str) -> dict:
        found = [o for o in scene["objects"] if self.matches(o, self.parse_desc(desc_text))]
        assert len(found) == 1, f"{scene['img_id']}: {desc_text!r} matches {len(found)} objects"
        assert self.askable(found[0])
        return found[0]

    def count(self, scene: dict, desc_text: str) -> int:
        found = [o for o in scene["objects"] if self.matches(o, self.parse_desc(desc_text))]
        assert all(self.askable(o) for o in found), f"{scene['img_id']}: counts a hidden {desc_text}"
        return len(found)

    def relation(self, rel: str, a: dict, b: dict) -> bool | None:
        if rel.startswith("with the same"):
            attr = rel.split()[3]
            return a[attr] == b[attr]
        ca = (a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2)
        cb = (b["bbox"][0] + b["bbox"][2] / 2, b["bbox"][1] + b["bbox"][3] / 2)
        diff = {"left of": cb[0] - ca[0], "right of": ca[0] - cb[0], "above": cb[1] - ca[1],
                "below": ca[1] - cb[1]}[rel]
        margin = self.margin * SIZE  # test scenes are SIZE x SIZE
        return True if diff > margin else False if diff < -margin else None

    def referent(self, scene: dict, subject: str, rel: str | None, anchor_text: str | None) -> dict:
        """The single object 'the <subject> [<rel> the <anchor>]' refers to."""
        if rel is None:
            return self.unique(scene, subject)
        anchor = self.unique(scene, anchor_text)
        desc = self.parse_desc(subject)
        cands = [o for o in scene["objects"] if o is not anchor and self.matches(o, desc)]
        truths = [self.relation(rel, o, anchor) for o in cands]
        assert None not in truths, f"{scene['img_id']}: undefined relation in {subject} {rel} {anchor_text}"
        hits = [o for o, t in zip(cands, truths, strict=True) if t and self.askable(o)]
        assert len(hits) == 1 and all(self.askable(o) for o, t in zip(cands, truths, strict=True) if t)
        return hits[0]

    # ---- VQA
    def vqa_answer(self, scene: dict, q: str) -> str:
        if m := re.fullmatch(r"What (color|shape|size) is the (.+)\?", q):
            obj = self.unique(scene, m[2])
            assert m[1] not in self.parse_desc(m[2]), q
            return obj[m[1]]
        if m := re.fullmatch(r"How many (.+) are there\?", q):
            return str(self.count(scene, m[1]))
        if m := re.fullmatch(r"Is there an? (.+)\?", q):
            found = [o for o in scene["objects"] if self.matches(o, self.parse_desc(m[1]))]
            assert not found or any(self.askable(o) for o in found)
            return "yes" if found else "no"
        if m := re.fullmatch(r"Is the (.+?) (?:an? )?(\w+)\?", q):
            obj = self.unique(scene, m[1])
            attr = "shape" if m[2] in self.shapes else "size" if m[2] in self.sizes else "color"
            return "yes" if obj[attr] == m[2] else "no"
        raise AssertionError(f"unparsed question {q!r}")

    # ---- GQA
    def gqa_answer(self, scene: dict, q: str) -> str:
        rel = "|".join(RELATIONS)
        if m := re.fullmatch(rf"What (color|shape) is the (.+?) ({rel}) the (.+)\?", q):
            assert m[1] not in self.parse_desc(m[2]) and m[1] not in m[3], q
            return self.referent(scene, m[2], m[3], m[4])[m[1]]
        if m := re.fullmatch(rf"Is the (.+?) ({rel}) the (.+)\?", q):
            truth = self.relation(m[2], self.unique(scene, m[1]), self.unique(scene, m[3]))
            assert truth is not None, q
            return "yes" if truth else "no"
        if m := re.fullmatch(rf"Is there an? (.+?) ({rel}) the (.+)\?", q):
            anchor, desc = self.unique(scene, m[3]), self.parse_desc(m[1])
            cands = [o for o in scene["objects"] if o is not anchor and self.matches(o, desc)]
            truths = [self.relation(m[2], o, anchor) for o in cands]
            assert None not in truths, q
            return "yes" if any(truths) else "no"
        if m := re.fullmatch(r"Are the (.+?) and the (.+?) the same (color|shape)\?", q):
            a, b = self.unique(scene, m[1]), self.unique(scene, m[2])
            assert m[3] not in self.parse_desc(m[1]) and m[3] not in self.parse_desc(m[2]), q
            return "yes" if a[m[3]] == b[m[3]] else "no"
        raise AssertionError(f"unparsed question {q!r}")

    # ---- NLVR2
    def clause(self, scene: dict, text: str) -> bool:
        if m := re.fullmatch(r"(exactly|at least) (\w+) (.+)", text):
            n, c = NUMBERS.index(m[2]), self.count(scene, m[3])
            return c == n if m[1] == "exactly" else c >= n
        if m := re.fullmatch(r"no (.+)", text):
            return self.count(scene, m[1]) == 0
        if m := re.fullmatch(r"an? (.+)", text):
            return self.count(scene, m[1]) >= 1
        raise AssertionError(f"unparsed clause {text!r}")

    def statement(self, left: dict, right: dict, sentence: str) -> tuple[bool, str]:
        """(truth, template name) of an NLVR2 sentence about (left, right)."""
        s = sentence[0].lower() + sentence[1:-1]
        assert sentence.endswith(".")
        side = {"left": left, "right": right}
        if m := re.fullmatch(r"the left image contains (.+) (and|or) the right image contains (.+)", s):
            a, b = self.clause(left, m[1]), self.clause(right, m[3])
            return ((a and b) if m[2] == "and" else (a or b)), m[2]
        if m := re.fullmatch(r"the (left|right) image contains more (.+) than the (left|right) image", s):
            assert m[1] != m[3]
            return self.count(side[m[1]], m[2]) > self.count(side[m[3]], m[2]), "more"
        if m := re.fullmatch(r"both images contain the same number of (.+)", s):
            return self.count(left, m[1]) == self.count(right, m[1]), "same"
        if m := re.fullmatch(r"the (left|right) image contains (.+)", s):
            return self.clause(side[m[1]], m[2]), "one"
        if m := re.fullmatch(r"both images contain (.+)", s):
            return self.clause(left, m[1]) and self.clause(right, m[1]), "both"
        if m := re.fullmatch(r"exactly one image contains (.+)", s):
            return self.clause(left, m[1]) != self.clause(right, m[1]), "exactly one"
        raise AssertionError(f"unparsed statement {sentence!r}")

    def ref(self, scene: dict, text: str) -> tuple[dict, bool]:
        """(referent, whether the expression is relational)."""
        m = re.fullmatch(rf"the (.+?)(?: ({'|'.join(RELATIONS)}) the (.+))?", text)
        assert m, text
        return self.referent(scene, m[1], m[2], m[3]), m[2] is not None


@pytest.fixture(scope="module")
def checker(params) -> Checker:
    return Checker(params)


# -------------------------------------------------------------------- files and keys

EXPECTED_FILES = [
    "lxmert/train.json", "lxmert/val.json",
    *[f"{t}/{s}.json" for t in ("vqa", "gqa", "nlvr2", "retrieval") for s in SPLITS],
    "vqa/trainval_ans2label.json", "vqa/trainval_label2ans.json",
    "gqa/trainval_ans2label.json", "gqa/trainval_label2ans.json",
    "karpathy/dataset_coco.json",
    *[f"refcoco/{s}.json" for s in ("train", "val", "testA", "testB")],
    *[f"hidden/{h}.json" for h in ("vqa_test", "gqa_test", "nlvr2_test", "captions_test", "refcoco_testA",
                                   "refcoco_testB")],
]


def test_writes_exactly_the_files_of_the_layout(world):
    out, _ = world
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(EXPECTED_FILES)


def _keys(records: list[dict]) -> set[frozenset]:
    return {frozenset(r) for r in records}


def _lxmert_like_label(answers: list[str]) -> dict[str, float]:
    """Soft scores recomputed here: our own normalisation of the variants annotators write."""
    words = dict(zip(NUMBERS, map(str, range(len(NUMBERS))), strict=True))

    def norm(a: str) -> str:
        a = a.lower().rstrip(".")
        a = re.sub(r"^(a|an|the) ", "", a)
        return {"grey": "gray"}.get(a, words.get(a, a))

    counts = Counter(norm(a) for a in answers)
    return {a: min(1.0, round(0.3 * n, 1)) for a, n in counts.items()}


def test_vqa_files(world, scenes):
    out, _ = world
    qids = []
    for split in SPLITS:
        recs = load(out, f"vqa/{split}.json")
        qids += [r["question_id"] for r in recs]
        img_ids = {s["img_id"] for s in scenes[split]}
        assert {r["img_id"] for r in recs} <= img_ids
        base = {"answer_type", "img_id", "question_id", "question_type", "sent"}
        if split == "test":
            assert _keys(recs) == {frozenset(base)}
            continue
        assert _keys(recs) == {frozenset(base | {"label", "answers"})}
        for r in recs:
            assert len(r["answers"]) == 10 and isinstance(r["question_id"], int)
            assert r["label"] == _lxmert_like_label(r["answers"])
            assert r["sent"].lower().startswith(r["question_type"])
            assert r["answer_type"] in ("yes/no", "number", "other")
    assert len(qids) == len(set(qids)) == 6 * sum(len(scenes[s]) for s in SPLITS)
    label2ans = load(out, "vqa/trainval_label2ans.json")
    assert load(out, "vqa/trainval_ans2label.json") == {a: i for i, a in enumerate(label2ans)}
    seen = {a for s in ("train", "val") for r in load(out, f"vqa/{s}.json") for a in r["label"]}
    assert seen == set(label2ans)
    hidden = load(out, "hidden/vqa_test.json")
    test = load(out, "vqa/test.json")
    assert set(hidden) == {str(r["question_id"]) for r in test}
    assert {frozenset(v) for v in hidden.values()} == {frozenset({"answers", "answer_type"})}
    assert all(len(v["answers"]) == 10 for v in hidden.values())


def test_gqa_files(world, scenes):
    out, _ = world
    for split in SPLITS:
        recs = load(out, f"gqa/{split}.json")
        base = {"img_id", "question_id", "sent"}
        assert _keys(recs) == {frozenset(base if split == "test" else base | {"label"})}
        assert all(isinstance(r["question_id"], str) for r in recs)
        assert len({r["question_id"] for r in recs}) == len(recs) > 2 * len(scenes[split])
        if split != "test":
            assert all(len(r["label"]) == 1 and list(r["label"].values()) == [1.0] for r in recs)
    hidden = load(out, "hidden/gqa_test.json")
    assert set(hidden) == {r["question_id"] for r in load(out, "gqa/test.json")}
    assert set(load(out, "gqa/trainval_label2ans.json")) >= set(hidden.values())


def test_lxmert_files(world, scenes):
    out, _ = world
    for split in ("train", "val"):
        recs = load(out, f"lxmert/{split}.json")
        assert [r["img_id"] for r in recs] == [s["img_id"] for s in scenes[split]]
        assert _keys(recs) == {frozenset({"img_id", "sentf", "labelf"})}
        vqa = Counter(r["img_id"] for r in load(out, f"vqa/{split}.json"))
        for r in recs:
            assert len(r["sentf"]["mscoco"]) == 5
            assert set(r["sentf"]) - {"mscoco"} == set(r["labelf"]) <= {"vqa", "gqa"}
            for source, labels in r["labelf"].items():
                assert len(labels) == len(r["sentf"][source])
            assert len(r["sentf"].get("vqa", [])) == vqa[r["img_id"]]


def test_nlvr2_files(world, scenes, params):
    out, _ = world
    pairs = params.text.nlvr2_pairs_per_sentence
    hidden = load(out, "hidden/nlvr2_test.json")
    for split in SPLITS:
        recs = load(out, f"nlvr2/{split}.json")
        base = {"identifier", "img0", "img1", "sent", "uid"}
        assert _keys(recs) == {frozenset(base if split == "test" else base | {"label"})}
        assert len(recs) == params.text.nlvr2_sentences[split] * pairs
        ids = {s["img_id"] for s in scenes[split]}
        assert all(r["img0"] in ids and r["img1"] in ids and r["img0"] != r["img1"] for r in recs)
        assert len({r["identifier"] for r in recs}) == len({r["uid"] for r in recs}) == len(recs)
        by_sentence: dict[str, list[dict]] = {}
        for r in recs:
            s, setid, pairid, sentid = r["identifier"].split("-")
            assert s == split
            by_sentence.setdefault(f"{setid}-{sentid}", []).append(r)
        assert len({v[0]["sent"] for v in by_sentence.values()}) == len(by_sentence)
        for group in by_sentence.values():
            assert len(group) == pairs and len({r["sent"] for r in group}) == 1
            labels = [hidden[r["identifier"]] if split == "test" else r["label"] for r in group]
            assert sum(labels) == pairs // 2  # balanced per sentence (4 pairs: 2 true)
    assert set(hidden) == {r["identifier"] for r in load(out, "nlvr2/test.json")}


def test_caption_files(world, scenes):
    from pycocotools.coco import COCO

    out, _ = world
    data = load(out, "karpathy/dataset_coco.json")
    assert set(data) == {"images", "dataset"}
    keys = {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences"}
    assert {frozenset(im) for im in data["images"]} == {frozenset(keys)}
    assert [im["filename"] for im in data["images"]] == [f"{s['img_id']}.png" for sp in SPLITS for s in scenes[sp]]
    for im in data["images"]:
        n = 0 if im["split"] == "test" else 5
        assert len(im["sentences"]) == len(im["sentids"]) == n
        assert all(set(s) == {"raw", "tokens", "imgid", "sentid"} for s in im["sentences"])
    gt = load(out, "hidden/captions_test.json")
    assert set(gt) == {"images", "annotations"}
    coco = COCO(str(out / "hidden/captions_test.json"))
    test_ids = [im["cocoid"] for im in data["images"] if im["split"] == "test"]
    assert sorted(coco.getImgIds()) == sorted(test_ids)
    assert all(len(coco.getAnnIds(imgIds=i)) == 5 for i in test_ids)
    for split in SPLITS:
        recs = load(out, f"retrieval/{split}.json")
        if split == "train":
            assert _keys(recs) == {frozenset({"image", "caption", "image_id"})}
            assert len(recs) == 5 * len(scenes[split])
        else:
            assert _keys(recs) == {frozenset({"image", "caption"})}
            assert [r["image"] for r in recs] == [f"images/{s['img_id']}.png" for s in scenes[split]]
            assert all(len(r["caption"]) == 5 for r in recs)


def test_refcoco_files(world, scenes, checker):
    out, _ = world
    by_id = scene_index(scenes)
    seen_ids = []
    for name in ("train", "val", "testA", "testB"):
        recs = load(out, f"refcoco/{name}.json")
        seen_ids += [r["ref_id"] for r in recs]
        test = name.startswith("test")
        keys = {"image", "text", "ref_id"} | (set() if test else {"bbox"})
        assert _keys(recs) == {frozenset(keys)}
        boxes = load(out, f"hidden/refcoco_{name}.json") if test else {str(r["ref_id"]): r["bbox"] for r in recs}
        assert set(boxes) == {str(r["ref_id"]) for r in recs}
        for r in recs:
            scene = by_id[Path(r["image"]).stem]
            assert scene["split"] == ("test" if test else name)
            target, relational = checker.ref(scene, r["text"])
            assert target["bbox"] == boxes[str(r["ref_id"])]
            if test:
                assert relational == (name == "testB")
    assert len(seen_ids) == len(set(seen_ids))
    assert len(load(out, "refcoco/testA.json")) > 0 and len(load(out, "refcoco/testB.json")) > 0


# ---------------------------------------------------------------------- content


def test_vqa_answers_are_what_the_image_shows(corpus, scenes, checker):
    by_id = scene_index(scenes)
    for split in SPLITS:
        for qa in corpus[split].vqa:
            truth = checker.vqa_answer(by_id[qa.img_id], qa.question.text)
            assert normalize_answer(truth) == qa.question.answer, qa.question.text


def test_gqa_answers_are_what_the_image_shows(corpus, scenes, checker):
    by_id = scene_index(scenes)
    families = Counter()
    for split in SPLITS:
        for qa in corpus[split].gqa:
            assert checker.gqa_answer(by_id[qa.img_id], qa.question.text) == qa.question.answer
            families[qa.question.family] += 1
    assert len(families) == 5 and min(families.values()) > 0.1 * sum(families.values())


def test_nlvr2_labels_agree_with_an_independent_checker(world, scenes, checker):
    out, _ = world
    by_id = scene_index(scenes)
    hidden = load(out, "hidden/nlvr2_test.json")
    templates = Counter()
    for split in SPLITS:
        for r in load(out, f"nlvr2/{split}.json"):
            label = hidden[r["identifier"]] if split == "test" else bool(r["label"])
            truth, template = checker.statement(by_id[r["img0"]], by_id[r["img1"]], r["sent"])
            assert truth == label, r
            templates[template] += 1
    assert len(templates) == 7  # every template is in use


def test_captions_list_the_objects_left_to_right(corpus, scenes, checker):
    by_id = scene_index(scenes)
    for split in SPLITS:
        for img_id, caps in corpus[split].captions.items():
            objs = sorted((o for o in by_id[img_id]["objects"] if checker.askable(o)),
                          key=lambda o: (o["bbox"][0] + o["bbox"][2] / 2, o["bbox"][1] + o["bbox"][3] / 2))
            words = [f"{article(o['size'])} {o['size']} {o['color']} {o['shape']}" for o in objs]
            listing = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
            assert len(caps) == len(set(caps)) == 5
            assert all(listing in c.lower() for c in caps), (caps, listing)


def test_answers_are_balanced_within_question_types(corpus):
    by_type: dict[str, Counter] = {}
    for qa in corpus["train"].vqa:
        by_type.setdefault(qa.question.question_type, Counter())[qa.question.answer] += 1
    assert set(by_type) == {"what color is the", "what shape is the", "what size is the", "how many",
                            "is there", "is the"}
    for qtype in ("is there", "is the", "what size is the"):
        counts = by_type[qtype]
        assert abs(counts["yes" if "is" in qtype.split()[0] else "small"] / sum(counts.values()) - 0.5) < 0.1
    for qtype, max_share in (("how many", 0.3), ("what color is the", 0.25), ("what shape is the", 0.3)):
        counts = by_type[qtype]
        assert max(counts.values()) / sum(counts.values()) < max_share, (qtype, counts)
    assert len(by_type["how many"]) >= 5  # counts 0..4 at least


def test_blind_baseline_stays_below_half(world):
    out, metrics = world
    train, val = load(out, "vqa/train.json"), load(out, "vqa/val.json")
    per_type: dict[str, Counter] = {}
    for r in train:  # the best-scored answer of each label (ties: alphabetical first)
        top = sorted(r["label"].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        per_type.setdefault(r["question_type"], Counter())[top] += 1
    guess = {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in per_type.items()}
    preds = {r["question_id"]: guess[r["question_type"]] for r in val}
    gt = {r["question_id"]: {"answers": r["answers"], "answer_type": r["answer_type"]} for r in val}
    blind = vqa_accuracy(preds, gt)["overall"]
    assert blind < 0.5
    assert metrics["vqa"]["blind_val_accuracy"] == pytest.approx(blind, abs=1e-9)
    assert metrics["gqa"]["blind_val_accuracy"] < 0.5


def test_metrics(world, scenes, params):
    _, metrics = world
    assert set(metrics) == {"vqa", "gqa", "nlvr2", "captions", "refcoco"}
    assert metrics["vqa"]["questions"] == {s: 6 * len(scenes[s]) for s in SPLITS}
    assert metrics["nlvr2"]["sentences"] == params.text.nlvr2_sentences
    assert metrics["nlvr2"]["true_fraction"] == {s: 0.5 for s in SPLITS}
    assert metrics["vqa"]["answer_entropy_bits"] > 3.5  # 26 answers, far from a skewed table
    assert 0.95 < metrics["vqa"]["answer_entropy_bits_by_type"]["is there"] <= 1.0
    json.dumps(metrics)  # plain data


def test_annotator_answer_variants_normalise_back():
    for answer, kind in (("2", "number"), ("0", "number"), ("circle", "shape"), ("gray", "color"),
                         ("yes", "yes/no"), ("small", "size")):
        variants = answer_variants(answer, kind)
        assert variants and all(normalize_answer(v) == answer for v in variants)
    assert "two" in answer_variants("2", "number") and "grey" in answer_variants("gray", "color")


# ------------------------------------------------------------------- scene semantics


def _view(objects: list[tuple[str, str, str, list[int], float]], margin: float = 0.08) -> SceneView:
    scene = {"img_id": "x", "width": 100, "height": 100, "objects": [
        {"id": i, "shape": s, "color": c, "size": z, "texture": "plain", "bbox": b, "visible": v}
        for i, (s, c, z, b, v) in enumerate(objects)]}
    return SceneView(scene, max_occlusion=0.4, margin=margin)


def test_scene_view_semantics():
    view = _view([
        ("circle", "red", "small", [0, 0, 10, 10], 1.0),  # centre (5, 5)
        ("circle", "red", "large", [10, 40, 10, 10], 1.0),  # centre (15, 45): 10 px right
        ("star", "blue", "small", [60, 0, 10, 10], 0.5),  # too hidden to count
    ])
    a, b, star = view.objects
    assert view.relate("left of", a, b) is True  # 10 px > margin 8 px
    assert view.relate("right of", a, b) is False
    assert view.relate("above", a, b) is True
    assert view.relate("with the same color as", a, b) is True
    close = _view([("circle", "red", "small", [0, 0, 10, 10], 1), ("star", "red", "small", [5, 0, 10, 10], 1)])
    assert close.relate("left of", *close.objects) is None  # 5 px apart: within the margin
    assert view.count(Desc(color="red")) == 2
    assert view.count(Desc(shape="star")) is None  # would count a hidden object
    assert view.unique_descs(a) == [Desc(size="small", color="red"), Desc(size="small", shape="circle"),
                                    Desc(size="small", color="red", shape="circle")]
    assert view.unique_descs(a, exclude=["size"]) == []
    rel = [r.words() for r in view.relational_descs(a, exclude=["size"])]
    assert "object left of the large object" in rel
    assert "red object above the large object" in rel
    # the hidden star is also above the large circle: "object above" would be ambiguous
    assert "object above the large object" not in rel
    assert "object with the same color as the large object" in rel
    assert not any(r.startswith(("small", "large")) for r in rel)
    assert plural("cross") == "crosses" and plural("star") == "stars" and article("orange") == "an"


# ---------------------------------------------------------------------- determinism


_SUBPROCESS = """
import json, sys
from pathlib import Path
from vlpipe.config import WorldParams
from vlpipe.data.language import write_text_data
scenes = json.loads(Path(sys.argv[1]).read_text())
params = WorldParams.model_validate(json.loads(Path(sys.argv[2]).read_text()))
write_text_data(scenes, params, Path(sys.argv[3]))
"""


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_across_processes(tmp_path):
    scenes = random_scenes({"train": 30, "val": 12, "test": 12}, seed=5)
    params = make_params(nlvr2_sentences={"train": 8, "val": 4, "test": 4})
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    (tmp_path / "params.json").write_text(json.dumps(params.model_dump(mode="json")))
    write_text_data(scenes, params, tmp_path / "a")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set iteration order must not matter
    subprocess.run([sys.executable, "-c", _SUBPROCESS, str(tmp_path / "scenes.json"), str(tmp_path / "params.json"),
                    str(tmp_path / "b")], check=True, env=env)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and a == b
    other = make_params(nlvr2_sentences={"train": 8, "val": 4, "test": 4}).model_copy(update={"seed": 4})
    write_text_data(scenes, other, tmp_path / "c")
    assert _tree(tmp_path / "c")["vqa/train.json"] != a["vqa/train.json"]
    # the NLVR2 settings have their own random stream: VQA does not change with them
    more = make_params(nlvr2_sentences={"train": 9, "val": 4, "test": 4})
    write_text_data(scenes, more, tmp_path / "d")
    assert _tree(tmp_path / "d")["vqa/train.json"] == a["vqa/train.json"]


def test_missing_split_is_an_error(tmp_path):
    scenes = random_scenes({"train": 3, "val": 2, "test": 2})
    del scenes["test"]
    with pytest.raises(ValueError, match="lack split"):
        write_text_data(scenes, make_params(), tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------- with the renderer


def test_with_the_world_scene_sampler(tmp_path):
    world = pytest.importorskip("vlpipe.data.world")
    params = WorldParams.model_validate({"scene": {"n_train": 24, "n_val": 8, "n_test": 8},
                                         "text": {"nlvr2_sentences": {"train": 6, "val": 3, "test": 3}}})
    counts = {"train": 24, "val": 8, "test": 8}
    scenes = {s: [world.sample_scene(params.scene, world.image_id(s, i), s, world.image_rngs(params.seed, s, i)[0])
                  for i in range(n)] for s, n in counts.items()}
    metrics = write_text_data(scenes, params, tmp_path)
    assert metrics["vqa"]["questions"]["train"] == 24 * params.text.questions_per_image
    by_id = scene_index(scenes)
    for r in load(tmp_path, "refcoco/train.json"):
        target, _ = Checker(params).ref(by_id[Path(r["image"]).stem], r["text"])
        assert target["bbox"] == r["bbox"]
    ids = {im["cocoid"] for im in load(tmp_path, "karpathy/dataset_coco.json")["images"]}
    assert ids == {world.image_int_id(s["img_id"]) for sp in SPLITS for s in scenes[sp]}


def test_swap_sides_mirrors_every_nlvr2_template_and_keeps_its_truth(scenes, params):
    """``swap_sides`` (the NLVR2 augmentation) turns each statement into its mirror image,
    whose truth on the swapped pair is the original's, for every template."""
    from dataclasses import replace

    from vlpipe.data.language import nlvr2 as templates
    from vlpipe.data.language.corpus import scene_views, vocab_of
    from vlpipe.tasks.base import Example
    from vlpipe.tasks.nlvr2 import swap_sides

    def mirror(st):
        if isinstance(st, (templates.OneImage, templates.MoreThan)):
            return replace(st, side="right" if st.side == "left" else "left")
        if isinstance(st, templates.Connective):
            return replace(st, left_clause=st.right_clause, right_clause=st.left_clause)
        return st  # Both, ExactlyOne, SameNumber are symmetric

    views, vocab, rng = scene_views(scenes["train"], params), vocab_of(params), np.random.default_rng(0)
    seen, defined = set(), 0
    for _ in range(600):
        st = templates.sample_statement(vocab, rng)
        i, j = (int(k) for k in rng.choice(len(views), size=2, replace=False))
        ex = Example(key="k", img_ids=(views[i].img_id, views[j].img_id), sent=st.sentence, target=st.truth(views[i], views[j]))
        (out,) = swap_sides([ex])
        assert out.key == "k-swapped" and out.img_ids == (views[j].img_id, views[i].img_id)
        if isinstance(st, templates.Connective):  # the same statement, the right image named first
            want = (f"The right image contains {st.left_clause.text} {st.connective} "
                    f"the left image contains {st.right_clause.text}.")  # fmt: skip
        else:
            want = mirror(st).sentence
        assert out.sent == want and out.target == ex.target
        assert mirror(st).truth(views[j], views[i]) == ex.target
        seen.add((type(st).__name__, getattr(st, "connective", "")))
        defined += ex.target is not None
    assert len(seen) == 7 and defined > 400  # every template, mostly defined truth values
