"""A contact sheet of world scenes with one caption each, to eyeball the data.

Captions come from the Karpathy file (``karpathy/dataset_coco.json``, formats.md section 4)
when the world has one, else from a description built from the scene graph.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from vlpipe.data.images import read_image
from vlpipe.data.world import read_scenes
from vlpipe.errors import InputError
from vlpipe.io import atomic_file, read_json

_TILE = 256  # target tile side in pixels; images are upscaled by an integer factor towards it
_COLUMNS = 4
_PAD = 6
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.42
_LINE_H = 15
_BG = (32, 32, 32)
_FG = (235, 235, 235)
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def describe_scene(scene: dict) -> str:
    """A plain description from the scene graph, e.g. ``two small red circles and a large blue star.``"""
    kinds = Counter(
        (o["size"], o["color"], "" if o["texture"] == "plain" else o["texture"], o["shape"])
        for o in scene["objects"]
    )
    phrases = []
    for (size, color, texture, shape), n in kinds.items():
        words = " ".join(w for w in (size, color, texture, shape) if w)
        phrases.append(
            f"{_NUMBERS.get(n, str(n))} {words}{'es' if shape.endswith(('s', 'x', 'sh', 'ch')) else 's'}"
            if n > 1
            else f"a {words}"
        )
    if not phrases:
        return "an empty scene."
    head = ", ".join(phrases[:-1])
    return f"{head} and {phrases[-1]}." if head else f"{phrases[-1]}."


def _karpathy_captions(world_dir: Path) -> dict[str, str]:
    """img_id -> first Karpathy sentence, or {} when the world has no Karpathy file."""
    path = world_dir / "karpathy" / "dataset_coco.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(path, "expected {'images': [...]} (Karpathy dataset_coco.json format)")
    captions = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "filename" not in entry:
            raise InputError(path, "an images entry has no 'filename'")
        sentences = entry.get("sentences") or []
        if sentences and isinstance(sentences[0], dict) and "raw" in sentences[0]:
            captions[Path(entry["filename"]).stem] = str(sentences[0]["raw"])
    return captions


def _wrap(text: str, width_px: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines that fit ``width_px`` in the caption font."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and cv2.getTextSize(candidate, _FONT, _FONT_SCALE, 1)[0][0] > width_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _tile(img: np.ndarray, lines: list[str], n_lines: int) -> np.ndarray:
    """Upscaled image over a caption band of ``n_lines`` lines: (side + band, side, 3) uint8."""
    scale = max(1, _TILE // max(img.shape[:2]))
    big = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    band = np.full((n_lines * _LINE_H + _PAD, big.shape[1], 3), _BG, dtype=np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(band, line, (4, (k + 1) * _LINE_H - 3), _FONT, _FONT_SCALE, _FG, 1, cv2.LINE_AA)
    return np.vstack([big, band])


def write_preview(world_dir: Path, n: int, out_png: Path) -> None:
    """Write a PNG contact sheet of the first ``n`` val scenes of ``world_dir``, captioned."""
    world_dir = Path(world_dir)
    scenes = read_scenes(world_dir / "scenes" / "val.json")[: max(n, 0)]
    if not scenes:
        raise InputError(world_dir / "scenes" / "val.json", "no val scenes to preview")
    captions = _karpathy_captions(world_dir)
    images = [read_image(world_dir / "images" / f"{s['img_id']}.png") for s in scenes]
    side = max(max(img.shape[:2]) * max(1, _TILE // max(img.shape[:2])) for img in images)
    texts = [_wrap(captions.get(s["img_id"], describe_scene(s)), side - 8) for s in scenes]
    n_lines = max(len(t) for t in texts)
    tiles = [_tile(img, t, n_lines) for img, t in zip(images, texts, strict=True)]
    tile_h = max(t.shape[0] for t in tiles)
    cols = min(_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = np.full((rows * (tile_h + _PAD) + _PAD, cols * (side + _PAD) + _PAD, 3), _BG, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = _PAD + r * (tile_h + _PAD), _PAD + c * (side + _PAD)
        sheet[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise RuntimeError(f"{out_png}: OpenCV failed to encode the preview")
    with atomic_file(out_png, "wb") as f:
        f.write(buf.tobytes())
