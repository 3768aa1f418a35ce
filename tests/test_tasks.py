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
