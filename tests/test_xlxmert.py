"""X-LXMERT: uniform cell masking, centroid-tied cluster head, round-robin tasks, save/load,
the fine-tuning encoder, mask-predict sampling and the pre-training stage on a tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpipe.config import (
    CodebookParams,
    TokenizerParams,
    WorldParams,
    XlxmertModelParams,
    XlxmertPretrainParams,
)
from vlpipe.errors import InputError
from vlpipe.models.lxmert import IGNORE_INDEX
from vlpipe.models.xlxmert import (
    build_xlxmert,
    centroid_stats,
    load_pretrained_encoder,
    load_xlxmert,
    save_xlxmert,
    task_inputs,
    uniform_cell_mask,
)
from vlpipe.tasks.paint import mask_predict, remask_count, resample_cells

K, D, G, V = 12, 6, 4, 50  # clusters, centroid dim, grid side, vocab
N = G * G
B, L = 5, 9
MASK_KW = {"mask_token_id": 3, "special_token_ids": [0, 1, 2, 3], "vocab_size": V}


def tiny_params(**kw) -> XlxmertModelParams:
    base = dict(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=1, x_layers=1, r_layers=1
    )
    return XlxmertModelParams(**{**base, **kw})


def tiny_centroids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((K, D)).astype(np.float32)


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_xlxmert(tiny_params(**kw), vocab_size=V, centroids=tiny_centroids(), grid=G)


def clean_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(B, L, dtype=torch.long),
        "token_type_ids": torch.zeros(B, L, dtype=torch.long),
        "cluster_ids": torch.randint(K, (B, N), generator=g),
    }


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------- masking


def test_uniform_masking_draws_every_count_from_1_to_64():
    mask = uniform_cell_mask(4000, 64, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert mask.dtype == torch.bool and mask.shape == (4000, 64)
    assert int(counts.min()) == 1 and int(counts.max()) == 64
    # uniform over 1..64: every count occurs, mean (1 + 64) / 2
    assert len(torch.unique(counts)) == 64
    assert abs(float(counts.float().mean()) - 32.5) < 1.0


def test_visual_task_masks_cells_and_only_masked_cells_carry_loss():
    model = tiny_model()
    batch = clean_batch()
    inputs = task_inputs(
        batch, "visual", tiny_params(), generator=torch.Generator().manual_seed(1), **MASK_KW
    )
    masked, labels = inputs["visual_mask"], inputs["cluster_labels"]
    assert torch.equal(labels[masked], batch["cluster_ids"][masked])
    assert bool((labels[~masked] == IGNORE_INDEX).all())
    assert torch.equal(inputs["input_ids"], batch["input_ids"])  # text untouched by the visual task
    # the encoder's visual input is the mask vector on masked cells, the centroid elsewhere
    with torch.no_grad():
        model.visual_embedding.mask_feat.fill_(7.0)
    feats = model.visual_embedding(batch["cluster_ids"], masked)
    assert bool((feats[masked] == 7.0).all())
    mean, std = centroid_stats(model.centroids)
    assert torch.equal(feats[~masked], ((model.centroids - mean) / std)[batch["cluster_ids"][~masked]])

    out = model(**inputs)
    out.cluster_logits.retain_grad()
    out.losses["cluster"].backward()
    grad = out.cluster_logits.grad.abs().sum(-1)  # (B, N)
    assert bool((grad[~masked] == 0).all())
    assert bool((grad[masked] > 0).all())
    assert set(out.losses) == {"cluster", "loss"}


def test_mlm_and_matched_tasks_leave_the_grid_visible():
    p = tiny_params()
    batch = clean_batch()
    mlm = task_inputs(batch, "mlm", p, generator=torch.Generator().manual_seed(2), **MASK_KW)
    assert "visual_mask" not in mlm and torch.equal(mlm["cluster_ids"], batch["cluster_ids"])
    assert bool((mlm["mlm_labels"] != IGNORE_INDEX).any())
    matched = task_inputs(batch, "matched", p.model_copy(update={"match_swap_prob": 1.0}),
                          generator=torch.Generator().manual_seed(3), **MASK_KW)  # fmt: skip
    assert bool((matched["matched_label"] == 0).all())
    assert not torch.equal(matched["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="unknown X-LXMERT task"):
        task_inputs(batch, "qa", p, **MASK_KW)


# ------------------------------------------------------------------- tied centroids


def test_cluster_head_is_tied_to_the_frozen_centroids():
    model = tiny_model()
    cent = torch.from_numpy(tiny_centroids())
    assert torch.equal(model.centroids, cent)
    assert not model.centroids.requires_grad
    assert all(p is not model.centroids for p in model.parameters())
    batch = task_inputs(
        clean_batch(), "visual", tiny_params(), generator=torch.Generator().manual_seed(0), **MASK_KW
    )
    model.eval()
    out = model(**batch)
    head = model.cluster_head
    # output weights = the centroids, standardised by their fixed per-dimension statistics
    weights = (cent - cent.mean(0)) / cent.std(0, unbiased=False)
    expected = head.proj(head.transform(out.vision_output)) @ weights.t() + head.bias
    torch.testing.assert_close(out.cluster_logits, expected)
    # the tie is live: changing centroid 3 changes the logits of cluster 3 (and the input of
    # cells with id 3), nothing is a copy
    with torch.no_grad():
        model.visual_embedding.centroids[3] += 1.0
    logits = model(**batch).cluster_logits
    assert not torch.allclose(logits[..., 3], out.cluster_logits[..., 3])
    if not bool((batch["cluster_ids"] == 3).any()):
        torch.testing.assert_close(logits[..., 4], out.cluster_logits[..., 4])


def test_centroids_unchanged_by_a_training_step_while_the_head_learns():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = task_inputs(
        clean_batch(), "visual", tiny_params(), generator=torch.Generator().manual_seed(0), **MASK_KW
    )
    model(**batch).losses["loss"].backward()
    assert model.centroids.grad is None
    opt.step()
    after = model.state_dict()
    assert torch.equal(after["visual_embedding.centroids"], before["visual_embedding.centroids"])
    assert not torch.equal(after["cluster_head.proj.weight"], before["cluster_head.proj.weight"])
    assert not torch.equal(after["visual_embedding.mask_feat"], before["visual_embedding.mask_feat"])


def test_centroid_shape_must_match_the_config():
    model = tiny_model()
    from vlpipe.models.xlxmert import XLxmert

    with pytest.raises(ValueError, match="do not match"):
        XLxmert(model.config, torch.zeros(K + 1, D))


# -------------------------------------------------------------------- round robin


def test_tasks_alternate_round_robin_per_optimizer_step():
    model = tiny_model(tasks=["mlm", "visual", "matched"])  # the reference's schedule
    assert [model.next_task() for _ in range(6)] == ["mlm", "visual", "matched"] * 2
    model = tiny_model(tasks=["visual", "mlm", "visual"])
    assert [model.next_task(grad_accum=2) for _ in range(8)] == [
        "visual", "visual", "mlm", "mlm", "visual", "visual", "visual", "visual",
    ]  # fmt: skip
    assert int(model.state_dict()["task_step"]) == 8  # checkpoints carry the schedule's position


# --------------------------------------------------------------------- save / load


def test_save_load_round_trip_and_the_finetuning_encoder(tmp_path: Path):
    model = tiny_model().eval()
    model.next_task()
    save_xlxmert(model, tmp_path / "x")
    config = json.loads((tmp_path / "x/config.json").read_text())
    assert (
        config["num_clusters"] == K
        and config["grid"] == G
        and config["tasks"] == ["visual", "mlm", "visual", "matched"]
    )
    loaded = load_xlxmert(tmp_path / "x").eval()
    batch = clean_batch()
    torch.testing.assert_close(loaded(**batch).cluster_logits, model(**batch).cluster_logits, rtol=0, atol=0)
    assert int(loaded.task_step) == 0  # the schedule counter is not part of the saved model

    encoder = load_pretrained_encoder(tmp_path / "x").eval()
    assert encoder.hidden_size == 16 and encoder.max_text_length == 40 and encoder.config.num_clusters == K
    feats = torch.randn(B, N, D)  # continuous grid features, as GridInputs gives them
    pos = model.cell_boxes.expand(B, -1, -1)
    pooled = encoder(batch["input_ids"], batch["attention_mask"], feats, pos, batch["token_type_ids"])
    assert pooled.shape == (B, 16)
    # raw centroids as features give the pre-trained encoder's pooled output: the centroid
    # standardisation is folded into the encoder's first visual layer
    cent_feats = model.centroids[batch["cluster_ids"]]
    same = encoder(batch["input_ids"], batch["attention_mask"], cent_feats, pos, batch["token_type_ids"])
    torch.testing.assert_close(same, model(**batch).pooled_output)
    scratch = load_pretrained_encoder(tmp_path / "x", pretrained=False)
    assert not torch.equal(scratch.lxmert.pooler.dense.weight, encoder.lxmert.pooler.dense.weight)
    # the from-scratch encoder reads features through the same standardisation: its fresh
    # first layer (bias 0) maps the centroids' mean to 0 and a unit step of z = (x - mean) / std
    # to a column of a weight drawn at the initializer's scale, not to std times it
    fc = scratch.lxmert.encoder.visn_fc.visn_fc
    mean, std = centroid_stats(model.centroids)
    torch.testing.assert_close(fc(mean), torch.zeros(16), atol=1e-5, rtol=0)
    fresh = fc.weight * std  # (H, D): the layer in the standardised space
    assert abs(fresh.std().item() - model.config.initializer_range) < 0.005


def test_loading_a_non_xlxmert_directory_is_a_clear_error(tmp_path: Path):
    save_xlxmert(tiny_model(), tmp_path / "x")
    config = json.loads((tmp_path / "x/config.json").read_text())
    del config["num_clusters"]
    (tmp_path / "x/config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="not an X-LXMERT config"):
        load_xlxmert(tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y/config.json").write_text("{not json")
    with pytest.raises(InputError, match="malformed JSON"):
        load_xlxmert(tmp_path / "y")


# --------------------------------------------------------------------- mask-predict


class _Recorder(torch.nn.Module):
    """Wraps a model and records how many cells each mask-predict step masks."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.masked: list[int] = []

    @property
    def num_cells(self) -> int:
        return self.model.num_cells

    def forward(self, *args, visual_mask, **kw):
        self.masked.append(visual_mask.sum(1).tolist())
        return self.model(*args, visual_mask=visual_mask, **kw)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_mask_predict_fills_every_cell_in_t_steps(steps: int):
    model = _Recorder(tiny_model())
    batch = clean_batch()
    ids = mask_predict(
        model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], steps=steps
    )
    assert ids.shape == (B, N) and ids.dtype == torch.long
    assert bool(((ids >= 0) & (ids < K)).all())
    # step 1 sees every cell masked; after step i, int((T - i) / T * N) cells are masked again
    expected = [N] + [remask_count(i, steps, N) for i in range(1, steps)]
    assert [row[0] for row in model.masked] == expected and all(len(set(r)) == 1 for r in model.masked)
    assert remask_count(steps, steps, N) == 0
    assert model.model.training  # mode restored


def test_mask_predict_is_deterministic_under_a_seed():
    model = tiny_model()
    batch = clean_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def run(seed: int, **kw) -> torch.Tensor:
        return mask_predict(model, *args, steps=5, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0, temperature=1.0), run(0, temperature=1.0))
    assert not torch.equal(run(0, temperature=1.0), run(1, temperature=1.0))
    assert torch.equal(run(0, temperature=1.0, top_k=3), run(0, temperature=1.0, top_k=3))
    assert torch.equal(run(0), run(1))  # temperature 0: argmax, no randomness at all


def test_greedy_mask_predict_keeps_a_confident_cell():
    """A cell the model is sure of at step 1 stays as predicted while others are re-masked."""
    model = tiny_model().eval()
    batch = clean_batch()
    with torch.no_grad():
        model.cluster_head.bias.zero_()
        model.cluster_head.bias[5] = 50.0  # every cell: id 5 with probability ~1
    ids = mask_predict(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], steps=4)
    assert bool((ids == 5).all())


def test_resample_cells_redraws_only_the_masked_cells():
    model = tiny_model()
    batch = clean_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ids = batch["cluster_ids"]  # (B, N)
    masked = torch.zeros(B, N, dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad():
        model.cluster_head.bias.zero_()
        model.cluster_head.bias[(int(ids.max()) + 1) % K] = 50.0  # the model is sure of an id the grid lacks
    out = resample_cells(
        model, *args, ids, masked, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[~masked], ids[~masked])  # kept cells untouched
    assert bool((out[masked] == (int(ids.max()) + 1) % K).all())  # masked cells re-drawn by the model
    nothing = torch.zeros_like(masked)
    assert torch.equal(resample_cells(model, *args, ids, nothing, temperature=1.0), ids)
    assert model.training  # mode restored

    def draw(seed: int) -> torch.Tensor:
        with torch.no_grad():
            model.cluster_head.bias.zero_()
        return resample_cells(
            model, *args, ids, masked, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


# ------------------------------------------------------------------ stage (tiny world)


def build_tiny_root(root: Path, k: int = 8, dim: int = 6) -> Path:
    """A tiny world, its tokenizer, random 8x8 grid features and a k-means codebook."""
    from vlpipe.data.tokenizer import build_tokenizer
    from vlpipe.data.world import generate_world
    from vlpipe.features.codebook import build_codebook
    from vlpipe.features.store import write_grid_store

    world = WorldParams.model_validate({
        "scene": {"n_train": 16, "n_val": 8, "n_test": 4},
        "text": {"nlvr2_sentences": {"train": 4, "val": 2, "test": 2}},
    })  # fmt: skip
    generate_world(world, root / "data/world")
    (root / "data/tokenizer").mkdir(parents=True)
    build_tokenizer(TokenizerParams(vocab_size=200), root / "data/world", root / "data/tokenizer")
    splits = json.loads((root / "data/world/splits.json").read_text())
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((k, dim)).astype(np.float32)
    recs = [
        {"img_id": i, "img_h": 64, "img_w": 64, "features": protos[rng.integers(0, k, (8, 8))]}
        for ids in splits.values() for i in ids
    ]  # fmt: skip
    write_grid_store(root / "data/features/grid", iter(recs), grid=8, dim=dim)
    build_codebook(
        CodebookParams(k=k, iterations=2),
        root / "data/features/grid",
        splits["train"],
        root / "data/codebook",
    )
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_root(tmp_path_factory.mktemp("xlxmert") / "repo")


def _pretrain_params(**train) -> XlxmertPretrainParams:
    return XlxmertPretrainParams.model_validate({
        "model": {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                  "l_layers": 1, "x_layers": 1, "r_layers": 1},
        "train": {"batch_size": 8, "max_steps": 4, "log_every": 1, "checkpoint_every": 2, "seed": 0, **train},
        "eval_batch_size": 16, "val_max_examples": 20,
    })  # fmt: skip


def test_pretrain_stage_writes_model_and_metrics_beside_the_baseline(tiny_root: Path):
    from vlpipe.stages.xlxmert import pretrain_xlxmert

    metrics = pretrain_xlxmert(_pretrain_params(), tiny_root)
    saved = json.loads((tiny_root / "metrics/pretrain/xlxmert.json").read_text())
    assert saved["steps"] == 4
    val = saved["val"]
    for key in (
        "loss_mlm",
        "loss_cluster",
        "loss_matched",
        "mlm_accuracy",
        "matched_accuracy",
        "cluster_accuracy",
        "cluster_majority_baseline",
        "cluster_accuracy_full_mask",
        "cluster_majority_baseline_full_mask",
    ):
        assert key in val and np.isfinite(val[key]), key
    assert 0 < val["cluster_majority_baseline"] < 1
    meta = json.loads((tiny_root / "models/pretrained/xlxmert/meta.json").read_text())
    assert meta["num_clusters"] == 8 and meta["grid"] == 8
    model = load_xlxmert(tiny_root / "models/pretrained/xlxmert")
    centroids = np.load(tiny_root / "data/codebook/centroids.npy")
    np.testing.assert_array_equal(model.centroids.numpy(), centroids)  # still the codebook after training
    assert not (tiny_root / "runs/pretrain-xlxmert/checkpoints").exists()
    # same params -> bitwise identical weights and metrics
    first = {k: v.clone() for k, v in model.state_dict().items()}
    again = pretrain_xlxmert(_pretrain_params(), tiny_root)
    speed = "samples_per_second"
    assert {k: v for k, v in again.items() if k != speed} == {k: v for k, v in metrics.items() if k != speed}
    for k, v in load_xlxmert(tiny_root / "models/pretrained/xlxmert").state_dict().items():
        assert torch.equal(v, first[k]), k


def test_pretrain_stage_names_a_missing_codebook_entry(tiny_root: Path, tmp_path: Path):
    from vlpipe.features.codebook import load_codebook
    from vlpipe.stages.xlxmert import cluster_ids

    _, codes = load_codebook(tiny_root / "data/codebook")
    with pytest.raises(InputError, match="no cluster ids for img_id 'nope'"):
        cluster_ids(codes, ["nope"])
