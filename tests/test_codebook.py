"""X-LXMERT codebook: faiss k-means over grid vectors, code ids, metrics, determinism."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from vlpipe.config import CodebookParams
from vlpipe.errors import InputError
from vlpipe.features.codebook import assign, build_codebook, load_codebook
from vlpipe.features.store import write_grid_store, write_region_store

G, D = 3, 8  # grid side, feature dim


@pytest.fixture
def grid_dir(tmp_path: Path) -> Path:
    """24 images (16 train, 8 val) whose cells are noisy copies of 6 prototypes."""
    rng = np.random.default_rng(7)
    protos = rng.standard_normal((6, D)).astype(np.float32) * 3  # (6, D)
    recs = []
    for i in range(24):
        which = rng.integers(0, 6, (G, G))  # (G, G)
        feats = protos[which] + 0.3 * rng.standard_normal((G, G, D), dtype=np.float32)  # (G, G, D)
        split = "train" if i < 16 else "val"
        recs.append({"img_id": f"{split}{i}", "img_h": 32, "img_w": 32, "features": feats.astype(np.float32)})
    out = tmp_path / "grid"
    write_grid_store(out, iter(recs), grid=G, dim=D, batch_rows=5)
    return out


def _train(n: int = 16) -> list[str]:
    return [f"train{i}" for i in range(n)]


def _vectors(grid_dir: Path, ids: list[str]) -> np.ndarray:
    from vlpipe.features.store import FeatureStore

    store = FeatureStore.open(grid_dir)
    return np.concatenate([store[i]["features"].reshape(G * G, D) for i in ids])  # (n*G*G, D)


def test_ids_are_the_nearest_centroids(tmp_path: Path, grid_dir: Path) -> None:
    build_codebook(CodebookParams(k=8, iterations=10), grid_dir, _train(), tmp_path / "cb")
    centroids, codes = load_codebook(tmp_path / "cb")
    assert centroids.shape == (8, D) and centroids.dtype == np.float32
    assert len(codes) == 24 and "val20" in codes  # every split is coded
    for img_id in codes.ids:
        x = _vectors(grid_dir, [img_id])  # (G*G, D)
        d2 = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(
            -1
        )  # (G*G, K)
        got = codes[img_id]["ids"]
        assert got.dtype == np.int32 and got.shape == (G * G,)
        np.testing.assert_array_equal(got, d2.argmin(1))


def test_assign_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    vectors, centroids = rng.standard_normal((200, 5)), rng.standard_normal((17, 5))
    got = assign(vectors.astype(np.float32), centroids.astype(np.float32))
    d2 = ((vectors[:, None] - centroids[None]) ** 2).sum(-1)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, d2.argmin(1))


def test_metrics_agree_with_the_written_codes(tmp_path: Path, grid_dir: Path) -> None:
    m = build_codebook(CodebookParams(k=12, iterations=10), grid_dir, _train(), tmp_path / "cb")
    centroids, codes = load_codebook(tmp_path / "cb")
    ids = np.concatenate([codes[i]["ids"] for i in _train()])  # (16*G*G,)
    counts = np.bincount(ids, minlength=12)
    p = counts[counts > 0] / counts.sum()
    assert m["fit_vectors"] == 16 * G * G and m["k"] == 12
    assert m["majority_code_share"] == pytest.approx(counts.max() / counts.sum())
    assert m["dead_code_share"] == pytest.approx((counts == 0).mean())
    assert m["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    x = _vectors(grid_dir, _train())
    assert m["inertia"] == pytest.approx(((x - centroids[ids]) ** 2).sum(1).mean(), rel=1e-5)
    assert m["inertia"] < 0.3**2 * D * 1.5  # 6 clear clusters: within-cluster noise only


def test_codebook_is_bitwise_deterministic_across_thread_counts(tmp_path: Path, grid_dir: Path) -> None:
    params = CodebookParams(k=8, iterations=5, seed=3)
    before = faiss.omp_get_max_threads()
    metrics = []
    try:
        for threads, name in ((1, "a"), (2, "b")):
            faiss.omp_set_num_threads(threads)
            metrics.append(build_codebook(params, grid_dir, _train(), tmp_path / name))
    finally:
        faiss.omp_set_num_threads(before)
    assert metrics[0] == metrics[1]
    for f in ("centroids.npy", "ids.arrow", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_sample_size_and_seed(tmp_path: Path, grid_dir: Path) -> None:
    m = build_codebook(CodebookParams(k=4, iterations=5, sample_size=40), grid_dir, _train(), tmp_path / "a")
    assert m["fit_vectors"] == 40
    build_codebook(
        CodebookParams(k=4, iterations=5, sample_size=40, seed=1), grid_dir, _train(), tmp_path / "b"
    )
    a, b = np.load(tmp_path / "a" / "centroids.npy"), np.load(tmp_path / "b" / "centroids.npy")
    assert a.tobytes() != b.tobytes()


def test_bad_inputs(tmp_path: Path, grid_dir: Path) -> None:
    with pytest.raises(InputError, match="nope"):
        build_codebook(CodebookParams(k=4), grid_dir, ["train0", "nope"], tmp_path / "cb")
    with pytest.raises(InputError, match="only 9 training grid vectors for k=10"):
        build_codebook(CodebookParams(k=10), grid_dir, ["train0"], tmp_path / "cb")
    region = tmp_path / "region"
    write_region_store(region, iter([]), num_boxes=2, dim=D)
    with pytest.raises(InputError, match="expected a grid store"):
        build_codebook(CodebookParams(k=4), region, ["x"], tmp_path / "cb")
    assert not (tmp_path / "cb").exists()
    build_codebook(CodebookParams(k=4, iterations=2), grid_dir, _train(), tmp_path / "cb")
    (tmp_path / "cb" / "centroids.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError, match=r"centroids\.npy"):
        load_codebook(tmp_path / "cb")
