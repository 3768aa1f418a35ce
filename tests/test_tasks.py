"""Task objects: examples, targets, heads, submission files and the local leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlpipe.errors import InputError
from vlpipe.eval.leaderboard import score_submission
from vlpipe.tasks import TASKS, TaskModel
from vlpipe.tasks.base import make_collate, predict_all


@pytest.fixture(params=sorted(TASKS))
def task(request: pytest.FixtureRequest, tiny_world: Path):
    return TASKS[request.param](tiny_world)


def _perfect(task) -> dict:
    """Predictions equal to the hidden answers (what a perfect model would submit)."""
    gt = task.hidden_ground_truth()
    if task.name == "vqa":
        from collections import Counter

        return {q: Counter(e["answers"]).most_common(1)[0][0] for q, e in gt.items()}
    return dict(gt)


def test_splits_load_and_test_has_no_targets(task) -> None:
    train, val, test = (task.examples(s) for s in ("train", "val", "test"))
    assert train and val and test
    assert all(ex.target is not None for ex in train + val)
    assert all(ex.target is None for ex in test)
    assert all(len(ex.img_ids) == task.num_images for ex in train)


def test_targets_shape_and_values(task) -> None:
    ex = task.examples("train")[:8]
    t = task.targets(ex)
    assert t.shape[0] == 8
    if task.name in ("vqa", "gqa"):
        assert t.shape == (8, task.num_answers)
        for row, e in zip(t, ex, strict=True):
            for ans, score in e.target.items():
                assert row[task.ans2label[ans]] == pytest.approx(score)
            assert int((row > 0).sum()) == len([a for a in e.target if a in task.ans2label])
    else:
        assert t.tolist() == [int(e.target) for e in ex]


def test_submission_round_trip_and_perfect_leaderboard_score(task, tmp_path: Path) -> None:
    preds = _perfect(task)
    path = task.write_submission(preds, tmp_path)
    assert path.name == task.submission_name
    assert task.read_submission(path) == {(str(k) if task.name == "gqa" else k): v for k, v in preds.items()}
    scores = score_submission(task, path)["test"]
    main = scores.get("overall", scores.get("accuracy"))
    # VQA: the majority answer of 10 noisy annotators is not always worth 1.0 (official metric).
    assert main == pytest.approx(1.0) if task.name != "vqa" else main > 0.9


def test_official_file_formats(task, tmp_path: Path) -> None:
    preds = _perfect(task)
    path = task.write_submission(preds, tmp_path)
    if task.name == "vqa":
        rows = json.loads(path.read_text())
        assert set(rows[0]) == {"question_id", "answer"} and isinstance(rows[0]["question_id"], int)
    elif task.name == "gqa":
        rows = json.loads(path.read_text())
        assert set(rows[0]) == {"questionId", "prediction"} and isinstance(rows[0]["questionId"], str)
    else:
        first = path.read_text().splitlines()[0]
        ident, label = first.split(",")
        assert label in ("True", "False") and len(ident.split("-")) >= 4


def test_leaderboard_rejects_missing_and_unknown_predictions(task, tmp_path: Path) -> None:
    preds = _perfect(task)
    some = dict(list(preds.items())[1:])
    path = task.write_submission(some, tmp_path)
    with pytest.raises(InputError, match="no prediction"):
        score_submission(task, path)
    bad_key = {"vqa": 999_999_999, "gqa": "nope", "nlvr2": "test-9999-0-0"}[task.name]
    path = task.write_submission({**preds, bad_key: next(iter(preds.values()))}, tmp_path)
    with pytest.raises(InputError, match="not in the test split"):
        score_submission(task, path)


def test_malformed_submission_is_named(task, tmp_path: Path) -> None:
    path = tmp_path / task.submission_name
    path.write_text("{not json" if path.suffix == ".json" else "id-only-no-label\n")
    with pytest.raises(InputError, match=task.submission_name):
        task.read_submission(path)


class _BagEncoder(nn.Module):
    """A trivial encoder (mean of embedded tokens + mean visual feature) for shape checks."""

    def __init__(self, vocab: int, dim: int, hidden: int = 16):
        super().__init__()
        self.hidden_size = hidden
        self.emb = nn.Embedding(vocab, hidden)
        self.vis = nn.Linear(dim, hidden)

    def forward(self, input_ids, attention_mask, visual_feats, visual_pos, token_type_ids=None):
        return self.emb(input_ids).mean(1) + self.vis(visual_feats).mean(1)  # (B, H)


def test_task_model_collate_and_predict(task, tiny_world: Path, tmp_path: Path) -> None:
    from vlpipe.config import TokenizerParams
    from vlpipe.data.tokenizer import build_tokenizer, load_tokenizer

    build_tokenizer(TokenizerParams(vocab_size=200), tiny_world, tmp_path)
    tok = load_tokenizer(tmp_path)
    dim, n = 6, 5

    def visual(ids):
        g = torch.Generator().manual_seed(0)
        return {"visual_feats": torch.randn(len(ids), n, dim, generator=g), "visual_pos": torch.rand(len(ids), n, 4)}

    enc = _BagEncoder(len(tok), dim)
    model = TaskModel(enc, task.build_head(enc.hidden_size), task.num_images)
    collate = make_collate(task, tok, visual, max_length=24)
    batch = collate(task.examples("train")[:4])
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    # Padded to the batch's longest sentence (not to max_length): cheaper, same outputs.
    assert ids.shape[0] == 4 * task.num_images and ids.shape[1] == int(mask.sum(1).max()) <= 24
    logits = model(batch["inputs"])
    losses = task.loss(logits, batch["targets"])
    assert set(losses) >= {"loss"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    val = task.examples("val")
    preds = predict_all(model, task, val, collate, batch_size=7)
    assert set(preds) == {ex.key for ex in val}
    metric = task.metric(preds, "val")
    assert 0.0 <= metric.get("overall", metric.get("accuracy")) <= 1.0


def test_mark_sides_gives_each_nlvr2_row_the_index_of_its_image(tiny_world: Path, tmp_path: Path) -> None:
    from vlpipe.config import TokenizerParams
    from vlpipe.data.tokenizer import build_tokenizer, load_tokenizer

    build_tokenizer(TokenizerParams(vocab_size=200), tiny_world, tmp_path)
    tok, task = load_tokenizer(tmp_path), TASKS["nlvr2"](tiny_world)

    def visual(ids):
        return {"visual_feats": torch.zeros(len(ids), 3, 4), "visual_pos": torch.zeros(len(ids), 3, 4)}

    examples = task.examples("train")[:3]
    plain = make_collate(task, tok, visual, max_length=24)(examples)["inputs"]
    marked = make_collate(task, tok, visual, max_length=24, mark_sides=True)(examples)["inputs"]
    assert not plain["token_type_ids"].any()
    # rows (example 0, left), (example 0, right), (example 1, left), ...: types 0, 1, 0, 1, 0, 1
    assert marked["token_type_ids"].tolist() == [[k % 2] * plain["input_ids"].shape[1] for k in range(6)]
    assert torch.equal(marked["input_ids"], plain["input_ids"])

    # X-VLM's pixel collate marks its rows the same way (and only when asked).
    from vlpipe.stages.xvlm import make_pixel_collate

    def pixels(ids):
        return {"pixel_values": torch.zeros(len(ids), 3, 8, 8)}

    plain_px = make_pixel_collate(task, tok, pixels, max_length=24)(examples)["inputs"]
    marked_px = make_pixel_collate(task, tok, pixels, max_length=24, mark_sides=True)(examples)["inputs"]
    assert not plain_px["token_type_ids"].any()
    assert torch.equal(marked_px["token_type_ids"], marked["token_type_ids"])
    assert marked_px["pixel_values"].shape == (6, 3, 8, 8)


def test_own_frame_makes_the_left_image_of_every_row_its_own(tiny_world: Path, tmp_path: Path) -> None:
    """``own_frame``: the right image's row reads the sentence with left / right swapped, the
    left image's row reads it as written; everything else in the batch is unchanged."""
    from vlpipe.config import TokenizerParams
    from vlpipe.data.tokenizer import build_tokenizer, load_tokenizer
    from vlpipe.stages.xvlm import make_pixel_collate
    from vlpipe.tasks.base import Example
    from vlpipe.tasks.nlvr2 import swap_side_words

    assert swap_side_words("The left image contains a star or the right image contains no circles.") == (
        "The right image contains a star or the left image contains no circles."
    )
    assert swap_side_words("Left of the right image.") == "Right of the left image."
    build_tokenizer(TokenizerParams(vocab_size=200), tiny_world, tmp_path)
    tok, task = load_tokenizer(tmp_path), TASKS["nlvr2"](tiny_world)

    def pixels(ids):
        return {"pixel_values": torch.stack([torch.full((3, 4, 4), float(k)) for k in range(len(ids))])}

    examples = [Example(key="a", img_ids=("i0", "i1"), sent="The left image contains a star.", target=True),
                Example(key="b", img_ids=("i2", "i3"), sent="Both images contain a circle.", target=False)]  # fmt: skip
    plain = make_pixel_collate(task, tok, pixels, max_length=24)(examples)
    own = make_pixel_collate(task, tok, pixels, max_length=24, own_frame=True)(examples)
    expected = ["The left image contains a star.", "The right image contains a star.",
                "Both images contain a circle.", "Both images contain a circle."]  # fmt: skip
    assert torch.equal(own["inputs"]["input_ids"], tok(expected, padding="longest", return_tensors="pt")["input_ids"])
    assert not torch.equal(own["inputs"]["input_ids"][1], plain["inputs"]["input_ids"][1])
    for k in (0, 2, 3):  # rows without a side word to swap, and every left image's row, stay as they were
        assert torch.equal(own["inputs"]["input_ids"][k], plain["inputs"]["input_ids"][k])
    assert torch.equal(own["inputs"]["pixel_values"], plain["inputs"]["pixel_values"])
    assert torch.equal(own["targets"], plain["targets"])
    with pytest.raises(ValueError, match="own_frame is for two-image tasks"):
        make_pixel_collate(TASKS["vqa"](tiny_world), tok, pixels, max_length=24, own_frame=True)


def test_left_clause_first_commutes_the_two_image_clauses_only() -> None:
    from vlpipe.stages.xvlm import left_clause_first

    assert left_clause_first("The right image contains a star or the left image contains no red circles.") == (
        "The left image contains no red circles or the right image contains a star."
    )
    assert left_clause_first("the right image contains exactly two cubes and the left image contains a cube") == (
        "the left image contains a cube and the right image contains exactly two cubes"
    )
    for same in ("The left image contains a star and the right image contains no circles.",  # already left first
                 "The right image contains more stars than the left image.",  # one clause about both
                 "Both images contain a star or a circle.", "The right image contains a star."):  # fmt: skip
        assert left_clause_first(same) == same


def test_own_clause_first_gives_each_row_its_own_clause_first(tiny_world: Path, tmp_path: Path) -> None:
    """``own_clause_first``: with ``own_frame``, both rows of a connective sentence (and of its
    mirrored copy) start with the clause about their own image; other sentences are as
    ``own_frame`` alone makes them."""
    from vlpipe.config import TokenizerParams
    from vlpipe.data.tokenizer import build_tokenizer, load_tokenizer
    from vlpipe.stages.xvlm import make_pixel_collate
    from vlpipe.tasks.base import Example
    from vlpipe.tasks.nlvr2 import swap_sides

    build_tokenizer(TokenizerParams(vocab_size=200), tiny_world, tmp_path)
    tok, task = load_tokenizer(tmp_path), TASKS["nlvr2"](tiny_world)

    def pixels(ids):
        return {"pixel_values": torch.zeros(len(ids), 3, 4, 4)}

    pair = Example(key="a", img_ids=("i0", "i1"), target=True,
                   sent="The left image contains a star or the right image contains no circles.")  # fmt: skip
    other = Example(key="b", img_ids=("i2", "i3"), sent="The left image contains a star.", target=False)
    examples = [pair, other, *swap_sides([pair])]
    got = make_pixel_collate(task, tok, pixels, max_length=24, own_frame=True, own_clause_first=True)(examples)
    expected = ["The left image contains a star or the right image contains no circles.",  # left image's own
                "The left image contains no circles or the right image contains a star.",  # right image's own
                "The left image contains a star.", "The right image contains a star.",  # as own_frame alone
                "The left image contains no circles or the right image contains a star.",  # mirrored: i1 first
                "The left image contains a star or the right image contains no circles."]  # fmt: skip
    ids = tok(expected, padding="longest", return_tensors="pt")["input_ids"]
    assert torch.equal(got["inputs"]["input_ids"], ids)
    with pytest.raises(ValueError, match="needs own_frame"):
        make_pixel_collate(task, tok, pixels, max_length=24, own_clause_first=True)


def test_mirror_swaps_spatial_words_in_question_and_answers_and_tags_the_copy() -> None:
    from vlpipe.tasks.base import Example
    from vlpipe.tasks.mirror import mirror_examples, swap_words

    ex = Example(key="q1", img_ids=("i",), sent="Is the red star left of the circle above the square?",
                 target={"left": 0.6, "bottom": 0.3, "yes": 1.0})  # fmt: skip
    h, v, hv = mirror_examples([ex], "both")
    assert (h.key, v.key, hv.key) == ("q1-mirror-h", "q1-mirror-v", "q1-mirror-h-v")
    assert h.sent == "Is the red star right of the circle above the square?"
    assert v.sent == "Is the red star left of the circle below the square?"
    assert hv.sent == "Is the red star right of the circle below the square?"
    assert h.target == {"right": 0.6, "bottom": 0.3, "yes": 1.0} and v.target == {"left": 0.6, "top": 0.3, "yes": 1.0}
    assert (h.info["mirror"], hv.info["mirror"]) == (("horizontal",), ("horizontal", "vertical"))
    assert ex.info == {} and ex.sent.startswith("Is the red star left")  # the original is untouched
    assert swap_words("Left, leftover, Right.", ("horizontal",)) == "Right, leftover, Left."  # whole words
    assert mirror_examples([ex], "none") == [] and len(mirror_examples([ex], "horizontal")) == 1
    with pytest.raises(ValueError, match="mirror must be one of"):
        mirror_examples([ex], "diagonal")


@pytest.mark.parametrize("axes", [("horizontal",), ("vertical",), ("horizontal", "vertical")])
def test_mirrored_layout_keeps_every_spatial_relation_true_under_the_swapped_word(axes, tiny_world: Path) -> None:
    """The world's own relation semantics (box centres with a margin) on reflected scenes:
    ``a <r> b`` before equals ``a <swapped r> b`` after, for every object pair of its scenes."""
    from vlpipe.data.language.scene import SPATIAL, SceneView
    from vlpipe.io import read_json
    from vlpipe.tasks.mirror import mirror_positions, swap_words

    checked = 0
    for scene in read_json(tiny_world / "scenes" / "train.json"):
        w, h = float(scene["width"]), float(scene["height"])
        boxes = torch.tensor([[x / w, y / h, (x + bw) / w, (y + bh) / h] for x, y, bw, bh in
                              (o["bbox"] for o in scene["objects"])], dtype=torch.float64)  # fmt: skip
        flipped = mirror_positions(boxes, axes)  # (N, 4) x1y1x2y2 in [0, 1]
        objects = [{**o, "bbox": [float(b[0] * w), float(b[1] * h), float((b[2] - b[0]) * w), float((b[3] - b[1]) * h)]}
                   for o, b in zip(scene["objects"], flipped, strict=True)]  # fmt: skip
        before, after = SceneView(scene, 0.5, 0.05), SceneView({**scene, "objects": objects}, 0.5, 0.05)
        for a in before.objects:
            for b, r in ((b, r) for b in before.objects if b is not a for r in SPATIAL):
                truth = before.relate(r, a, b)
                assert after.relate(swap_words(r, axes), after.objects[a.index], after.objects[b.index]) == truth
                checked += truth is not None
    assert checked > 100
    assert torch.allclose(mirror_positions(mirror_positions(boxes, axes), axes), boxes)  # an involution


def test_collate_reflects_the_boxes_of_mirrored_copies_only(tiny_world: Path, tmp_path: Path) -> None:
    from vlpipe.config import TokenizerParams
    from vlpipe.data.tokenizer import build_tokenizer, load_tokenizer
    from vlpipe.tasks.mirror import mirror_examples

    build_tokenizer(TokenizerParams(vocab_size=200), tiny_world, tmp_path)
    tok, task = load_tokenizer(tmp_path), TASKS["gqa"](tiny_world)
    pos = torch.tensor([[0.1, 0.2, 0.3, 0.6], [0.5, 0.0, 1.0, 0.25]])  # (N, 4)

    def visual(ids):
        return {"visual_feats": torch.arange(len(ids) * 2 * 3.0).view(len(ids), 2, 3), "visual_pos": pos.expand(len(ids), 2, 4)}

    ex = task.examples("train")[:2]
    batch = make_collate(task, tok, visual, max_length=24)(ex + mirror_examples(ex, "both"))
    got = batch["inputs"]["visual_pos"]  # (8, 2, 4): 2 originals, then h, h, v, v, hv, hv
    assert torch.equal(got[:2], pos.expand(2, 2, 4))
    assert torch.allclose(got[2], torch.tensor([[0.7, 0.2, 0.9, 0.6], [0.0, 0.0, 0.5, 0.25]]))
    assert torch.allclose(got[4], torch.tensor([[0.1, 0.4, 0.3, 0.8], [0.5, 0.75, 1.0, 1.0]]))
    assert torch.allclose(got[6], torch.tensor([[0.7, 0.4, 0.9, 0.8], [0.0, 0.75, 0.5, 1.0]]))
    assert torch.equal(batch["inputs"]["visual_feats"], visual([0] * 8)["visual_feats"])  # appearance kept
    assert torch.equal(batch["targets"][2:4], task.targets(ex))  # the world's GQA answers name no side


def test_text_assignment_examples_put_the_caption_first_second_or_nowhere() -> None:
    from vlpipe.tasks.text_assignment import NEITHER, TextAssignment, text_assignment_examples

    captions = [(f"img{i % 7}", f"caption {i}") for i in range(60)]
    own = dict((s, i) for i, s in captions)
    ex = text_assignment_examples(captions, seed=3)
    assert ex == text_assignment_examples(captions, seed=3) and ex != text_assignment_examples(captions, seed=4)
    assert sorted(e.sent for e in ex) == sorted(s for _, s in captions)  # every caption once
    assert [sum(e.target == k for e in ex) for k in range(3)] == [20, 20, 20]
    for e in ex:
        a, b = e.img_ids
        assert a != b
        assert (a == own[e.sent], b == own[e.sent]) == {0: (True, False), 1: (False, True), NEITHER: (False, False)}[e.target]
    ta = TextAssignment()
    logits = torch.nn.functional.one_hot(ta.targets(ex), 3).float()  # (60, 3) perfect
    preds = ta.predict(logits, ex)
    assert ta.metric(preds, ex) == {"accuracy": 1.0, "accuracy_first": 1.0, "accuracy_second": 1.0, "accuracy_neither": 1.0}
    preds[ex[0].key] = (ex[0].target + 1) % 3
    assert ta.metric(preds, ex)["accuracy"] == pytest.approx(59 / 60)
    assert ta.build_head(8)(torch.randn(5, 16)).shape == (5, 3)
    with pytest.raises(ValueError, match="at least 3 images"):
        text_assignment_examples([("a", "x"), ("b", "y")], seed=0)
