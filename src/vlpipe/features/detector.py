"""A small anchor-free object/attribute detector with a bottom-up-attention RoI head.

Two stages on one CNN backbone (output stride ``2 ** len(channels)``, 8 by default):

1. Dense detection like CenterNet (Zhou et al., "Objects as Points", 2019): per shape
   class a centre heatmap trained with the penalty-reduced focal loss, plus a sub-cell
   centre offset and a log box size at every cell. At inference the objectness peaks
   (highest class probability, 3x3 max-pool) are the box candidates.
2. A second-stage RoI head like bottom-up attention's (Anderson et al., "Bottom-Up and
   Top-Down Attention", CVPR 2018): RoIAlign (Mask R-CNN) of a box from the first and the
   last backbone maps -> two-layer MLP -> a D-dim pooled feature -> linear classifiers of
   the object class (with background) and of its attributes (colour, size, texture). Like
   Faster R-CNN it is trained on ground-truth boxes plus jittered and random boxes
   labelled by IoU. A detection's class comes from this head, and its score is
   objectness x class probability (CenterNet2, Zhou et al. 2021).

The D-dim RoI-head output is the region feature that LXMERT / VLP / X-LXMERT read
(``vlpipe.features.extract``), so its training targets make it carry shape, colour, size
and texture. RoIAlign warps every box to the same grid, which loses the absolute box size;
the head therefore also sees the box width and height relative to the image.

Saved as ``config.json`` (architecture), ``model.safetensors`` (weights) and ``meta.json``
(label names and feature size, read by downstream stages).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from vlpipe.config import DetectorParams
from vlpipe.data.images import normalise_batch, read_image, stack_images
from vlpipe.errors import InputError
from vlpipe.features.roi import batched_nms, box_iou, roi_align
from vlpipe.io import read_json, write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
ATTRIBUTES = ("color", "size", "texture")
# Label columns of a ground-truth object: shape index, then one index per attribute.
LABEL_KEYS = ("shape", *ATTRIBUTES)
FG_IOU = 0.5  # a training RoI with IoU >= 0.5 to a GT box is that object (Faster R-CNN)
EVAL_MIN_SCORE = 0.01  # detections kept for COCO AP (the curve needs the low-scored tail)
MAX_DETECTIONS = 100  # COCO's maxDets


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Vocab:
    """Label names: object classes (shapes) and the values of each attribute."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    textures: tuple[str, ...]

    @classmethod
    def from_meta(cls, meta: dict[str, Any], path: Path) -> Vocab:
        """Read the four name lists of a world (or detector) ``meta.json``."""
        lists = {}
        for key in ("shapes", "colors", "sizes", "textures"):
            names = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise InputError(path, f"{key!r} must be a non-empty list of names")
            lists[key] = tuple(names)
        return cls(**lists)

    def names(self, key: str) -> tuple[str, ...]:
        """Names of a label column of :data:`LABEL_KEYS`."""
        return {"shape": self.shapes, "color": self.colors, "size": self.sizes, "texture": self.textures}[key]


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and inference defaults; saved as ``config.json``."""

    channels: tuple[int, ...]
    feature_dim: int
    roi_size: int
    roi_hidden: int
    sampling_ratio: int
    score_threshold: float
    nms_iou: float

    @classmethod
    def from_params(cls, p: DetectorParams) -> DetectorConfig:
        return cls(
            tuple(p.channels),
            p.feature_dim,
            p.roi_size,
            p.roi_hidden,
            p.sampling_ratio,
            p.score_threshold,
            p.nms_iou,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "channels": list(self.channels)}


# --------------------------------------------------------------------------- model


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv -> GroupNorm -> ReLU. GroupNorm (not BatchNorm): no running statistics, so
    training and inference compute the same function at any batch size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(c_out, 8), c_out),
        nn.ReLU(inplace=True),
    )


class Backbone(nn.Module):
    """One stage per entry of ``channels``: a stride-2 conv block, plus a stride-1 block in
    every stage but the first. The output stride is ``2 ** len(channels)`` (8 for the default
    three stages, whose 39-pixel receptive field covers the world's largest objects).
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        stages, c_in = [], 3
        for i, c in enumerate(channels):
            # The full-resolution first stage stays a single block: it is the costliest per channel.
            blocks = [_conv_block(c_in, c, 2)] + ([_conv_block(c, c, 1)] if i > 0 else [])
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.strides = [2 ** (i + 1) for i in range(len(channels))]
        self.channels = list(channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the output of every stage, stage i: (B, C_i, H / 2^(i+1), W / 2^(i+1))."""
        maps, x = [], images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class CenterHead(nn.Module):
    """CenterNet head: class-centre heatmap logits and (offset x, offset y, log w, log h).

    One shared 3x3 conv then two 1x1 outputs (CenterNet has a 3x3 conv per output; sharing
    it halves the head's cost at no visible loss on the world).
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        width = max(channels // 2, 8)
        self.shared = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(width, num_classes, 1)
        self.box = nn.Conv2d(width, 4, 1)
        # Start every cell at the prior probability 0.1 so the focal loss starts small (CenterNet).
        nn.init.constant_(self.heatmap.bias, -math.log(9.0))

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.shared(fmap)
        return self.heatmap(x), self.box(x)  # (B, S, h, w), (B, 4, h, w)


class RoIHead(nn.Module):
    """Multi-level RoIAlign -> MLP -> D-dim region feature -> class (+ background) and attribute logits.

    Boxes are pooled from the first backbone stage (stride 2: colour and fine texture) and
    from the last (stride 8: shape and context), as FPN-style detectors pool several levels.
    Pooling the last level alone does not work here: the dense detection losses, which need
    neither colour nor texture, drive the deep features to drop both.
    """

    def __init__(
        self, config: DetectorConfig, channels: Sequence[int], strides: Sequence[int], vocab: Vocab
    ) -> None:
        super().__init__()
        self.roi_size = config.roi_size
        self.sampling_ratio = config.sampling_ratio
        self.levels = sorted({0, len(channels) - 1})
        self.scales = [1.0 / strides[i] for i in self.levels]
        flat = sum(channels[i] for i in self.levels) * config.roi_size**2 + 2  # + (box w, box h) / image size
        self.mlp = nn.Sequential(
            nn.Linear(flat, config.roi_hidden),
            nn.ReLU(),
            nn.Linear(config.roi_hidden, config.feature_dim),
            nn.ReLU(),
        )
        self.classifiers = nn.ModuleDict(
            {
                "shape": nn.Linear(config.feature_dim, len(vocab.shapes) + 1),  # index 0 = background
                "color": nn.Linear(config.feature_dim, len(vocab.colors)),
                "size": nn.Linear(config.feature_dim, len(vocab.sizes)),
                "texture": nn.Linear(config.feature_dim, len(vocab.textures)),
            }
        )

    def features(
        self, maps: Sequence[torch.Tensor], rois: torch.Tensor, image_sizes: torch.Tensor
    ) -> torch.Tensor:
        """Backbone maps, (K, 5) rois [b, x1, y1, x2, y2] px, (B, 2) image (h, w) -> (K, D)."""
        pooled = [
            roi_align(maps[i], rois, self.roi_size, scale, self.sampling_ratio).flatten(1)  # (K, C_i * r * r)
            for i, scale in zip(self.levels, self.scales, strict=True)
        ]
        dt = pooled[0].dtype
        hw = image_sizes[rois[:, 0].long()].to(dt)  # (K, 2) image (h, w)
        wh = torch.stack([(rois[:, 3] - rois[:, 1]) / hw[:, 1], (rois[:, 4] - rois[:, 2]) / hw[:, 0]], dim=1)
        return self.mlp(torch.cat([*pooled, wh.to(dt)], dim=1))  # (K, D)

    def classify(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """(K, D) -> logits per label key: shape (K, S+1) with background at 0, attributes (K, n)."""
        return {k: head(feats) for k, head in self.classifiers.items()}


@dataclass
class Candidates:
    """Top-M class-agnostic box candidates of each image, heatmap peaks first."""

    boxes: torch.Tensor  # (B, M, 4) px
    scores: torch.Tensor  # (B, M) objectness
    peak: torch.Tensor  # (B, M) bool, a local maximum of the objectness map


class Detector(nn.Module):
    """Backbone + CenterNet head + RoI head; inputs are uint8 BGR batches (B, 3, H, W)."""

    def __init__(self, config: DetectorConfig, vocab: Vocab) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.backbone = Backbone(config.channels)
        self.center = CenterHead(config.channels[-1], len(vocab.shapes))
        self.roi_head = RoIHead(config, config.channels, self.backbone.strides, vocab)

    @property
    def stride(self) -> int:
        """Output stride of the last backbone map (the CenterNet heatmap's cell size)."""
        return self.backbone.strides[-1]

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> backbone maps (one per stage), heatmap logits (B, S, h, w), box (B, 4, h, w)."""
        maps = self.backbone_maps(images)
        heat, box = self.center(maps[-1])
        return maps, heat, box

    def backbone_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (B, 3, H, W) -> the backbone map of every stage (all the RoI head needs)."""
        return self.backbone(normalise_batch(images))

    def region_features(
        self, maps: Sequence[torch.Tensor], rois: torch.Tensor, image_sizes: torch.Tensor
    ) -> torch.Tensor:
        """The D-dim pooled feature of each RoI (K, 5) [b, x1, y1, x2, y2] px -> (K, D)."""
        return self.roi_head.features(maps, rois, image_sizes)

    def classify(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.roi_head.classify(feats)

    def candidates(
        self, heat: torch.Tensor, box: torch.Tensor, image_sizes: torch.Tensor, max_candidates: int
    ) -> Candidates:
        """Decode the M best cells of each image into boxes scored by objectness.

        Objectness is the highest class probability of a cell (the class itself is left to
        the RoI head, as in two-stage detectors). Local maxima (3x3 max-pool, CenterNet's
        NMS) rank before every other cell, each group by score, so the first candidates are
        the detections proper and the rest progressively weaker guesses. Boxes are clipped
        to each image's real size.
        """
        n, _, h, w = heat.shape
        scores = heat.sigmoid().amax(dim=1)  # (B, h, w)
        peak = scores == F.max_pool2d(scores[:, None], 3, stride=1, padding=1)[:, 0]
        rank = (scores + peak.to(scores.dtype)).flatten(1)  # peaks in [1, 2], others in [0, 1)
        m = min(max_candidates, h * w)
        cell = torch.argsort(rank, dim=1, descending=True, stable=True)[:, :m]  # (B, M)
        cy, cx = (cell // w).to(box.dtype), (cell % w).to(box.dtype)
        reg = box.flatten(2).gather(2, cell[:, None, :].expand(n, 4, m))  # (B, 4, M)
        centre_x = (cx + reg[:, 0]) * self.stride
        centre_y = (cy + reg[:, 1]) * self.stride
        # exp() of a clamped log size: an untrained head cannot produce inf boxes.
        half_w = reg[:, 2].clamp(-4.0, 8.0).exp() * self.stride / 2
        half_h = reg[:, 3].clamp(-4.0, 8.0).exp() * self.stride / 2
        boxes = torch.stack(
            [centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=2
        )
        return Candidates(
            clip_boxes(boxes, image_sizes), scores.flatten(1).gather(1, cell), peak.flatten(1).gather(1, cell)
        )


def clip_boxes(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Clip (B, M, 4) boxes into their images (B, 2) (h, w), at least one pixel wide and tall."""
    h = image_sizes[:, 0, None].to(boxes.dtype)  # (B, 1)
    w = image_sizes[:, 1, None].to(boxes.dtype)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w - 1)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h - 1)
    x2 = torch.maximum(torch.minimum(boxes[..., 2], w), x1 + 1)
    y2 = torch.maximum(torch.minimum(boxes[..., 3], h), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def rois_of(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image (n_i, 4) boxes -> (sum n_i, 5) rois [batch index, x1, y1, x2, y2]."""
    parts = [torch.cat([torch.full((len(b), 1), float(i)), b.float()], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(parts) if parts else torch.zeros(0, 5)


# --------------------------------------------------------------------------- data


@dataclass
class Instances:
    """COCO instances of one split, aligned by position with ``img_ids``."""

    coco: dict[str, Any]
    img_ids: list[str]
    coco_ids: list[int]
    files: list[Path]
    boxes: list[torch.Tensor]  # (n_i, 4) float32 x1y1x2y2 px
    labels: list[torch.Tensor]  # (n_i, 4) int64: shape, color, size, texture indices
    category_ids: list[int]  # COCO category id of shape index s


def _field(path: Path, obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(path, f"{where}: missing key {key!r}")
    if not isinstance(obj[key], kind):
        raise InputError(path, f"{where}: {key!r} has the wrong type ({type(obj[key]).__name__})")
    return obj[key]


def read_instances(world_dir: Path, split: str, vocab: Vocab) -> Instances:
    """Read ``instances_{split}.json`` (COCO; category = shape, attributes per annotation).

    Raises :class:`InputError` naming the file on a missing key, an unknown category or
    attribute value, or an annotation of an unknown image.
    """
    path = Path(world_dir) / f"instances_{split}.json"
    coco = read_json(path)
    cats = _field(path, coco, "categories", list, "top level")
    cat_to_shape: dict[int, int] = {}
    for c in cats:
        name = _field(path, c, "name", str, "category")
        if name not in vocab.shapes:
            raise InputError(path, f"category {name!r} is not a shape of meta.json {list(vocab.shapes)}")
        cat_to_shape[_field(path, c, "id", int, f"category {name!r}")] = vocab.shapes.index(name)
    missing = [s for i, s in enumerate(vocab.shapes) if i not in cat_to_shape.values()]
    if missing:
        raise InputError(path, f"no category for shapes {missing}")
    category_ids = [next(c for c, s in cat_to_shape.items() if s == i) for i in range(len(vocab.shapes))]
    row: dict[int, int] = {}
    img_ids, coco_ids, files = [], [], []
    for im in _field(path, coco, "images", list, "top level"):
        cid = _field(path, im, "id", int, "image")
        row[cid] = len(img_ids)
        coco_ids.append(cid)
        img_ids.append(_field(path, im, "img_id", str, f"image {cid}"))
        files.append(Path(world_dir) / _field(path, im, "file_name", str, f"image {cid}"))
    per_image: list[list[tuple[list[float], list[int]]]] = [[] for _ in img_ids]
    for ann in _field(path, coco, "annotations", list, "top level"):
        where = f"annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
        image = _field(path, ann, "image_id", int, where)
        cat = _field(path, ann, "category_id", int, where)
        bbox = _field(path, ann, "bbox", list, where)
        attrs = _field(path, ann, "attributes", dict, where)
        if image not in row or cat not in cat_to_shape:
            raise InputError(path, f"{where}: unknown image_id {image} or category_id {cat}")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise InputError(path, f"{where}: bbox must be 4 numbers [x, y, w, h]")
        label = [cat_to_shape[cat]]
        for key in ATTRIBUTES:
            value = _field(path, attrs, key, str, f"{where} attributes")
            if value not in vocab.names(key):
                raise InputError(path, f"{where}: {key} {value!r} is not one of {list(vocab.names(key))}")
            label.append(vocab.names(key).index(value))
        x, y, w, h = (float(v) for v in bbox)
        per_image[row[image]].append(([x, y, x + w, y + h], label))
    boxes = [torch.tensor([b for b, _ in objs], dtype=torch.float32).reshape(-1, 4) for objs in per_image]
    labels = [torch.tensor([lab for _, lab in objs], dtype=torch.int64).reshape(-1, 4) for objs in per_image]
    return Instances(coco, img_ids, coco_ids, files, boxes, labels, category_ids)


def world_vocab(world_dir: Path) -> Vocab:
    """The label names of a world, from its ``meta.json``."""
    path = Path(world_dir) / "meta.json"
    return Vocab.from_meta(read_json(path), path)


def load_images(files: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read image files into a uint8 batch (N, 3, H, W) (zero-padded) and sizes (N, 2) (h, w)."""
    return stack_images([read_image(f) for f in files])


# --------------------------------------------------------------------------- training targets


@dataclass
class Targets:
    """Dense CenterNet targets of every training image (built once, before training)."""

    heatmap: torch.Tensor  # (N, S, h, w) float32, 1 at object centres
    box: torch.Tensor  # (N, 4, h, w) offset x, offset y, log w, log h (in cells)
    mask: torch.Tensor  # (N, h, w) bool, cells that carry a box target
    gt_boxes: torch.Tensor  # (N, O, 4) px, padded
    gt_labels: torch.Tensor  # (N, O, 4), padded
    gt_count: torch.Tensor  # (N,)


def build_targets(inst: Instances, num_classes: int, map_hw: tuple[int, int], stride: int) -> Targets:
    """Gaussian centre heatmaps (sigma = box side / 6 cells, at least 0.5) and box targets."""
    n, (h, w) = len(inst.img_ids), map_hw
    counts = torch.tensor([len(b) for b in inst.boxes], dtype=torch.int64)
    o_max = max(int(counts.max()) if n else 0, 1)
    gt_boxes = torch.zeros(n, o_max, 4)
    gt_labels = torch.zeros(n, o_max, 4, dtype=torch.int64)
    for i, (b, lab) in enumerate(zip(inst.boxes, inst.labels, strict=True)):
        gt_boxes[i, : len(b)], gt_labels[i, : len(b)] = b, lab
    heatmap = torch.zeros(n * num_classes, h * w)
    box = torch.zeros(n, 4, h, w)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    img = torch.repeat_interleave(torch.arange(n), counts)  # (G,) image of every object
    boxes, labels = torch.cat(inst.boxes), torch.cat(inst.labels)  # (G, 4), (G, 4)
    if len(boxes):
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / stride  # (G, 2) in cells
        size = ((boxes[:, 2:] - boxes[:, :2]) / stride).clamp(min=1e-2)  # (G, 2) in cells
        cell = centre.floor().long()
        cell[:, 0].clamp_(0, w - 1)
        cell[:, 1].clamp_(0, h - 1)
        sigma = (size / 6).clamp(min=0.5)  # (G, 2)
        xs, ys = torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32)
        gx = torch.exp(-((xs[None] - cell[:, :1]) ** 2) / (2 * sigma[:, :1] ** 2))  # (G, w)
        gy = torch.exp(-((ys[None] - cell[:, 1:]) ** 2) / (2 * sigma[:, 1:] ** 2))  # (G, h)
        blobs = (gy[:, :, None] * gx[:, None, :]).flatten(1)  # (G, h*w), exactly 1 at the centre cell
        target_row = img * num_classes + labels[:, 0]
        heatmap.scatter_reduce_(0, target_row[:, None].expand_as(blobs), blobs, "amax")
        box[img, :, cell[:, 1], cell[:, 0]] = torch.cat([centre - cell, size.log()], dim=1)
        mask[img, cell[:, 1], cell[:, 0]] = True
    return Targets(heatmap.reshape(n, num_classes, h, w), box, mask, gt_boxes, gt_labels, counts)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), per object."""
    pos = target.eq(1)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    pos_loss = ((1 - p) ** 2 * log_p)[pos].sum()
    neg_loss = (p**2 * (1 - target) ** 4 * log_not_p)[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def sample_rois(
    gt: torch.Tensor,
    gt_img: torch.Tensor,
    image_sizes: torch.Tensor,
    jitter: int,
    n_random: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Training RoIs (R, 5): every GT box, ``jitter`` perturbed copies of it, ``n_random`` random boxes per image.

    Jitter shifts the centre by up to 20% of the side and scales each side by up to e^±0.3,
    so the head sees the imprecise boxes that detection produces at extraction time.
    """
    n_img = image_sizes.shape[0]
    rep = gt.repeat(jitter, 1)  # (G*J, 4)
    wh = rep[:, 2:] - rep[:, :2]
    centre = (rep[:, :2] + rep[:, 2:]) / 2 + (torch.rand(rep.shape[0], 2, generator=gen) - 0.5) * 0.4 * wh
    wh = wh * torch.exp((torch.rand(rep.shape[0], 2, generator=gen) - 0.5) * 0.6)
    jittered = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    rand_img = torch.arange(n_img).repeat_interleave(n_random)  # (B*R,)
    hw = image_sizes[rand_img].float()  # (B*R, 2)
    side = hw.min(dim=1).values[:, None]  # (B*R, 1)
    r_wh = (
        torch.exp(torch.rand(len(rand_img), 2, generator=gen) * torch.log(0.7 * side / 4)) * 4
    )  # 4 px .. 0.7 side
    r_c = torch.rand(len(rand_img), 2, generator=gen) * hw.flip(1)
    random_boxes = torch.cat([r_c - r_wh / 2, r_c + r_wh / 2], dim=1)
    boxes = torch.cat([gt, jittered, random_boxes])
    img = torch.cat([gt_img, gt_img.repeat(jitter), rand_img])
    boxes = clip_boxes(boxes[None], image_sizes[img])[0] if len(boxes) else boxes
    return torch.cat([img[:, None].float(), boxes], dim=1)


def assign_labels(
    rois: torch.Tensor, gt: torch.Tensor, gt_img: torch.Tensor, gt_labels: torch.Tensor
) -> torch.Tensor:
    """(R, 4) labels of RoIs: the best-IoU GT of the same image if IoU >= 0.5; else shape 0 (background).

    Returned shape labels are shifted by one (0 = background); attributes of background
    RoIs are -1 (ignored by the loss).
    """
    out = torch.full((rois.shape[0], 4), -1, dtype=torch.int64)
    out[:, 0] = 0
    if gt.shape[0] == 0:
        return out
    iou = box_iou(rois[:, 1:], gt)  # (R, G)
    iou = torch.where(rois[:, :1].long() == gt_img[None, :], iou, torch.full_like(iou, -1.0))
    best, arg = iou.max(dim=1)
    fg = best >= FG_IOU
    out[fg] = gt_labels[arg[fg]]
    out[fg, 0] += 1
    return out


def _roi_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    losses = {"roi_shape": F.cross_entropy(logits["shape"], labels[:, 0])}
    for j, key in enumerate(ATTRIBUTES, start=1):
        fg = labels[:, j] >= 0
        losses[f"roi_{key}"] = (
            F.cross_entropy(logits[key][fg], labels[fg, j]) if fg.any() else logits[key].sum() * 0.0
        )
    return losses


def detector_loss(
    model: Detector,
    images: torch.Tensor,
    sizes: torch.Tensor,
    t: Targets,
    idx: torch.Tensor,
    params: DetectorParams,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """All training losses of one batch (``idx`` selects the images' rows of the targets)."""
    maps, heat, box = model(images)
    mask = t.mask[idx]  # (B, h, w)
    n_pos = mask.sum().clamp(min=1)
    box_t = t.box[idx].permute(0, 2, 3, 1)[mask]  # (P, 4)
    box_p = box.permute(0, 2, 3, 1)[mask]  # (P, 4)
    losses = {
        "heatmap": focal_loss(heat, t.heatmap[idx]),
        "offset": F.l1_loss(box_p[:, :2], box_t[:, :2], reduction="sum") / n_pos,
        "box_size": F.l1_loss(box_p[:, 2:], box_t[:, 2:], reduction="sum") / n_pos,
    }
    valid = torch.arange(t.gt_boxes.shape[1])[None, :] < t.gt_count[idx][:, None]  # (B, O)
    gt, gt_labels = t.gt_boxes[idx][valid], t.gt_labels[idx][valid]  # (G, 4) each
    gt_img = torch.arange(len(idx))[:, None].expand_as(valid)[valid]  # (G,)
    rois = sample_rois(gt, gt_img, sizes, params.jitter_per_box, params.random_rois, gen)
    labels = assign_labels(rois, gt, gt_img, gt_labels)
    logits = model.classify(model.region_features(maps, rois, sizes))
    losses.update(_roi_loss(logits, labels))
    return losses


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return f


def train_detector(params: DetectorParams, world_dir: Path, out_dir: Path) -> dict:
    """Train on ``instances_train.json``, save to ``out_dir``, return train + val metrics.

    ``out_dir`` must exist (the stage passes a fresh temporary directory). Deterministic on
    CPU: the same params and world give the same weights bit for bit. Metrics hold no
    wall-clock times (they must be reproducible); the time is logged instead.
    """
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    start = time.perf_counter()
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    vocab = world_vocab(world_dir)
    inst = read_instances(world_dir, "train", vocab)
    if params.max_train_images is not None:
        n = params.max_train_images
        inst = replace(
            inst,
            img_ids=inst.img_ids[:n],
            coco_ids=inst.coco_ids[:n],
            files=inst.files[:n],
            boxes=inst.boxes[:n],
            labels=inst.labels[:n],
        )
    images, sizes = load_images(inst.files)
    model = Detector(DetectorConfig.from_params(params), vocab)
    map_hw = model.backbone(torch.zeros(1, 3, *images.shape[2:]))[-1].shape[2:]
    targets = build_targets(inst, len(vocab.shapes), tuple(map_hw), model.stride)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(images) / params.batch_size)
    total = steps_per_epoch * params.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, total // 20)))
    history: list[dict[str, float]] = []
    model.train()
    with tqdm(total=total, desc="detector", disable=None) as bar:
        for _ in range(params.epochs):
            sums: dict[str, float] = {}
            for idx in torch.randperm(len(images), generator=gen).split(params.batch_size):
                losses = detector_loss(model, images[idx], sizes[idx], targets, idx, params, gen)
                loss = sum(losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                sched.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / steps_per_epoch
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append({**sums, "total": sum(sums.values())})
    model.eval()
    save_detector(model, out_dir)
    train_seconds = time.perf_counter() - start
    val = evaluate_detector(model, world_dir, "val") if (world_dir / "instances_val.json").is_file() else {}
    log.info("detector: trained %d images x %d epochs in %.1f s", len(images), params.epochs, train_seconds)
    return {
        "train": {
            "images": len(images),
            "epochs": params.epochs,
            "loss_first_epoch": history[0]["total"],
            "loss_last_epoch": history[-1]["total"],
            "losses_last_epoch": {k: v for k, v in history[-1].items() if k != "total"},
        },
        "val": val,
    }


# --------------------------------------------------------------------------- save / load


def save_detector(model: Detector, out_dir: Path) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``meta.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    v = model.vocab
    write_json(out_dir / CONFIG_FILE, model.config.to_json())
    state = {k: t.detach().contiguous() for k, t in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(
        out_dir / META_FILE,
        {
            "kind": "detector",
            "shapes": list(v.shapes),
            "colors": list(v.colors),
            "sizes": list(v.sizes),
            "textures": list(v.textures),
            "objects": list(v.shapes),
            "attributes": list(v.colors),
            "feature_dim": model.config.feature_dim,
            "stride": model.stride,
        },
    )


def load_detector(model_dir: Path) -> Detector:
    """Load a saved detector in eval mode; :class:`InputError` on missing or mismatched files."""
    model_dir = Path(model_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        if not (model_dir / name).is_file():
            raise InputError(model_dir / name, "detector file not found (run the `detector` stage first)")
    cfg_path = model_dir / CONFIG_FILE
    raw = read_json(cfg_path)
    try:
        config = DetectorConfig(**{**raw, "channels": tuple(raw["channels"])})
    except (TypeError, KeyError) as e:
        raise InputError(cfg_path, f"not a detector config: {e}") from e
    meta_path = model_dir / META_FILE
    meta = read_json(meta_path)
    vocab = Vocab.from_meta(meta, meta_path)
    if meta.get("feature_dim") != config.feature_dim:
        raise InputError(
            meta_path, f"feature_dim {meta.get('feature_dim')} != config.json's {config.feature_dim}"
        )
    model = Detector(config, vocab)
    weights_path = model_dir / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise InputError(weights_path, f"unreadable safetensors file: {e}") from e
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise InputError(
            weights_path,
            f"weights do not match config.json/meta.json: missing {missing[:5]}, unexpected {unexpected[:5]}",
        )
    bad = [k for k, t in state.items() if t.shape != expected[k].shape]
    if bad:
        raise InputError(weights_path, f"tensor shapes do not match config.json/meta.json: {bad[:5]}")
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------- inference & evaluation


def batched(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``."""
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


@dataclass
class Detections:
    """Final detections of one image, best first."""

    boxes: torch.Tensor  # (n, 4) px
    scores: torch.Tensor  # (n,)
    labels: torch.Tensor  # (n,) shape index (RoI head)
    attrs: dict[str, torch.Tensor]  # RoI-head argmax per attribute, (n,) each


@torch.inference_mode()
def detect(
    detector: Detector, images: torch.Tensor, sizes: torch.Tensor, min_score: float
) -> list[Detections]:
    """Detect objects in a uint8 batch (B, 3, H, W) with real sizes (B, 2); see :func:`decode_detections`."""
    maps, heat, box = detector(images)
    return decode_detections(detector, maps, heat, box, sizes, min_score)


@torch.inference_mode()
def decode_detections(
    detector: Detector,
    maps: Sequence[torch.Tensor],
    heat: torch.Tensor,
    box: torch.Tensor,
    sizes: torch.Tensor,
    min_score: float,
) -> list[Detections]:
    """Two-stage detections: class-agnostic candidates, classified by the RoI head.

    Candidates are the objectness peaks; score = objectness x RoI-head probability of the
    best foreground class (the probabilistic two-stage score of CenterNet2, Zhou et al.
    2021); detections scoring >= ``min_score`` go through per-class NMS, at most 100 per image.
    """
    cand = detector.candidates(heat, box, sizes, MAX_DETECTIONS)
    n, m = cand.scores.shape
    feats = detector.region_features(maps, rois_of(list(cand.boxes)), sizes)  # (B*M, D)
    logits = detector.classify(feats)
    cls_prob, cls = logits["shape"].softmax(dim=1)[:, 1:].max(dim=1)  # background column dropped
    scores = cand.scores * cls_prob.reshape(n, m)  # (B, M)
    out = []
    for i in range(n):
        rows = torch.arange(i * m, (i + 1) * m)
        ok = (scores[i] >= min_score) & cand.peak[i]
        rows, b, s = rows[ok], cand.boxes[i][ok], scores[i][ok]
        keep = batched_nms(b, s, cls[rows], detector.config.nms_iou)[:MAX_DETECTIONS]
        rows = rows[keep]
        out.append(
            Detections(b[keep], s[keep], cls[rows], {k: logits[k][rows].argmax(1) for k in ATTRIBUTES})
        )
    return out


def _coco_ap(inst: Instances, results: list[dict[str, Any]]) -> tuple[float, float]:
    """COCO AP@[.5:.95] and AP50 of ``results`` with pycocotools' COCOeval (bbox)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    gt_data = dict(inst.coco)
    gt_data["annotations"] = [
        {**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]), "iscrowd": a.get("iscrowd", 0)}
        for a in inst.coco["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


def _match(pred: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of predictions (by score) to GT boxes at IoU >= 0.5."""
    if len(pred) == 0 or len(gt) == 0:
        return []
    iou = box_iou(pred, gt)
    taken: set[int] = set()
    pairs = []
    for p in torch.argsort(scores, descending=True, stable=True).tolist():
        best = [(float(iou[p, g]), g) for g in range(len(gt)) if g not in taken and iou[p, g] >= 0.5]
        if best:
            g = max(best)[1]
            taken.add(g)
            pairs.append((p, g))
    return pairs


def evaluate_detector(detector: Detector, world_dir: Path, split: str = "val", batch_size: int = 64) -> dict:
    """Detection and RoI-head quality on ``instances_{split}.json``.

    * ``map``, ``ap50``: COCO bbox AP (pycocotools COCOeval) of detections (category = shape).
    * ``precision``, ``recall``, ``color_acc``: detections scoring >= the detector's
      ``score_threshold``, matched one-to-one to GT at IoU 0.5; colour accuracy of matches.
    * ``roi_{shape,color,size,texture}_acc``: RoI-head accuracy on the ground-truth boxes.
    """
    inst = read_instances(Path(world_dir), split, detector.vocab)
    detector.eval()
    results: list[dict[str, Any]] = []
    n_gt = n_det = n_match = color_ok = 0
    roi_ok = dict.fromkeys(LABEL_KEYS, 0)
    thr = detector.config.score_threshold
    for sl in batched(len(inst.img_ids), batch_size):
        images, sizes = load_images(inst.files[sl])
        with torch.inference_mode():
            maps, heat, box = detector(images)
            # RoI-head predictions on the ground-truth boxes (second-stage quality alone).
            logits = detector.classify(detector.region_features(maps, rois_of(inst.boxes[sl]), sizes))
        dets = decode_detections(detector, maps, heat, box, sizes, EVAL_MIN_SCORE)
        gt_boxes, gt_labels = inst.boxes[sl], inst.labels[sl]
        for d, gt, lab, cid in zip(dets, gt_boxes, gt_labels, inst.coco_ids[sl], strict=True):
            for b, s, c in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True):
                results.append(
                    {
                        "image_id": cid,
                        "category_id": inst.category_ids[c],
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": s,
                    }
                )
            confident = d.scores >= thr
            pairs = _match(d.boxes[confident], d.scores[confident], gt)
            colors = d.attrs["color"][confident]
            n_gt, n_det, n_match = n_gt + len(gt), n_det + int(confident.sum()), n_match + len(pairs)
            color_ok += sum(int(colors[p] == lab[g, 1]) for p, g in pairs)
        labels = torch.cat(gt_labels)
        for j, key in enumerate(LABEL_KEYS):
            pred = logits[key].argmax(1) - (1 if key == "shape" else 0)
            roi_ok[key] += int((pred == labels[:, j]).sum())
    mean_ap, ap50 = _coco_ap(inst, results)
    return {
        "map": mean_ap,
        "ap50": ap50,
        "precision": n_match / max(n_det, 1),
        "recall": n_match / max(n_gt, 1),
        "color_acc": color_ok / max(n_match, 1),
        **{f"roi_{k}_acc": v / max(n_gt, 1) for k, v in roi_ok.items()},
        "images": len(inst.img_ids),
        "objects": n_gt,
    }
