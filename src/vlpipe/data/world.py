"""The synthetic "shapes world": seeded scene graphs rendered with OpenCV.

A CLEVR-like (Johnson et al., 2017) stand-in for COCO / Visual Genome that runs on 2 CPU
cores (docs/design.md, "The shapes world"). Every image holds 2-6 objects with a shape,
colour, size and texture; background gradient + Gaussian noise, clutter strokes and partial
occlusion keep detection and counting from being trivial, while two rules keep every object
recognisable: at most ``max_occlusion`` of an object's pixels are hidden by later objects,
and objects of the same colour never touch (they would merge into one blob).

Counting questions need scenes with several objects of one kind (design.md: the prototype's
counting failed on skewed counts), so with probability ``repeat_prob`` a scene repeats one
colour on 2..n of its objects, and independently one shape.

Randomness: every image gets its own generators, derived from ``(seed, split, index)`` by
``np.random.SeedSequence``, so any image can be regenerated alone and the bytes of every
output file depend only on the params.

Layout of what :func:`generate_world` writes: docs/layout.md, ``data/world/``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vlpipe.config import ParamsError, SceneParams, WorldParams
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Well separated BGR values (pairwise L2 distance >= 90 in the default 8, far above the
# pixel noise) that stay bright against the dark background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (40, 40, 220),
    "green": (50, 190, 50),
    "blue": (230, 100, 30),
    "yellow": (30, 220, 230),
    "purple": (190, 50, 150),
    "orange": (20, 130, 255),
    "cyan": (220, 210, 30),
    "white": (235, 235, 235),
    "pink": (190, 150, 255),
    "gray": (140, 140, 140),
    "brown": (40, 85, 150),
    "lime": (60, 255, 170),
}

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")

# Texture pixels are the object's colour times this factor: dark enough to see, and they
# cover at most a third of the object so its colour still dominates.
_TEXTURE_DARKEN = 0.45
_CIRCLE_VERTICES = 48
# Per-channel jitter of an object's colour (0-255 scale): variety without crossing into a
# neighbouring palette colour.
_COLOR_JITTER = 12
_SIZE_JITTER = 0.06


# ----------------------------------------------------------------------------- ids & seeds


def image_id(split: str, index: int) -> str:
    """The string id of image ``index`` of ``split``, e.g. ``world_train_000042``."""
    return f"world_{split}_{index:06d}"


def image_int_id(img_id: str) -> int:
    """A unique integer id for COCO-style files: ``(split position + 1) * 10**6 + index``.

    ``world_train_000042`` -> 1000042, ``world_val_000007`` -> 2000007, ``world_test_..`` -> 3....
    """
    parts = img_id.split("_")
    if len(parts) != 3 or parts[0] != "world" or parts[1] not in SPLITS or not parts[2].isdigit():
        raise ValueError(f"not a world image id: {img_id!r}")
    return (SPLITS.index(parts[1]) + 1) * 10**6 + int(parts[2])


def image_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (scene, render) generators of one image, derived from (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
    seq = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), index))
    scene_seq, render_seq = seq.spawn(2)
    return np.random.default_rng(scene_seq), np.random.default_rng(render_seq)


def check_scene_params(params: SceneParams) -> None:
    """Raise :class:`ParamsError` if a shape, colour or texture is one the renderer cannot draw."""
    for key, names, known in (
        ("shapes", params.shapes, _UNIT_SHAPES),
        ("colors", params.colors, PALETTE),
        ("textures", params.textures, TEXTURES),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ParamsError(f"world.scene.{key}: unknown {unknown} (known: {sorted(known)})")


# --------------------------------------------------------------------------------- geometry


def _regular_polygon(k: int, radius: float = 1.0, phase_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(k) / k)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    outer_v = _regular_polygon(points, 1.0, -90.0)  # (5, 2) tips
    inner_v = _regular_polygon(points, inner, -90.0 + 180.0 / points)  # (5, 2) notches
    return np.stack([outer_v, inner_v], axis=1).reshape(-1, 2)  # (10, 2) interleaved


def _cross(arm: float = 0.36) -> np.ndarray:
    a = arm / 2
    quarter = np.array([[-a, -1.0], [a, -1.0], [a, -a]])  # (3, 2) top arm, then the inner corner
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # (x, y) -> (-y, x): a quarter turn in image axes
    return np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])  # (12, 2)


def _normalise(poly: np.ndarray) -> tuple[np.ndarray, float]:
    """Map a polygon into the unit box [0, 1]^2 (both extents exactly 0..1); return its w/h aspect."""
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    extent = hi - lo
    return (poly - lo) / extent, float(extent[0] / extent[1])


# shape name -> (unit polygon (K, 2) in [0, 1]^2, natural aspect w / h). y grows downwards.
_UNIT_SHAPES: dict[str, tuple[np.ndarray, float]] = {
    "circle": _normalise(_regular_polygon(_CIRCLE_VERTICES)),
    "square": _normalise(_regular_polygon(4, phase_deg=45.0)),
    "triangle": _normalise(_regular_polygon(3)),
    "star": _normalise(_star()),
    "hexagon": _normalise(_regular_polygon(6)),
    "cross": _normalise(_cross()),
    "diamond": _normalise(_regular_polygon(4) * np.array([0.75, 1.0])),
    "pentagon": _normalise(_regular_polygon(5)),
    "ellipse": _normalise(_regular_polygon(_CIRCLE_VERTICES) * np.array([1.0, 0.6])),
}


def bbox_size(shape: str, side: float) -> tuple[int, int]:
    """(w, h) in pixels of ``shape`` whose longer side is ``side`` (keeps its natural aspect)."""
    aspect = _UNIT_SHAPES[shape][1]
    w = side * min(1.0, aspect)
    h = side * min(1.0, 1.0 / aspect)
    return max(3, round(w)), max(3, round(h))


def shape_polygon(shape: str, bbox: Sequence[int]) -> np.ndarray:
    """Vertices (K, 2) float in OpenCV pixel-centre coordinates of ``shape`` filling ``bbox``.

    The unit polygon is stretched onto the pixel centres ``x .. x+w-1`` / ``y .. y+h-1``, so the
    rasterised shape covers exactly the pixels of the COCO box [x, y, w, h].
    """
    x, y, w, h = bbox
    unit = _UNIT_SHAPES[shape][0]  # (K, 2) in [0, 1]^2
    return unit * np.array([w - 1, h - 1], dtype=np.float64) + np.array([x, y], dtype=np.float64)


def _fixed_point(poly: np.ndarray) -> np.ndarray:
    # cv2 draws with 4 fractional bits (shift=4): sub-pixel vertices without float support.
    return np.round(poly * 16.0).astype(np.int32)  # (K, 2)


def shape_mask(shape: str, bbox: Sequence[int], image_size: int) -> np.ndarray:
    """Boolean mask (S, S) of the full, unoccluded shape."""
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    cv2.fillPoly(mask, [_fixed_point(shape_polygon(shape, bbox))], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def visible_masks(scene: dict[str, Any]) -> list[np.ndarray]:
    """Boolean masks (S, S) of each object's visible pixels (later objects occlude earlier ones)."""
    size = scene["width"]
    covered = np.zeros((size, size), dtype=bool)  # union of the objects drawn above
    top_down = []
    for obj in reversed(scene["objects"]):
        full = shape_mask(obj["shape"], obj["bbox"], size)
        top_down.append(full & ~covered)
        covered = covered | full
    return top_down[::-1]


# --------------------------------------------------------------------------------- sampling


def _sample_attributes(params: SceneParams, n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Attributes of ``n`` objects, biased so that several objects often share a colour / shape."""
    colors = [params.colors[i] for i in rng.integers(len(params.colors), size=n)]
    shapes = [params.shapes[i] for i in rng.integers(len(params.shapes), size=n)]
    for values, names in ((colors, params.colors), (shapes, params.shapes)):
        if n >= 2 and rng.random() < params.repeat_prob:
            k = int(rng.integers(2, n + 1))  # how many objects share the value
            chosen = names[int(rng.integers(len(names)))]
            for i in rng.choice(n, size=k, replace=False):
                values[int(i)] = chosen
    sizes = [params.sizes[i] for i in rng.integers(len(params.sizes), size=n)]
    patterned = [t for t in params.textures if t != "plain"]
    textures = []
    for _ in range(n):
        textured = bool(patterned) and rng.random() < params.texture_prob
        textures.append(patterned[int(rng.integers(len(patterned)))] if textured else "plain")
    return [
        {"shape": s, "color": c, "size": z, "texture": t}
        for s, c, z, t in zip(shapes, colors, sizes, textures, strict=True)
    ]


def _fraction(part: np.ndarray, whole: np.ndarray) -> float:
    # Rounded once here so that the stored ``visible`` and the placement rule agree exactly.
    return round(int(np.count_nonzero(part)) / int(np.count_nonzero(whole)), 4)


def _smallest_size(params: SceneParams) -> str:
    return min(params.sizes, key=lambda s: params.size_fractions[s])


class _Layout:
    """Objects placed so far with their visible masks; checks the recognisability rules."""

    def __init__(self, params: SceneParams) -> None:
        self.size = params.image_size
        self.min_visible = 1.0 - params.max_occlusion
        self.objects: list[dict[str, Any]] = []
        self.full: list[np.ndarray] = []  # (S, S) bool each
        self.visible: list[np.ndarray] = []  # (S, S) bool each
        # Same-coloured objects keep a gap of >= 2 px, visible through the pixel noise.
        self._kernel = np.ones((5, 5), dtype=np.uint8)

    def _fits(self, mask: np.ndarray, color: str) -> bool:
        touch = cv2.dilate(mask.astype(np.uint8), self._kernel).astype(bool)  # mask grown by 2 px
        for obj, full, vis in zip(self.objects, self.full, self.visible, strict=True):
            if obj["color"] == color and (touch & vis).any():
                return False  # same colour touching: the two would read as one object
            if _fraction(vis & ~mask, full) < self.min_visible:
                return False
        return True

    def try_place(self, attrs: dict[str, str], side: float, tries: int, rng: np.random.Generator) -> bool:
        w, h = bbox_size(attrs["shape"], side)
        if w > self.size or h > self.size:
            return False
        for _ in range(tries):
            bbox = [int(rng.integers(0, self.size - w + 1)), int(rng.integers(0, self.size - h + 1)), w, h]
            mask = shape_mask(attrs["shape"], bbox, self.size)
            if self._fits(mask, attrs["color"]):
                self.visible = [vis & ~mask for vis in self.visible]
                self.objects.append({**attrs, "bbox": bbox})
                self.full.append(mask)
                self.visible.append(mask)
                return True
        return False


def sample_scene(params: SceneParams, img_id: str, split: str, rng: np.random.Generator) -> dict:
    """Sample one scene graph (docs/layout.md schema); objects are listed in draw order.

    Each object is placed at a random position such that no object (earlier ones included)
    ends up more than ``max_occlusion`` hidden and no two same-coloured objects touch. An object
    that fits nowhere after ``placement_tries`` positions is shrunk to the smallest size, then
    dropped; the layout is resampled if fewer than ``min_objects`` remain.
    """
    check_scene_params(params)
    n = int(rng.integers(params.min_objects, params.max_objects + 1))
    attrs = _sample_attributes(params, n, rng)
    smallest = _smallest_size(params)
    for _ in range(20):
        layout = _Layout(params)
        for a in attrs:
            jitter = 1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
            side = params.size_fractions[a["size"]] * params.image_size * jitter
            if layout.try_place(a, side, params.placement_tries, rng):
                continue
            small = {**a, "size": smallest}
            layout.try_place(
                small, params.size_fractions[smallest] * params.image_size, params.placement_tries, rng
            )
        if len(layout.objects) >= params.min_objects:
            break
    else:
        raise ParamsError(
            f"world.scene: cannot place {params.min_objects} objects in {params.image_size} px images "
            "(lower min_objects or size_fractions, or raise image_size / max_occlusion)"
        )
    objects = []
    for i, (obj, full, vis) in enumerate(zip(layout.objects, layout.full, layout.visible, strict=True)):
        objects.append({"id": i, **obj, "visible": _fraction(vis, full)})
    size = params.image_size
    return {"img_id": img_id, "split": split, "width": size, "height": size, "objects": objects}


# -------------------------------------------------------------------------------- rendering


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark tinted background with a linear brightness gradient: (S, S, 3) uint8."""
    base = rng.uniform(15, 50) + rng.uniform(-8, 8, size=3)  # (3,) BGR
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, 30)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)  # (S, S) each in [0, 1]
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys) * amplitude  # (S, S)
    return np.clip(np.rint(base[None, None, :] + ramp[:, :, None]), 0, 255).astype(np.uint8)  # (S, S, 3)


def _draw_clutter(img: np.ndarray, count: int, rng: np.random.Generator) -> None:
    """Thin muted lines and arcs under the objects: edges that belong to no object."""
    size = img.shape[0]
    for _ in range(int(rng.integers(0, count + 1))):
        grey = rng.uniform(60, 130)
        color = tuple(float(np.clip(grey + t, 0, 255)) for t in rng.uniform(-25, 25, size=3))
        thickness = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
            p2 = tuple(int(v) for v in rng.integers(0, size, size=2))
            cv2.line(img, p1, p2, color, thickness, lineType=cv2.LINE_AA)
        else:
            center = tuple(int(v) for v in rng.integers(0, size, size=2))
            axes = tuple(int(v) for v in rng.integers(size // 8, size // 2, size=2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(
                img,
                center,
                axes,
                float(rng.uniform(0, 180)),
                start,
                start + float(rng.uniform(60, 200)),
                color,
                thickness,
                lineType=cv2.LINE_AA,
            )


def _texture_pattern(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (S, S) pattern of the texture's dark pixels (about a quarter to a third of them)."""
    ys, xs = np.mgrid[0:size, 0:size]  # (S, S) each
    period = max(3, round(size / 16))
    if texture == "striped":
        direction = int(rng.integers(4))  # 0, 45, 90, 135 degrees
        coord = (xs, ys, xs + ys, xs - ys)[direction]
        step = period if direction < 2 else period + 1  # diagonals: same visual spacing
        return (coord % step) < max(1, step // 3)
    if texture == "dotted":
        dot = max(1, period // 2)
        return ((xs % (period + 1)) < dot) & ((ys % (period + 1)) < dot)
    return np.zeros((size, size), dtype=bool)


def render_scene(scene: dict, params: SceneParams, rng: np.random.Generator) -> np.ndarray:
    """Render a scene graph to an (H, W, 3) uint8 BGR image.

    Background, clutter, objects in list order (anti-aliased fill, then texture), then
    Gaussian pixel noise of std ``noise_std`` over everything. ``rng`` only drives the
    appearance (background, clutter, colour jitter, stripe direction, noise); the geometry
    comes from the scene graph alone.
    """
    size = scene["width"]
    # Drawing happens on uint8: OpenCV anti-aliases (LINE_AA) only 8-bit images.
    img = _background(size, rng)  # (S, S, 3) uint8
    _draw_clutter(img, params.clutter, rng)
    for obj in scene["objects"]:
        base = np.array(PALETTE[obj["color"]], dtype=np.float64)
        color = np.clip(base + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3), 0, 255)  # (3,)
        poly = _fixed_point(shape_polygon(obj["shape"], obj["bbox"]))
        cv2.fillPoly(img, [poly], tuple(float(c) for c in color), lineType=cv2.LINE_AA, shift=4)
        if obj["texture"] != "plain":
            dark = _texture_pattern(obj["texture"], size, rng) & shape_mask(obj["shape"], obj["bbox"], size)
            img[dark] = np.rint(color * _TEXTURE_DARKEN).astype(np.uint8)
    if params.noise_std == 0:
        return img
    noisy = img.astype(np.float32) + rng.normal(0.0, params.noise_std, size=img.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ COCO files


def scenes_to_coco(scenes: list[dict], params: SceneParams) -> dict:
    """COCO instances (pycocotools-readable) of scenes: category = shape (ids 1..n in params order).

    Each annotation carries ``"attributes": {"color", "size", "texture"}`` and the object's
    visible fraction; ``area`` is the pixel area of the full shape.
    """
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(params.shapes)]
    cat_id = {s: i + 1 for i, s in enumerate(params.shapes)}
    images, annotations = [], []
    for scene in scenes:
        int_id = image_int_id(scene["img_id"])
        images.append(
            {
                "id": int_id,
                "img_id": scene["img_id"],
                "file_name": f"images/{scene['img_id']}.png",
                "width": scene["width"],
                "height": scene["height"],
            }
        )
        for obj in scene["objects"]:
            area = int(np.count_nonzero(shape_mask(obj["shape"], obj["bbox"], scene["width"])))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int_id,
                    "category_id": cat_id[obj["shape"]],
                    "bbox": [float(v) for v in obj["bbox"]],
                    "area": float(area),
                    "iscrowd": 0,
                    "visible": obj["visible"],
                    "attributes": {"color": obj["color"], "size": obj["size"], "texture": obj["texture"]},
                }
            )
    return {
        "info": {"description": "vlpipe shapes world", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


# ----------------------------------------------------------------------------------- reading


_OBJECT_KEYS = ("id", "shape", "color", "size", "texture", "bbox", "visible")


def read_scenes(path: Path) -> list[dict]:
    """Read a scenes JSON file (list of scene graphs), raising :class:`InputError` on a bad schema."""
    scenes = read_json(path)
    if not isinstance(scenes, list):
        raise InputError(path, f"expected a list of scenes, got {type(scenes).__name__}")
    for i, scene in enumerate(scenes):
        if not isinstance(scene, dict) or not {"img_id", "width", "height", "objects"} <= scene.keys():
            raise InputError(path, f"scene {i}: expected keys img_id, width, height, objects")
        for obj in scene["objects"]:
            if not isinstance(obj, dict) or any(k not in obj for k in _OBJECT_KEYS):
                raise InputError(path, f"scene {scene['img_id']}: object missing one of {_OBJECT_KEYS}")
            bbox = obj["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int) for v in bbox)):
                raise InputError(path, f"scene {scene['img_id']}: bbox must be 4 integers, got {bbox!r}")
    return scenes


# ----------------------------------------------------------------------------------- writing


def _split_sizes(params: SceneParams) -> dict[str, int]:
    return {"train": params.n_train, "val": params.n_val, "test": params.n_test}


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"{path}: OpenCV failed to encode the image")
    path.write_bytes(buf.tobytes())


def _generate_split(params: WorldParams, split: str, n: int, images_dir: Path) -> list[dict]:
    scenes = []
    for i in range(n):
        img_id = image_id(split, i)
        scene_rng, render_rng = image_rngs(params.seed, split, i)
        scene = sample_scene(params.scene, img_id, split, scene_rng)
        _write_png(images_dir / f"{img_id}.png", render_scene(scene, params.scene, render_rng))
        scenes.append(scene)
    return scenes


def scene_stats(scenes: list[dict]) -> dict[str, Any]:
    """Summary of a split: objects per image, occlusion, and how often kinds repeat (for counting)."""
    objects = [o for s in scenes for o in s["objects"]]
    max_color = Counter(max(Counter(o["color"] for o in s["objects"]).values()) for s in scenes)
    max_shape = Counter(max(Counter(o["shape"] for o in s["objects"]).values()) for s in scenes)
    n_obj = Counter(len(s["objects"]) for s in scenes)
    total = max(len(scenes), 1)
    return {
        "objects_per_image": round(len(objects) / total, 4),
        "objects_hist": {str(k): n_obj[k] for k in sorted(n_obj)},
        "occluded_fraction": round(sum(o["visible"] < 1.0 for o in objects) / max(len(objects), 1), 4),
        "min_visible": min((o["visible"] for o in objects), default=1.0),
        "max_same_color_hist": {str(k): max_color[k] for k in sorted(max_color)},
        "max_same_shape_hist": {str(k): max_shape[k] for k in sorted(max_shape)},
    }


def generate_world(params: WorldParams, out_dir: Path) -> dict:
    """Write the image/scene part of ``data/world`` into ``out_dir``, then the text via language.py.

    ``out_dir`` is an existing empty temporary directory that the stage renames into place.
    Writes images/, scenes/{train,val}.json, hidden/scenes_test.json, instances_{train,val}.json,
    hidden/instances_test.json, splits.json and meta.json, then calls
    ``vlpipe.data.language.write_text_data``. Returns the metrics of metrics/world.json:
    ``{"counts": {split: {"images", "objects"}}, "scenes": <train scene_stats>, **text_metrics}``.
    """
    from vlpipe.data.language import write_text_data

    check_scene_params(params.scene)
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=False)
    (out_dir / "scenes").mkdir()
    (out_dir / "hidden").mkdir()
    scenes = {
        split: _generate_split(params, split, n, images_dir)
        for split, n in _split_sizes(params.scene).items()
    }
    for split, split_scenes in scenes.items():
        hidden = split == "test"
        scene_path = out_dir / ("hidden/scenes_test.json" if hidden else f"scenes/{split}.json")
        coco_path = out_dir / ("hidden/instances_test.json" if hidden else f"instances_{split}.json")
        write_json(scene_path, split_scenes, indent=None)
        write_json(coco_path, scenes_to_coco(split_scenes, params.scene), indent=None)
    counts = {
        split: {"images": len(s), "objects": sum(len(x["objects"]) for x in s)} for split, s in scenes.items()
    }
    write_json(out_dir / "splits.json", {split: [s["img_id"] for s in v] for split, v in scenes.items()})
    p = params.scene
    write_json(
        out_dir / "meta.json",
        {
            "image_size": p.image_size,
            "shapes": list(p.shapes),
            "colors": list(p.colors),
            "sizes": list(p.sizes),
            "textures": list(p.textures),
            "palette_bgr": {c: list(PALETTE[c]) for c in p.colors},
            "seed": params.seed,
            "counts": counts,
        },
    )
    text_metrics = write_text_data(scenes, params, out_dir)
    return {"counts": counts, "scenes": scene_stats(scenes["train"]), **text_metrics}
