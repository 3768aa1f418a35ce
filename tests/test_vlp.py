"""VLP: attention masks, losses, decoding (greedy / beam / cache), save/load, and the stages
(pre-training, captioning with SCST, submission, VQA) on a tiny world with random region features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from vlpipe.config import CaptionParams, FinetuneParams, TrainParams, VlpModelParams, VlpPretrainParams
from vlpipe.errors import InputError
from vlpipe.models.vlp import (
    IGNORE_INDEX,
    IncrementalDecoder,
    VlpEncoder,
    attention_allowed,
    beam_search,
    box_encoding,
    build_vlp,
    greedy_decode,
    load_vlp,
    mask_caption_batch,
    save_vlp,
    seq2seq_mask,
    strip_caption,
)

SPECIAL = {"pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4}
VOCAB, D, N = 40, 12, 5


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_model(seed: int = 0, std: float = 0.02, dropout: float = 0.1):
    torch.manual_seed(seed)
    params = VlpModelParams(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, num_layers=2, initializer_range=std,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, max_text_length=12,
        max_position_embeddings=16, standardize_features=False,
    )  # fmt: skip
    return build_vlp(params, vocab_size=VOCAB, visual_feat_dim=D, **SPECIAL)


def visual_batch(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, N, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(b, N, 2, generator=g) * 0.4], dim=-1)  # (B, N, 4)
    return torch.randn(b, N, D, generator=g), box_encoding(boxes, torch.rand(b, N, generator=g))


def text_batch(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] [PAD].. with different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, 9, dtype=torch.long)
    for i in range(b):
        n = 4 + i % 4
        ids[i, 0], ids[i, n + 1] = 2, 3
        ids[i, 1 : n + 1] = torch.randint(5, VOCAB, (n,), generator=g)
    return ids, (ids != 0).long()


# --------------------------------------------------------------------------- params


def test_params_validation_and_presets():
    base = VlpModelParams.preset("base")
    assert (base.hidden_size, base.num_layers, base.num_attention_heads) == (768, 12, 12)
    assert VlpPretrainParams().s2s_prob == 0.75 and VlpPretrainParams().bi_prob == 0.25
    with pytest.raises(ValidationError, match="s2s_prob \\+ bi_prob must be 1"):
        VlpPretrainParams(s2s_prob=0.5, bi_prob=0.25)
    with pytest.raises(ValidationError, match="multiple of num_attention_heads"):
        VlpModelParams(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValidationError):
        CaptionParams.model_validate({"beam_sise": 2})


# --------------------------------------------------------------------------- masks


def test_seq2seq_mask_pattern():
    p, s = 4, 9  # image segment [CLS] r1 r2 [SEP], caption of 5 tokens
    m = seq2seq_mask(p, s)
    for q in range(s):
        for k in range(s):
            if q < p:  # image segment: sees only itself, never caption tokens
                assert m[q, k] == (k < p)
            else:  # caption position q sees the image segment and caption tokens <= q
                assert m[q, k] == (k < p or k <= q)
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, -2:] = False  # padding
    allowed = attention_allowed(torch.tensor([True, False]), valid, p)
    assert torch.equal(allowed[0], m)
    assert allowed[1, :, : s - 2].all() and not allowed[1, :, s - 2 :].any()  # bidirectional, minus padding


def test_model_obeys_the_masks():
    model = tiny_model(dropout=0.0).eval()
    feats, boxes = visual_batch(2)
    ids, att = text_batch(2)
    changed = ids.clone()
    changed[:, 3] = 7 if int(ids[0, 3]) != 7 else 8  # a caption token at text index 3
    for s2s_flag in (True, False):
        s2s = torch.full((2,), s2s_flag)
        a = model.bert(ids, att, feats, boxes, s2s=s2s)
        b = model.bert(changed, att, feats, boxes, s2s=s2s)
        p = N + 2
        same_image = torch.allclose(a[:, :p], b[:, :p])
        same_left = torch.allclose(a[:, p : p + 2], b[:, p : p + 2])  # text indices 1, 2
        assert same_image == same_left == s2s_flag
        assert not torch.allclose(a[:, p + 2 :], b[:, p + 2 :])  # the changed token and what follows


def test_losses_are_separate_and_masking_spares_cls_and_padding():
    model = tiny_model()
    feats, boxes = visual_batch(4)
    ids, att = text_batch(4)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_caption_batch(ids, att, mask_token_id=4, vocab_size=VOCAB, prob=0.5, generator=g)
    assert (labels[:, 0] == IGNORE_INDEX).all() and (labels[att == 0] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).sum() > 0
    s2s = torch.tensor([True, True, False, True])
    out = model(feats, boxes, masked, att, s2s=s2s, mlm_labels=labels)
    assert set(out.losses) == {"mlm_s2s", "mlm_bi", "loss"}
    assert out.mlm_logits.shape == (4, ids.shape[1], VOCAB) and out.pooled.shape == (4, 32)
    n_s2s, n_bi = (labels[s2s] != IGNORE_INDEX).sum(), (labels[~s2s] != IGNORE_INDEX).sum()
    mix = (out.losses["mlm_s2s"] * n_s2s + out.losses["mlm_bi"] * n_bi) / (n_s2s + n_bi)
    torch.testing.assert_close(out.losses["loss"], mix)
    only_s2s = model(feats, boxes, masked, att, s2s=torch.ones(4, dtype=torch.bool), mlm_labels=labels).losses
    assert only_s2s["mlm_bi"].item() == 0.0
    out.losses["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"


# ------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy_and_cache_changes_nothing(seed: int):
    # A wide init gives peaked, seed-dependent distributions, so the captions are non-trivial.
    model = tiny_model(seed, std=0.4, dropout=0.0).eval()
    feats, boxes = visual_batch(3, seed)
    greedy = greedy_decode(model, feats, boxes, max_length=8)
    greedy_ids = [strip_caption(r, 3) for r in greedy.tolist()]
    assert any(len(c) > 1 for c in greedy_ids)
    assert beam_search(model, feats, boxes, beam_size=1, max_length=8) == greedy_ids
    assert torch.equal(greedy_decode(model, feats, boxes, max_length=8, use_cache=False), greedy)
    beams = beam_search(model, feats, boxes, beam_size=3, max_length=8)
    assert beam_search(model, feats, boxes, beam_size=3, max_length=8, use_cache=False) == beams
    with pytest.raises(ValueError, match="position table"):
        greedy_decode(model, feats, boxes, max_length=15)  # 16 positions: [CLS], [SEP] and 14 caption tokens
    # cached and uncached logits agree step by step
    cached, plain = IncrementalDecoder(model, feats, boxes), IncrementalDecoder(model, feats, boxes, use_cache=False)
    for t in range(greedy.shape[1]):
        torch.testing.assert_close(cached.next_logits(), plain.next_logits(), rtol=1e-4, atol=1e-4)
        cached.push(greedy[:, t])
        plain.push(greedy[:, t])


def test_beam_search_finds_a_more_likely_caption_than_greedy():
    model = tiny_model(3, std=0.4, dropout=0.0).eval()
    with torch.no_grad():
        model.cls.predictions.bias[3] += 2.5  # make [SEP] likely, so captions end at different lengths
    feats, boxes = visual_batch(8, 3)
    max_length = 6

    def log_prob(captions: list[list[int]]) -> torch.Tensor:
        """Sum of log p of the generated tokens: the caption and its [SEP] unless cut at max_length."""
        rows = [c + [3] if len(c) < max_length else c for c in captions]
        tokens = torch.zeros(len(rows), max_length, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        lp = model(feats, boxes, caption_tokens=tokens).token_log_probs  # (B, T)
        return (lp * (torch.arange(max_length)[None] < torch.tensor([len(r) for r in rows])[:, None])).sum(1)

    greedy = beam_search(model, feats, boxes, beam_size=1, max_length=max_length)
    beams = beam_search(model, feats, boxes, beam_size=4, max_length=max_length)
    assert len({len(c) for c in greedy + beams}) > 1
    gain = log_prob(beams) - log_prob(greedy)
    assert (gain >= -1e-5).all() and (gain > 1e-3).any(), gain


def test_scored_captions_match_decoding_and_sampling_is_seeded():
    model = tiny_model(1, std=0.4, dropout=0.0).eval()
    feats, boxes = visual_batch(3, 1)
    tokens = greedy_decode(model, feats, boxes, max_length=7)
    dec, steps = IncrementalDecoder(model, feats, boxes), []
    for t in range(tokens.shape[1]):
        steps.append(dec.next_logits().float().log_softmax(-1).gather(1, tokens[:, t : t + 1]))
        dec.push(tokens[:, t])
    scored = model(feats, boxes, caption_tokens=tokens).token_log_probs  # (B, T), one pass
    torch.testing.assert_close(scored, torch.cat(steps, 1), rtol=1e-4, atol=1e-4)
    draw = [greedy_decode(model, feats, boxes, max_length=7, sample=True, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]  # fmt: skip
    assert torch.equal(draw[0], draw[1])


def test_save_load_roundtrip_and_bad_checkpoint(tmp_path: Path):
    model = tiny_model(std=0.2).eval()
    save_vlp(model, tmp_path / "vlp")
    assert sorted(p.name for p in (tmp_path / "vlp").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_vlp(tmp_path / "vlp").eval()
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    feats, boxes = visual_batch(2)
    assert torch.equal(greedy_decode(model, feats, boxes, max_length=6), greedy_decode(loaded, feats, boxes, max_length=6))
    (tmp_path / "vlp/model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="model.safetensors"):
        load_vlp(tmp_path / "vlp")


# ------------------------------------------------------------------ stages (tiny world)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/world (tiny), data/tokenizer (WordPiece on its text) and a region store of random features."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from conftest import deep_update, tiny_overrides
    from vlpipe.config import WorldParams
    from vlpipe.data.world import generate_world
    from vlpipe.features.store import write_region_store
    from vlpipe.io import atomic_dir, read_json

    root = tmp_path_factory.mktemp("vlp") / "repo"
    world_params = WorldParams.model_validate(deep_update(WorldParams().model_dump(mode="json"), tiny_overrides()["world"]))
    with atomic_dir(root / "data/world") as tmp:
        generate_world(world_params, tmp)
    world = root / "data/world"
    text = [s["raw"] for im in read_json(world / "karpathy/dataset_coco.json")["images"] for s in im["sentences"]]
    text += [r["sent"] for r in read_json(world / "vqa/train.json")]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(text, vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    tok.save_pretrained(str(root / "data/tokenizer"))
    rng = np.random.default_rng(0)
    ids = [i for split in read_json(world / "splits.json").values() for i in split]

    def record(img_id: str) -> dict:
        xy = rng.uniform(0, 40, (4, 2)).astype(np.float32)
        return {"img_id": img_id, "img_h": 64, "img_w": 64, "objects_id": rng.integers(0, 6, 4),
                "objects_conf": rng.uniform(0.2, 1, 4).astype(np.float32), "attrs_id": rng.integers(0, 8, 4),
                "attrs_conf": rng.uniform(0.2, 1, 4).astype(np.float32),
                "boxes": np.concatenate([xy, xy + 20], axis=1), "features": rng.normal(size=(4, 8)).astype(np.float32)}  # fmt: skip

    write_region_store(root / "data/features/region", (record(i) for i in ids), num_boxes=4, dim=8)
    return root


@pytest.fixture
def fake_meteor(monkeypatch: pytest.MonkeyPatch):
    """METEOR's Java start-up (a paraphrase table, ~10-30 s) is tested in test_caption_eval.py;
    the stage tests only check it is reported."""
    import pycocoevalcap.meteor.meteor as meteor_module

    class FakeMeteor:
        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            return 0.25, [0.25] * len(res)

    monkeypatch.setattr(meteor_module, "Meteor", FakeMeteor)


def tiny_train(**kw) -> TrainParams:
    return TrainParams(batch_size=16, checkpoint_every=1000, log_every=1, **kw)


def tiny_model_params() -> VlpModelParams:
    return VlpModelParams(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_layers=1)


def test_pretrain_caption_scst_and_submit_stages(tiny_root: Path, fake_meteor):
    from vlpipe.models.vlp import Vlp
    from vlpipe.stages.vlp import finetune_caption, pretrain_vlp, submit_caption

    pre = pretrain_vlp(VlpPretrainParams(model=tiny_model_params(), train=tiny_train(max_steps=3), eval_batch_size=64), tiny_root)
    assert set(pre["train"]) >= {"mlm_s2s", "mlm_bi", "loss"}
    assert set(pre["val"]) == {"loss_mlm_s2s", "loss_mlm_bi", "mlm_accuracy_s2s", "mlm_accuracy_bi"}
    out = tiny_root / "models/pretrained/vlp"
    assert {"config.json", "model.safetensors", "meta.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["visual_pos_dim"] == 6
    # Input statistics of the pre-training features travel with the model (standardize_features).
    assert len(config["visual_feat_mean"]) == len(config["visual_feat_std"]) == config["visual_feat_dim"]
    assert min(config["visual_feat_std"]) > 0
    assert not list((tiny_root / "models/pretrained").glob(".*")), "no temporary directory left behind"

    p = CaptionParams(train=tiny_train(max_steps=2), beam_size=2, max_length=6, eval_batch_size=8,
                      val_max_images=6, scst=True, scst_train=tiny_train(max_steps=1, lr=1e-4))  # fmt: skip
    metrics = finetune_caption(p, tiny_root)
    for part in ("val", "val_xe"):
        assert {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"} <= set(metrics[part])
    assert isinstance(metrics["val"]["SPICE"], str) and metrics["val"]["SPICE"].startswith("skipped")
    assert set(metrics["scst_train"]) >= {"scst", "reward_sample", "reward_greedy"}
    saved = json.loads((tiny_root / "metrics/finetune/vlp-caption.json").read_text())
    assert saved["val"]["images"] == 6
    model_dir = tiny_root / "models/finetuned/vlp-caption"
    results = json.loads((model_dir / "val_results.json").read_text())
    assert len(results) == 6 and all(isinstance(r["image_id"], int) for r in results)
    assert isinstance(load_vlp(model_dir), Vlp)

    board = submit_caption(p, tiny_root)
    path = tiny_root / "leaderboard/vlp-caption/captions_test_results.json"
    submitted = json.loads(path.read_text())
    assert len(submitted) == board["count"] == 16 and "CIDEr-D" in board["test"]
    assert json.loads((tiny_root / "metrics/leaderboard/vlp-caption.json").read_text())["count"] == 16


def test_pretraining_is_deterministic(tiny_root: Path, tmp_path: Path):
    import shutil

    from safetensors.torch import load_file

    from vlpipe.stages.vlp import pretrain_vlp

    weights = []
    for run in ("a", "b"):
        root = tmp_path / run
        shutil.copytree(tiny_root / "data", root / "data")
        pretrain_vlp(VlpPretrainParams(model=tiny_model_params(), train=tiny_train(max_steps=2), val_max_examples=16), root)
        weights.append(load_file(str(root / "models/pretrained/vlp/model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_vqa_with_the_vlp_encoder(tiny_root: Path):
    from vlpipe.data.tokenizer import load_tokenizer
    from vlpipe.stages.vlp import _visual, finetune_task, load_task_model, submit_task
    from vlpipe.tasks import GqaTask, VqaTask
    from vlpipe.tasks.base import make_collate

    if not (tiny_root / "models/pretrained/vlp").is_dir():
        from vlpipe.stages.vlp import pretrain_vlp

        pretrain_vlp(VlpPretrainParams(model=tiny_model_params(), train=tiny_train(max_steps=1)), tiny_root)
    p = FinetuneParams.model_construct(model="vlp", task="vqa", init="pretrained", train=tiny_train(max_steps=2),
                                       eval_batch_size=32)  # fmt: skip
    metrics = finetune_task("vlp-vqa", p.task, p.init, p.train, p.eval_batch_size, tiny_root)
    assert 0.0 <= metrics["val"]["overall"] <= 1.0 and metrics["steps"] == 2
    task = VqaTask(tiny_root / "data/world")
    model = load_task_model(tiny_root / "models/finetuned/vlp-vqa", task)
    assert isinstance(model.encoder, VlpEncoder) and model.encoder.hidden_size == 32
    collate = make_collate(task, load_tokenizer(tiny_root / "data/tokenizer"), _visual(tiny_root, model.encoder.config), 20)
    batch = collate(task.examples("val")[:3])
    assert batch["inputs"]["visual_pos"].shape[-1] == 6
    assert model(batch["inputs"]).shape == (3, task.num_answers)
    board = submit_task("vlp-vqa", "vqa", 32, tiny_root)
    assert (tiny_root / "leaderboard/vlp-vqa/test_predict.json").is_file() and board["count"] > 0
    with pytest.raises(InputError, match="not a VLP model fine-tuned for 'gqa'"):
        load_task_model(tiny_root / "models/finetuned/vlp-vqa", GqaTask(tiny_root / "data/world"))


def test_visual_input_is_standardised_with_the_models_statistics(tiny_root: Path) -> None:
    from types import SimpleNamespace

    from vlpipe.stages.vlp import _visual

    raw = _visual(tiny_root, SimpleNamespace(max_regions=4))
    img = sorted(raw.regions.store.ids)[0]
    feats = raw([img])["visual_feats"]  # (1, N, D)
    mean, std = [0.5] * feats.shape[-1], [2.0] * feats.shape[-1]
    standardised = _visual(tiny_root, SimpleNamespace(max_regions=4, visual_feat_mean=mean, visual_feat_std=std))
    out = standardised([img])["visual_feats"]
    assert torch.allclose(out, (feats - 0.5) / 2.0, atol=1e-6)
