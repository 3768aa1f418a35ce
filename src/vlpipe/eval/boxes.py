"""Box geometry for grounding: format conversions, IoU, generalized IoU, accuracy at IoU.

Boxes are float tensors ``(..., 4)``. Grounding models regress ``(cx, cy, w, h)`` normalised
to [0, 1] (X-VLM, Zeng et al. 2022, formats.md §5); annotations are COCO pixel
``[x, y, w, h]``; the overlap measures work on corner boxes ``(x1, y1, x2, y2)``.
Generalized IoU follows Rezatofighi et al. (CVPR 2019): ``IoU - |C \\ (A ∪ B)| / |C|`` with
``C`` the smallest box enclosing both; it lies in (-1, 1] and, unlike IoU, still has a
gradient when the boxes do not overlap.

Everything is element-wise over the leading dimensions (pairs of boxes, not all-pairs
matrices): a prediction is always compared with its own target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

EPS = 1e-7  # guards the divisions for degenerate (zero-area) boxes


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` centre/size -> corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` corners -> centre/size."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` COCO ``[x, y, w, h]`` -> corners."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    # (..., 4) corners -> (...); inverted boxes count as empty
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.maximum(a[..., :2], b[..., :2])  # (..., 2) top-left of the intersection
    hi = torch.minimum(a[..., 2:], b[..., 2:])  # (..., 2) bottom-right
    inter = (hi - lo).clamp(min=0).prod(-1)  # (...)
    return inter, _area(a) + _area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of corner boxes ``(..., 4)`` -> ``(...)`` in [0, 1]."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=EPS)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise generalized IoU of corner boxes ``(..., 4)`` -> ``(...)`` in (-1, 1]."""
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=EPS)
    lo = torch.minimum(a[..., :2], b[..., :2])  # the enclosing box C
    hi = torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (hi - lo).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=EPS)


def box_regression_losses(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """X-VLM's grounding losses on ``(B, 4)`` normalised ``(cx, cy, w, h)`` boxes.

    ``bbox_l1``: L1 over the four coordinates (mean over rows, sum over coordinates divided by
    4 as a mean); ``bbox_giou``: mean of ``1 - GIoU`` of the corner boxes. Both are 0 for an
    empty batch (a mixed batch may hold no region).
    """
    if pred.shape[0] == 0:
        zero = pred.sum() * 0.0  # keeps the head in the graph (DDP expects every parameter used)
        return {"bbox_l1": zero, "bbox_giou": zero}
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().mean()
    giou = generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))  # (B,)
    return {"bbox_l1": l1, "bbox_giou": (1.0 - giou).mean()}


def accuracy_at_iou(
    predictions: Mapping[Any, Sequence[float]], ground_truth: Mapping[Any, Sequence[float]], threshold: float = 0.5
) -> dict[str, float]:
    """Grounding accuracy: fraction of referring expressions whose predicted box has
    IoU >= ``threshold`` with the annotated one (RefCOCO's metric), plus the mean IoU.

    Both mappings hold COCO pixel boxes ``[x, y, w, h]`` keyed by ref_id; every ground-truth
    key needs a prediction (extra predictions are ignored).
    """
    if not ground_truth:
        raise ValueError("no ground-truth boxes to evaluate")
    missing = [k for k in ground_truth if k not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ground_truth)} boxes have no prediction, e.g. {missing[:5]}")
    keys = list(ground_truth)
    pred = xywh_to_xyxy(torch.tensor([list(predictions[k]) for k in keys], dtype=torch.float64))  # (N, 4)
    gt = xywh_to_xyxy(torch.tensor([list(ground_truth[k]) for k in keys], dtype=torch.float64))
    iou = box_iou(pred, gt)  # (N,)
    return {"accuracy": float((iou >= threshold).double().mean()), "mean_iou": float(iou.mean())}
