"""RoIAlign, box IoU and non-maximum suppression in plain PyTorch (no torchvision).

RoIAlign follows He et al., "Mask R-CNN" (ICCV 2017), with the half-pixel correction
(``aligned=True``) of Detectron2: each output bin averages ``sampling_ratio**2``
bilinearly interpolated samples; a sample more than one pixel outside the feature map
contributes zero, one within that pixel is clamped to the border.

Bilinear interpolation is separable, so every output bin is a weighted sum of at most
``(2 * S)**2`` feature-map pixels (S samples per axis, two neighbours each). We build
those pixel indices and weights for all boxes at once and let ``F.embedding_bag``
(mode ``sum`` with per-sample weights) gather-and-sum them: one vectorised call, memory
the size of the output, and an exact gradient with respect to the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _axis_weights(
    start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, n_bins: int, n_samples: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel indices and weights of the bilinear samples along one axis.

    ``start``, ``bin_size``: (K,) box start and bin size in feature-map pixels; ``grid``:
    (K,) samples per bin for each box (may differ per box with adaptive sampling),
    ``n_samples`` its maximum. Returns ``(idx, w)`` both (K, n_bins, 2 * n_samples):
    for every bin, the two neighbouring pixels of every sample and their weights,
    already divided by the box's sample count (samples beyond ``grid`` weigh zero).
    """
    dev, dt = start.device, start.dtype
    bins = torch.arange(n_bins, device=dev, dtype=dt)  # (P,)
    sub = torch.arange(n_samples, device=dev, dtype=dt) + 0.5  # (S,)
    g = grid.clamp(min=1).to(dt)  # (K,)
    # Sample coordinate: start + p * bin + (s + 0.5) * bin / grid        (K, P, S)
    pos = start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]
    pos = pos + sub[None, None, :] * (bin_size / g)[:, None, None]
    in_grid = torch.arange(n_samples, device=dev)[None, None, :] < grid[:, None, None]  # (K, 1, S)
    inside = (pos >= -1.0) & (pos <= length)  # farther than a pixel outside: zero
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= length - 1  # last pixel: both neighbours are the last pixel
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(dt))
    keep = (inside & in_grid).to(dt) / g[:, None, None]  # (K, P, S)
    idx = torch.cat([low, high], dim=-1)  # (K, P, 2S)
    w = torch.cat([(1 - frac) * keep, frac * keep], dim=-1)  # (K, P, 2S)
    return idx, w


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """RoIAlign (Mask R-CNN) of ``boxes`` over ``features``.

    Args:
        features: (B, C, H, W) feature maps.
        boxes: (K, 5) rows ``[batch_index, x1, y1, x2, y2]`` in input-image coordinates.
        output_size: ``oh`` or ``(oh, ow)`` bins per box.
        spatial_scale: feature-map pixels per input pixel (1 / stride).
        sampling_ratio: samples per bin and axis; ``<= 0`` picks ``ceil(box / bins)``
            per box, as the reference does.
        aligned: shift box corners by -0.5 pixel so pixel centres line up (Detectron2).

    Returns:
        (K, C, oh, ow) pooled features; differentiable in ``features`` (not in boxes).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(features.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) [batch_index, x1, y1, x2, y2], got {tuple(boxes.shape)}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    n_img, chans, height, width = features.shape
    k = boxes.shape[0]
    if k == 0:
        return features.new_zeros(0, chans, oh, ow)
    boxes = boxes.detach().to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - offset for i in range(1, 5))  # (K,) each
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the legacy op forces boxes to be at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / ow, roi_h / oh
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.long, device=boxes.device)
    else:
        grid_h = torch.ceil(bin_h).long().clamp(min=0)
        grid_w = torch.ceil(bin_w).long().clamp(min=0)
    s_h = max(int(grid_h.max()), 1) if sampling_ratio <= 0 else sampling_ratio
    s_w = max(int(grid_w.max()), 1) if sampling_ratio <= 0 else sampling_ratio
    iy, wy = _axis_weights(y1, bin_h, grid_h, oh, s_h, height)  # (K, oh, 2Sh)
    ix, wx = _axis_weights(x1, bin_w, grid_w, ow, s_w, width)  # (K, ow, 2Sw)
    batch = boxes[:, 0].long().clamp(0, n_img - 1)
    # Flat pixel index b*H*W + y*W + x and weight wy*wx of every term of every bin.
    flat = (batch[:, None, None, None, None] * height + iy[:, :, None, :, None]) * width
    flat = flat + ix[:, None, :, None, :]  # (K, oh, ow, 2Sh, 2Sw)
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]  # (K, oh, ow, 2Sh, 2Sw)
    table = features.permute(0, 2, 3, 1).reshape(n_img * height * width, chans)  # (B*H*W, C)
    pooled = F.embedding_bag(
        flat.reshape(k * oh * ow, -1),
        table,
        per_sample_weights=weight.reshape(k * oh * ow, -1),
        mode="sum",
    )  # (K*oh*ow, C)
    return pooled.reshape(k, oh, ow, chans).permute(0, 3, 1, 2).contiguous()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(K, 4) x1y1x2y2 -> (K,) area (zero for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) x1y1x2y2 boxes -> (N, M); 0 where the union is 0."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(
        union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter)
    )


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression.

    Visits boxes by decreasing score (ties: lower index first) and drops every later box
    whose IoU with a kept box is greater than ``iou_threshold``. Returns the kept
    indices into ``boxes`` as a LongTensor, highest score first (torchvision semantics).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    over = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu()  # (K, K) bool
    removed = torch.zeros(order.numel(), dtype=torch.bool)
    kept: list[int] = []
    # The greedy scan is inherently sequential over kept boxes; each step is one
    # vectorised OR of a row of the precomputed overlap matrix.
    for i in range(order.numel()):
        if removed[i]:
            continue
        kept.append(i)
        removed |= over[i]
    return order[torch.tensor(kept, dtype=torch.long, device=order.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS done independently per label, in one pass.

    Boxes of different labels are moved apart by a per-label offset larger than every
    coordinate, so they never overlap; the result equals per-label :func:`nms` merged by
    decreasing score.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    span = float(boxes.abs().max()) * 2 + 1.0
    shifted = boxes + (labels.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)
