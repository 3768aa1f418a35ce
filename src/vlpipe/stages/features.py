"""Stages `detector`, `features@region`, `features@grid` and `codebook`
(params sections `detector`, `features.<kind>`, `codebook`)."""

from __future__ import annotations

from pathlib import Path

from vlpipe.config import load_section
from vlpipe.errors import VlpipeError
from vlpipe.io import atomic_dir, read_json, write_metrics

WORLD_DIR = Path("data/world")
DETECTOR_DIR = Path("models/detector")
FEATURES_DIR = Path("data/features")
CODEBOOK_DIR = Path("data/codebook")


def run_detector(params_path: Path, root: Path) -> None:
    from vlpipe.features.detector import train_detector

    params = load_section("detector", params_path)
    with atomic_dir(root / DETECTOR_DIR) as tmp:
        metrics = train_detector(params, root / WORLD_DIR, tmp)
    write_metrics(root / "metrics/detector.json", metrics)


def run_features(kind: str, params_path: Path, root: Path) -> None:
    from vlpipe.features.detector import load_detector
    from vlpipe.features.extract import extract_grid_features, extract_region_features

    extractors = {"region": extract_region_features, "grid": extract_grid_features}
    if kind not in extractors:
        raise VlpipeError(f"unknown feature kind {kind!r}; expected one of {sorted(extractors)}")
    params = getattr(load_section("features", params_path), kind)
    detector = load_detector(root / DETECTOR_DIR)
    # The store writer renames its own temp dir into place, so nothing partial is left.
    metrics = extractors[kind](detector, root / WORLD_DIR, params, root / FEATURES_DIR / kind)
    write_metrics(root / f"metrics/features_{kind}.json", metrics)


def run_codebook(params_path: Path, root: Path) -> None:
    from vlpipe.features.codebook import build_codebook

    params = load_section("codebook", params_path)
    train_ids = read_json(root / WORLD_DIR / "splits.json")["train"]
    with atomic_dir(root / CODEBOOK_DIR) as tmp:
        metrics = build_codebook(params, root / FEATURES_DIR / "grid", train_ids, tmp)
    write_metrics(root / "metrics/codebook.json", metrics)
