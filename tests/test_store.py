"""The memory-mapped Arrow feature store and its TSV / HDF5 import-export (tiny, offline)."""

from __future__ import annotations

import base64
import csv
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vlpipe.errors import InputError
from vlpipe.features.store import (
    FeatureStore,
    export_lxmert_tsv,
    export_xlxmert_hdf5,
    grid_positions,
    import_lxmert_tsv,
    import_xlxmert_hdf5,
    write_grid_store,
    write_region_store,
)

N, D = 4, 6  # boxes per image, feature dim


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def _region(img_id: str, rng: np.random.Generator) -> dict:
    return {
        "img_id": img_id,
        "img_h": int(rng.integers(50, 500)),
        "img_w": int(rng.integers(50, 500)),
        "objects_id": rng.integers(0, 1600, N).astype(np.int64),
        "objects_conf": rng.random(N, dtype=np.float32),
        "attrs_id": rng.integers(0, 400, N).astype(np.int64),
        "attrs_conf": rng.random(N, dtype=np.float32),
        "boxes": (rng.random((N, 4), dtype=np.float32) * 50),
        "features": rng.standard_normal((N, D), dtype=np.float32),
    }


def _tsv_fields(r: dict) -> list:
    return [
        r["img_id"], r["img_h"], r["img_w"], _b64(r["objects_id"]), _b64(r["objects_conf"]),
        _b64(r["attrs_id"]), _b64(r["attrs_conf"]), N, _b64(r["boxes"]), _b64(r["features"]),
    ]  # fmt: skip


def _write_tsv(path: Path, records: list[dict], lineterminator: str = "\r\n") -> None:
    """Write records the way the reference extractor does: csv writer, delimiter tab."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator=lineterminator)
        for r in records:
            writer.writerow(_tsv_fields(r))


@pytest.fixture
def records() -> list[dict]:
    rng = np.random.default_rng(0)
    return [_region(f"COCO_train2014_{i:012d}", rng) for i in range(7)]


@pytest.fixture
def region_dir(tmp_path: Path, records: list[dict]) -> Path:
    out = tmp_path / "region"
    write_region_store(out, iter(records), num_boxes=N, dim=D, batch_rows=3)  # 3 record batches
    return out


# ------------------------------------------------------------------------ TSV


@pytest.mark.parametrize("terminator", ["\r\n", "\n"])
def test_tsv_round_trip_is_byte_identical(tmp_path: Path, records: list[dict], terminator: str) -> None:
    records[2]["img_id"] = 'odd "quoted"\tid'  # csv writer quotes this field
    src, back = tmp_path / "in.tsv", tmp_path / "out.tsv"
    _write_tsv(src, records, terminator)
    # One hand-made line our writer would not produce (padded int): kept verbatim.
    with open(src, "a", newline="") as f:
        fields = [str(x) for x in _tsv_fields({**records[0], "img_id": "padded"})]
        fields[1] = "0" + fields[1]
        f.write("\t".join(fields) + terminator)
    info = import_lxmert_tsv(src, tmp_path / "store")
    assert info == {"count": 8, "num_boxes": N, "dim": D, "verbatim_lines": 1}
    export_lxmert_tsv(tmp_path / "store", back)
    assert back.read_bytes() == src.read_bytes()
    store = FeatureStore.open(tmp_path / "store")
    assert store.ids[2] == 'odd "quoted"\tid'
    np.testing.assert_array_equal(store[records[5]["img_id"]]["features"], records[5]["features"])
    assert int(store["padded"]["img_h"]) == records[0]["img_h"]


def test_export_of_a_written_store_reads_back(tmp_path: Path, region_dir: Path, records: list[dict]) -> None:
    export_lxmert_tsv(region_dir, tmp_path / "x.tsv")
    lines = (tmp_path / "x.tsv").read_bytes().split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == len(records) + 1
    import_lxmert_tsv(tmp_path / "x.tsv", tmp_path / "again")
    again = FeatureStore.open(tmp_path / "again")
    for r in records:
        for key, value in again[r["img_id"]].items():
            np.testing.assert_array_equal(value, r[key])


def _corrupt_line(fields: list[str], kind: str) -> list[str]:
    if kind == "truncated":
        return fields[:6]
    if kind == "bad_base64":
        return fields[:8] + ["!!notbase64!!"] + fields[9:]
    if kind == "wrong_bytes":
        return fields[:3] + [_b64(np.zeros(N - 1, dtype=np.int64))] + fields[4:]
    return fields[:7] + [str(N + 1)] + fields[8:]  # num_boxes disagrees with the first line


@pytest.mark.parametrize("kind", ["truncated", "bad_base64", "wrong_bytes", "num_boxes"])
def test_corrupt_tsv_line_names_file_line_and_img_id(tmp_path: Path, records: list[dict], kind: str) -> None:
    src = tmp_path / "bad.tsv"
    _write_tsv(src, records)
    lines = src.read_bytes().decode().split("\r\n")
    lines[2] = "\t".join(_corrupt_line(lines[2].split("\t"), kind))
    src.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(InputError) as err:
        import_lxmert_tsv(src, tmp_path / "store")
    msg = str(err.value)
    assert "bad.tsv" in msg and "line 3" in msg and records[2]["img_id"] in msg, msg
    assert not (tmp_path / "store").exists()  # atomic: nothing left behind
    assert not any(p.name.startswith(".store") for p in tmp_path.iterdir())


def test_tsv_file_cut_mid_line(tmp_path: Path, records: list[dict]) -> None:
    src = tmp_path / "cut.tsv"
    _write_tsv(src, records)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 37])  # the last line loses the end of its features
    with pytest.raises(InputError, match=rf"cut\.tsv: line 7: img_id '{records[6]['img_id']}'"):
        import_lxmert_tsv(src, tmp_path / "store")


# ------------------------------------------------------------------------ store


def test_lookup_by_id_across_batches(region_dir: Path, records: list[dict]) -> None:
    store = FeatureStore.open(region_dir)
    assert len(store) == 7 and store.ids == tuple(r["img_id"] for r in records)
    assert store.meta["kind"] == "region" and store.meta["num_boxes"] == N and store.meta["dim"] == D
    for row, r in enumerate(records):
        assert r["img_id"] in store and store.index(r["img_id"]) == row
        got = store[r["img_id"]]
        assert set(got) == set(r) - {"img_id"}
        for key, value in got.items():
            np.testing.assert_array_equal(value, r[key])
        assert got["features"].shape == (N, D) and got["boxes"].dtype == np.float32
    assert "nope" not in store
    with pytest.raises(KeyError, match="nope"):
        store["nope"]


def test_get_many_and_normalized_boxes(region_dir: Path, records: list[dict]) -> None:
    store = FeatureStore.open(region_dir)
    ids = [records[5]["img_id"], records[0]["img_id"], records[3]["img_id"]]
    batch = store.get_many(ids)
    assert batch["features"].shape == (3, N, D) and batch["img_w"].shape == (3,)
    np.testing.assert_array_equal(batch["features"][0], records[5]["features"])
    np.testing.assert_array_equal(batch["objects_id"][2], records[3]["objects_id"])
    r = records[4]
    want = r["boxes"] / np.array([r["img_w"], r["img_h"], r["img_w"], r["img_h"]], dtype=np.float32)
    np.testing.assert_allclose(store.normalized_boxes(r["img_id"]), want, rtol=1e-6)


def test_region_inputs_keep_the_first_max_boxes(region_dir: Path, records: list[dict]) -> None:
    from vlpipe.data.visual import RegionInputs

    ids = [records[2]["img_id"], records[-1]["img_id"]]
    full, cut = RegionInputs(region_dir)(ids), RegionInputs(region_dir, max_boxes=3)(ids)
    assert full["visual_feats"].shape == (2, N, D) and cut["visual_feats"].shape == (2, 3, D)
    for key in ("visual_feats", "visual_pos", "obj_labels", "obj_conf", "attr_labels", "attr_conf"):
        torch.testing.assert_close(cut[key], full[key][:, :3])  # the store's first (best) boxes
    assert RegionInputs(region_dir, max_boxes=10 * N).num_boxes == N


def test_lookups_are_zero_copy_read_only_views(region_dir: Path, records: list[dict]) -> None:
    store = FeatureStore.open(region_dir)
    a = store[records[4]["img_id"]]["features"]
    b = store[records[4]["img_id"]]["features"]
    assert not a.flags.owndata and not a.flags.writeable
    assert np.shares_memory(a, b)  # two lookups, one memory: the mapped file, not copies
    _, arrays = next(store.iter_batches())
    assert np.shares_memory(arrays["features"][0], store[records[0]["img_id"]]["features"])
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def test_pickle_carries_only_the_path(region_dir: Path, records: list[dict]) -> None:
    store = FeatureStore.open(region_dir)
    blob = pickle.dumps(store)
    assert len(blob) < 500
    clone = pickle.loads(blob)
    assert clone._state is None  # reopened lazily, on first use in the worker
    np.testing.assert_array_equal(clone[records[1]["img_id"]]["boxes"], records[1]["boxes"])


class _StoreDataset:
    """Map-style dataset over a store, as a training loader would use it."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        rec = self.store.row(i)
        return {"pid": os.getpid(), "features": np.array(rec["features"]), "img_h": int(rec["img_h"])}


def test_store_in_two_dataloader_workers(region_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    store = FeatureStore.open(region_dir)
    loader = torch.utils.data.DataLoader(
        _StoreDataset(store), batch_size=2, num_workers=2, multiprocessing_context="spawn"
    )
    batches = list(loader)
    pids = {int(p) for b in batches for p in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids
    feats = torch.cat([b["features"] for b in batches]).numpy()
    want = np.stack([store.row(i)["features"] for i in range(len(store))])
    assert feats.tobytes() == want.tobytes()


def test_truncated_arrow_file(region_dir: Path) -> None:
    path = region_dir / "features.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"features\.arrow: not a readable Arrow IPC file"):
        FeatureStore.open(region_dir)


def test_meta_that_disagrees_with_the_file(region_dir: Path) -> None:
    meta_path = region_dir / "meta.json"
    meta = meta_path.read_text()
    meta_path.write_text(meta.replace('"count": 7', '"count": 8'))
    with pytest.raises(InputError, match=r"features\.arrow: disagrees with meta\.json: .*count=8"):
        FeatureStore.open(region_dir)
    meta_path.write_text(
        meta.replace(
            f'"shape": [\n        {N},\n        {D}\n', f'"shape": [\n        {N},\n        {D + 1}\n'
        )
    )
    with pytest.raises(InputError, match=r"disagrees with meta\.json"):
        FeatureStore.open(region_dir)


def test_writer_rejects_bad_records_and_leaves_nothing(tmp_path: Path, records: list[dict]) -> None:
    bad = dict(records[3], features=np.zeros((N, D + 1), dtype=np.float32))
    with pytest.raises(ValueError, match=rf"{records[3]['img_id']}.*features has shape"):
        write_region_store(tmp_path / "r", iter([records[0], bad]), num_boxes=N, dim=D)
    wide = dict(records[1], features=records[1]["features"].astype(np.float64))
    with pytest.raises(ValueError, match="dtype float64"):
        write_region_store(tmp_path / "r", iter([wide]), num_boxes=N, dim=D)
    with pytest.raises(ValueError, match="appears twice"):
        write_region_store(tmp_path / "r", iter([records[0], records[0]]), num_boxes=N, dim=D)
    assert list(tmp_path.iterdir()) == []


def test_store_files_are_deterministic(tmp_path: Path, records: list[dict]) -> None:
    for name in ("a", "b"):
        write_region_store(tmp_path / name, iter(records), num_boxes=N, dim=D)
    for f in ("features.arrow", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


# ------------------------------------------------------------------------ grid / HDF5


def _grid_records(n: int, g: int = 3, d: int = 5) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "img_id": f"img{i}",
            "img_h": 64,
            "img_w": 80,
            "features": rng.standard_normal((g, g, d), dtype=np.float32),
        }
        for i in range(n)
    ]


def test_grid_store_and_hdf5_round_trip(tmp_path: Path) -> None:
    recs = _grid_records(5)
    write_grid_store(tmp_path / "grid", iter(recs), grid=3, dim=5, batch_rows=2)
    store = FeatureStore.open(tmp_path / "grid")
    assert store.meta["kind"] == "grid" and store.meta["grid"] == 3 and "j/G" in store.meta["positions"]
    export_xlxmert_hdf5(tmp_path / "grid", tmp_path / "g.h5")
    with h5py.File(tmp_path / "g.h5", "r") as f:  # the reference layout
        assert f["img3/features"].shape == (3, 3, 5) and f["img3/features"].dtype == np.float32
    assert import_xlxmert_hdf5(tmp_path / "g.h5", tmp_path / "back") == {"count": 5, "grid": 3, "dim": 5}
    back = FeatureStore.open(tmp_path / "back")
    for r in recs:
        np.testing.assert_array_equal(back[r["img_id"]]["features"], r["features"])
        assert int(back[r["img_id"]]["img_w"]) == 80


def _h5_with(path: Path, damage: str) -> None:
    recs = _grid_records(4, g=4, d=16)
    with h5py.File(path, "w") as f:
        for r in recs:
            grp = f.create_group(r["img_id"])
            if r["img_id"] == "img2" and damage == "missing":
                grp["other"] = r["features"]
            elif r["img_id"] == "img2" and damage == "shape":
                grp["features"] = r["features"][:2]
            else:
                grp.create_dataset("features", data=r["features"], chunks=(4, 4, 16), compression="gzip")
    if damage == "bytes":  # overwrite img2's compressed chunk on disk
        with h5py.File(path, "r") as f:
            info = f["img2/features"].id.get_chunk_info(0)
        with open(path, "r+b") as raw:
            raw.seek(info.byte_offset)
            raw.write(b"\xff" * info.size)


@pytest.mark.parametrize("damage", ["missing", "shape", "bytes"])
def test_corrupt_hdf5_entry_names_file_and_img_id(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "grid.h5"
    _h5_with(path, damage)
    with pytest.raises(InputError, match=r"grid\.h5: img_id 'img2'"):
        import_xlxmert_hdf5(path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_grid_positions_row_major() -> None:
    pos = grid_positions(8)
    assert pos.shape == (64, 4)
    i, j = 2, 5
    np.testing.assert_allclose(pos[i * 8 + j], [j / 8, i / 8, (j + 1) / 8, (i + 1) / 8])
