"""RoIAlign / IoU / NMS against brute-force references written straight from their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from vlpipe.features.roi import batched_nms, box_iou, nms, roi_align


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """One RoIAlign sample of a (C, H, W) map, exactly as the Mask R-CNN reference does it."""
    h, w = fmap.shape[1:]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_lo = y_hi = h - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_lo = x_hi = w - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[:, y_lo, x_lo]
        + hy * lx * fmap[:, y_lo, x_hi]
        + ly * hx * fmap[:, y_hi, x_lo]
        + ly * lx * fmap[:, y_hi, x_hi]
    )


def _naive_roi_align(feats, boxes, out, scale, ratio, aligned):
    """Per-box, per-bin, per-sample Python loops (the reference algorithm)."""
    k = boxes.shape[0]
    result = torch.zeros(k, feats.shape[1], out, out, dtype=feats.dtype)
    off = 0.5 if aligned else 0.0
    for r in range(k):
        b, x1, y1, x2, y2 = boxes[r].tolist()
        x1, y1, x2, y2 = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / out, rh / out
        gh = ratio if ratio > 0 else math.ceil(rh / out)
        gw = ratio if ratio > 0 else math.ceil(rw / out)
        count = max(gh * gw, 1)
        for py in range(out):
            for px in range(out):
                acc = torch.zeros(feats.shape[1], dtype=feats.dtype)
                for iy in range(max(gh, 0)):
                    y = y1 + py * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        x = x1 + px * bw + (ix + 0.5) * bw / gw
                        acc = acc + _bilinear(feats[int(b)], y, x)
                result[r, :, py, px] = acc / count
    return result


def _random_boxes(gen: torch.Generator, k: int, n_img: int, h: int, w: int, scale: float) -> torch.Tensor:
    """Boxes in image coordinates, many crossing or lying beyond the map borders."""
    img_h, img_w = h / scale, w / scale
    x1 = torch.rand(k, generator=gen, dtype=torch.float64) * img_w * 1.4 - 0.3 * img_w
    y1 = torch.rand(k, generator=gen, dtype=torch.float64) * img_h * 1.4 - 0.3 * img_h
    bw = torch.rand(k, generator=gen, dtype=torch.float64) * img_w * 0.8
    bh = torch.rand(k, generator=gen, dtype=torch.float64) * img_h * 0.8
    b = torch.randint(0, n_img, (k,), generator=gen).double()
    boxes = torch.stack([b, x1, y1, x1 + bw, y1 + bh], dim=1)
    # A box covering the whole image, a degenerate one, and one entirely outside.
    boxes[0, 1:] = torch.tensor([0.0, 0.0, img_w, img_h], dtype=torch.float64)
    boxes[1, 1:] = torch.tensor([3.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    boxes[2, 1:] = torch.tensor([img_w + 4, img_h + 4, img_w + 9, img_h + 6], dtype=torch.float64)
    return boxes


@pytest.mark.parametrize(
    "ratio,scale,aligned,out",
    [(2, 1.0, True, 3), (1, 0.5, True, 2), (0, 0.25, True, 3), (2, 0.5, False, 2), (0, 1.0, False, 4)],
)
def test_roi_align_matches_naive_reference(ratio: int, scale: float, aligned: bool, out: int) -> None:
    gen = torch.Generator().manual_seed(ratio * 100 + out)
    feats = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(gen, 24, 2, 7, 9, scale)
    got = roi_align(feats, boxes, out, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
    want = _naive_roi_align(feats, boxes, out, scale, ratio, aligned)
    assert got.shape == (24, 3, out, out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[2].abs().max() == 0  # a box entirely outside the map pools zeros


def test_roi_align_gradient_matches_naive_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 2, 6, 5, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(gen, 10, 2, 6, 5, 0.5)
    upstream = torch.randn(10, 2, 2, 2, generator=gen, dtype=torch.float64)
    f1 = feats.clone().requires_grad_(True)
    (roi_align(f1, boxes, 2, spatial_scale=0.5, sampling_ratio=2) * upstream).sum().backward()
    f2 = feats.clone().requires_grad_(True)
    (_naive_roi_align(f2, boxes, 2, 0.5, 2, True) * upstream).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-10, atol=1e-10)


def test_roi_align_of_constant_map_inside_is_constant() -> None:
    feats = torch.full((1, 4, 8, 8), 3.0)
    boxes = torch.tensor([[0, 4.0, 4.0, 20.0, 28.0], [0, 0.0, 0.0, 32.0, 32.0]])
    out = roi_align(feats, boxes, (2, 3), spatial_scale=0.25)
    assert out.shape == (2, 4, 2, 3)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


def test_roi_align_border_samples() -> None:
    """Samples exactly on the -1 / H limits clamp to the border; beyond them they are zero."""
    feats = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    # One sample per box, at the box centre: (4, 4), (-1, -1), (5, 5), (4.5, 1).
    boxes = torch.tensor(
        [[0, 3.0, 3.0, 5.0, 5.0], [0, -2.0, -2.0, 0.0, 0.0], [0, 4.0, 4.0, 6.0, 6.0], [0, 4.0, 0.0, 5.0, 2.0]]
    )
    out = roi_align(feats, boxes, 1, sampling_ratio=1, aligned=False).flatten()
    assert out.tolist() == [16.0, 1.0, 0.0, 0.0]
    assert (
        roi_align(
            feats, boxes[3:] - torch.tensor([0, 0.5, 0, 0.5, 0]), 1, sampling_ratio=1, aligned=False
        ).item()
        == 8.0
    )


def test_roi_align_rejects_bad_shapes_and_handles_no_boxes() -> None:
    feats = torch.zeros(1, 2, 4, 4)
    assert roi_align(feats, torch.zeros(0, 5), 3).shape == (0, 2, 3, 3)
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(feats, torch.zeros(3, 4), 3)


def _naive_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _naive_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """O(K^2) greedy NMS: a box survives if it overlaps no higher-scored survivor."""
    bl, sl = boxes.tolist(), scores.tolist()
    order = sorted(range(len(sl)), key=lambda i: (-sl[i], i))
    kept: list[int] = []
    for i in order:
        if all(_naive_iou(bl[i], bl[j]) <= thr for j in kept):
            kept.append(i)
    return kept


def _rand_xyxy(gen: torch.Generator, k: int) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=gen) * 50
    wh = torch.rand(k, 2, generator=gen) * 20 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_box_iou_matches_naive() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = _rand_xyxy(gen, 13), _rand_xyxy(gen, 9)
    want = torch.tensor([[_naive_iou(x, y) for y in b.tolist()] for x in a.tolist()])
    torch.testing.assert_close(box_iou(a, b), want)
    assert box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0  # empty boxes: no NaN


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.7])
def test_nms_matches_naive_greedy(thr: float) -> None:
    gen = torch.Generator().manual_seed(int(thr * 10))
    for _ in range(5):
        boxes = _rand_xyxy(gen, 60)
        scores = torch.rand(60, generator=gen)
        scores[5] = scores[6]  # a tie: the lower index goes first
        assert nms(boxes, scores, thr).tolist() == _naive_nms(boxes, scores, thr)


def test_batched_nms_is_per_label_nms() -> None:
    gen = torch.Generator().manual_seed(11)
    boxes = _rand_xyxy(gen, 80)
    scores = torch.rand(80, generator=gen)
    labels = torch.randint(0, 4, (80,), generator=gen)
    got = batched_nms(boxes, scores, labels, 0.4).tolist()
    want: list[int] = []
    for c in range(4):
        idx = torch.nonzero(labels == c).flatten()
        want += [int(idx[i]) for i in _naive_nms(boxes[idx], scores[idx], 0.4)]
    assert sorted(got) == sorted(want)
    assert scores[got].tolist() == sorted(scores[got].tolist(), reverse=True)
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
