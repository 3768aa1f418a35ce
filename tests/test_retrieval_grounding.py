"""Retrieval and grounding: GIoU / IoU on hand-computed boxes, recall@k on a hand-made
similarity matrix, ITM re-ranking of the top k, the ranking and grounding leaderboard files,
the pixel source, and the X-VLM stages end to end on a tiny world."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest
import torch

from vlpipe.errors import InputError
from vlpipe.eval.boxes import (
    accuracy_at_iou,
    box_iou,
    box_regression_losses,
    cxcywh_to_xyxy,
    generalized_box_iou,
    xyxy_to_cxcywh,
)
from vlpipe.eval.retrieval import retrieval_metrics, retrieval_ranks
from vlpipe.io import read_json, write_json

if TYPE_CHECKING:
    from vlpipe.config import TrainParams


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ----------------------------------------------------------------------------- boxes


def test_giou_of_disjoint_boxes() -> None:
    a, b = torch.tensor([0.0, 0, 1, 1]), torch.tensor([2.0, 0, 3, 1])
    # IoU 0; enclosing box [0, 0, 3, 1] has area 3, the union 2: GIoU = 0 - (3 - 2) / 3
    assert box_iou(a, b).item() == 0.0
    assert generalized_box_iou(a, b).item() == pytest.approx(-1 / 3)
    far = torch.tensor([9.0, 9, 10, 10])  # further apart -> lower GIoU (the gradient IoU lacks)
    assert generalized_box_iou(a, far).item() < generalized_box_iou(a, b).item()


def test_giou_of_nested_boxes() -> None:
    outer, inner = torch.tensor([0.0, 0, 4, 4]), torch.tensor([1.0, 1, 2, 2])
    # intersection = inner (1), union = outer (16), enclosing = outer: GIoU = IoU = 1/16
    assert box_iou(outer, inner).item() == pytest.approx(1 / 16)
    assert generalized_box_iou(outer, inner).item() == pytest.approx(1 / 16)


def test_giou_of_identical_and_partly_overlapping_boxes() -> None:
    a = torch.tensor([[0.0, 0, 2, 2], [0.0, 0, 2, 2]])
    b = torch.tensor([[0.0, 0, 2, 2], [1.0, 1, 3, 3]])
    # row 2: intersection 1, union 7, enclosing [0, 0, 3, 3] = 9: GIoU = 1/7 - 2/9
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([1.0, 1 / 7 - 2 / 9]))
    assert torch.allclose(box_iou(a, b), torch.tensor([1.0, 1 / 7]))


def test_box_format_conversions_round_trip() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    assert torch.allclose(cxcywh_to_xyxy(boxes)[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes)


def test_box_regression_losses_on_known_boxes() -> None:
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    same = box_regression_losses(target.clone(), target)
    assert same["bbox_l1"].item() == 0.0 and same["bbox_giou"].item() == pytest.approx(0.0, abs=1e-6)
    shifted = box_regression_losses(torch.tensor([[0.6, 0.5, 0.2, 0.2]]), target)
    # L1: |0.1| over 4 coordinates; IoU = 0.1*0.2 / (2*0.04 - 0.02) = 1/3, enclosing = union: GIoU 1/3
    assert shifted["bbox_l1"].item() == pytest.approx(0.025)
    assert shifted["bbox_giou"].item() == pytest.approx(2 / 3, abs=1e-5)
    empty = box_regression_losses(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4))
    assert empty["bbox_l1"].item() == 0.0


def test_accuracy_at_iou_threshold() -> None:
    gt = {1: [0, 0, 10, 10], 2: [0, 0, 10, 10], 3: [0, 0, 10, 10]}
    pred = {1: [0, 0, 10, 10], 2: [0, 0, 10, 5], 3: [0, 0, 10, 4.9]}  # IoU 1, 0.5, 0.49
    out = accuracy_at_iou(pred, gt, 0.5)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["mean_iou"] == pytest.approx((1 + 0.5 + 0.49) / 3)
    with pytest.raises(ValueError, match="no prediction"):
        accuracy_at_iou({1: [0, 0, 1, 1]}, gt)


# ------------------------------------------------------------------------- recalls


def test_recall_at_k_on_a_hand_made_similarity_matrix() -> None:
    # 3 images, 6 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = torch.tensor([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: caption 1 first -> rank 0 (either caption counts)
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # image 1: first own caption (2) at rank 2
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: own captions last -> rank 4
    ])  # fmt: skip
    t2i = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0], [1.0, 0, 0]])
    img_ranks, txt_ranks = retrieval_ranks(i2t, t2i, txt2img)
    assert img_ranks.tolist() == [0, 2, 4]
    assert txt_ranks.tolist() == [0, 1, 0, 2, 0, 2]  # zero-score ties keep index order
    m = retrieval_metrics(i2t, t2i, txt2img)
    assert m["txt_r1"] == pytest.approx(1 / 3) and m["txt_r5"] == 1.0 and m["txt_r10"] == 1.0
    assert m["img_r1"] == pytest.approx(0.5) and m["img_r5"] == 1.0
    assert m["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 0.5 + 1 + 1) / 6)


def test_ties_are_broken_by_index_so_results_are_stable() -> None:
    i2t = torch.zeros(2, 2)
    m = retrieval_metrics(i2t, i2t.t(), [0, 1])
    assert m["txt_r1"] == 0.5 and m["img_r1"] == 0.5


# ------------------------------------------------------------------- ITM re-ranking


class StubModel(torch.nn.Module):
    """Images are one-hot 'colours'; ITC only sees a noisy copy, ITM sees the truth, so the
    re-ranking fixes what it is given in the top k and nothing else."""

    def __init__(self, itc_noise: torch.Tensor):
        super().__init__()
        self.itc_noise = itc_noise  # (T, E) added to the text features

    def embed_image(self, pixel_values: torch.Tensor):
        from vlpipe.models.xvlm import VisualBatch

        colour = pixel_values[:, :, 0, 0]  # (B, 3) one-hot
        return VisualBatch(colour[:, None, :], torch.ones(len(colour), 1, dtype=torch.bool), colour)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from vlpipe.models.xvlm import TextBatch

        colour = torch.nn.functional.one_hot(input_ids[:, 1] - 10, 3).float()  # token 10+c names colour c
        noisy = colour + self.itc_noise[input_ids[:, 2] - 20]  # token 20+t: caption number t
        return TextBatch(input_ids, attention_mask, colour[:, None, :], noisy)

    def clamped_temp(self) -> torch.Tensor:
        return torch.tensor(1.0)

    def match_logits(self, visual, text, rows=None) -> torch.Tensor:
        tokens = visual.tokens if rows is None else visual.tokens[rows]
        agree = (tokens[:, 0] * text.hidden[:, 0]).sum(-1)  # 1 when colours match
        return torch.stack([torch.zeros_like(agree), 10 * agree], dim=-1)


class StubTokenizer:
    def __call__(self, texts, **kwargs):
        ids = torch.tensor([[2, 10 + int(t.split()[0]), 20 + int(t.split()[1]), 3] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_itm_rescores_the_top_k_only() -> None:
    from vlpipe.tasks.retrieval import RetrievalSplit, rank_split, split_metrics

    split = RetrievalSplit(images=["a", "b", "c"], texts=["0 0", "1 1", "2 2"], txt2img=[0, 1, 2])
    noise = torch.zeros(3, 3)
    noise[0] = torch.tensor([-1.0, 2.0, 0.5])  # caption 0 looks like colour 1 to ITC (rank 2 for image 0)
    colours = {"a": 0, "b": 1, "c": 2}

    def visual(ids):
        px = torch.zeros(len(ids), 3, 2, 2)
        for i, img in enumerate(ids):
            px[i, colours[img]] = 1.0
        return {"pixel_values": px}

    model = StubModel(noise)
    itc_only = split_metrics(rank_split(model, split, visual, StubTokenizer(), max_length=4, batch_size=2, k=0), split)
    assert itc_only["img_r1"] < 1.0
    wide = rank_split(model, split, visual, StubTokenizer(), max_length=4, batch_size=2, k=3)
    assert split_metrics(wide, split)["r_mean"] == 1.0  # every true pair is in the top 3: ITM fixes it
    narrow = rank_split(model, split, visual, StubTokenizer(), max_length=4, batch_size=2, k=1)
    # text 0's top-1 image by ITC is b; ITM scores that single candidate but cannot promote a
    assert narrow["t2i"][0].argmax().item() == 1
    assert narrow["t2i"][0, 1] > narrow["t2i"][0, 0]


def test_ranking_file_round_trip(tmp_path: Path) -> None:
    from vlpipe.tasks.retrieval import RetrievalSplit, score_ranking, write_ranking

    g = torch.Generator().manual_seed(0)
    split = RetrievalSplit(images=[f"im{i}" for i in range(12)], texts=[f"t{t}" for t in range(24)],
                           txt2img=[t // 2 for t in range(24)])  # fmt: skip
    scores = {"i2t": torch.randn(12, 24, generator=g), "t2i": torch.randn(24, 12, generator=g)}
    write_ranking(tmp_path / "rank.json", scores, split)
    assert score_ranking(tmp_path / "rank.json", split) == retrieval_metrics(scores["i2t"], scores["t2i"], split.txt2img)
    write_json(tmp_path / "bad.json", {"i2t": {}, "t2i": []})
    with pytest.raises(InputError, match="bad.json"):
        score_ranking(tmp_path / "bad.json", split)


# ------------------------------------------------------------------------- fixtures


def _write_image(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((32, 48, 3), value, dtype=np.uint8))


@pytest.fixture
def refcoco_world(tmp_path: Path) -> Path:
    """Two 48x32 images, refs in every split, hidden test boxes."""
    world = tmp_path / "world"
    for name in ("world_train_000000", "world_val_000000", "world_test_000000"):
        _write_image(world / "images" / f"{name}.png")
    rec = {"image": "images/world_train_000000.png", "text": "the red circle", "ref_id": 0, "bbox": [12, 8, 24, 16]}
    write_json(world / "refcoco/train.json", [rec])
    write_json(world / "refcoco/val.json", [rec | {"image": "images/world_val_000000.png", "ref_id": 1}])
    test = {"image": "images/world_test_000000.png", "text": "the blue star"}
    write_json(world / "refcoco/testA.json", [test | {"ref_id": 2}])
    write_json(world / "refcoco/testB.json", [test | {"ref_id": 3}, test | {"ref_id": 4}])
    write_json(world / "hidden/refcoco_testA.json", {"2": [0, 0, 10, 10]})
    write_json(world / "hidden/refcoco_testB.json", {"3": [0, 0, 10, 10], "4": [20, 20, 10, 10]})
    return world


def test_refcoco_targets_are_normalised_and_predictions_come_back_in_pixels(refcoco_world: Path) -> None:
    from vlpipe.tasks.refcoco import RefcocoTask

    task = RefcocoTask(refcoco_world)
    train = task.examples("train")
    # box [12, 8, 24, 16] in a 48x32 image: centre (24, 16) -> (0.5, 0.5), size (0.5, 0.5)
    assert task.targets(train).tolist() == [[0.5, 0.5, 0.5, 0.5]]
    preds = task.predict(task.targets(train), train)
    assert preds == {0: [12.0, 8.0, 24.0, 16.0]}
    assert task.metric({1: [12, 8, 24, 16]}, "val")["accuracy"] == 1.0
    assert [ex.key for ex in task.examples("test")] == [2, 3, 4]
    losses = task.loss(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), task.targets(train))
    assert losses["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_refcoco_submission_is_scored_per_test_split(refcoco_world: Path, tmp_path: Path) -> None:
    from vlpipe.eval.leaderboard import score_submission
    from vlpipe.tasks.refcoco import RefcocoTask

    task = RefcocoTask(refcoco_world)
    preds = {2: [0, 0, 10, 10], 3: [0, 0, 10, 10], 4: [0, 0, 10, 10]}  # ref 4 is wrong
    path = task.write_submission(preds, tmp_path / "lb")
    scored = score_submission(task, path)["test"]
    assert scored["accuracy"] == pytest.approx(2 / 3)
    assert scored["testA"]["accuracy"] == 1.0 and scored["testB"]["accuracy"] == 0.5
    write_json(path, [{"ref_id": 2, "bbox": [0, 0, 0, 5]}])
    with pytest.raises(InputError, match="bbox"):
        task.read_submission(path)


def test_pixel_source_reads_resizes_and_reports_bad_images(tmp_path: Path) -> None:
    from vlpipe.stages.xvlm import PixelInputs

    _write_image(tmp_path / "images" / "a.png", value=255)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG truncated")
    source = PixelInputs(tmp_path, image_size=16)
    px = source(["a", "a"])["pixel_values"]
    assert px.shape == (2, 3, 16, 16) and torch.allclose(px, torch.ones_like(px))
    with pytest.raises(InputError, match="broken.png"):
        source(["broken"])
    with pytest.raises(InputError, match="missing.png"):
        source(["missing"])


# ---------------------------------------------------------------------- the stages


def _tokenizer(world: Path, out: Path) -> None:
    """A WordPiece tokenizer of the world's training text (as the tokenizer stage writes one)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from vlpipe.data.tokenizer import SPECIAL_TOKENS, training_corpus

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(list(training_corpus(world)), vocab_size=200, special_tokens=SPECIAL_TOKENS,
                           show_progress=False)  # fmt: skip
    out.mkdir(parents=True)
    BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out))  # fmt: skip


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlpipe.config import WorldParams
    from vlpipe.data.world import generate_world

    root = tmp_path_factory.mktemp("xvlm_root")
    (root / "data/world").mkdir(parents=True)
    params = WorldParams.model_validate({"scene": {"n_train": 24, "n_val": 8, "n_test": 8},
                                         "text": {"nlvr2_sentences": {"train": 6, "val": 3, "test": 3}}})  # fmt: skip
    generate_world(params, root / "data/world")
    _tokenizer(root / "data/world", root / "data/tokenizer")
    return root


def test_stages_pretrain_finetune_and_submit_on_a_tiny_world(tiny_root: Path) -> None:
    from vlpipe.config import TrainParams, XvlmFinetuneParams, XvlmModelParams, XvlmPretrainParams
    from vlpipe.stages import xvlm as stage

    model = XvlmModelParams(vision_hidden_size=16, vision_layers=1, vision_heads=2, vision_intermediate_size=32,
                            hidden_size=16, num_attention_heads=2, intermediate_size=32, text_layers=1,
                            fusion_layers=1, embed_dim=8)  # fmt: skip
    train = TrainParams(max_steps=2, batch_size=4, log_every=1)
    pre = stage.pretrain(XvlmPretrainParams(model=model, train=train, val_max_images=4), tiny_root)
    assert {"itc_r_mean", "loss_itc", "loss_bbox_giou", "loss_mlm"} <= set(pre["val"])
    weights = tiny_root / "models/pretrained/xvlm/model.safetensors"
    first = weights.read_bytes()
    assert not (tiny_root / "runs/pretrain-xvlm/checkpoints").exists()
    again = stage.pretrain(XvlmPretrainParams(model=model, train=train, val_max_images=4), tiny_root)
    assert weights.read_bytes() == first and again["val"] == pre["val"]  # same seed, same bytes
    for task in ("retrieval", "refcoco", "nlvr2"):
        p = XvlmFinetuneParams(task=task, train=train, k_test=3, flip_images=task == "nlvr2", own_frame=task == "nlvr2")
        val = stage.finetune(f"xvlm-{task}", p, tiny_root)["val"]
        test = stage.submit(f"xvlm-{task}", p, tiny_root)["test"]
        key = {"retrieval": "r_mean", "refcoco": "accuracy", "nlvr2": "accuracy"}[task]
        assert 0.0 <= val[key] <= 1.0 and 0.0 <= test[key] <= 1.0
    assert (tiny_root / "leaderboard/xvlm-retrieval/test_rank.json").is_file()
    # the NLVR2 model records that it reads its rows from their own side; submit with params
    # that say otherwise would feed it sentences it was not trained on, and is refused
    assert read_json(tiny_root / "models/finetuned/xvlm-nlvr2/task.json")["own_frame"] is True
    with pytest.raises(InputError, match="own_frame"):
        stage.submit("xvlm-nlvr2", XvlmFinetuneParams(task="nlvr2", own_frame=False), tiny_root)
    assert {"testA", "testB"} <= set(stage.submit("xvlm-refcoco", XvlmFinetuneParams(task="refcoco"), tiny_root)["test"])


def _tiny_vqa_model(root: Path) -> TrainParams:
    """Pre-train a tiny X-VLM on ``root``'s world (once) and fine-tune it on VQA at
    ``models/finetuned/xvlm-vqa`` (NLVR2's start); returns the tiny training settings."""
    from vlpipe.config import TrainParams, XvlmFinetuneParams, XvlmModelParams, XvlmPretrainParams
    from vlpipe.stages import xvlm as stage

    model = XvlmModelParams(vision_hidden_size=16, vision_layers=1, vision_heads=2, vision_intermediate_size=32,
                            hidden_size=16, num_attention_heads=2, intermediate_size=32, text_layers=1,
                            fusion_layers=1, embed_dim=8)  # fmt: skip
    train = TrainParams(max_steps=2, batch_size=4, log_every=1)
    if not (root / "models/pretrained/xvlm").is_dir():
        stage.pretrain(XvlmPretrainParams(model=model, train=train, val_max_images=4), root)
    stage.finetune("xvlm-vqa", XvlmFinetuneParams(task="vqa", train=train), root)
    return train


def test_nlvr2_multitasked_with_vqa_logs_both_losses_and_saves_a_plain_nlvr2_model(tiny_root: Path) -> None:
    """``vqa_per_pair``: the stage trains NLVR2 with VQA questions beside it, logs both losses,
    and writes an NLVR2 task model that ``submit`` (and ``load_task_model``) read as any other."""
    from safetensors.torch import load_file

    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.stages import xvlm as stage

    train = _tiny_vqa_model(tiny_root)
    p = XvlmFinetuneParams(task="nlvr2", start_from="models/finetuned/xvlm-vqa", answer_features=True,
                           vqa_per_pair=2, train=train)  # fmt: skip
    metrics = stage.finetune("xvlm-nlvr2-mt", p, tiny_root)
    assert metrics["train"]["vqa_bce"] > 0 and metrics["train"]["nlvr2_ce"] > 0
    assert metrics["train"]["loss"] == pytest.approx(metrics["train"]["vqa_bce"] + metrics["train"]["nlvr2_ce"], rel=1e-5)
    saved = load_file(tiny_root / "models/finetuned/xvlm-nlvr2-mt/model.safetensors")
    assert not any(k.startswith("nlvr2.") for k in saved) and any(k.startswith("head.answers.") for k in saved)
    assert 0.0 <= stage.submit("xvlm-nlvr2-mt", p, tiny_root)["test"]["accuracy"] <= 1.0


def test_nlvr2_reading_options_are_recorded_loaded_and_checked_by_submit(tiny_root: Path) -> None:
    """``symmetric_head`` and ``own_clause_first``: the NLVR2 stage trains with them and records
    them in task.json, ``load_task_model`` rebuilds the head symmetric, and submit refuses params
    without either (the model would read pairs as it was not trained to)."""
    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.stages import xvlm as stage

    train = _tiny_vqa_model(tiny_root)
    p = XvlmFinetuneParams(task="nlvr2", start_from="models/finetuned/xvlm-vqa", answer_features=True,
                           own_frame=True, own_clause_first=True, pair_fusion="own", swap_sides=True,
                           symmetric_head=True, train=train)  # fmt: skip
    stage.finetune("xvlm-nlvr2-sym", p, tiny_root)
    model_dir = tiny_root / "models/finetuned/xvlm-nlvr2-sym"
    info = read_json(model_dir / "task.json")
    assert info["symmetric_head"] is True and info["own_clause_first"] is True
    assert stage.load_task_model(model_dir, stage.make_task("nlvr2", tiny_root / "data/world")).head.symmetric
    assert 0.0 <= stage.submit("xvlm-nlvr2-sym", p, tiny_root)["test"]["accuracy"] <= 1.0
    for name in ("symmetric_head", "own_clause_first"):
        with pytest.raises(InputError, match=name):
            stage.submit("xvlm-nlvr2-sym", p.model_copy(update={name: False}), tiny_root)


def test_vqa_with_the_vision_cache_trains_as_without_it(tiny_root: Path) -> None:
    """``vision_cache_mb``: the frozen image encoder's outputs come from the cache after the
    first epoch, and the run's losses and val metrics are the uncached run's."""
    from vlpipe.config import TrainParams, XvlmFinetuneParams
    from vlpipe.stages import xvlm as stage

    _tiny_vqa_model(tiny_root)  # the pre-trained model
    train = TrainParams(epochs=2, batch_size=8, log_every=1)  # 2 epochs: the second reads the cache
    runs = {mb: stage.finetune(f"xvlm-vqa-cache{mb}", XvlmFinetuneParams(task="vqa", train=train, freeze_vision=True,
                                                                         vision_cache_mb=mb), tiny_root)
            for mb in (0, 16)}  # fmt: skip
    for k, v in runs[0]["train"].items():
        if k not in ("grad_norm", "lr", "epoch"):
            assert runs[16]["train"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert runs[16]["val"] == pytest.approx(runs[0]["val"], abs=1e-6)
    assert "vision_cache" not in runs[0] and runs[16]["vision_cache"]["hit_rate"] > 0.4  # epoch 2 and val


def test_ema_decay_saves_the_averaged_weights(tiny_root: Path) -> None:
    """``ema_decay``: the stage trains as before but saves the average of its iterates; a decay
    near 0 averages nothing and gives the plain run's weights back."""
    from safetensors.torch import load_file

    from vlpipe.config import TrainParams, XvlmFinetuneParams, XvlmModelParams, XvlmPretrainParams
    from vlpipe.stages import xvlm as stage

    model = XvlmModelParams(vision_hidden_size=16, vision_layers=1, vision_heads=2, vision_intermediate_size=32,
                            hidden_size=16, num_attention_heads=2, intermediate_size=32, text_layers=1,
                            fusion_layers=1, embed_dim=8)  # fmt: skip
    train = TrainParams(max_steps=4, batch_size=4, log_every=1, lr=1e-3)
    if not (tiny_root / "models/pretrained/xvlm").is_dir():
        stage.pretrain(XvlmPretrainParams(model=model, train=TrainParams(max_steps=2, batch_size=4), val_max_images=4),
                       tiny_root)  # fmt: skip
    saved = {}
    for name, decay in (("plain", None), ("tiny", 1e-9), ("ema", 0.9)):
        stage.finetune(f"xvlm-vqa-{name}", XvlmFinetuneParams(task="vqa", train=train, ema_decay=decay), tiny_root)
        saved[name] = load_file(tiny_root / f"models/finetuned/xvlm-vqa-{name}/model.safetensors")
    assert saved["plain"].keys() == saved["ema"].keys()
    for k in saved["plain"]:
        assert torch.allclose(saved["plain"][k], saved["tiny"][k], atol=1e-6), k
    moved = [k for k in saved["plain"] if not torch.allclose(saved["plain"][k], saved["ema"][k], atol=1e-6)]
    assert any(k.startswith("head.") for k in moved) and any(k.startswith("encoder.bert.") for k in moved)
    assert stage.submit("xvlm-vqa-ema", XvlmFinetuneParams(task="vqa", ema_decay=0.9), tiny_root)["test"]


def test_flipped_collate_mirrors_each_image_on_its_own_coin() -> None:
    """``flip_images``: every row's image is either itself or its left-right mirror, rows flip
    independently, the text and targets stay, and a seeded torch RNG gives the same flips."""
    from vlpipe.stages.xvlm import with_flips

    pixels = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).reshape(64, 3, 4, 4)

    def collate(batch: list) -> dict:
        return {"inputs": {"input_ids": torch.ones(64, 5), "pixel_values": pixels.clone()}, "targets": torch.ones(32)}

    torch.manual_seed(0)
    out = with_flips(collate)([None] * 32)
    got = out["inputs"]["pixel_values"]
    same = (got == pixels).flatten(1).all(1)
    mirrored = (got == pixels.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 16 < int(mirrored.sum()) < 48
    assert torch.equal(out["inputs"]["input_ids"], torch.ones(64, 5)) and torch.equal(out["targets"], torch.ones(32))
    torch.manual_seed(0)
    assert torch.equal(with_flips(collate)([None] * 32)["inputs"]["pixel_values"], got)


def test_flip_images_is_refused_outside_nlvr2() -> None:
    from pydantic import ValidationError

    from vlpipe.config import XvlmFinetuneParams

    with pytest.raises(ValidationError, match="flip_images is for NLVR2 only"):
        XvlmFinetuneParams(task="vqa", flip_images=True)
