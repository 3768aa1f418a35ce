"""Memory and start-up cost: reference-style TSV loading vs the memory-mapped Arrow store.

The reference LXMERT loader decodes the whole bottom-up-attention TSV into Python dicts of
NumPy arrays in RAM before training starts (formats.md §1: minutes to start, 207 GB for 4
data workers on COCO). This benchmark writes a synthetic TSV (default 2000 images x 36
boxes x 2048 floats, ~800 MB) in a temporary directory, imports it into our store, then,
in a fresh child process per approach and DataLoader start method, measures:

* open time: decode the TSV into dicts (baseline) vs ``FeatureStore.open`` (ours);
* RSS growth of the loading process at open;
* with ``--workers`` DataLoader workers that each iterate the whole set, touching every
  feature (fork and spawn start methods): the sum of the workers' USS (private pages), and
  for loader + workers together the PSS of anonymous memory (heap RAM, not reclaimable
  without swap) and of file-backed memory (page cache: shared by every process and every
  run that maps the file, and reclaimable), read from /proc/<pid>/smaps_rollup.

Ratios are ours / baseline from the same run. Linux only (reads /proc). The page cache is
warm for both approaches (both files were just written). Run:
``.venv/bin/python benchmarks/store_memory.py [--images 2000]``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlpipe.features.store import LXMERT_TSV_FIELDS, FeatureStore, import_lxmert_tsv

MB = 1 << 20


def memory(pid: int | str = "self") -> dict[str, int]:
    """Memory of a process in bytes, from /proc/<pid>/smaps_rollup.

    rss: resident; uss: private pages (Private_Clean + Private_Dirty); pss_anon: proportional
    share of anonymous memory (heap: RAM that cannot be reclaimed without swap); pss_file:
    proportional share of file-backed pages (page cache: shared, reclaimable).
    """
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    uss = kb["Private_Clean"] + kb["Private_Dirty"]
    return {
        "rss": kb["Rss"] << 10,
        "uss": uss << 10,
        "pss_anon": kb["Pss_Anon"] << 10,
        "pss_file": kb["Pss_File"] << 10,
    }


def write_tsv(path: Path, images: int, boxes: int, dim: int, seed: int) -> None:
    """A synthetic LXMERT TSV, byte for byte as the reference extractor's csv writer (tab) writes it."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        for i in range(images):
            arrays = [
                rng.integers(0, 1600, boxes).astype(np.int64),  # objects_id
                rng.random(boxes, dtype=np.float32),  # objects_conf
                rng.integers(0, 400, boxes).astype(np.int64),  # attrs_id
                rng.random(boxes, dtype=np.float32),  # attrs_conf
                rng.random((boxes, 4), dtype=np.float32) * 400,  # boxes
                rng.random((boxes, dim), dtype=np.float32),  # features
            ]
            enc = [base64.b64encode(a.tobytes()).decode("ascii") for a in arrays]
            # The bytes csv.writer(delimiter="\t") writes for these fields (none needs quoting);
            # joined directly because the writer's per-character scan of 400 KB fields is slow.
            fields = [f"COCO_train2014_{i:012d}", "480", "640", *enc[:4], str(boxes), *enc[4:]]
            f.write("\t".join(fields) + "\r\n")


def load_tsv_in_ram(path: Path) -> dict[str, dict[str, Any]]:
    """Reference-style loading: every line decoded into a dict of NumPy arrays, all in RAM."""
    shapes = {"objects_id": np.int64, "objects_conf": np.float32, "attrs_id": np.int64}
    shapes |= {"attrs_conf": np.float32, "boxes": np.float32, "features": np.float32}
    data: dict[str, dict[str, Any]] = {}
    old = csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f, LXMERT_TSV_FIELDS, delimiter="\t"):
                n = int(row["num_boxes"])
                item: dict[str, Any] = {"img_h": int(row["img_h"]), "img_w": int(row["img_w"])}
                for key, dtype in shapes.items():
                    arr = np.frombuffer(base64.b64decode(row[key]), dtype=dtype)
                    item[key] = arr.reshape(n, -1) if key in ("boxes", "features") else arr
                data[row["img_id"]] = item
    finally:
        csv.field_size_limit(old)
    return data


class InRam:
    """Dataset view of the in-RAM dicts."""

    def __init__(self, data: dict[str, dict[str, Any]]) -> None:
        self.data = data
        self.ids = list(data)

    def features(self, i: int) -> np.ndarray:
        return self.data[self.ids[i]]["features"]

    def __len__(self) -> int:
        return len(self.ids)


class Mapped:
    """Dataset view of the store (pickles as a path; workers map the file themselves)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def features(self, i: int) -> np.ndarray:
        return self.store.row(i)["features"]

    def __len__(self) -> int:
        return len(self.store)


class Sweep(torch.utils.data.IterableDataset):
    """Every DataLoader worker reads the whole set, touching each feature, then reports its memory."""

    def __init__(self, source: InRam | Mapped) -> None:
        self.source = source

    def __iter__(self) -> Iterator[dict[str, float]]:
        total = 0.0
        for i in range(len(self.source)):
            total += float(self.source.features(i).sum())  # touches every page of every image
        # The loader process's share is read while every worker still maps the data.
        parent = {f"parent_{k}": v for k, v in memory(os.getppid()).items()}
        yield {"checksum": total, **memory(), **parent}


def measure(approach: str, path: str, workers: int, start: str, out: Any) -> None:
    """Child process: open one way, then sweep with ``workers`` DataLoader workers."""
    torch.set_num_threads(1)
    before = memory()
    t0 = time.perf_counter()
    source = InRam(load_tsv_in_ram(Path(path))) if approach == "baseline" else Mapped(FeatureStore.open(path))
    opened = time.perf_counter() - t0
    after = memory()
    loader = torch.utils.data.DataLoader(
        Sweep(source),
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=start,
    )
    t1 = time.perf_counter()
    reports = list(loader)
    swept = time.perf_counter() - t1
    out.put(
        {
            "open_s": opened,
            "rss_after_open": after["rss"] - before["rss"],
            "workers_uss": sum(r["uss"] for r in reports),
            "tree_pss_anon": max(r["parent_pss_anon"] for r in reports) + sum(r["pss_anon"] for r in reports),
            "tree_pss_file": max(r["parent_pss_file"] for r in reports) + sum(r["pss_file"] for r in reports),
            "sweep_s": swept,
            "checksums": sorted({round(r["checksum"], 3) for r in reports}),
        }
    )


def run_child(approach: str, path: Path, workers: int, start: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a fresh interpreter per measurement: clean RSS
    out = ctx.Queue()
    proc = ctx.Process(target=measure, args=(approach, str(path), workers, start, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def report(rows: list[tuple[str, dict, dict]]) -> None:
    """One table: each figure for baseline and store, and their ratio."""
    print(f"\n{'start':6} {'figure':31} {'baseline':>12} {'store':>12} {'store/base':>11}")
    for start, base, ours in rows:
        for key, label, unit in (
            ("open_s", "open time", "s"),
            ("rss_after_open", "loader RSS growth at open", "MB"),
            ("workers_uss", "sum of worker USS", "MB"),
            ("tree_pss_anon", "loader+workers anon PSS", "MB"),
            ("tree_pss_file", "loader+workers file PSS", "MB"),
            ("sweep_s", "sweep time (all workers)", "s"),
        ):
            scale = MB if unit == "MB" else 1
            b, o = base[key] / scale, ours[key] / scale
            ratio = o / b if b else float("nan")
            print(f"{start:6} {label + ' (' + unit + ')':31} {b:12.2f} {o:12.2f} {ratio:11.3f}")
        assert base["checksums"] == ours["checksums"], (start, base["checksums"], ours["checksums"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--start", default="fork,spawn", help="DataLoader start methods to measure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlpipe-bench-") as tmp:
        tsv, store = Path(tmp) / "features.tsv", Path(tmp) / "store"
        t0 = time.perf_counter()
        write_tsv(tsv, args.images, args.boxes, args.dim, args.seed)
        t1 = time.perf_counter()
        info = import_lxmert_tsv(tsv, store)
        t2 = time.perf_counter()
        arrow = (store / "features.arrow").stat().st_size
        print(f"{args.images} images x {args.boxes} boxes x {args.dim} floats, {args.workers} workers")
        print(f"TSV {tsv.stat().st_size / MB:.0f} MB written in {t1 - t0:.1f} s; imported in {t2 - t1:.1f} s")
        print(f"store {arrow / MB:.0f} MB ({info['count']} rows, {info['verbatim_lines']} verbatim lines)")
        rows = []
        for start in args.start.split(","):
            base = run_child("baseline", tsv, args.workers, start)
            ours = run_child("store", store, args.workers, start)
            rows.append((start, base, ours))
        report(rows)
        print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
