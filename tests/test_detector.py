"""The detector: targets <-> decoding, overfitting a handful of images, save/load, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vlpipe.config import DetectorParams
from vlpipe.data.images import image_to_tensor, read_image, stack_images
from vlpipe.errors import InputError
from vlpipe.features.detector import (
    Detector,
    DetectorConfig,
    build_targets,
    evaluate_detector,
    focal_loss,
    load_detector,
    read_instances,
    train_detector,
    world_vocab,
)

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (40, 40, 220), "green": (50, 190, 50), "blue": (230, 100, 30), "yellow": (30, 220, 230)}
SIZES = {"small": 14, "large": 22}
TEXTURES = ["plain", "striped"]


def _draw(
    img: np.ndarray, shape: str, bgr: tuple[int, int, int], x: int, y: int, side: int, texture: str
) -> None:
    mask = np.zeros(img.shape[:2], np.uint8)
    if shape == "circle":
        cv2.circle(mask, (x + side // 2, y + side // 2), side // 2, 1, -1)
    elif shape == "square":
        cv2.rectangle(mask, (x, y), (x + side - 1, y + side - 1), 1, -1)
    else:
        pts = np.array([[x + side // 2, y], [x, y + side - 1], [x + side - 1, y + side - 1]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    img[mask > 0] = bgr
    if texture == "striped":
        stripes = np.zeros_like(mask)
        stripes[::4] = 1
        img[(mask > 0) & (stripes > 0)] = tuple(c // 3 for c in bgr)


def write_tiny_world(root: Path, n_train: int = 8, n_val: int = 4, n_test: int = 2, seed: int = 0) -> Path:
    """A COCO-style mini world (docs/layout.md): 2-3 non-overlapping shapes per 64x64 image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    splits: dict[str, list[str]] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        images, anns = [], []
        splits[split] = []
        for i in range(n):
            img_id = f"world_{split}_{i:06d}"
            splits[split].append(img_id)
            img = np.full((64, 64, 3), 30, np.uint8) + rng.integers(0, 12, (64, 64, 3), dtype=np.uint8)
            slots = rng.choice(4, size=int(rng.integers(2, 4)), replace=False)
            for slot in slots:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                color = list(COLORS)[int(rng.integers(len(COLORS)))]
                size = list(SIZES)[int(rng.integers(len(SIZES)))]
                texture = TEXTURES[int(rng.integers(2))]
                side = SIZES[size]
                x = int(slot % 2) * 32 + int(rng.integers(0, 32 - side + 1))
                y = int(slot // 2) * 32 + int(rng.integers(0, 32 - side + 1))
                _draw(img, shape, COLORS[color], x, y, side, texture)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": SHAPES.index(shape) + 1,
                        "bbox": [x, y, side, side],
                        "area": float(side * side),
                        "iscrowd": 0,
                        "attributes": {"color": color, "size": size, "texture": texture},
                    }
                )
            cv2.imwrite(str(root / "images" / f"{img_id}.png"), img)
            images.append(
                {
                    "id": i + 1,
                    "img_id": img_id,
                    "file_name": f"images/{img_id}.png",
                    "width": 64,
                    "height": 64,
                }
            )
        coco = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": s} for k, s in enumerate(SHAPES)],
        }
        if split != "test":
            (root / f"instances_{split}.json").write_text(json.dumps(coco))
    (root / "splits.json").write_text(json.dumps(splits))
    meta = {
        "image_size": 64,
        "shapes": SHAPES,
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "textures": TEXTURES,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def tiny_params(**kw: object) -> DetectorParams:
    base = {
        "channels": [16, 32],
        "feature_dim": 32,
        "roi_hidden": 64,
        "batch_size": 8,
        "epochs": 2,
        "lr": 3e-3,
    }
    return DetectorParams(**{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_world(tmp_path_factory.mktemp("world") / "world")


@pytest.fixture(scope="module")
def overfit(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The detector trained for many epochs on the 8 training images."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("det") / "model"
    out.mkdir()
    metrics = train_detector(tiny_params(epochs=120, batch_size=8), world, out)
    return out, metrics


def test_overfits_a_handful_of_images(world: Path, overfit: tuple[Path, dict]) -> None:
    out, metrics = overfit
    assert metrics["train"]["loss_last_epoch"] < 0.2 * metrics["train"]["loss_first_epoch"]
    det = load_detector(out)
    train = evaluate_detector(det, world, "train")
    assert train["recall"] >= 0.9, train  # confident detections find the objects
    assert train["precision"] >= 0.8, train
    assert train["ap50"] >= 0.8, train
    assert train["color_acc"] >= 0.9, train
    for key in ("shape", "color", "size", "texture"):
        assert train[f"roi_{key}_acc"] >= 0.9, (key, train)
    assert set(metrics["val"]) >= {"map", "ap50", "color_acc", "roi_color_acc"}


def test_saved_files_and_round_trip(world: Path, overfit: tuple[Path, dict]) -> None:
    out, _ = overfit
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shapes"] == SHAPES and meta["colors"] == list(COLORS) and meta["feature_dim"] == 32
    det = load_detector(out)
    images, sizes = stack_images([read_image(world / "images/world_train_000000.png")])
    maps, heat, box = det(images)
    assert heat.shape == (1, len(SHAPES), 16, 16) and box.shape == (1, 4, 16, 16)
    assert det.region_features(maps, torch.tensor([[0, 4.0, 4.0, 30.0, 30.0]]), sizes).shape == (1, 32)


def test_training_is_deterministic(world: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        metrics = train_detector(tiny_params(epochs=1, max_train_images=4), world, tmp_path / name)
        runs.append((metrics, (tmp_path / name / "model.safetensors").read_bytes()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]


def test_targets_decode_back_to_the_boxes(world: Path) -> None:
    """Perfect dense predictions (the targets themselves) decode to the ground-truth boxes."""
    vocab = world_vocab(world)
    inst = read_instances(world, "train", vocab)
    det = Detector(DetectorConfig.from_params(tiny_params()), vocab)
    t = build_targets(inst, len(SHAPES), (16, 16), det.stride)
    logits = torch.logit(t.heatmap.clamp(1e-6, 1 - 1e-6))
    sizes = torch.full((len(inst.img_ids), 2), 64)
    cand = det.candidates(logits, t.box, sizes, 10)
    for i, gt in enumerate(inst.boxes):
        n = len(gt)
        assert torch.all(cand.scores[i, :n] > 0.999)  # every object is a heatmap peak of value 1
        got = sorted(cand.boxes[i, :n].tolist())
        torch.testing.assert_close(torch.tensor(got), torch.tensor(sorted(gt.tolist())), atol=1e-3, rtol=0)
        assert torch.all(cand.scores[i, n:] < 0.999)
    assert focal_loss(logits, t.heatmap) < 0.1 * focal_loss(torch.zeros_like(logits), t.heatmap)


def test_load_detector_errors(overfit: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = overfit
    with pytest.raises(InputError, match="config.json: detector file not found"):
        load_detector(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "meta.json", "model.safetensors"):
        (bad / name).write_bytes((src / name).read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "channels": [16, 48]}))
    with pytest.raises(InputError, match="model.safetensors: tensor shapes do not match"):
        load_detector(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="model.safetensors: unreadable"):
        load_detector(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json: malformed JSON"):
        load_detector(bad)


def test_bad_instances_and_images_raise_input_error(world: Path, tmp_path: Path) -> None:
    vocab = world_vocab(world)
    broken = tmp_path / "w"
    broken.mkdir()
    coco = json.loads((world / "instances_train.json").read_text())
    coco["annotations"][0]["attributes"]["color"] = "mauve"
    (broken / "instances_train.json").write_text(json.dumps(coco))
    with pytest.raises(InputError, match=r"instances_train.json: annotation 1: color 'mauve'"):
        read_instances(broken, "train", vocab)
    del coco["annotations"][0]["bbox"]
    (broken / "instances_train.json").write_text(json.dumps(coco))
    with pytest.raises(InputError, match="missing key 'bbox'"):
        read_instances(broken, "train", vocab)
    png = broken / "corrupt.png"
    png.write_bytes((world / "images/world_train_000000.png").read_bytes()[:100])
    with pytest.raises(InputError, match="corrupt.png: corrupt or truncated image"):
        read_image(png)
    with pytest.raises(InputError, match="missing.png: image file not found"):
        read_image(broken / "missing.png")


def test_corrupt_training_image_fails_training(world: Path, tmp_path: Path) -> None:
    copy = tmp_path / "world"
    copy.mkdir()
    for p in world.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    (copy / "images").mkdir()
    for p in (world / "images").iterdir():
        (copy / "images" / p.name).write_bytes(p.read_bytes())
    (copy / "images/world_train_000003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="world_train_000003.png: corrupt"):
        train_detector(tiny_params(epochs=1), copy, tmp_path / "out")


def test_image_helpers() -> None:
    img = np.zeros((5, 7, 3), np.uint8)
    img[..., 2] = 255  # pure red in BGR
    t = image_to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t[2].min() == 1.0 and t[0].max() == -1.0
    batch, sizes = stack_images([img, np.zeros((8, 4, 3), np.uint8)])
    assert batch.shape == (2, 3, 8, 7) and sizes.tolist() == [[5, 7], [8, 4]]
