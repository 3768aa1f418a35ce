"""Stage `world`: the synthetic shapes world (reads params section `world`)."""

from __future__ import annotations

from pathlib import Path

from vlpipe.config import load_section
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, write_metrics

WORLD_DIR = Path("data/world")


def run(params_path: Path, root: Path) -> None:
    from vlpipe.data.world import generate_world

    params = load_section("world", params_path)
    with atomic_dir(root / WORLD_DIR) as tmp:
        metrics = generate_world(params, tmp)
    write_metrics(root / "metrics/world.json", metrics)


def preview(root: Path, n: int, out_png: Path) -> None:
    from vlpipe.data.preview import write_preview

    world_dir = root / WORLD_DIR
    if not (world_dir / "meta.json").is_file():
        raise InputError(world_dir, "no world here yet; run `dvc repro world` (or `vlpipe world`) first")
    write_preview(world_dir, n, out_png)
