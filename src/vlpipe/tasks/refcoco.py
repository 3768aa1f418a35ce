"""RefCOCO-style grounding (Kazemzadeh et al. 2014; Yu et al. 2016) as X-VLM fine-tunes it:
regress the referred object's box from the fused [CLS] of (image, expression), L1 + (1 - GIoU)
on normalised (cx, cy, w, h) (Zeng et al. 2022, §4.2). Metric: accuracy at IoU >= 0.5 per
split (``val``; ``testA``, ``testB`` on the local leaderboard, from ``data/world/hidden``).

The ``test`` split is testA + testB together; its submission ``test_predict.json`` is
``[{"ref_id": int, "bbox": [x, y, w, h]}]`` in pixels, scored per test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpipe.data.examples import Example
from vlpipe.data.formats.refcoco import box_to_cxcywh, read_refcoco, read_refcoco_hidden
from vlpipe.data.formats.schema import is_box
from vlpipe.data.images import read_image
from vlpipe.errors import InputError
from vlpipe.eval.boxes import accuracy_at_iou, box_regression_losses
from vlpipe.io import read_json, write_json
from vlpipe.tasks.base import Task

TEST_SPLITS = ("testA", "testB")
IOU_THRESHOLD = 0.5


class RefcocoTask(Task):
    """Box regression on the world's ``refcoco/{train,val,testA,testB}.json``."""

    name = "refcoco"
    num_images = 1
    submission_name = "test_predict.json"

    def __init__(self, world_dir: Path):
        super().__init__(world_dir)
        self._sizes: dict[str, tuple[int, int]] = {}  # image path -> (width, height)

    # ---- data
    def _image_size(self, relative: str) -> tuple[int, int]:
        """(width, height) of an image, read once (the boxes are normalised by it)."""
        if relative not in self._sizes:
            h, w = read_image(self.world_dir / relative).shape[:2]
            self._sizes[relative] = (w, h)
        return self._sizes[relative]

    def _split_examples(self, split: str) -> list[Example]:
        labelled = split not in TEST_SPLITS
        out = []
        for r in read_refcoco(self.world_dir / "refcoco" / f"{split}.json", labelled=labelled):
            w, h = self._image_size(r["image"])
            target = box_to_cxcywh(r["bbox"], w, h) if labelled else None
            info = {"split": split, "size": (w, h), "bbox": r.get("bbox")}
            out.append(Example(key=r["ref_id"], img_ids=(Path(r["image"]).stem,), sent=r["text"], target=target, info=info))
        return out

    def examples(self, split: str) -> list[Example]:
        """``train`` / ``val`` (with boxes) or ``test`` (= testA + testB, without boxes)."""
        if split == "test":
            return [ex for s in TEST_SPLITS for ex in self._split_examples(s)]
        return self._split_examples(split)

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        return torch.tensor([list(ex.target) for ex in examples], dtype=torch.float32)  # (B, 4) cx, cy, w, h

    # ---- model side
    def build_head(self, hidden_size: int) -> nn.Module:
        from vlpipe.models.xvlm import BoxHead

        return BoxHead(hidden_size)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        # logits: the head's sigmoid boxes (B, 4)
        losses = box_regression_losses(logits, targets)
        return losses | {"loss": losses["bbox_l1"] + losses["bbox_giou"]}

    def predict(self, logits: torch.Tensor, examples: Sequence[Example]) -> dict[Any, list[float]]:
        """Normalised (cx, cy, w, h) -> COCO pixel [x, y, w, h] of each example's image."""
        out = {}
        for ex, (cx, cy, bw, bh) in zip(examples, logits.float().tolist(), strict=True):
            w, h = ex.info["size"]
            # a box of zero size is no box (the submission reader rejects it): keep a hundredth of a pixel
            out[ex.key] = [(cx - bw / 2) * w, (cy - bh / 2) * h, max(bw * w, 0.01), max(bh * h, 0.01)]
        return out

    # ---- evaluation
    def metric(self, predictions: dict[Any, list[float]], split: str) -> dict[str, Any]:
        gt = {ex.key: ex.info["bbox"] for ex in self.examples(split)}
        return accuracy_at_iou(predictions, gt, IOU_THRESHOLD)

    def hidden_ground_truth(self) -> dict[int, list[float]]:
        boxes: dict[int, list[float]] = {}
        for s in TEST_SPLITS:
            boxes |= read_refcoco_hidden(self.world_dir / "hidden" / f"refcoco_{s}.json")
        return boxes

    def score(self, predictions: dict[Any, list[float]], ground_truth: Any) -> dict[str, Any]:
        """Accuracy@0.5 over both test splits and per split (the RefCOCO+ table's columns)."""
        out: dict[str, Any] = accuracy_at_iou(predictions, ground_truth, IOU_THRESHOLD)
        for s in TEST_SPLITS:
            keys = [ex.key for ex in self._split_examples(s)]
            missing = [k for k in keys if k not in ground_truth]
            if missing:
                raise InputError(self.world_dir / "hidden" / f"refcoco_{s}.json", f"no box for ref_ids {missing[:5]}")
            out[s] = accuracy_at_iou(predictions, {k: ground_truth[k] for k in keys}, IOU_THRESHOLD)
        return out

    def write_submission(self, predictions: dict[Any, list[float]], out_dir: Path) -> Path:
        path = self.submission_path(out_dir)
        rows = [{"ref_id": int(k), "bbox": [round(float(v), 2) for v in box]} for k, box in sorted(predictions.items())]
        write_json(path, rows, indent=None)
        return path

    def read_submission(self, path: Path) -> dict[int, list[float]]:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise InputError(path, "expected a list of {ref_id, bbox}")
        out: dict[int, list[float]] = {}
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or set(r) != {"ref_id", "bbox"}:
                raise InputError(path, f"entry {i}: expected keys ref_id, bbox; got {r!r}")
            if not isinstance(r["ref_id"], int) or isinstance(r["ref_id"], bool):
                raise InputError(path, f"entry {i}: ref_id must be an integer")
            problem = is_box(r["bbox"])
            if problem:
                raise InputError(path, f"entry {i}: bbox: {problem}")
            if r["ref_id"] in out:
                raise InputError(path, f"entry {i}: duplicate ref_id {r['ref_id']}")
            out[r["ref_id"]] = r["bbox"]
        return out
