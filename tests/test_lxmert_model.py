"""LXMERT model: heads, separate losses, masking recipe, save/load and HF compatibility."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from vlpipe.config import LxmertModelParams
from vlpipe.models.lxmert import (
    IGNORE_INDEX,
    build_lxmert,
    load_lxmert,
    mask_objects,
    mask_pretrain_batch,
    mask_tokens,
    masked_lm_loss,
    save_lxmert,
    swap_sentences,
)

SIZES = dict(
    vocab_size=60, visual_feat_dim=12, visual_pos_dim=4, num_object_labels=7, num_attr_labels=5, num_answers=9
)
SPECIAL = [0, 1, 2, 3]  # pad, cls, sep, mask
MASK_ID = 3
B, L, N = 6, 10, 5


def tiny_params(**kw) -> LxmertModelParams:
    kw.setdefault("standardize_features", False)  # raw features: no statistics needed
    return LxmertModelParams(hidden_size=32, num_attention_heads=2, intermediate_size=64, **kw)


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_lxmert(tiny_params(**kw), **SIZES)


def clean_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, SIZES["vocab_size"], (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    qa = torch.zeros(B, SIZES["num_answers"])
    qa[torch.arange(B), torch.randint(SIZES["num_answers"], (B,), generator=g)] = 1.0
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(B, L, dtype=torch.long),
        "token_type_ids": torch.zeros(B, L, dtype=torch.long),
        "visual_feats": torch.rand(B, N, SIZES["visual_feat_dim"], generator=g),
        "visual_pos": torch.rand(B, N, 4, generator=g),
        "obj_labels": torch.randint(SIZES["num_object_labels"], (B, N), generator=g),
        "obj_conf": torch.rand(B, N, generator=g),
        "attr_labels": torch.randint(SIZES["num_attr_labels"], (B, N), generator=g),
        "attr_conf": torch.rand(B, N, generator=g),
        "qa_targets": qa,
        "qa_valid": torch.ones(B, dtype=torch.bool),
    }


def pretrain_inputs(params: LxmertModelParams, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return mask_pretrain_batch(
        clean_batch(seed), params, mask_token_id=MASK_ID, special_token_ids=SPECIAL,
        vocab_size=SIZES["vocab_size"], generator=g,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")
    return {k: batch[k] for k in keys}


# --------------------------------------------------------------------------- params


def test_params_presets_and_validation():
    base = LxmertModelParams.preset("base")
    assert (base.hidden_size, base.num_attention_heads, base.intermediate_size) == (768, 12, 3072)
    assert (base.l_layers, base.x_layers, base.r_layers) == (9, 5, 5)
    tiny = LxmertModelParams()
    assert tiny.hidden_size <= 128 and (tiny.l_layers, tiny.x_layers, tiny.r_layers) == (1, 3, 1)
    assert tiny.visual_loss_weight == 6.67
    with pytest.raises(ValidationError, match="multiple of num_attention_heads"):
        LxmertModelParams(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValidationError, match="unknown|Extra"):
        LxmertModelParams.model_validate({"hidden_sise": 64})


# --------------------------------------------------------------------------- forward


def test_forward_shapes_and_separate_named_losses():
    params = tiny_params()
    model = tiny_model()
    inputs = pretrain_inputs(params)
    out = model(**inputs)
    assert out.mlm_logits.shape == (B, L, SIZES["vocab_size"])
    assert out.match_logits.shape == (B, 2)
    assert out.obj_logits.shape == (B, N, SIZES["num_object_labels"])
    assert out.attr_logits.shape == (B, N, SIZES["num_attr_labels"])
    assert out.feat_pred.shape == (B, N, SIZES["visual_feat_dim"])
    assert out.qa_logits.shape == (B, SIZES["num_answers"])
    assert out.pooled_output.shape == (B, 32)
    assert set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa", "loss"}
    parts = sum(v for k, v in out.losses.items() if k != "loss")
    torch.testing.assert_close(out.losses["loss"], parts)
    out.losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # the MLM decoder is tied to the word embeddings
    assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight


def test_visual_losses_are_scaled_and_confidence_weighted():
    inputs = pretrain_inputs(tiny_params())
    model = tiny_model().eval()
    scaled = model(**inputs).losses
    model.config.visual_loss_normalizer = 1.0
    plain = model(**inputs).losses
    for key in ("obj", "attr", "feat"):
        torch.testing.assert_close(scaled[key], 6.67 * plain[key])
    torch.testing.assert_close(scaled["mlm"], plain["mlm"])
    no_conf = model(**{**inputs, "obj_conf": torch.zeros(B, N)}).losses
    assert no_conf["obj"].item() == 0.0 and no_conf["attr"].item() > 0
    unmasked = model(**{**inputs, "feat_mask": torch.zeros(B, N)}).losses
    assert unmasked["obj"].item() == unmasked["attr"].item() == unmasked["feat"].item() == 0.0


def test_mlm_loss_only_on_masked_tokens():
    logits = torch.randn(2, 4, 11)
    labels = torch.full((2, 4), IGNORE_INDEX)
    assert masked_lm_loss(logits, labels).item() == 0.0
    labels[0, 1], labels[1, 3] = 5, 7
    expected = F.cross_entropy(torch.stack([logits[0, 1], logits[1, 3]]), torch.tensor([5, 7]))
    torch.testing.assert_close(masked_lm_loss(logits, labels), expected)


def test_qa_loss_only_on_matched_pairs():
    model = tiny_model().eval()
    inputs = pretrain_inputs(tiny_params())
    matched = inputs["matched_label"]
    assert 0 < matched.sum() < B  # the seed gives both kinds
    other_answers = inputs["qa_targets"].clone()
    other_answers[matched == 0] = torch.rand(int((matched == 0).sum()), SIZES["num_answers"])
    a = model(**inputs).losses["qa"]
    b = model(**{**inputs, "qa_targets": other_answers}).losses["qa"]
    assert a.item() == b.item()
    none = model(**{**inputs, "matched_label": torch.zeros(B, dtype=torch.long)}).losses["qa"]
    assert none.item() == 0.0
    bce = tiny_model(qa_loss="bce").eval()(**inputs).losses["qa"]
    assert bce.item() != a.item()


def test_same_seed_same_model_and_losses():
    params = tiny_params()
    a, b = tiny_model(seed=5), tiny_model(seed=5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    torch.manual_seed(0)
    la = a(**pretrain_inputs(params)).losses["loss"]
    torch.manual_seed(0)
    lb = b(**pretrain_inputs(params)).losses["loss"]
    assert torch.equal(la, lb)


# --------------------------------------------------------------------------- masking


def test_mask_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (400, 50), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # e.g. [CLS]
    masked, labels = mask_tokens(ids, maskable, mask_token_id=MASK_ID, vocab_size=1000, generator=g)
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    frac = chosen.float().mean().item()
    assert 0.14 < frac < 0.16
    as_mask = (masked[chosen] == MASK_ID).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < as_mask < 0.83 and 0.08 < kept < 0.12  # the other ~10% are random tokens


def test_mask_objects_80_10_10():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(200, 36, 8, generator=g) + 1.0  # no zero features by chance
    masked, feat_mask = mask_objects(feats, generator=g)
    chosen = feat_mask.bool()
    assert 0.13 < chosen.float().mean().item() < 0.17
    assert torch.equal(masked[~chosen], feats[~chosen])
    zero = (masked[chosen] == 0).all(-1).float().mean().item()
    kept = (masked[chosen] == feats[chosen]).all(-1).float().mean().item()
    assert 0.76 < zero < 0.84 and 0.07 < kept < 0.13
    swapped = chosen & ~(masked == 0).all(-1) & ~(masked == feats).all(-1)  # (B, N)
    b_idx, n_idx = swapped.nonzero(as_tuple=True)
    for b, n in zip(b_idx.tolist()[:20], n_idx.tolist()[:20], strict=True):
        source = (feats == masked[b, n]).all(-1).nonzero()  # where the feature came from
        assert len(source) == 1 and source[0, 0].item() != b  # from another image


def test_swap_sentences_half_and_consistent():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(1000)[:, None].expand(1000, 5)  # each row unique
    text, matched = swap_sentences({"input_ids": ids}, generator=g)
    assert 0.45 < matched.float().mean().item() < 0.55
    same = (text["input_ids"] == ids).all(-1)
    assert torch.equal(same, matched.bool())


def test_swap_sentences_only_among_the_sentences_that_take_part():
    # match_sources: captions (valid) are swapped only with each other; questions are never
    # swapped and carry no matching loss (-100), so QA still sees every question.
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(1000)[:, None].expand(1000, 5)
    valid = torch.arange(1000) % 3 == 0
    text, matched = swap_sentences({"input_ids": ids}, generator=g, valid=valid)
    assert (matched[~valid] == IGNORE_INDEX).all()
    assert torch.equal(text["input_ids"][~valid], ids[~valid])
    kept = matched[valid]
    assert 0.4 < kept.float().mean().item() < 0.6
    swapped_in = text["input_ids"][valid][kept == 0, 0]  # the foreign sentences' rows
    assert (swapped_in % 3 == 0).all() and not torch.equal(swapped_in, ids[valid][kept == 0, 0])
    # One or no valid example: nothing to swap with.
    _, matched = swap_sentences({"input_ids": ids[:4]}, generator=g, valid=torch.tensor([1, 0, 0, 0]).bool())
    assert matched.tolist() == [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_matching_loss_ignores_sentences_outside_the_task_and_qa_keeps_them():
    model = tiny_model().eval()
    params = tiny_params()
    batch = clean_batch(5)
    g = torch.Generator().manual_seed(2)
    kw = dict(mask_token_id=MASK_ID, special_token_ids=SPECIAL, vocab_size=SIZES["vocab_size"], generator=g)
    batch["match_valid"] = torch.tensor([True, True, True, False, False, False])
    inputs = mask_pretrain_batch(batch, params, **kw)
    assert "match_valid" not in inputs  # consumed, not a model input
    labels = inputs["matched_label"]
    assert (labels[3:] == IGNORE_INDEX).all()
    out = model(**inputs)
    want = F.cross_entropy(out.match_logits[:3], labels[:3])
    assert torch.allclose(out.losses["matched"], want)
    # No sentence takes part: a zero loss, still in the graph (every step logs the same keys).
    batch["match_valid"] = torch.zeros(B, dtype=torch.bool)
    out = model(**mask_pretrain_batch(batch, params, **kw))
    assert out.losses["matched"].item() == 0.0 and out.losses["matched"].requires_grad
    assert torch.isfinite(out.losses["qa"])


def test_mask_pretrain_batch_is_deterministic_and_keeps_targets():
    params = tiny_params()
    a, b = pretrain_inputs(params, seed=3), pretrain_inputs(params, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    clean = clean_batch(3)
    assert torch.equal(a["feat_targets"], clean["visual_feats"])
    specials = torch.isin(a["input_ids"], torch.tensor([0, 1, 2]))
    assert (a["mlm_labels"][specials] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------ save/load


def test_save_load_gives_identical_logits(tmp_path):
    model = tiny_model().eval()
    inputs = pretrain_inputs(tiny_params())
    save_lxmert(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_lxmert(tmp_path / "m").eval()
    a, b = model(**inputs), loaded(**inputs)
    for name in ("mlm_logits", "match_logits", "obj_logits", "attr_logits", "feat_pred", "qa_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert loaded.cls.predictions.decoder.weight is loaded.lxmert.embeddings.word_embeddings.weight


def test_compatible_with_transformers_lxmert_for_pretraining(tmp_path):
    from transformers import LxmertForPreTraining

    model = tiny_model().eval()
    inputs = encoder_inputs(pretrain_inputs(tiny_params()))
    ours = model(**inputs)
    # our directory loads into transformers' class ...
    save_lxmert(model, tmp_path / "ours")
    hf = LxmertForPreTraining.from_pretrained(tmp_path / "ours").eval()
    hf_out = hf(**inputs)
    assert torch.equal(hf_out.prediction_logits, ours.mlm_logits)
    assert torch.equal(hf_out.cross_relationship_score, ours.match_logits)
    assert torch.equal(hf_out.question_answering_score, ours.qa_logits)
    # ... and an HF directory (like a local unc-nlp/lxmert-base-uncased, .bin or safetensors) loads into ours
    hf.save_pretrained(tmp_path / "hf")
    back = load_lxmert(tmp_path / "hf").eval()
    assert torch.equal(back(**inputs).mlm_logits, ours.mlm_logits)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = load_lxmert(tmp_path / "bin").eval()
    assert torch.equal(from_bin(**inputs).qa_logits, ours.qa_logits)


def test_tiny_pretraining_run_lowers_every_loss(tmp_path):
    from vlpipe.config import TrainParams
    from vlpipe.train.loop import fit

    params = tiny_params(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    samples = [{k: v[i] for k, v in clean_batch(0).items()} for i in range(B)]

    def loss_fn(model, batch):
        inputs = mask_pretrain_batch(
            batch, params, mask_token_id=MASK_ID, special_token_ids=SPECIAL, vocab_size=SIZES["vocab_size"]
        )
        return model(**inputs).losses

    history = []
    train = TrainParams(
        max_steps=60, batch_size=B, lr=3e-3, warmup_ratio=0.1, log_every=10, checkpoint_every=1000
    )
    fit(tiny_model(), loss_fn, samples, None, train, tmp_path, on_step_end=lambda s, v: history.append(v))
    for key in ("mlm", "obj", "attr", "feat", "qa"):
        first = sum(h[key] for h in history[:10]) / 10
        last = sum(h[key] for h in history[-10:]) / 10
        assert last < first, key


def test_encoder_for_tasks_gives_the_pooled_vector(tmp_path):
    from vlpipe.models.lxmert import LxmertEncoder

    model = tiny_model().eval()
    save_lxmert(model, tmp_path / "m")
    encoder = LxmertEncoder(load_lxmert(tmp_path / "m").lxmert).eval()
    inputs = encoder_inputs(pretrain_inputs(tiny_params()))
    assert torch.equal(encoder(**inputs), model(**inputs).pooled_output)
    assert encoder.hidden_size == 32 and encoder.max_text_length == tiny_params().max_text_length


def test_input_statistics_travel_with_the_checkpoint(tmp_path):
    """standardize_features: the pre-training features' mean/std live in config.json, and the
    region source built from a loaded config standardises exactly as in pre-training."""
    import numpy as np

    from vlpipe.data.visual import RegionInputs, feature_statistics
    from vlpipe.features.store import write_region_store
    from vlpipe.models.lxmert import region_inputs

    rng = np.random.default_rng(0)
    n, d = 6, SIZES["visual_feat_dim"]
    records = [
        {"img_id": f"img{i}", "img_h": 10, "img_w": 10, "objects_id": np.zeros(n, np.int64),
         "objects_conf": np.ones(n, np.float32), "attrs_id": np.zeros(n, np.int64),
         "attrs_conf": np.ones(n, np.float32),
         "boxes": np.tile(np.array([0, 0, 5, 5], np.float32), (n, 1)),
         "features": (rng.random((n, d)) * 7 + 3).astype(np.float32)}
        for i in range(5)
    ]  # fmt: skip
    write_region_store(tmp_path / "store", iter(records), num_boxes=n, dim=d)
    raw = RegionInputs(tmp_path / "store", max_boxes=4)
    stats = feature_statistics(raw, [r["img_id"] for r in records])
    with pytest.raises(ValueError, match="feat_stats"):
        build_lxmert(tiny_params(standardize_features=True, max_boxes=4), **SIZES)
    torch.manual_seed(0)
    model = build_lxmert(tiny_params(standardize_features=True, max_boxes=4), feat_stats=stats, **SIZES)
    save_lxmert(model, tmp_path / "m")
    source = region_inputs(load_lxmert(tmp_path / "m").config, tmp_path / "store")
    feats = source([r["img_id"] for r in records])["visual_feats"]  # (5, 4, D)
    assert feats.shape == (5, 4, d)
    torch.testing.assert_close(feats.reshape(-1, d).mean(0), torch.zeros(d), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.reshape(-1, d).std(0, unbiased=False), torch.ones(d), atol=1e-4, rtol=0)
    want = (
        torch.from_numpy(np.stack([r["features"][:4] for r in records])) - torch.tensor(stats[0])
    ) / torch.tensor(stats[1])
    torch.testing.assert_close(feats, want.float())
    # A model without statistics (e.g. a reference checkpoint) reads the raw features.
    plain = build_lxmert(tiny_params(), **SIZES)
    assert torch.equal(
        region_inputs(plain.config, tmp_path / "store")(["img0"])["visual_feats"][0],
        torch.from_numpy(records[0]["features"]),
    )
    with pytest.raises(Exception, match="do not fit"):
        RegionInputs(tmp_path / "store", feat_mean=[0.0] * (d + 1), feat_std=[1.0] * (d + 1))


def test_pretrain_collate_marks_the_sentences_of_the_match_sources():
    from vlpipe.data.examples import Example
    from vlpipe.data.pretrain import make_pretrain_collate

    def tokenizer(sents, **_):
        n = len(sents)
        return {k: torch.ones(n, 3, dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}

    examples = [
        Example(key=("img0", "mscoco", 0), img_ids=("img0",), sent="a red circle", target=None),
        Example(key=("img0", "vqa", 0), img_ids=("img0",), sent="is it red?", target={"yes": 1.0}),
        Example(key=("img1", "vg", 0), img_ids=("img1",), sent="a circle", target=None),
    ]
    collate = make_pretrain_collate(tokenizer, lambda ids: {}, {"yes": 0}, 8, ["mscoco", "vg"])
    assert collate(examples)["match_valid"].tolist() == [True, False, True]
    every = make_pretrain_collate(tokenizer, lambda ids: {}, {"yes": 0}, 8, None)
    assert every(examples)["match_valid"].tolist() == [True, True, True]


def test_finetuning_can_start_from_another_finetunings_encoder(tmp_path, tiny_world):
    """``start_from: models/finetuned/<key>``: the encoder comes from that task model (its
    head is dropped), ``init: scratch`` keeps only its architecture, another model's is refused."""
    from vlpipe.config import FinetuneParams
    from vlpipe.errors import InputError
    from vlpipe.models.lxmert import LxmertEncoder
    from vlpipe.stages.lxmert import build_task_model, save_task_model
    from vlpipe.tasks.base import TaskModel
    from vlpipe.tasks.nlvr2 import Nlvr2Task
    from vlpipe.tasks.vqa import VqaTask

    vqa, nlvr2 = VqaTask(tiny_world), Nlvr2Task(tiny_world)
    source = TaskModel(LxmertEncoder(tiny_model(seed=3).lxmert), vqa.build_head(32), 1)
    save_task_model(source, vqa, FinetuneParams(model="lxmert", task="vqa"), tmp_path / "models/finetuned/lxmert-vqa")
    want = source.encoder.state_dict()

    p = FinetuneParams(model="lxmert", task="nlvr2", start_from="models/finetuned/lxmert-vqa")
    model, copied = build_task_model(p, nlvr2, tmp_path)
    got = model.encoder.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert model.num_images == 2 and model.head.logit_fc[-1].out_features == 2 and copied == 0

    scratch, _ = build_task_model(p.model_copy(update={"init": "scratch"}), nlvr2, tmp_path)
    fresh = scratch.encoder.state_dict()
    assert all(fresh[k].shape == want[k].shape for k in want)
    assert not torch.equal(fresh["lxmert.encoder.layer.0.attention.self.query.weight"],
                           want["lxmert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip

    with pytest.raises(InputError, match="task.json.*expected a fine-tuned 'xlxmert' model"):
        build_task_model(p.model_copy(update={"model": "xlxmert"}), nlvr2, tmp_path)
