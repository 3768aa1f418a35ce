"""Visual inputs for a batch of image ids, from a feature store.

Models see images through one of these sources, so tasks and datasets never know whether
the features are detector regions (LXMERT, VLP), grid cells (X-LXMERT) or pixels (X-VLM).
A source is called with a list of img_ids and returns a dict of (B, ...) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlpipe.errors import InputError
from vlpipe.features.store import FeatureStore


class RegionInputs:
    """Region features (LXMERT schema): features, boxes normalised to [0, 1], detector labels.

    Returns ``visual_feats`` (B, N, D) float32, ``visual_pos`` (B, N, 4) x1y1x2y2 divided by
    the image size (as the LXMERT loader does), ``obj_labels`` / ``attr_labels`` (B, N) int64
    and ``obj_conf`` / ``attr_conf`` (B, N) float32 (the targets of masked object prediction).
    """

    kind = "region"

    def __init__(
        self,
        store_dir: str | Path,
        max_boxes: int | None = None,
        feat_mean: Sequence[float] | None = None,
        feat_std: Sequence[float] | None = None,
    ):
        """``max_boxes`` keeps each image's first boxes (stores list detections best first);
        ``feat_mean`` / ``feat_std`` (D,) standardise the features (a model's input statistics)."""
        self.store = FeatureStore.open(store_dir)
        meta = self.store.meta
        if meta.get("kind") != "region":
            raise InputError(store_dir, f"expected a region feature store, found kind={meta.get('kind')!r}")
        self.feat_dim = int(meta["dim"])
        stored = int(meta["num_boxes"])
        self.num_boxes = stored if max_boxes is None else min(stored, int(max_boxes))
        self.pos_dim = 4
        self._norm: tuple[np.ndarray, np.ndarray] | None = None
        if (feat_mean is None) != (feat_std is None):
            raise ValueError("give both feat_mean and feat_std, or neither")
        if feat_mean is not None and feat_std is not None:
            mean, std = np.asarray(feat_mean, np.float32), np.asarray(feat_std, np.float32)
            if mean.shape != (self.feat_dim,) or std.shape != (self.feat_dim,) or (std <= 0).any():
                raise InputError(
                    store_dir, f"feature statistics of shape {mean.shape}/{std.shape} (std > 0) do not fit "
                    f"the store's {self.feat_dim}-dim features (a model trained on other features?)",
                )  # fmt: skip
            self._norm = (mean, std)

    def __call__(self, img_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [i for i in img_ids if i not in self.store]
        if missing:
            raise InputError(self.store.path, f"no features for img_id {missing[0]!r}")
        rows = self.store.get_many(list(img_ids))
        n = self.num_boxes
        scale = np.stack([rows["img_w"], rows["img_h"], rows["img_w"], rows["img_h"]], axis=-1)  # (B, 4)
        pos = rows["boxes"][:, :n] / scale[:, None, :].astype(np.float32)  # (B, N, 4)
        feats = rows["features"][:, :n]  # (B, N, D) read-only view of the memory map
        feats = np.ascontiguousarray(feats) if self._norm is None else (feats - self._norm[0]) / self._norm[1]
        return {
            "visual_feats": torch.from_numpy(feats),  # (B, N, D)
            "visual_pos": torch.from_numpy(np.clip(pos, 0.0, 1.0).astype(np.float32)),
            "obj_labels": torch.from_numpy(rows["objects_id"][:, :n].astype(np.int64)),
            "obj_conf": torch.from_numpy(np.ascontiguousarray(rows["objects_conf"][:, :n])),
            "attr_labels": torch.from_numpy(rows["attrs_id"][:, :n].astype(np.int64)),
            "attr_conf": torch.from_numpy(np.ascontiguousarray(rows["attrs_conf"][:, :n])),
        }


def feature_statistics(
    source: RegionInputs, img_ids: Sequence[str], batch_size: int = 256
) -> tuple[list[float], list[float]]:
    """Per-dimension mean and std (D,) of the features ``source`` gives for ``img_ids`` (every
    box it keeps), in float64 so that large stores do not lose precision."""
    total, sq, count = 0.0, 0.0, 0
    ids = list(dict.fromkeys(img_ids))
    if not ids:
        raise ValueError("feature_statistics needs at least one image")
    for start in range(0, len(ids), batch_size):
        f = source(ids[start : start + batch_size])["visual_feats"].double().reshape(-1, source.feat_dim)
        total, sq, count = total + f.sum(0), sq + (f * f).sum(0), count + f.shape[0]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)  # constant dims keep scale 1e-3
    return mean.tolist(), std.tolist()


def grid_boxes(grid: int) -> np.ndarray:
    """(G*G, 4) cell boxes (j/G, i/G, (j+1)/G, (i+1)/G), row-major (X-LXMERT)."""
    i, j = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    boxes = np.stack([j / grid, i / grid, (j + 1) / grid, (i + 1) / grid], axis=-1)
    return boxes.reshape(-1, 4).astype(np.float32)


class GridInputs:
    """Grid features (X-LXMERT): ``visual_feats`` (B, G*G, D) and cell boxes ``visual_pos`` (B, G*G, 4)."""

    kind = "grid"

    def __init__(self, store_dir: str | Path):
        self.store = FeatureStore.open(store_dir)
        meta = self.store.meta
        if meta.get("kind") != "grid":
            raise InputError(store_dir, f"expected a grid feature store, found kind={meta.get('kind')!r}")
        self.grid = int(meta["grid"])
        self.feat_dim = int(meta["dim"])
        self.num_boxes = self.grid * self.grid
        self.pos_dim = 4
        self._pos = torch.from_numpy(grid_boxes(self.grid))  # (G*G, 4)

    def __call__(self, img_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [i for i in img_ids if i not in self.store]
        if missing:
            raise InputError(self.store.path, f"no features for img_id {missing[0]!r}")
        rows = self.store.get_many(list(img_ids))
        feats = rows["features"].reshape(len(img_ids), self.num_boxes, self.feat_dim)  # (B, G*G, D)
        return {
            "visual_feats": torch.from_numpy(feats),
            "visual_pos": self._pos.expand(len(img_ids), -1, -1).clone(),
        }
