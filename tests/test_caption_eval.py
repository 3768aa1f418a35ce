"""Caption metrics (pycocoevalcap), the CIDEr-D reward, results-file checks and the caption task's
local leaderboard. Java (PTB tokenizer, METEOR) runs in two tests only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpipe.errors import InputError
from vlpipe.eval import caption as caption_eval
from vlpipe.eval.caption import CiderD, caption_metrics, check_caption_results, read_results
from vlpipe.eval.leaderboard import score_submission
from vlpipe.tasks.caption import CaptionTask

REFS = {
    11: ["A small red circle and a large blue star.", "There is a small red circle and a large blue star."],
    12: ["A large green square.", "A picture of a large green square."],
    13: ["From left to right, a small cyan cross, a large white hexagon.", "A small cyan cross and a large white hexagon."],
}
PREDS = {11: "a small red circle and a large blue star", 12: "a small green square", 13: "a large white hexagon"}


@pytest.fixture(scope="module")
def one_meteor():
    """One METEOR process for the module: it loads a paraphrase table for ~10-30 s at start."""
    import pycocoevalcap.meteor.meteor as meteor_module

    shared = meteor_module.Meteor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", lambda: shared)
        yield shared


def _pycocoevalcap_direct(preds: dict[int, str], refs: dict[int, list[str]]) -> dict[str, float]:
    """The reference computation, written as the coco-caption README does it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": preds[i]}] for i in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)},
        "METEOR": Meteor().compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }


def test_metrics_match_pycocoevalcap_called_directly(one_meteor):
    ours = caption_metrics(PREDS, REFS, spice=False)
    direct = _pycocoevalcap_direct(PREDS, REFS)
    for name in caption_eval.METRICS:
        assert ours[name] == pytest.approx(direct[name], abs=1e-9), name
    assert ours["images"] == 3
    assert ours["SPICE"].startswith("skipped")
    assert "METEOR" not in caption_metrics(PREDS, REFS, meteor=False, spice=False)
    # a perfect caption set scores higher on every metric than the hand-made one
    perfect = caption_metrics({i: r[0] for i, r in REFS.items()}, REFS, spice=False)
    assert all(perfect[m] > ours[m] for m in ("BLEU-4", "CIDEr-D", "ROUGE-L"))


def test_cider_d_reward_equals_coco_caption_cider():
    from pycocoevalcap.cider.cider import Cider

    tokenized = {i: [" ".join(caption_eval.tokenize(c)) for c in caps] for i, caps in REFS.items()}
    preds = {i: [" ".join(caption_eval.tokenize(PREDS[i]))] for i in REFS}
    mean, per_image = Cider().compute_score(tokenized, preds)
    ours = CiderD(REFS).scores([PREDS[i] for i in REFS], [REFS[i] for i in REFS], keys=list(REFS))
    assert ours.tolist() == pytest.approx(per_image.tolist(), abs=1e-12)
    assert ours.mean() == pytest.approx(mean, abs=1e-12)
    # cached reference vectors give the same numbers on a second call
    cider = CiderD(REFS)
    first = cider.scores([PREDS[11]], [REFS[11]], keys=[11])
    assert cider.scores([PREDS[11]], [REFS[11]], keys=[11]).tolist() == first.tolist()
    assert cider.score(REFS[11][0], REFS[11]) > cider.score(PREDS[12], REFS[11])


def test_results_with_wrong_id_or_missing_caption_are_rejected(tmp_path: Path):
    path = tmp_path / "captions_val_results.json"
    ok = [{"image_id": i, "caption": c} for i, c in PREDS.items()]
    path.write_text(json.dumps(ok))
    assert read_results(path, REFS) == PREDS

    cases = {
        "not an image of the ground truth": [*ok[:2], {"image_id": 99, "caption": "a star"}],
        "have no caption": ok[:2],
        "caption": [*ok[:2], {"image_id": 13}],
        "empty caption": [*ok[:2], {"image_id": 13, "caption": "  "}],
        "duplicate image_id": [*ok, ok[0]],
    }
    for problem, records in cases.items():
        path.write_text(json.dumps(records))
        with pytest.raises(InputError, match=problem) as err:
            read_results(path, REFS)
        assert err.value.path == path
    path.write_text("[{")
    with pytest.raises(InputError, match="malformed JSON"):
        read_results(path, REFS)
    with pytest.raises(InputError, match="image_id must be an int"):
        check_caption_results(path, [{"image_id": "11", "caption": "x"}], REFS)


def test_spice_is_reported_as_skipped_without_its_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(caption_eval, "spice_models_dir", lambda: tmp_path)
    assert not caption_eval.spice_available()
    status = caption_eval._spice({1: ["a"]}, {1: ["a"]})
    assert isinstance(status, str) and status.startswith("skipped") and str(tmp_path) in status
    for jar in caption_eval.SPICE_JARS:
        (tmp_path / jar).write_bytes(b"")
    assert caption_eval.spice_available()


def _tiny_caption_world(world: Path) -> None:
    """A Karpathy file with 2 train, 1 val and 3 test images, and the hidden test references."""
    images, sentid = [], 0
    splits = [("train", 1), ("train", 2), ("val", 5), ("test", 11), ("test", 12), ("test", 13)]
    for imgid, (split, cocoid) in enumerate(splits):
        caps = [] if split == "test" else ["A small red circle.", "There is a small red circle."]
        sents = [{"raw": c, "tokens": caption_eval.tokenize(c), "imgid": imgid, "sentid": sentid + k} for k, c in enumerate(caps)]
        sentid += len(caps)
        images.append({"filepath": "images", "filename": f"world_{split}_{cocoid:06d}.png", "imgid": imgid,
                       "cocoid": cocoid, "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents})  # fmt: skip
    (world / "karpathy").mkdir(parents=True)
    (world / "karpathy/dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    gt_images = [{"id": i, "file_name": f"images/world_test_{i:06d}.png"} for i in REFS]
    annotations = [{"image_id": i, "id": 100 * i + k, "caption": c} for i, caps in REFS.items() for k, c in enumerate(caps)]
    (world / "hidden").mkdir()
    (world / "hidden/captions_test.json").write_text(json.dumps({"images": gt_images, "annotations": annotations}))


def test_caption_task_data_and_local_leaderboard(tmp_path: Path, one_meteor):
    world = tmp_path / "world"
    _tiny_caption_world(world)
    task = CaptionTask(world)
    assert [ex.key for ex in task.caption_examples("train")] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert task.caption_examples("train")[0].img_ids == ("world_train_000001",)
    val = task.image_examples("val")
    assert [ex.key for ex in val] == [5] and len(val[0].target) == 2
    gt = task.ground_truth("val")
    assert [im["id"] for im in gt["images"]] == [5] and len(gt["annotations"]) == 2
    assert task.image_ids("test") == [11, 12, 13]

    out = tmp_path / "leaderboard"
    path = task.write_submission(PREDS, out)
    assert path.name == "captions_test_results.json"
    assert json.loads(path.read_text()) == [{"image_id": i, "caption": c} for i, c in sorted(PREDS.items())]
    scores = score_submission(task, path)
    assert scores["count"] == 3
    assert scores["test"]["CIDEr-D"] == pytest.approx(caption_metrics(PREDS, REFS, spice=False)["CIDEr-D"])

    path.write_text(json.dumps([{"image_id": 5, "caption": "a val image"}]))
    with pytest.raises(InputError, match="image_id 5 is not an image of the ground truth") as err:
        score_submission(task, path)
    assert err.value.path == path
