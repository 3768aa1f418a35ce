"""X-LXMERT's visual codebook: faiss k-means over grid feature vectors.

X-LXMERT (Cho et al., 2020) clusters the 8x8 grid features of COCO train images with
faiss k-means (K=10000, 20 iterations), then replaces each grid cell by the id of its
nearest centroid; pre-training predicts these ids for masked cells. Here the centroids are
fitted on the training images' grid vectors (optionally a seeded sample of them) and every
image of the grid store, all splits, gets its (G*G,) code ids.

Output directory: ``centroids.npy`` (K, D) float32, ``ids.arrow`` (a store with img_id and
ids (G*G,) int32, row-major cells as in the grid store) and ``meta.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from vlpipe.config import CodebookParams
from vlpipe.errors import InputError
from vlpipe.features.store import Column, FeatureStore, store_meta, write_arrow
from vlpipe.io import atomic_dir, read_json, write_json

CENTROIDS_FILE = "centroids.npy"
IDS_FILE = "ids.arrow"
META_FILE = "meta.json"


def _index(centroids: np.ndarray) -> faiss.IndexFlatL2:
    """Exact L2 index over the (K, D) centroids."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def _nearest(index: faiss.IndexFlatL2, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M,) squared distances and (M,) int64 ids of the nearest centroid of each (M, D) vector."""
    dist, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)  # (M, 1) each
    # faiss computes |x|^2 + |c|^2 - 2 x.c, which can round below zero for a near-exact match.
    return np.maximum(dist[:, 0], 0.0), ids[:, 0].astype(np.int64)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact nearest centroid (faiss IndexFlatL2) of each of the (M, D) vectors: (M,) int64."""
    if vectors.ndim != 2 or centroids.ndim != 2 or vectors.shape[1] != centroids.shape[1]:
        raise ValueError(f"vectors {vectors.shape} and centroids {centroids.shape} must be (M, D) and (K, D)")
    return _nearest(_index(centroids), vectors)[1]


def _grid_store(grid_dir: Path) -> tuple[FeatureStore, int, int]:
    store = FeatureStore.open(grid_dir)
    if store.meta.get("kind") != "grid":
        raise InputError(store.path, f"expected a grid store, found kind={store.meta.get('kind')!r}")
    return store, int(store.meta["grid"]), int(store.meta["dim"])


def _training_vectors(
    store: FeatureStore, train_ids: Sequence[str], sample_size: int | None, seed: int
) -> np.ndarray:
    """(S, D) float32 grid vectors of the training images: all of them, or a seeded sample.

    Sampling picks flat (image, cell) positions without replacement and reads only the
    images it touches, so the full (N*G*G, D) matrix is never built when sampling.
    """
    grid, dim = int(store.meta["grid"]), int(store.meta["dim"])
    cells = grid * grid
    total = len(train_ids) * cells
    if sample_size is None or sample_size >= total:
        flat = np.arange(total)
    else:
        flat = np.sort(np.random.default_rng(seed).choice(total, size=sample_size, replace=False))  # (S,)
    image, cell = np.divmod(flat, cells)  # (S,) each
    out = np.empty((len(flat), dim), dtype=np.float32)  # (S, D)
    bounds = np.flatnonzero(np.diff(image)) + 1  # start of each image's run in the sorted sample
    for run in np.split(np.arange(len(flat)), bounds):
        feats = store[train_ids[image[run[0]]]]["features"].reshape(cells, dim)  # (G*G, D) view
        out[run] = feats[cell[run]]
    return out


def _fit(vectors: np.ndarray, params: CodebookParams) -> np.ndarray:
    """Seeded faiss k-means; returns (K, D) float32 centroids.

    ``max_points_per_centroid`` is lifted so faiss does not subsample behind our back
    (``sample_size`` is the only sampling knob) and ``min_points_per_centroid=1`` quiets its
    warning on tiny worlds. Results do not depend on the OpenMP thread count: faiss assigns
    each point independently and sums each centroid's points in a fixed order.
    """
    n, dim = vectors.shape
    kmeans = faiss.Kmeans(
        dim,
        params.k,
        niter=params.iterations,
        seed=params.seed,
        max_points_per_centroid=max(n, 1),
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(vectors)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


@dataclass
class _Usage:
    """Code statistics over the training images' grid cells, accumulated while assigning."""

    k: int
    counts: np.ndarray = field(init=False)
    squared: float = 0.0  # sum of squared distances to the nearest centroid

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.k, dtype=np.int64)

    def add(self, dist: np.ndarray, ids: np.ndarray) -> None:
        self.counts += np.bincount(ids, minlength=self.k)
        self.squared += float(dist.astype(np.float64).sum())

    def metrics(self) -> dict[str, float]:
        n = int(self.counts.sum())
        p = self.counts[self.counts > 0] / n
        return {
            "inertia": self.squared / n,
            "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "dead_code_share": float((self.counts == 0).mean()),
            "majority_code_share": float(self.counts.max() / n),
        }


def _code_records(
    store: FeatureStore, index: faiss.IndexFlatL2, train: set[str], usage: _Usage
) -> Iterator[dict]:
    """Nearest-centroid ids of every grid cell of every image, batch by batch."""
    for ids, arrays in store.iter_batches():
        feats = arrays["features"]  # (B, G, G, D) zero-copy view
        rows, cells = feats.shape[0], feats.shape[1] * feats.shape[2]
        dist, codes = _nearest(index, feats.reshape(rows * cells, -1))  # (B*G*G,) each
        dist, codes = dist.reshape(rows, cells), codes.reshape(rows, cells)
        for r, img_id in enumerate(ids):
            if img_id in train:
                usage.add(dist[r], codes[r])
            yield {"img_id": img_id, "ids": codes[r].astype(np.int32)}


def build_codebook(params: CodebookParams, grid_dir: Path, train_ids: list[str], out_dir: Path) -> dict:
    """Fit the X-LXMERT codebook on ``train_ids`` of the grid store and code every image.

    Writes ``out_dir`` atomically (centroids.npy, ids.arrow, meta.json) and returns metrics
    on the training cells: inertia (mean squared distance to the nearest centroid),
    code-usage perplexity, share of dead codes and the share of the most frequent code
    (the majority-code baseline of X-LXMERT's cluster prediction).
    """
    store, grid, dim = _grid_store(Path(grid_dir))
    missing = [i for i in train_ids if i not in store]
    if not train_ids or missing:
        raise InputError(
            store.path, f"train img_ids missing from the grid store: {missing[:5]} ({len(missing)})"
        )
    if len(set(train_ids)) != len(train_ids):
        raise InputError(store.path, "train img_ids contain duplicates")
    vectors = _training_vectors(store, train_ids, params.sample_size, params.seed)  # (S, D)
    if len(vectors) < params.k:
        raise InputError(store.path, f"only {len(vectors)} training grid vectors for k={params.k} centroids")
    centroids = _fit(vectors, params)  # (K, D)
    usage = _Usage(params.k)
    columns = [Column("ids", "int32", (grid * grid,))]
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / CENTROIDS_FILE, centroids)
        records = _code_records(store, _index(centroids), set(train_ids), usage)
        count = write_arrow(tmp / IDS_FILE, "codes", columns, records)
        extra = {
            "iterations": params.iterations,
            "seed": params.seed,
            "sample_size": params.sample_size,
            "fit_vectors": len(vectors),
            "train_images": len(train_ids),
        }
        meta = store_meta("codes", columns, count, extra, filename=IDS_FILE)
        write_json(tmp / META_FILE, {**meta, "k": params.k, "dim": dim, "grid": grid})
    return {"k": params.k, "fit_vectors": len(vectors), **usage.metrics()}


def load_codebook(directory: Path) -> tuple[np.ndarray, FeatureStore]:
    """(K, D) float32 centroids and the memory-mapped ``img_id -> ids (G*G,) int32`` store."""
    directory = Path(directory)
    meta = read_json(directory / META_FILE)
    path = directory / CENTROIDS_FILE
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        centroids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a readable .npy array: {e}") from e
    try:
        k, dim, grid = int(meta["k"]), int(meta["dim"]), int(meta["grid"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(directory / META_FILE, f"codebook meta needs k, dim, grid: {e!r}") from e
    if centroids.shape != (k, dim) or centroids.dtype != np.float32:
        raise InputError(
            path, f"has {centroids.shape} {centroids.dtype}, meta.json says ({k}, {dim}) float32"
        )
    codes = FeatureStore.open(directory, IDS_FILE)
    if codes.meta["columns"].get("ids", {}).get("shape") != [grid * grid]:
        raise InputError(codes.path, f"ids column does not hold {grid}x{grid} cells")
    return centroids, codes
