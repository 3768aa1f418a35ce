"""Region and grid features of every world image from our detector's RoI head.

* Region features, as bottom-up attention produces them for LXMERT / VLP (Anderson et al.
  2018; formats.md §1): exactly ``num_boxes`` boxes per image (LXMERT: 36), each with its
  D-dim pooled RoI feature, object class (argmax over the shapes, background excluded, and
  its probability) and attribute (argmax colour and its probability).
* Grid features, as X-LXMERT (Cho et al. 2020) takes them from its detector: the G x G grid
  cells of the image used as boxes through the same RoI head, stored (G, G, D) row-major;
  cell (i, j) sits at (j/G, i/G, (j+1)/G, (i+1)/G) (``vlpipe.features.store.grid_positions``).

Records are produced by generators (:func:`region_records`, :func:`grid_records`) that the
feature store consumes batch by batch, so memory stays flat however many images there are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlpipe.config import GridFeatureParams, RegionFeatureParams
from vlpipe.errors import InputError
from vlpipe.features.detector import Detector, batched, load_images, read_instances
from vlpipe.features.roi import box_iou, nms
from vlpipe.features.store import grid_positions, write_grid_store, write_region_store
from vlpipe.io import read_json

log = logging.getLogger(__name__)

IMAGE_PATTERN = "images/{img_id}.png"  # docs/layout.md, data/world/
CANDIDATES_PER_BOX = 4  # heatmap candidates decoded per requested box, before NMS


# --------------------------------------------------------------------------- inputs


def read_splits(world_dir: Path) -> dict[str, list[str]]:
    """``splits.json``: split name -> image ids; :class:`InputError` on a bad schema."""
    path = Path(world_dir) / "splits.json"
    splits = read_json(path)
    if not isinstance(splits, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in splits.values()
    ):
        raise InputError(path, "expected an object mapping each split to a list of image id strings")
    return splits


def all_image_ids(world_dir: Path) -> list[str]:
    """Every image id of every split, in the file's split order."""
    return [img_id for ids in read_splits(world_dir).values() for img_id in ids]


def image_paths(world_dir: Path, img_ids: Sequence[str]) -> list[Path]:
    return [Path(world_dir) / IMAGE_PATTERN.format(img_id=i) for i in img_ids]


def ground_truth(world_dir: Path, detector: Detector) -> dict[str, torch.Tensor]:
    """img_id -> (n, 6) [x1, y1, x2, y2, shape, colour] of the splits whose instances are public."""
    gt = {}
    for split in ("train", "val"):
        if (Path(world_dir) / f"instances_{split}.json").is_file():
            inst = read_instances(Path(world_dir), split, detector.vocab)
            for img_id, b, lab in zip(inst.img_ids, inst.boxes, inst.labels, strict=True):
                gt[img_id] = torch.cat([b, lab[:, :2].float()], dim=1)  # (n, 6): box, shape, colour
    return gt


# --------------------------------------------------------------------------- box selection


def select_boxes(
    boxes: torch.Tensor, scores: torch.Tensor, num_boxes: int, nms_iou: float, score_threshold: float
) -> tuple[torch.Tensor, int]:
    """Indices (num_boxes,) of the boxes to keep for one image, best first, and how many of
    them are detections proper (NMS survivors scoring >= ``score_threshold``).

    Class-agnostic NMS survivors come first (so every object appears once, however many
    class channels fire on it), by decreasing score; then the suppressed candidates by
    score. If there are fewer candidates than ``num_boxes`` the list is repeated, so every
    image has exactly ``num_boxes`` boxes as the LXMERT schema requires.
    """
    if len(boxes) == 0:
        raise ValueError("select_boxes needs at least one candidate box")
    keep = nms(boxes, scores, nms_iou)
    rest = torch.ones(len(boxes), dtype=torch.bool)
    rest[keep] = False
    rest_idx = torch.nonzero(rest).flatten()
    rest_idx = rest_idx[torch.argsort(scores[rest_idx], descending=True, stable=True)]
    order = torch.cat([keep, rest_idx])
    repeats = -(-num_boxes // len(order))  # ceil
    n_above = min(int((scores[keep] >= score_threshold).sum()), num_boxes)
    return order.repeat(repeats)[:num_boxes], n_above


# --------------------------------------------------------------------------- region features


@dataclass
class RegionStats:
    """Running totals for the region-feature metrics."""

    images: int = 0
    above_threshold: int = 0
    gt_images: int = 0
    gt_objects: int = 0
    recalled: int = 0
    shape_ok: int = 0
    color_ok: int = 0

    def add_ground_truth(
        self, boxes: torch.Tensor, objects: torch.Tensor, attrs: torch.Tensor, gt: torch.Tensor
    ) -> None:
        """Recall of GT objects by the image's boxes at IoU 0.5, and labels of the best box."""
        self.gt_images += 1
        self.gt_objects += len(gt)
        if len(gt) == 0:
            return
        iou = box_iou(gt[:, :4], boxes)  # (n, N)
        best, arg = iou.max(dim=1)
        hit = best >= 0.5
        self.recalled += int(hit.sum())
        self.shape_ok += int((objects[arg[hit]] == gt[hit, 4].long()).sum())
        self.color_ok += int((attrs[arg[hit]] == gt[hit, 5].long()).sum())

    def metrics(self, num_boxes: int) -> dict[str, Any]:
        return {
            "images": self.images,
            "num_boxes": num_boxes,
            "boxes_above_threshold_per_image": self.above_threshold / max(self.images, 1),
            "gt_images": self.gt_images,
            "recall_iou50": self.recalled / max(self.gt_objects, 1),
            "recalled_shape_acc": self.shape_ok / max(self.recalled, 1),
            "recalled_color_acc": self.color_ok / max(self.recalled, 1),
        }


def _argmax_conf(probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(K, n) probabilities -> argmax (K,) int64 and its probability (K,) float32."""
    conf, idx = probs.max(dim=1)
    return idx.numpy().astype(np.int64), conf.numpy().astype(np.float32)


@torch.inference_mode()
def region_records(
    detector: Detector,
    world_dir: Path,
    params: RegionFeatureParams,
    img_ids: Sequence[str],
    stats: RegionStats | None = None,
    gt: dict[str, torch.Tensor] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one LXMERT-schema record per image (formats.md §1), ``num_boxes`` boxes each.

    Boxes: heatmap candidates -> class-agnostic NMS -> :func:`select_boxes`. Objects: RoI-head
    argmax over the shapes with background excluded (bottom-up attention drops its
    background column the same way), ``objects_conf`` its softmax probability; attributes:
    the colour head. ``stats`` (optional) accumulates counts for the metrics, with recall
    against ``gt`` (img_id -> (n, 6) box, shape, colour) where given.
    """
    detector.eval()
    n = params.num_boxes
    for sl in batched(len(img_ids), params.batch_size):
        ids = list(img_ids[sl])
        images, sizes = load_images(image_paths(world_dir, ids))
        maps, heat, box = detector(images)
        cand = detector.candidates(heat, box, sizes, CANDIDATES_PER_BOX * n)
        picks = [
            select_boxes(cand.boxes[i], cand.scores[i], n, params.nms_iou, params.score_threshold)
            for i in range(len(ids))
        ]
        boxes = torch.stack([cand.boxes[i][idx] for i, (idx, _) in enumerate(picks)])  # (B, N, 4)
        rois = torch.cat(
            [torch.arange(len(ids)).repeat_interleave(n)[:, None].float(), boxes.reshape(-1, 4)], dim=1
        )
        feats = detector.region_features(maps, rois, sizes)  # (B*N, D)
        logits = detector.classify(feats)
        obj_id, obj_conf = _argmax_conf(logits["shape"].softmax(dim=1)[:, 1:])  # background column dropped
        attr_id, attr_conf = _argmax_conf(logits["color"].softmax(dim=1))
        feats_np = feats.numpy().astype(np.float32).reshape(len(ids), n, -1)
        for i, img_id in enumerate(ids):
            rows = slice(i * n, (i + 1) * n)
            if stats is not None:
                stats.images += 1
                stats.above_threshold += picks[i][1]
                if gt is not None and img_id in gt:
                    stats.add_ground_truth(
                        boxes[i], torch.from_numpy(obj_id[rows]), torch.from_numpy(attr_id[rows]), gt[img_id]
                    )
            yield {
                "img_id": img_id,
                "img_h": int(sizes[i, 0]),
                "img_w": int(sizes[i, 1]),
                "objects_id": obj_id[rows],
                "objects_conf": obj_conf[rows],
                "attrs_id": attr_id[rows],
                "attrs_conf": attr_conf[rows],
                "boxes": boxes[i].numpy().astype(np.float32),
                "features": feats_np[i],
            }


def extract_region_features(
    detector: Detector, world_dir: Path, params: RegionFeatureParams, out_dir: Path
) -> dict:
    """Write the region store of every image in ``splits.json`` to ``out_dir``; return metrics.

    Metrics: images, boxes per image scoring above ``score_threshold`` (after NMS), recall of
    the public (train/val) ground-truth objects by the ``num_boxes`` boxes at IoU 0.5, and
    the shape / colour accuracy of the best box of each recalled object.
    """
    world_dir = Path(world_dir)
    start = time.perf_counter()
    ids = all_image_ids(world_dir)
    stats = RegionStats()
    records = region_records(detector, world_dir, params, ids, stats, ground_truth(world_dir, detector))
    v = detector.vocab
    extra = {
        "source": "vlpipe detector",
        "objects": list(v.shapes),
        "attributes": list(v.colors),
        "score_threshold": params.score_threshold,
        "nms_iou": params.nms_iou,
    }
    write_region_store(
        Path(out_dir),
        tqdm(records, total=len(ids), desc="region features", disable=None),
        params.num_boxes,
        detector.feature_dim,
        extra,
    )
    log.info("region features: %d images in %.1f s", stats.images, time.perf_counter() - start)
    return stats.metrics(params.num_boxes)


# --------------------------------------------------------------------------- grid features


def grid_boxes(grid: int, img_h: int, img_w: int) -> torch.Tensor:
    """(G*G, 4) pixel boxes of the grid cells, row-major (cell (i, j) at index i*G + j)."""
    scale = torch.tensor([img_w, img_h, img_w, img_h], dtype=torch.float32)
    return torch.from_numpy(grid_positions(grid)) * scale


@torch.inference_mode()
def grid_records(
    detector: Detector, world_dir: Path, params: GridFeatureParams, img_ids: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """Yield ``{img_id, img_h, img_w, features (G, G, D) float32}`` per image."""
    detector.eval()
    g = params.grid
    for sl in batched(len(img_ids), params.batch_size):
        ids = list(img_ids[sl])
        images, sizes = load_images(image_paths(world_dir, ids))
        maps = detector.backbone_maps(images)
        cells = [grid_boxes(g, int(h), int(w)) for h, w in sizes.tolist()]  # each (G*G, 4)
        rois = torch.cat(
            [torch.arange(len(ids)).repeat_interleave(g * g)[:, None].float(), torch.cat(cells)], dim=1
        )
        feats = detector.region_features(maps, rois, sizes).numpy().astype(np.float32)  # (B*G*G, D)
        feats = feats.reshape(len(ids), g, g, -1)
        for i, img_id in enumerate(ids):
            yield {
                "img_id": img_id,
                "img_h": int(sizes[i, 0]),
                "img_w": int(sizes[i, 1]),
                "features": feats[i],
            }


def extract_grid_features(
    detector: Detector, world_dir: Path, params: GridFeatureParams, out_dir: Path
) -> dict:
    """Write the grid store (X-LXMERT) of every image in ``splits.json`` to ``out_dir``; return metrics."""
    world_dir = Path(world_dir)
    start = time.perf_counter()
    ids = all_image_ids(world_dir)
    records = grid_records(detector, world_dir, params, ids)
    write_grid_store(
        Path(out_dir),
        tqdm(records, total=len(ids), desc="grid features", disable=None),
        params.grid,
        detector.feature_dim,
        {"source": "vlpipe detector"},
    )
    log.info("grid features: %d images in %.1f s", len(ids), time.perf_counter() - start)
    return {"images": len(ids), "grid": params.grid, "dim": detector.feature_dim}
