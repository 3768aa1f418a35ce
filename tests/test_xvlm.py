"""X-VLM model: ITC positives and cross-process gathering, hard negatives, patch-in-box pooling,
whole-word masking, named losses, the task encoder, local weights and save/load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from vlpipe.config import XvlmModelParams
from vlpipe.errors import InputError
from vlpipe.models.xvlm import (
    IGNORE_INDEX,
    PatchBoxHead,
    WholeWordMasker,
    Xvlm,
    XvlmEncoder,
    XvlmGrounder,
    build_xvlm,
    itc_loss,
    itc_targets,
    load_text_weights,
    load_xvlm,
    patches_in_boxes,
    region_tokens,
    sample_hard_negatives,
    save_xvlm,
    whole_word_mask,
)

VOCAB, B, L, LR = 40, 6, 9, 5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_params(**kw) -> XvlmModelParams:
    sizes = dict(image_size=16, patch_size=4, vision_hidden_size=16, vision_layers=1, vision_heads=2,
                 vision_intermediate_size=32, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                 text_layers=1, fusion_layers=1, embed_dim=8, max_text_length=12, max_position_embeddings=16)  # fmt: skip
    return XvlmModelParams(**(sizes | kw))


def tiny_model(seed: int = 0, **kw) -> Xvlm:
    torch.manual_seed(seed)
    return build_xvlm(tiny_params(**kw), vocab_size=VOCAB)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    region = torch.randint(5, VOCAB, (B, LR), generator=g)
    region[:, 0], region[:, -1] = 2, 3
    masked, labels = whole_word_mask(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(VOCAB, dtype=torch.bool),
                                     mask_token_id=4, vocab_size=VOCAB, prob=0.4, generator=g)  # fmt: skip
    return {
        "pixel_values": torch.randn(B, 3, 16, 16, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones(B, L, dtype=torch.long),
        "image_ids": torch.tensor([0, 0, 1, 2, 3, 4]),  # two captions of image 0
        "mlm_input_ids": masked,
        "mlm_labels": labels,
        "region_boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4]] * B),
        "region_input_ids": region,
        "region_attention_mask": torch.ones(B, LR, dtype=torch.long),
        "region_ids": torch.arange(B),
    }


# ------------------------------------------------------------------------------ ITC


def test_itc_targets_treat_every_pair_of_the_same_image_as_positive() -> None:
    ids = torch.tensor([7, 7, 3, 7])
    t = itc_targets(ids, ids)
    assert torch.equal(t[0], torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]))
    assert torch.equal(t[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(t.sum(1), torch.ones(4))


def test_itc_loss_matches_a_hand_written_soft_target_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2])
    temp = torch.tensor(0.1)
    got = itc_loss(img, txt, ids, temp)
    sim = img @ txt.t() / temp
    pos = (ids[:, None] == ids[None, :]).float()
    manual = 0.0
    for s in (sim, sim.t()):  # rows 0 and 1 each put half their target on columns 0 and 1
        manual = manual - ((F.log_softmax(s, 1) * pos).sum(1) / pos.sum(1)).mean() / 2
    assert torch.allclose(got, manual)
    # A caption of the same image is not a negative: matching both captions perfectly is optimal.
    perfect = F.normalize(torch.eye(5)[[0, 0, 1, 2]], dim=-1)
    assert itc_loss(perfect, perfect, ids, torch.tensor(0.01)) < 0.7  # log(2) per row of image 0 at most


TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from vlpipe.models.xvlm import itc_loss
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    img_all = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt_all = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    ids_all = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])  # positives across the two halves too
    per = 8 // world
    rows = slice(rank * per, (rank + 1) * per)
    img = img_all[rows].clone().requires_grad_(True)
    txt = txt_all[rows].clone().requires_grad_(True)
    loss = itc_loss(img, txt, ids_all[rows], torch.tensor(0.07))
    loss.backward()
    # what DDP does: average losses and gradients over processes
    mean = loss.detach().clone(); dist.all_reduce(mean); mean /= world
    grads = [torch.cat([img.grad, txt.grad], 1) / world]
    out = [torch.zeros_like(grads[0]) for _ in range(world)]
    dist.all_gather(out, grads[0])
    if rank == 0:
        json.dump({"loss": mean.item(), "grad": torch.cat(out).tolist()}, open(sys.argv[1], "w"))
    dist.barrier()  # leave together: a rank tearing gloo down alone can abort the other
    dist.destroy_process_group()
    """
)


def test_itc_under_torchrun_equals_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    script, result = tmp_path / "itc_ddp.py", tmp_path / "result.json"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(result)]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(result.read_text())

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_(True)
    loss = itc_loss(img, txt, torch.tensor([0, 0, 1, 2, 3, 3, 3, 4]), torch.tensor(0.07))
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(torch.tensor(got["grad"]), torch.cat([img.grad, txt.grad], 1), atol=1e-6)


# --------------------------------------------------------------------- hard negatives


def test_hard_negatives_never_pick_a_positive_and_flag_rows_without_negatives() -> None:
    ids = torch.tensor([0, 0, 1, 1, 2, 3])
    sim = torch.full((6, 6), -50.0)
    same = ids[:, None] == ids[None, :]
    sim[same] = 50.0  # positives are overwhelmingly the most similar
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg, valid = sample_hard_negatives(sim, ids, gen)
        assert valid.all()
        assert not (ids[neg] == ids).any()
    lonely = torch.tensor([5, 5, 5])  # every column is the same image: no negative exists
    neg, valid = sample_hard_negatives(torch.zeros(3, 3), lonely, gen)
    assert not valid.any()


def test_hard_negatives_follow_the_similarity() -> None:
    ids = torch.arange(4)
    sim = torch.zeros(4, 4)
    sim[0, 3] = 8.0  # for row 0, column 3 is by far the hardest negative
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_hard_negatives(sim, ids, gen)[0][0] for _ in range(100)])
    assert (picks == 3).float().mean() > 0.9


# ----------------------------------------------------------------- patch-in-box pooling


def test_patches_in_box_are_those_whose_centre_is_inside() -> None:
    # grid 4: patch centres at 0.125, 0.375, 0.625, 0.875; the box covers x, y in [0, 0.5]
    inside = patches_in_boxes(torch.tensor([[0.25, 0.25, 0.5, 0.5]]), grid=4)
    assert inside.nonzero()[:, 1].tolist() == [0, 1, 4, 5]
    # bottom-right strip: x in [0.5, 1], y in [0.75, 1]
    inside = patches_in_boxes(torch.tensor([[0.75, 0.875, 0.5, 0.25]]), grid=4)
    assert inside.nonzero()[:, 1].tolist() == [14, 15]
    # too small to hold a patch centre: the patch under the box centre
    inside = patches_in_boxes(torch.tensor([[0.55, 0.3, 0.02, 0.02]]), grid=4)
    assert inside.nonzero()[:, 1].tolist() == [6]


def test_region_token_is_the_mean_of_its_patches_and_only_they_stay_visible() -> None:
    tokens = torch.arange(17 * 2, dtype=torch.float32).view(1, 17, 2)  # 1 global + 16 patches
    reg, mask = region_tokens(tokens, torch.tensor([[0.25, 0.25, 0.5, 0.5]]), grid=4)
    patches = tokens[0, 1:][[0, 1, 4, 5]]
    assert torch.equal(reg[0, 0], patches.mean(0))
    assert torch.equal(reg[0, 1:], tokens[0, 1:])
    assert mask[0].nonzero()[:, 0].tolist() == [0, 1, 2, 5, 6]


def test_patch_box_head_centres_the_box_on_the_patch_the_text_points_at() -> None:
    head = PatchBoxHead(hidden=4, vision_width=4, grid=4)
    with torch.no_grad():
        for lin in (head.query, head.key):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    patches = torch.zeros(1, 16, 4)
    patches[0, 6, 0] = 10.0  # patch (row 1, col 2): centre (0.625, 0.375)
    box = head(torch.tensor([[10.0, 0, 0, 0]]), patches)[0]
    assert abs(box[0].item() - 0.625) <= 1 / 8 and abs(box[1].item() - 0.375) <= 1 / 8  # within half a patch
    assert 0 < box[2].item() < 1 and 0 < box[3].item() < 1
    with pytest.raises(ValueError, match="patch tokens"):
        head(torch.zeros(1, 4))


def test_grounder_predicts_normalised_boxes_and_learns_from_box_losses() -> None:
    from vlpipe.eval.boxes import box_regression_losses

    model = tiny_model()
    grounder = XvlmGrounder(XvlmEncoder(model), model.bbox_head)
    b = batch()
    inputs = {"input_ids": b["region_input_ids"], "attention_mask": b["region_attention_mask"],
              "pixel_values": b["pixel_values"]}  # fmt: skip
    boxes = grounder(inputs)
    assert boxes.shape == (B, 4) and ((boxes >= 0) & (boxes <= 1)).all()
    box_regression_losses(boxes, b["region_boxes"])["bbox_giou"].backward()
    assert model.bbox_head.query.weight.grad is not None
    assert model.vision.backbone.embeddings.patch_embeddings.projection.weight.grad is not None


# ------------------------------------------------------------------------- masking


def test_whole_word_masking_masks_every_piece_of_a_chosen_word() -> None:
    # vocab: 10 = "hex", 11 = "##agon"; the word hex ##agon is masked as a whole or not at all
    continuation = torch.zeros(20, dtype=torch.bool)
    continuation[11] = True
    ids = torch.tensor([[2, 10, 11, 5, 10, 11, 3]] * 200)
    maskable = torch.tensor([[0, 1, 1, 1, 1, 1, 0]] * 200, dtype=torch.bool)
    masked, labels = whole_word_mask(ids, maskable, continuation, mask_token_id=4, vocab_size=20, prob=0.5,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    chosen = labels != IGNORE_INDEX
    assert torch.equal(chosen[:, 1], chosen[:, 2]) and torch.equal(chosen[:, 4], chosen[:, 5])
    assert not chosen[:, 0].any() and not chosen[:, 6].any()
    assert 0.3 < chosen[:, 3].float().mean() < 0.7
    assert (masked[chosen] == 4).float().mean() > 0.6  # mostly [MASK] (80%)
    assert torch.equal(labels[chosen], ids[chosen])


def test_masker_never_masks_special_tokens_or_padding() -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "hex", "##agon"]
    masker = WholeWordMasker(vocab, special_ids=[0, 1, 2, 3, 4], mask_token_id=4, params=tiny_params(mlm_prob=1.0))
    ids = torch.tensor([[2, 5, 6, 7, 3, 0]])
    out = masker({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])})
    assert (out["mlm_labels"] != IGNORE_INDEX).tolist() == [[False, True, True, True, False, False]]
    assert torch.equal(out["input_ids"], ids)  # the clean ids stay for ITC / ITM


# --------------------------------------------------------------------------- model


def test_forward_gives_separate_named_losses_and_every_head_gets_a_gradient() -> None:
    model = tiny_model()
    out = model(**batch(), generator=torch.Generator().manual_seed(0))
    names = {"itc", "itm", "mlm", "itc_region", "itm_region", "bbox_l1", "bbox_giou", "loss"}
    assert set(out.losses) == names
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert torch.allclose(out.losses["loss"], sum(v for k, v in out.losses.items() if k != "loss"))
    assert out.boxes.shape == (B, 4) and ((out.boxes > 0) & (out.boxes < 1)).all()
    out.losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert model.temp.item() == pytest.approx(0.07)


def test_disabled_tasks_drop_their_losses_and_heads() -> None:
    model = tiny_model(task_mlm=False, task_bbox=False, task_region=False)
    assert not hasattr(model, "mlm_head") and not hasattr(model, "bbox_head")
    out = model(**batch())
    assert set(out.losses) == {"itc", "itm", "loss"}


def test_same_seed_gives_bitwise_identical_losses() -> None:
    a = tiny_model(seed=3)(**batch(), generator=torch.Generator().manual_seed(1)).losses
    b = tiny_model(seed=3)(**batch(), generator=torch.Generator().manual_seed(1)).losses
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_roundtrip_gives_the_same_outputs(tmp_path: Path) -> None:
    model = tiny_model().eval()
    save_xvlm(model, tmp_path / "m")
    loaded = load_xvlm(tmp_path / "m").eval()
    assert loaded.mlm_head.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        a = model(**batch(), generator=torch.Generator().manual_seed(0)).losses
        b = loaded(**batch(), generator=torch.Generator().manual_seed(0)).losses
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    save_xvlm(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="model.safetensors"):
        load_xvlm(tmp_path / "m")


# -------------------------------------------------------------------- task encoder


def test_encoder_gives_the_fused_cls() -> None:
    model = tiny_model().eval()
    enc = XvlmEncoder(model)
    b = batch()
    pooled = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    assert pooled.shape == (B, enc.hidden_size) and enc.max_text_length == 12
    image = model.embed_image(b["pixel_values"])
    text = model.embed_text(b["input_ids"], b["attention_mask"])
    assert torch.allclose(pooled, model.fused_cls(image, text))


def pair_model(pair_fusion: str, seed: int = 0) -> Xvlm:
    model = tiny_model(seed)
    model.config.pair_fusion = pair_fusion
    return model


@pytest.mark.parametrize("pair_fusion", ["concat", "twin"])
def test_nlvr2_rows_attend_to_both_images_of_their_pair(pair_fusion: str) -> None:
    enc = XvlmEncoder(pair_model(pair_fusion), num_images=2).eval()
    with torch.no_grad():
        if pair_fusion == "concat":
            enc.image_slot.normal_()
    b = batch()
    inputs = {"input_ids": b["input_ids"][:4], "attention_mask": b["attention_mask"][:4]}
    pixels = b["pixel_values"][:4]  # pairs (0, 1) and (2, 3)
    with torch.no_grad():
        base = enc(**inputs, pixel_values=pixels)
        changed = pixels.clone()
        changed[1] = torch.randn(3, 16, 16)  # only image 1 of the first pair
        other = enc(**inputs, pixel_values=changed)
    assert not torch.allclose(base[0], other[0])  # row 0 (sentence + image 0) sees image 1 too
    assert torch.equal(base[2:], other[2:])  # the other pair is untouched


def test_twin_fusion_starts_as_the_trained_cross_attention_and_keeps_the_two_reads_apart() -> None:
    """ALBEF's NLVR2 fusion: both branches are copies of the trained cross-attention and the
    merge starts as their mean, so a pair of two identical images reads exactly as one image
    did; its branches are separate parameters, and own / other enter different branches."""
    single = XvlmEncoder(tiny_model(seed=4)).eval()
    twin = XvlmEncoder(pair_model("twin", seed=4), num_images=2).eval()
    assert not hasattr(twin, "image_slot")
    block = twin.bert.encoder.layer[-1].crossattention
    assert block.self0.query.weight is not block.self1.query.weight
    b = batch()
    ids, mask = b["input_ids"][:4], b["attention_mask"][:4]
    pixels = b["pixel_values"][:4]
    same = pixels[[0, 0, 2, 2]]  # each pair shows one image twice
    with torch.no_grad():
        want = single(input_ids=ids, attention_mask=mask, pixel_values=same)
        got = twin(input_ids=ids, attention_mask=mask, pixel_values=same)
        assert torch.allclose(got, want, atol=1e-5)
        # Once the branches differ, which image is "own" matters: the two rows of a pair
        # (own, other) = (0, 1) and (1, 0) read the same sentence differently
        block.self1.value.weight.add_(torch.randn_like(block.self1.value.weight))
        rows = twin(input_ids=ids[[0, 0]], attention_mask=mask[[0, 0]], pixel_values=pixels[:2])
    assert not torch.allclose(rows[0], rows[1])
    assert {k for k in twin.state_dict() if "crossattention" in k} >= {
        "bert.encoder.layer.1.crossattention.self0.query.weight",
        "bert.encoder.layer.1.crossattention.self1.key.weight",
        "bert.encoder.layer.1.crossattention.output.dense0.weight",
        "bert.encoder.layer.1.crossattention.output.merge_layer.weight",
        "bert.encoder.layer.1.crossattention.output.LayerNorm.weight",
    }


def test_twin_nlvr2_model_starts_from_vqa_and_saves_and_loads(tmp_path: Path) -> None:
    """``pair_fusion: twin`` from the VQA model: both branches hold the VQA cross-attention; the
    saved task model records the choice in its config and loads back to the same outputs."""
    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.stages.xvlm import load_for_finetuning, load_task_model, save_task_model
    from vlpipe.tasks.base import TaskModel

    vqa = TaskModel(XvlmEncoder(tiny_model(seed=5)), torch.nn.Linear(16, 3), 1)
    save_task_model(vqa, XvlmFinetuneParams(task="vqa"), tmp_path / "models/finetuned/xvlm-vqa")
    p = XvlmFinetuneParams(task="nlvr2", start_from="models/finetuned/xvlm-vqa", pair_fusion="twin")
    enc = XvlmEncoder(load_for_finetuning(p, tmp_path), num_images=2)
    source = vqa.encoder.bert.encoder.layer[1].crossattention
    for branch in ("self0", "self1"):
        got = getattr(enc.bert.encoder.layer[1].crossattention, branch)
        assert torch.equal(got.value.weight, source.self.value.weight)

    class Pairs:  # the NLVR2 task's shape, for save / load
        name, num_images = "nlvr2", 2

        def build_head(self, hidden: int) -> torch.nn.Module:
            return torch.nn.Linear(2 * hidden, 2)

    model = TaskModel(enc, Pairs().build_head(16), 2).eval()
    save_task_model(model, p, tmp_path / "nlvr2")
    assert json.loads((tmp_path / "nlvr2/config.json").read_text())["pair_fusion"] == "twin"
    loaded = load_task_model(tmp_path / "nlvr2", Pairs())
    b = batch()
    inputs = {"input_ids": b["input_ids"][:4], "attention_mask": b["attention_mask"][:4],
              "pixel_values": b["pixel_values"][:4]}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))


def test_own_pair_fusion_rows_read_only_their_own_image() -> None:
    """``pair_fusion: own`` (LXMERT's NLVR2 rows): each row is exactly the one-image encoder's
    read of its sentence and its own image; the other image of the pair does not reach it."""
    single = XvlmEncoder(tiny_model(seed=6)).eval()
    own = XvlmEncoder(pair_model("own", seed=6), num_images=2).eval()
    assert not hasattr(own, "image_slot")
    b = batch()
    inputs = {"input_ids": b["input_ids"][:4], "attention_mask": b["attention_mask"][:4]}
    pixels = b["pixel_values"][:4]
    with torch.no_grad():
        base = own(**inputs, pixel_values=pixels)
        assert torch.allclose(base, single(**inputs, pixel_values=pixels), atol=1e-6)
        changed = pixels.clone()
        changed[1] = torch.randn(3, 16, 16)  # image 1 of the first pair
        other = own(**inputs, pixel_values=changed)
        states = own.fused_states(**inputs, pixel_values=changed)
    assert torch.equal(base[0], other[0])  # row 0 never reads image 1
    assert not torch.allclose(base[1], other[1])  # row 1 does: it is its own
    assert torch.allclose(states[:, 0], other, atol=1e-6)


def test_encoder_lr_scale_puts_text_and_fusion_at_their_own_rate_and_the_head_at_the_base() -> None:
    from vlpipe.config import TrainParams, XvlmFinetuneParams
    from vlpipe.stages.xvlm import encoder_lr_scales
    from vlpipe.tasks.base import TaskModel
    from vlpipe.train.optim import build_optimizer

    model = TaskModel(XvlmEncoder(pair_model("concat", seed=3), num_images=2), torch.nn.Linear(32, 2), 2)
    p = XvlmFinetuneParams(task="nlvr2", encoder_lr_scale=0.25, vision_lr_scale=0.1)
    opt = build_optimizer(model, TrainParams(lr=1e-3), encoder_lr_scales(p, "encoder."))
    rate = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    for name, q in model.named_parameters():
        want = 1e-4 if name.startswith("encoder.vision.") else 2.5e-4 if name.startswith("encoder.") else 1e-3
        assert rate[id(q)] == pytest.approx(want), name
    assert rate[id(model.encoder.image_slot)] == pytest.approx(2.5e-4)
    # With the image encoder at the base rate, it keeps the base rate (not the encoder's)
    only = XvlmFinetuneParams(task="nlvr2", encoder_lr_scale=0.25)
    opt = build_optimizer(model, TrainParams(lr=1e-3), encoder_lr_scales(only, "encoder."))
    rate = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    assert rate[id(next(model.encoder.vision.parameters()))] == pytest.approx(1e-3)
    assert rate[id(next(model.encoder.bert.parameters()))] == pytest.approx(2.5e-4)
    assert rate[id(model.head.weight)] == pytest.approx(1e-3)
    # Retrieval trains X-VLM itself: its text side at the scale, its heads at the base rate
    bare = tiny_model(seed=3)
    opt = build_optimizer(bare, TrainParams(lr=1e-3), encoder_lr_scales(XvlmFinetuneParams(task="retrieval", encoder_lr_scale=0.5), ""))
    rate = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    for name, q in bare.named_parameters():
        if q.requires_grad and name != "mlm_head.decoder.weight":
            assert rate[id(q)] == pytest.approx(5e-4 if name.startswith("bert.") else 1e-3), name
    assert encoder_lr_scales(XvlmFinetuneParams(task="vqa"), "encoder.") is None
    with pytest.raises(ValueError):
        XvlmFinetuneParams(task="vqa", encoder_lr_scale=1.5)


def test_an_unknown_pair_fusion_is_an_error() -> None:
    with pytest.raises(ValueError, match="pair_fusion"):
        XvlmEncoder(pair_model("sum"), num_images=2)


# ------------------------------------------------------------- backbones and weights


@pytest.mark.parametrize("kind", ["clip", "swin"])
def test_other_backbones_give_a_global_token_then_the_patch_grid(kind: str) -> None:
    extra = {"swin_depths": [1, 1], "swin_heads": [2, 4], "swin_window": 2} if kind == "swin" else {}
    model = tiny_model(vision_type=kind, **extra)
    tokens = model.vision(torch.randn(2, 3, 16, 16))
    assert tokens.shape == (2, 1 + model.vision.grid**2, model.vision.width)
    assert model.vision.grid == (2 if kind == "swin" else 4)
    out = model(**batch())
    assert torch.isfinite(out.losses["loss"])


def test_vision_weights_load_from_a_local_directory(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)  # fmt: skip
    torch.manual_seed(5)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    model = tiny_model(vision_init=str(tmp_path / "vit"))
    reference = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False)
    assert torch.equal(model.vision.backbone.embeddings.patch_embeddings.projection.weight,
                       reference.embeddings.patch_embeddings.projection.weight)  # fmt: skip
    with pytest.raises(InputError, match="vision_init"):
        tiny_model(vision_init=str(tmp_path / "missing"))


def test_hybrid_stem_loads_the_detector_backbone(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vlpipe.features.detector import Backbone

    torch.manual_seed(2)
    backbone = Backbone([4, 8])
    det = tmp_path / "detector"
    det.mkdir()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()} | {"head.weight": torch.zeros(1)}
    save_file(state, str(det / "model.safetensors"))
    (det / "config.json").write_text(json.dumps({"channels": [4, 8]}))
    model = tiny_model(vision_type="hybrid", vision_init=str(det))
    assert model.vision.grid == 4 and model.vision.image_size == 16  # 16 px / stride 4, one token per cell
    assert torch.equal(model.vision.stem.stages[1][0][0].weight, backbone.stages[1][0][0].weight)
    assert torch.isfinite(model(**batch()).losses["loss"])
    (det / "config.json").write_text(json.dumps({"channels": [4, 16]}))
    with pytest.raises(InputError, match="stem"):
        tiny_model(vision_type="hybrid", vision_init=str(det))


def test_hybrid_tokens_fold_the_first_stem_stage_onto_the_grid() -> None:
    """With stem_levels [0, -1] each token's input holds its cell's block of the first stage (which
    keeps colour) folded by space-to-depth (or its mean), beside the last stage; [-1] reads the
    last stage alone."""
    from vlpipe.models.xvlm import VisionEncoder, hybrid_vision_config, stem_token_channels

    captured: list[torch.Tensor] = []

    def token_inputs(levels: list[int], maps: list[torch.Tensor], pool: str = "fold") -> torch.Tensor:
        params = tiny_params(vision_type="hybrid", stem_channels=[4, 8], stem_levels=levels, stem_pool=pool)
        vision = VisionEncoder("hybrid", hybrid_vision_config(params))
        vision.stem.forward = lambda _px: maps  # the stem's maps are the test's input
        hook = vision.backbone.embeddings.patch_embeddings.register_forward_pre_hook(
            lambda _m, args: captured.append(args[0])
        )
        vision(torch.zeros(2, 3, 16, 16))
        hook.remove()
        return captured.pop()

    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]  # stride 2 and stride 4 of a 16 px image
    both = token_inputs([0, -1], maps)  # (B, 4 * 2 * 2 + 8, G, G)
    assert both.shape == (2, stem_token_channels([4, 8], [0, 1], "fold"), 4, 4) == (2, 24, 4, 4)
    assert torch.equal(both[:, 16:], maps[1])
    for i, j in [(0, 0), (1, 3), (3, 2)]:  # cell (i, j) covers first-stage pixels [2i, 2i + 2) x [2j, 2j + 2)
        block = maps[0][:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # (B, 4, 2, 2)
        assert torch.equal(both[:, :16, i, j], block.flatten(1))
    perturbed = [maps[0].clone(), maps[1]]
    perturbed[0][:, :, 0, 0] += 1.0  # first-stage pixel of cell (0, 0) only
    changed = (token_inputs([0, -1], perturbed) != both).any(dim=1)  # (B, G, G)
    assert changed[:, 0, 0].all() and changed.sum() == 2
    last_only = token_inputs([-1], maps)
    assert last_only.shape == (2, 8, 4, 4) and torch.equal(token_inputs([-1], perturbed), last_only)
    mean = token_inputs([0, -1], maps, pool="mean")  # the cell's average of the first stage instead
    assert mean.shape == (2, stem_token_channels([4, 8], [0, 1], "mean"), 4, 4) == (2, 12, 4, 4)
    assert torch.equal(mean[:, 4:], maps[1])
    assert torch.allclose(mean[:, :4, 1, 3], maps[0][:, :, 2:4, 6:8].mean(dim=(2, 3)))


def test_stem_levels_are_checked_and_old_hybrid_configs_read_the_last_stage() -> None:
    from pydantic import ValidationError

    from vlpipe.models.xvlm import VisionEncoder, hybrid_vision_config

    with pytest.raises(ValidationError, match="stem_levels"):
        tiny_params(vision_type="hybrid", stem_channels=[4, 8], stem_levels=[2])
    config = hybrid_vision_config(tiny_params(vision_type="hybrid", stem_channels=[4, 8], stem_levels=[-1, 0, 1]))
    assert config["stem_levels"] == [0, 1] and config["stem_pool"] == "mean" and config["num_channels"] == 4 + 8
    old = hybrid_vision_config(tiny_params(vision_type="hybrid", stem_channels=[4, 8], stem_levels=[-1]))
    del old["stem_levels"]  # a config saved before the field existed
    assert VisionEncoder("hybrid", old).stem_levels == [1]


def test_text_weights_load_from_a_bert_checkpoint(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(1)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    model = tiny_model()
    assert load_text_weights(model, tmp_path / "bert") > 0
    bert = BertModel.from_pretrained(tmp_path / "bert")
    state = bert.state_dict()
    assert torch.equal(model.bert.encoder.layer[1].attention.self.query.weight,
                       state["encoder.layer.1.attention.self.query.weight"])  # fmt: skip
    assert torch.equal(model.bert.encoder.layer[0].intermediate.weight, state["encoder.layer.0.intermediate.dense.weight"])
    assert model.mlm_head.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_finetuning_can_start_from_another_finetunings_encoder(tmp_path: Path) -> None:
    """``start_from: models/finetuned/xvlm-vqa``: NLVR2 starts from the VQA model's image and
    text encoders (its answer head is dropped); a refcoco start gets a fresh box head."""
    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.stages.xvlm import load_for_finetuning, save_task_model
    from vlpipe.tasks.base import TaskModel

    vqa = XvlmFinetuneParams(task="vqa")
    source = TaskModel(XvlmEncoder(tiny_model(seed=5)), torch.nn.Linear(16, 3), 1)
    save_task_model(source, vqa, tmp_path / "models/finetuned/xvlm-vqa")
    want = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    for task in ("nlvr2", "refcoco"):
        p = XvlmFinetuneParams(task=task, start_from="models/finetuned/xvlm-vqa")
        got = load_for_finetuning(p, tmp_path).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
        assert any(k.startswith("bbox_head.") for k in got) == (task == "refcoco")


def test_freeze_vision_trains_text_and_fusion_but_never_the_image_encoder(tmp_path: Path) -> None:
    from vlpipe.config import TrainParams, XvlmFinetuneParams
    from vlpipe.models.xvlm import write_xvlm_files
    from vlpipe.stages.xvlm import load_for_finetuning
    from vlpipe.train.optim import build_optimizer

    (tmp_path / "models/pretrained/xvlm").mkdir(parents=True)
    write_xvlm_files(tiny_model(seed=2), tmp_path / "models/pretrained/xvlm")
    for freeze in (True, False):
        model = load_for_finetuning(XvlmFinetuneParams(task="vqa", freeze_vision=freeze), tmp_path)
        enc = XvlmEncoder(model)
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        opt = build_optimizer(enc, TrainParams(lr=1e-2))
        b = batch()
        enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]).pow(2).sum().backward()
        opt.step()
        moved = {k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])}
        assert any(k.startswith("bert.") for k in moved)
        assert any(k.startswith("vision.") for k in moved) != freeze, sorted(moved)[:5]


def test_vision_lr_scale_puts_exactly_the_image_encoder_at_its_own_rate() -> None:
    from vlpipe.config import TrainParams, XvlmFinetuneParams
    from vlpipe.stages.xvlm import vision_lr_scales
    from vlpipe.tasks.base import TaskModel
    from vlpipe.train.optim import build_optimizer

    model = TaskModel(XvlmEncoder(tiny_model(seed=3)), torch.nn.Linear(16, 3), 1)
    p = XvlmFinetuneParams(task="vqa", vision_lr_scale=0.1)
    opt = build_optimizer(model, TrainParams(lr=1e-3), vision_lr_scales(p, "encoder.vision."))
    rate = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    for name, q in model.named_parameters():
        want = 1e-4 if name.startswith("encoder.vision.") else 1e-3
        assert rate[id(q)] == pytest.approx(want), name
    assert sum(n.startswith("encoder.vision.") for n, _ in model.named_parameters()) > 10
    # Frozen or at the base rate: no extra groups
    assert vision_lr_scales(XvlmFinetuneParams(task="vqa", vision_lr_scale=0.1, freeze_vision=True), "x") is None
    assert vision_lr_scales(XvlmFinetuneParams(task="vqa"), "x") is None
    with pytest.raises(ValueError):
        XvlmFinetuneParams(task="vqa", vision_lr_scale=0.0)


def test_answer_features_head_reads_the_vqa_models_answers_and_saves_and_loads(tmp_path: Path, tiny_world: Path) -> None:
    """``answer_features``: the NLVR2 classifier reads each row's answers from the VQA model's
    own head (copied with its weights), and the task model loads back to the same outputs."""
    from pydantic import ValidationError

    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.models.xvlm import AnswerFeatureHead
    from vlpipe.stages.xvlm import (
        answer_feature_head,
        load_for_finetuning,
        load_task_model,
        make_task,
        save_task_model,
    )
    from vlpipe.tasks.base import TaskModel

    (tmp_path / "data").mkdir()
    (tmp_path / "data/world").symlink_to(tiny_world)
    vqa_task = make_task("vqa", tmp_path / "data/world")
    hidden = tiny_params().hidden_size
    vqa = TaskModel(XvlmEncoder(tiny_model(seed=6)), vqa_task.build_head(hidden), 1).eval()
    save_task_model(vqa, XvlmFinetuneParams(task="vqa"), tmp_path / "models/finetuned/xvlm-vqa")
    p = XvlmFinetuneParams(task="nlvr2", start_from="models/finetuned/xvlm-vqa", answer_features=True)
    head = answer_feature_head(p, hidden, tmp_path)
    assert isinstance(head, AnswerFeatureHead)
    rows = torch.randn(4, hidden)
    with torch.no_grad():
        assert torch.equal(head.answers(rows), vqa.head(rows))  # the VQA model's answers, as trained
    enc = XvlmEncoder(load_for_finetuning(p, tmp_path), num_images=2)
    model = TaskModel(enc, head, 2).eval()
    b = batch()
    inputs = {"input_ids": b["input_ids"][:4], "attention_mask": b["attention_mask"][:4],
              "pixel_values": b["pixel_values"][:4]}  # fmt: skip
    with torch.no_grad():
        before = model(inputs)  # (2 pairs, 2)
        assert before.shape == (2, 2)
        # the classifier depends on the answers: change what the VQA head says, the logits move
        head.answers.logit_fc[-1].bias.add_(torch.randn(vqa_task.num_answers))
        assert not torch.allclose(model(inputs), before)
    nlvr2_task = make_task("nlvr2", tmp_path / "data/world")
    save_task_model(model, p, tmp_path / "nlvr2")
    assert json.loads((tmp_path / "nlvr2/task.json").read_text())["answer_features"] == vqa_task.num_answers
    loaded = load_task_model(tmp_path / "nlvr2", nlvr2_task)
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))
    # only from a VQA model, and only for NLVR2
    bad = XvlmFinetuneParams(task="nlvr2", start_from="nlvr2", answer_features=True)
    with pytest.raises(InputError, match="task.json"):
        answer_feature_head(bad, hidden, tmp_path)
    with pytest.raises(ValidationError, match="answer_features"):
        XvlmFinetuneParams(task="vqa", answer_features=True)


def test_symmetric_answer_features_head_ignores_the_row_order() -> None:
    """``symmetric_head``: the classifier's logits are the mean of its two reads (rows as given
    and swapped), so swapping a pair's rows leaves them unchanged; the same weights without the
    option read the rows in a fixed order, and a model trained either way loads either way."""
    from vlpipe.models.layers import AnswerHead
    from vlpipe.models.xvlm import AnswerFeatureHead

    torch.manual_seed(0)
    hidden, answers = 8, 5
    fixed = AnswerFeatureHead(AnswerHead(hidden, answers), hidden, answers).eval()
    sym = AnswerFeatureHead(AnswerHead(hidden, answers), hidden, answers, symmetric=True).eval()
    sym.load_state_dict(fixed.state_dict())  # no parameter of its own
    pooled = torch.randn(3, 2 * hidden)  # (B, 2H): rows (left, right)
    swapped = pooled.reshape(3, 2, hidden).flip(1).reshape(3, 2 * hidden)
    with torch.no_grad():
        assert not torch.allclose(fixed(pooled), fixed(swapped))  # a fixed-order read
        torch.testing.assert_close(sym(pooled), sym(swapped))
        torch.testing.assert_close(sym(pooled), (fixed(pooled) + fixed(swapped)) / 2)
    with pytest.raises(ValueError, match="two rows"):
        AnswerFeatureHead(AnswerHead(hidden, answers), hidden, answers, num_images=1, symmetric=True)


def test_symmetric_head_is_refused_where_the_rows_are_not_interchangeable() -> None:
    from pydantic import ValidationError

    from vlpipe.config import XvlmFinetuneParams

    ok = XvlmFinetuneParams(task="nlvr2", own_frame=True, answer_features=True, symmetric_head=True)
    assert ok.symmetric_head
    for bad in ({"own_frame": False, "answer_features": True}, {"own_frame": True, "answer_features": False},
                {"own_frame": True, "answer_features": True, "pair_head": "tokens"}):  # fmt: skip
        with pytest.raises(ValidationError, match="symmetric_head"):
            XvlmFinetuneParams(task="nlvr2", symmetric_head=True, **bad)
    with pytest.raises(ValidationError, match="symmetric_head"):
        XvlmFinetuneParams(task="vqa", symmetric_head=True)


def test_frozen_feature_cache_gives_the_modules_outputs_and_encodes_each_row_once() -> None:
    from vlpipe.models.xvlm import FrozenFeatureCache

    calls: list[int] = []

    def module(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x.flatten(1) * 2 + x.flatten(1).sum(1, keepdim=True)  # row-wise, (B, 6)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 2, 3, generator=g)
    cache = FrozenFeatureCache(module, max_bytes=10**6)
    first = images[[0, 1, 2, 1]]
    got = cache(first)
    assert calls == [3] and len(cache) == 3  # a repeated row is encoded once
    torch.testing.assert_close(got, module(first))
    second = images[[2, 3, 0, 4]]
    got = cache(second)
    assert calls[-1] == 2 and len(cache) == 5 and (cache.hits, cache.misses) == (3, 5)
    torch.testing.assert_close(got, module(second))
    n = len(calls)
    got = cache(images)
    assert len(calls) == n  # every row came from the cache
    torch.testing.assert_close(got, module(images))
    # at max_bytes it stops adding entries, and rows past the cap are computed every time
    small = FrozenFeatureCache(module, max_bytes=2 * 6 * 4)  # two rows of 6 float32
    torch.testing.assert_close(small(images), module(images))
    assert len(small) == 2 and small.nbytes == 48
    torch.testing.assert_close(small(images), module(images))


def test_cached_frozen_vision_reads_as_the_encoder_and_refuses_a_trainable_one() -> None:
    model = tiny_model(seed=3).train()  # train mode: the frozen encoder is used so in fine-tuning
    model.vision.requires_grad_(False)
    plain, cached = XvlmEncoder(model, num_images=2), XvlmEncoder(model, num_images=2)
    cached.cache_frozen_vision(10**7)
    b = batch()
    args = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "pixel_values": b["pixel_values"]}
    plain.eval(), cached.eval()  # text dropout off, so the two reads compare
    with torch.no_grad():
        torch.testing.assert_close(cached(**args), plain(**args))
        torch.testing.assert_close(cached(**args), plain(**args))  # from the cache
    assert cached.vision_cache is not None and cached.vision_cache.hits == B
    assert not any(k.startswith("vision_cache") for k in cached.state_dict())  # checkpoints unchanged
    with pytest.raises(ValueError, match="frozen image encoder"):
        XvlmEncoder(tiny_model(seed=3)).cache_frozen_vision(10**7)


def test_vision_cache_needs_a_frozen_image_encoder() -> None:
    from pydantic import ValidationError

    from vlpipe.config import XvlmFinetuneParams

    assert XvlmFinetuneParams(task="vqa", freeze_vision=True, vision_cache_mb=64).vision_cache_mb == 64
    with pytest.raises(ValidationError, match="vision_cache_mb"):
        XvlmFinetuneParams(task="vqa", freeze_vision=False, vision_cache_mb=64)


def test_single_image_rows_of_a_two_image_encoder_read_only_their_own_image() -> None:
    """``single_image``: a row of the NLVR2 encoder reads its image as the VQA encoder does."""
    model = tiny_model(seed=7).eval()
    pair, one = XvlmEncoder(model, num_images=2), XvlmEncoder(model, num_images=1)
    torch.nn.init.normal_(pair.image_slot)  # pairing would change the rows
    b = batch()
    args = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "pixel_values": b["pixel_values"]}
    with torch.no_grad():
        assert torch.equal(pair(**args, single_image=True), one(**args))
        assert not torch.allclose(pair(**args), one(**args))


def test_with_partners_brings_each_item_its_own_fixed_partners_and_covers_them_all() -> None:
    from vlpipe.data.examples import Example
    from vlpipe.stages.xvlm import WithPartners

    main = [Example(key=f"p{i}", img_ids=("a", "b"), sent="s", target=1) for i in range(5)]
    partners = [Example(key=i, img_ids=("a",), sent="q", target={}) for i in range(7)]
    data = WithPartners(main, partners, per_item=2, seed=0)
    assert len(data) == 5
    items = [data[i] for i in range(5)]
    assert [ex.key for ex, _ in items] == [f"p{i}" for i in range(5)]
    assert all(len(qs) == 2 for _, qs in items)
    keys = [q.key for _, qs in items for q in qs]  # 10 draws over 7 partners: every one, 3 twice
    assert set(keys) == set(range(7)) and len(keys) == 10
    assert [q.key for q in data[3][1]] == [q.key for q in WithPartners(main, partners, 2, seed=0)[3][1]]
    assert keys != [q.key for i in range(5) for q in WithPartners(main, partners, 2, seed=1)[i][1]]
    with pytest.raises(ValueError):
        WithPartners(main, partners, per_item=0, seed=0)
    with pytest.raises(ValueError):
        WithPartners(main, [], per_item=1, seed=0)


def test_nlvr2_with_vqa_trains_both_tasks_through_one_encoder_and_the_classifiers_vqa_head() -> None:
    """``vqa_per_pair``: VQA rows go through the shared encoder (own image only) and the VQA
    head that the NLVR2 classifier reads; both losses move the shared weights."""
    from pydantic import ValidationError

    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.models.layers import AnswerHead
    from vlpipe.models.xvlm import AnswerFeatureHead, Nlvr2WithVqa
    from vlpipe.tasks.base import TaskModel

    hidden, answers = tiny_params().hidden_size, 5
    model = tiny_model(seed=8)
    nlvr2 = TaskModel(XvlmEncoder(model, 2), AnswerFeatureHead(AnswerHead(hidden, answers), hidden, answers), 2)
    both = Nlvr2WithVqa(nlvr2).eval()
    b = batch()
    pairs = {"input_ids": b["input_ids"][:4], "attention_mask": b["attention_mask"][:4],
             "pixel_values": b["pixel_values"][:4]}  # fmt: skip
    questions = {"input_ids": b["input_ids"][4:], "attention_mask": b["attention_mask"][4:],
                 "pixel_values": b["pixel_values"][4:]}  # fmt: skip
    with torch.no_grad():
        pair_logits, vqa_logits = both(pairs, questions)
        assert torch.equal(pair_logits, nlvr2(pairs))  # (2, 2)
        assert torch.equal(vqa_logits, nlvr2.head.answers(XvlmEncoder(model, 1)(**questions)))  # (2, 5)
    assert vqa_logits.shape == (2, answers)
    # the VQA loss alone trains the shared text / fusion layers and the head the classifier reads
    both.train()
    both(pairs, questions)[1].pow(2).sum().backward()
    grads = {n for n, q in both.named_parameters() if q.grad is not None and q.grad.abs().sum() > 0}
    assert any(n.startswith("nlvr2.encoder.bert.") for n in grads)
    assert any(n.startswith("nlvr2.head.answers.") for n in grads)
    assert not any(n.startswith("nlvr2.head.classifier.") for n in grads)
    assert set(Nlvr2WithVqa(nlvr2).state_dict()) == {f"nlvr2.{k}" for k in nlvr2.state_dict()}
    with pytest.raises(ValueError, match="AnswerFeatureHead"):
        Nlvr2WithVqa(TaskModel(XvlmEncoder(model, 2), torch.nn.Linear(2 * hidden, 2), 2))
    with pytest.raises(ValidationError, match="answer_features"):
        XvlmFinetuneParams(task="nlvr2", vqa_per_pair=1)
    with pytest.raises(ValidationError, match="concat"):
        XvlmFinetuneParams(task="nlvr2", answer_features=True, vqa_per_pair=1, pair_fusion="twin")


def test_token_pair_head_reads_both_rows_word_by_word_and_saves_and_loads(tmp_path: Path, tiny_world: Path) -> None:
    """``pair_head: tokens``: the NLVR2 classifier reads the rows' fused token states (not only
    their [CLS]); padding does not reach it; the model saves and loads to the same outputs."""
    from pydantic import ValidationError

    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.models.xvlm import TokenPairHead, TokenPairModel
    from vlpipe.stages.xvlm import (
        load_for_finetuning,
        load_task_model,
        make_task,
        nlvr2_or_task_model,
        save_task_model,
    )
    from vlpipe.tasks.base import TaskModel

    (tmp_path / "data").mkdir()
    (tmp_path / "data/world").symlink_to(tiny_world)
    vqa_task, nlvr2_task = make_task("vqa", tmp_path / "data/world"), make_task("nlvr2", tmp_path / "data/world")
    hidden = tiny_params().hidden_size
    vqa = TaskModel(XvlmEncoder(tiny_model(seed=9)), vqa_task.build_head(hidden), 1).eval()
    save_task_model(vqa, XvlmFinetuneParams(task="vqa"), tmp_path / "models/finetuned/xvlm-vqa")
    p = XvlmFinetuneParams(task="nlvr2", start_from="models/finetuned/xvlm-vqa", answer_features=True,
                           pair_head="tokens", pair_head_layers=1)  # fmt: skip
    enc = XvlmEncoder(load_for_finetuning(p, tmp_path), num_images=2)
    model = nlvr2_or_task_model(p, nlvr2_task, enc, tmp_path).eval()
    assert isinstance(model, TokenPairModel) and isinstance(model.head, TokenPairHead)
    b = batch()
    mask = b["attention_mask"][:4].clone()
    mask[:, -3:] = 0  # the last three tokens are padding
    inputs = {"input_ids": b["input_ids"][:4], "attention_mask": mask, "pixel_values": b["pixel_values"][:4]}
    states = enc.fused_states(**inputs)  # (4, L, H)
    with torch.no_grad():
        assert torch.equal(states[:, 0], enc(**inputs))  # [CLS] is what the cls head reads
        out = model(inputs)  # (2 pairs, 2)
        assert out.shape == (2, 2)
        # a word's state in one row moves the logits; a padded position's state does not
        moved = states.clone()
        moved[0, 2] += 1.0
        assert not torch.allclose(model.head(moved, mask), model.head(states, mask))
        padded = states.clone()
        padded[0, -1] += 100.0
        assert torch.allclose(model.head(padded, mask), model.head(states, mask), atol=1e-5)
        # the copied VQA head answers as the VQA model's does
        rows = torch.randn(3, hidden)
        assert torch.equal(model.head.answers(rows), vqa.head(rows))
    save_task_model(model, p, tmp_path / "nlvr2")
    info = json.loads((tmp_path / "nlvr2/task.json").read_text())
    assert info["pair_head"] == "tokens" and info["pair_head_layers"] == 1
    loaded = load_task_model(tmp_path / "nlvr2", nlvr2_task)
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))
    with pytest.raises(ValidationError, match="pair_head"):
        XvlmFinetuneParams(task="vqa", pair_head="tokens")
    with pytest.raises(ValidationError, match="pair_head"):
        XvlmFinetuneParams(task="nlvr2", pair_head="tokens", pair_fusion="twin")


def test_mark_sides_starts_the_right_sides_token_type_as_the_left_ones(tmp_path: Path) -> None:
    """``mark_sides``: the VQA model never saw token type 1, so NLVR2 starts it as a copy of type 0;
    at the start the right image's row then reads the sentence exactly as the VQA model would."""
    from vlpipe.config import XvlmFinetuneParams
    from vlpipe.stages.xvlm import load_for_finetuning, save_task_model
    from vlpipe.tasks.base import TaskModel

    vqa = TaskModel(XvlmEncoder(tiny_model(seed=7)), torch.nn.Linear(16, 3), 1)
    types = vqa.encoder.bert.embeddings.token_type_embeddings.weight
    assert not torch.equal(types[0], types[1])
    save_task_model(vqa, XvlmFinetuneParams(task="vqa"), tmp_path / "models/finetuned/xvlm-vqa")
    common = dict(task="nlvr2", start_from="models/finetuned/xvlm-vqa", pair_fusion="own")
    marked = load_for_finetuning(XvlmFinetuneParams(**common, mark_sides=True), tmp_path)
    plain = load_for_finetuning(XvlmFinetuneParams(**common), tmp_path)
    got = marked.bert.embeddings.token_type_embeddings.weight
    assert torch.equal(got[1], types[0]) and torch.equal(got[0], types[0])
    assert torch.equal(plain.bert.embeddings.token_type_embeddings.weight[1], types[1])
    enc = XvlmEncoder(marked, num_images=2).eval()
    b = batch()
    inputs = {"input_ids": b["input_ids"][:4], "attention_mask": b["attention_mask"][:4],
              "pixel_values": b["pixel_values"][:4]}  # fmt: skip
    with torch.no_grad():
        zeros = enc(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]))
        sides = enc(**inputs, token_type_ids=torch.arange(4).remainder(2)[:, None].expand_as(inputs["input_ids"]))
    assert torch.allclose(zeros, sides)
