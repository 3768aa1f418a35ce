"""Region / grid feature extraction: exactly N boxes, schema, grid cells, store, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_detector import tiny_params, write_tiny_world
from vlpipe.config import GridFeatureParams, RegionFeatureParams
from vlpipe.errors import InputError
from vlpipe.features.detector import Detector, DetectorConfig, load_images, world_vocab
from vlpipe.features.extract import (
    RegionStats,
    extract_grid_features,
    extract_region_features,
    grid_boxes,
    grid_records,
    image_paths,
    region_records,
    select_boxes,
)
from vlpipe.features.store import FeatureStore

N = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_world(tmp_path_factory.mktemp("xworld") / "world", n_train=5, n_val=3, n_test=2, seed=1)


@pytest.fixture(scope="module")
def detector(world: Path) -> Detector:
    """An untrained detector: extraction must give the exact schema whatever the weights."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return Detector(DetectorConfig.from_params(tiny_params()), world_vocab(world)).eval()


def test_every_image_gets_exactly_n_boxes(world: Path, detector: Detector) -> None:
    ids = ["world_train_000000", "world_val_000001", "world_test_000000"]
    params = RegionFeatureParams(num_boxes=N, batch_size=2)
    records = list(region_records(detector, world, params, ids))
    assert [r["img_id"] for r in records] == ids
    images, sizes = load_images(image_paths(world, ids))
    for i, r in enumerate(records):
        assert (r["img_h"], r["img_w"]) == (64, 64)
        for key, dtype, shape in [
            ("objects_id", np.int64, (N,)), ("objects_conf", np.float32, (N,)),
            ("attrs_id", np.int64, (N,)), ("attrs_conf", np.float32, (N,)),
            ("boxes", np.float32, (N, 4)), ("features", np.float32, (N, 32)),
        ]:  # fmt: skip
            assert r[key].dtype == dtype and r[key].shape == shape, key
        b = r["boxes"]
        assert (
            np.all(b[:, 0] >= 0)
            and np.all(b[:, 2] <= 64)
            and np.all(b[:, 2] > b[:, 0])
            and np.all(b[:, 3] > b[:, 1])
        )
        assert np.all((r["objects_id"] >= 0) & (r["objects_id"] < 3)) and np.all(
            (r["attrs_id"] >= 0) & (r["attrs_id"] < 4)
        )
        assert np.all((r["objects_conf"] > 0) & (r["objects_conf"] <= 1))
        # The features are the RoI head's output on exactly these boxes.
        with torch.inference_mode():
            maps = detector.backbone_maps(images[i : i + 1])
            rois = torch.cat([torch.zeros(N, 1), torch.from_numpy(b)], dim=1)
            want = detector.region_features(maps, rois, sizes[i : i + 1]).numpy()
        np.testing.assert_allclose(r["features"], want, rtol=1e-5, atol=1e-5)


def test_select_boxes_orders_survivors_then_suppressed_and_pads() -> None:
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    idx, above = select_boxes(boxes, scores, 4, nms_iou=0.5, score_threshold=0.2)
    assert idx.tolist() == [0, 2, 3, 1] and above == 2  # box 1 duplicates box 0: it comes last
    idx, above = select_boxes(boxes, scores, 9, nms_iou=0.5, score_threshold=0.05)
    assert idx.tolist() == [0, 2, 3, 1, 0, 2, 3, 1, 0] and above == 3
    idx, _ = select_boxes(boxes, scores, 2, nms_iou=0.5, score_threshold=0.2)
    assert idx.tolist() == [0, 2]


def test_recall_stats() -> None:
    stats = RegionStats()
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 64, 64]], dtype=torch.float32)
    objects, attrs = torch.tensor([1, 2, 0]), torch.tensor([3, 3, 3])
    gt = torch.tensor(
        [[1, 1, 10, 10, 1, 3], [20, 20, 34, 34, 0, 3], [50, 50, 60, 60, 0, 0]], dtype=torch.float32
    )
    stats.add_ground_truth(boxes, objects, attrs, gt)  # IoUs: 0.81, 0.51, 0.02
    m = stats.metrics(3)
    assert m["recall_iou50"] == pytest.approx(2 / 3)
    assert m["recalled_shape_acc"] == pytest.approx(1 / 2) and m["recalled_color_acc"] == 1.0


def test_grid_boxes_and_positions() -> None:
    b = grid_boxes(8, 48, 64)
    assert b.shape == (64, 4)
    i, j = 2, 5  # row 2, column 5 -> index i*G + j
    assert b[i * 8 + j].tolist() == [j * 8.0, i * 6.0, (j + 1) * 8.0, (i + 1) * 6.0]
    assert b[0].tolist() == [0.0, 0.0, 8.0, 6.0] and b[-1].tolist() == [56.0, 42.0, 64.0, 48.0]


def test_grid_records_are_row_major_cells(world: Path, detector: Detector) -> None:
    params = GridFeatureParams(grid=4, batch_size=3)
    rec = list(grid_records(detector, world, params, ["world_val_000000", "world_val_000002"]))[1]
    assert rec["features"].shape == (4, 4, 32) and rec["features"].dtype == np.float32
    images, sizes = load_images(image_paths(world, ["world_val_000002"]))
    with torch.inference_mode():
        cell = torch.tensor([[0, 48.0, 16.0, 64.0, 32.0]])  # row i=1, column j=3 of a 4x4 grid on 64x64
        want = detector.region_features(detector.backbone_maps(images), cell, sizes).numpy()[0]
    np.testing.assert_allclose(rec["features"][1, 3], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(rec["features"][3, 1], want)


def test_region_store_end_to_end_and_deterministic(world: Path, detector: Detector, tmp_path: Path) -> None:
    params = RegionFeatureParams(num_boxes=N, batch_size=4)
    metrics = extract_region_features(detector, world, params, tmp_path / "a")
    extract_region_features(detector, world, params, tmp_path / "b")
    assert (tmp_path / "a/features.arrow").read_bytes() == (tmp_path / "b/features.arrow").read_bytes()
    assert metrics["images"] == 10 and metrics["gt_images"] == 8  # test instances are hidden
    assert 0 <= metrics["recall_iou50"] <= 1 and metrics["boxes_above_threshold_per_image"] <= N
    with FeatureStore.open(tmp_path / "a") as store:
        assert len(store) == 10 and store.meta["num_boxes"] == N and store.meta["dim"] == 32
        assert store.meta["objects"] == ["circle", "square", "triangle"]
        rec = store["world_test_000001"]
        assert rec["boxes"].shape == (N, 4) and rec["features"].shape == (N, 32)
        assert rec["objects_id"].dtype == np.int64 and rec["attrs_conf"].dtype == np.float32


def test_grid_store_end_to_end(world: Path, detector: Detector, tmp_path: Path) -> None:
    metrics = extract_grid_features(detector, world, GridFeatureParams(grid=8, batch_size=4), tmp_path / "g")
    assert metrics == {"images": 10, "grid": 8, "dim": 32}
    with FeatureStore.open(tmp_path / "g") as store:
        assert store["world_train_000004"]["features"].shape == (8, 8, 32)
        assert store.meta["grid"] == 8


def test_corrupt_image_raises_and_leaves_nothing(world: Path, detector: Detector, tmp_path: Path) -> None:
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    (copy / "images/world_val_000002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match="world_val_000002.png: corrupt or truncated"):
        extract_region_features(detector, copy, RegionFeatureParams(num_boxes=N), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (copy / "images/world_val_000002.png").unlink()
    with pytest.raises(InputError, match="world_val_000002.png: image file not found"):
        extract_grid_features(detector, copy, GridFeatureParams(), tmp_path / "out")
    (copy / "splits.json").write_text('{"train": "oops"}')
    with pytest.raises(InputError, match="splits.json"):
        extract_grid_features(detector, copy, GridFeatureParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
