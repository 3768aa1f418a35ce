"""Image generator (SPADE + hinge GAN) and painting: shapes, gradients of each player,
save/load, caption parsing, detector-based scores and the PNGs paint writes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vlpipe.config import GeneratorParams, PaintParams
from vlpipe.errors import InputError
from vlpipe.models.generator import GanPair, build_generator, generate, load_generator, save_generator
from vlpipe.tasks.paint import (
    agreement,
    caption_objects,
    contact_sheet,
    found_objects,
    frechet_distance,
    object_recall,
    paint_text,
    r_precision,
)

G, D, S, B = 8, 6, 64, 3
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES = ("small", "large")


def tiny_params(**kw) -> GeneratorParams:
    base = dict(
        channels=[8, 8, 8, 4], cond_channels=4, cond_hidden=4, disc_channels=[4, 8], perceptual_weight=0.0
    )
    return GeneratorParams(**{**base, **kw})


def centroids(k: int = 10, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, D)) * 3 + 1).astype(np.float32)


def tiny_generator(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_generator(tiny_params(**kw), centroids(), grid=G, image_size=S)


def grids(seed: int = 0) -> torch.Tensor:
    cent = torch.from_numpy(centroids())
    ids = torch.randint(len(cent), (B, G, G), generator=torch.Generator().manual_seed(seed))
    return cent[ids]  # (B, G, G, D)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- generator


def test_generator_forward_backward_shapes():
    gen = tiny_generator()
    grid = grids()
    out = gen(grid)
    assert out.shape == (B, 3, S, S)
    assert float(out.detach().abs().max()) <= 1.0
    out.mean().backward()
    assert all(p.grad is not None for p in gen.parameters())
    images = generate(gen.eval(), grid, batch_size=2)
    assert images.shape == (B, S, S, 3) and images.dtype == np.uint8


def test_blocks_must_reach_the_image_size():
    with pytest.raises(ValueError, match="use 4 channel entries"):
        build_generator(tiny_params(channels=[8, 8, 8]), centroids(), grid=G, image_size=S)


def test_each_player_moves_only_by_its_own_loss():
    torch.manual_seed(0)
    gen = build_generator(tiny_params(), centroids(), grid=G, image_size=S)
    pair = GanPair(gen, tiny_params())
    images = torch.rand(B, 3, S, S) * 2 - 1
    losses = pair(images, grids())
    assert set(losses) == {"l1", "d_hinge", "g_hinge", "fm", "loss"}
    # the discriminator's loss reaches the discriminator only
    losses["d_hinge"].backward(retain_graph=True)
    assert all(p.grad is None for p in pair.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.discriminator.parameters())
    pair.zero_grad(set_to_none=True)
    # the generator's adversarial and feature-matching losses reach the generator only
    (losses["g_hinge"] + losses["fm"]).backward()
    assert all(p.grad is None for p in pair.discriminator.parameters())
    assert all(p.grad is not None for p in pair.generator.parameters())


def test_loss_mix_is_chosen_by_params():
    torch.manual_seed(0)
    l1_only = GanPair(build_generator(tiny_params(), centroids(), grid=G, image_size=S),
                      tiny_params(gan_weight=0.0, fm_weight=0.0))  # fmt: skip
    assert not hasattr(l1_only, "discriminator")
    assert set(l1_only(torch.zeros(B, 3, S, S), grids())) == {"l1", "loss"}
    with pytest.raises(ValueError, match="needs the discriminator"):
        tiny_params(gan_weight=0.0, fm_weight=1.0)
    with pytest.raises(ValueError, match="nothing to train"):
        tiny_params(l1_weight=0.0, gan_weight=0.0, fm_weight=0.0)


def test_perceptual_loss_trains_the_generator_through_a_frozen_network():
    from vlpipe.features.detector import Backbone

    torch.manual_seed(0)
    net = Backbone([4, 8])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = tiny_params(gan_weight=0.0, fm_weight=0.0, l1_weight=0.0, perceptual_weight=1.0)
    pair = GanPair(build_generator(params, centroids(), grid=G, image_size=S), params, net).train()
    assert not pair.perceptual_net.training  # a fixed feature extractor even in a training pair
    losses = pair(torch.rand(B, 3, S, S) * 2 - 1, grids())
    assert set(losses) == {"perceptual", "loss"} and float(losses["loss"].detach()) > 0
    losses["loss"].backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in pair.generator.parameters())
    torch.optim.AdamW(pair.parameters(), lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="needs a perceptual_net"):
        GanPair(build_generator(params, centroids(), grid=G, image_size=S), params)


def test_generator_save_load_round_trip(tmp_path: Path):
    gen = tiny_generator().eval()
    save_generator(gen, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    torch.testing.assert_close(loaded(grids()), gen(grids()), rtol=0, atol=0)
    config = json.loads((tmp_path / "g/config.json").read_text())
    config["channels"] = [8, 8]
    (tmp_path / "g/config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="not a generator config"):
        load_generator(tmp_path / "g")


def test_same_seed_same_generator():
    torch.testing.assert_close(tiny_generator(3)(grids()), tiny_generator(3)(grids()), rtol=0, atol=0)


# ----------------------------------------------------------------------------- scores


def test_caption_objects_follow_the_world_templates():
    text = "From left to right, a small red circle, an orange cross and a large blue star; " \
           "the small red circle is above the large blue star."  # fmt: skip
    assert caption_objects(text, SHAPES, COLORS, SIZES) == [
        ("red", "circle"),
        ("orange", "cross"),
        ("blue", "star"),
    ]
    assert caption_objects("a large red circle left of a square", SHAPES, COLORS, SIZES) == [
        ("red", "circle"), (None, "square"),
    ]  # fmt: skip
    assert caption_objects("An image with a small white hexagon.", SHAPES, COLORS, SIZES) == [
        ("white", "hexagon")
    ]


def test_object_matching_recall_and_r_precision():
    wanted = [("red", "circle"), ("red", "circle"), (None, "star")]
    assert found_objects(wanted, [("red", "circle"), ("blue", "star"), ("red", "square")]) == 2
    assert found_objects(wanted, [("red", "circle"), ("red", "circle"), ("green", "star")]) == 3
    assert agreement([("red", "circle")], [("red", "circle")]) == 1.0
    assert object_recall([[("red", "circle")], []], [[("red", "circle")], [("blue", "star")]]) == 0.5
    captions = [[("red", "circle")], [("blue", "star")], [("green", "cross")], [("white", "square")]]
    assert r_precision(captions, captions, candidates=4, seed=0) == 1.0  # every image shows its caption
    # nothing detected: every candidate ties at 0, the true caption gets 1/4 of the credit
    assert r_precision([[], [], [], []], captions, candidates=4, seed=0) == pytest.approx(0.25)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)
    scaled = a * 2  # covariance 4 I vs I: trace term 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.05)


def test_scores_of_images_without_detections_are_defined():
    from vlpipe.tasks.paint import DetectedImages, image_scores

    real = DetectedImages([[("red", "circle")], [("blue", "star")]], np.eye(2, 3))
    empty = DetectedImages([[], []], np.zeros((0, 3)))
    scores = image_scores(empty, [[("red", "circle")], [("blue", "star")]], real, candidates=2, seed=0)
    assert scores["object_recall"] == 0.0 and scores["frechet_distance"] is None
    assert scores["r_precision"] == pytest.approx(0.5) and scores["detections_per_image"] == 0.0


def test_contact_sheet_places_images_side_by_side():
    img = np.zeros((64, 64, 3), np.uint8)
    sheet = contact_sheet([("a red circle", [img, img + 255]), ("a blue star", [img, img])], columns=2)
    assert sheet.dtype == np.uint8 and sheet.shape[1] > 4 * 64 * 2 and sheet.shape[0] > 64 * 2


# ---------------------------------------------------------------------- stages (tiny world)


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny world with an X-LXMERT, a generator (2 steps each) and an untrained detector."""
    from test_xlxmert import _pretrain_params, build_tiny_root
    from vlpipe.features.detector import Detector, DetectorConfig, Vocab, save_detector
    from vlpipe.stages.xlxmert import pretrain_xlxmert, train_generator_stage

    root = build_tiny_root(tmp_path_factory.mktemp("paint") / "repo")
    torch.manual_seed(0)
    meta = json.loads((root / "data/world/meta.json").read_text())
    vocab = Vocab.from_meta(meta, root / "data/world/meta.json")
    config = DetectorConfig((8, 16), 8, 2, 16, 2, 0.0, 0.5)
    save_detector(Detector(config, vocab), root / "models/detector")
    pretrain_xlxmert(_pretrain_params(max_steps=2), root)
    train = tiny_params().train.model_copy(
        update={"max_steps": 2, "batch_size": 4, "checkpoint_every": 1, "log_every": 1}
    )
    # with the painter corruption (on by default): the tiny X-LXMERT re-draws a share of each grid
    params = tiny_params(perceptual_weight=1.0, corrupt_fraction=0.5)
    train_generator_stage(params.model_copy(update={"train": train}), root)
    return root


def test_generator_stage_writes_model_and_metrics(trained_root: Path):
    metrics = json.loads((trained_root / "metrics/generator.json").read_text())
    assert metrics["steps"] == 2
    assert {"l1", "psnr", "l1_mean_image"} <= set(metrics["val"])
    assert {"l1", "perceptual", "d_hinge", "g_hinge", "fm", "loss"} <= set(metrics["train"])
    gen = load_generator(trained_root / "models/generator")
    assert gen.config.grid == 8 and gen.config.image_size == 64


def test_painter_corruption_changes_grids_not_images(trained_root: Path):
    from vlpipe.stages.xlxmert import _codes, _grid_images

    centroids, codes, grid = _codes(trained_root)
    clean = _grid_images(trained_root, "train", codes, centroids, grid, limit=6)
    torch.manual_seed(0)
    noisy = _grid_images(trained_root, "train", codes, centroids, grid, limit=6,
                         corrupt_with=tiny_params(corrupt_fraction=1.0))  # fmt: skip
    a, b = clean.collate(list(range(6))), noisy.collate(list(range(6)))
    assert torch.equal(a["images"], b["images"])  # the target stays the real image
    changed = (a["grids"] != b["grids"]).any(-1)  # (B, G, G)
    assert changed.any() and not changed.all()
    # every grid is a grid of the codebook's centroids
    cent = torch.from_numpy(centroids)
    cells = b["grids"].reshape(-1, 1, cent.shape[1])  # (B*G*G, 1, D)
    assert bool((cells == cent[None]).all(-1).any(-1).all())


def test_painter_corruption_needs_the_codebook_of_the_pretrained_model(trained_root: Path):
    from vlpipe.stages.xlxmert import _codes, painter_corruption

    centroids, _, _ = _codes(trained_root)
    with pytest.raises(InputError, match="centroids are not those of"):
        painter_corruption(tiny_params(), trained_root, ["x"], centroids + 1.0)


def test_paint_stage_writes_sheet_and_metrics(trained_root: Path):
    from vlpipe.stages.xlxmert import paint_val

    metrics = paint_val(
        PaintParams(steps=4, num_captions=6, sheet_size=4, rprecision_candidates=4), trained_root
    )
    sheet = cv2.imread(str(trained_root / "reports/paint.png"))
    assert sheet is not None and sheet.shape[0] > 64 and sheet.shape[1] > 3 * 64
    saved = json.loads((trained_root / "metrics/paint.json").read_text())
    assert saved["captions"] == 6 and saved["caption_objects"] > 0 and saved["steps"] == 4
    for name in ("painted", "reconstructed"):
        assert {"object_recall", "r_precision", "frechet_distance", "detections_per_image"} <= set(
            saved[name]
        )
        assert 0 <= saved[name]["object_recall"] <= 1
    assert metrics["painted"]["object_recall"] == saved["painted"]["object_recall"]
    # same params -> the same result
    again = paint_val(
        PaintParams(steps=4, num_captions=6, sheet_size=4, rprecision_candidates=4), trained_root
    )
    assert again == metrics


def test_paint_text_writes_a_png(trained_root: Path, tmp_path: Path):
    out = paint_text(
        "a large red circle left of a blue square",
        trained_root / "models/pretrained/xlxmert", trained_root / "models/generator",
        trained_root / "data/tokenizer", tmp_path / "out/paint.png", steps=4,
    )  # fmt: skip
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] >= 64 and img.shape[1] >= 64
    with pytest.raises(InputError, match="empty"):
        paint_text("  ", trained_root / "models/pretrained/xlxmert", trained_root / "models/generator",
                   trained_root / "data/tokenizer", tmp_path / "x.png")  # fmt: skip
    assert not (tmp_path / "x.png").exists()
