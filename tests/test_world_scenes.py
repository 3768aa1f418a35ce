"""The shapes world: scene sampling, rendering, COCO instances, determinism and the preview."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pydantic import ValidationError

from vlpipe.config import ParamsError, SceneParams, TextParams, WorldParams
from vlpipe.data import world as W
from vlpipe.data.preview import describe_scene, write_preview
from vlpipe.errors import InputError
from vlpipe.io import read_json, write_json

SIZE = 48


def _scene_params(**over: object) -> SceneParams:
    base = {"image_size": SIZE, "n_train": 20, "n_val": 8, "n_test": 8}
    return SceneParams(**{**base, **over})


def _world_params(seed: int) -> WorldParams:
    text = TextParams(
        questions_per_image=2,
        gqa_per_image=2,
        captions_per_image=2,
        refs_per_image=1,
        nlvr2_sentences={"train": 4, "val": 2, "test": 2},
        nlvr2_pairs_per_sentence=2,
    )
    return WorldParams(seed=seed, scene=_scene_params(), text=text)


def _scenes(
    params: SceneParams, n: int, seed: int = 0, split: str = "train"
) -> list[tuple[dict, np.ndarray]]:
    out = []
    for i in range(n):
        scene_rng, render_rng = W.image_rngs(seed, split, i)
        scene = W.sample_scene(params, W.image_id(split, i), split, scene_rng)
        out.append((scene, W.render_scene(scene, params, render_rng)))
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------- scenes & rendering


def test_scene_schema_bbox_and_occlusion() -> None:
    params = _scene_params(max_occlusion=0.35)
    for scene, img in _scenes(params, 40):
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert params.min_objects <= len(scene["objects"]) <= params.max_objects
        assert [o["id"] for o in scene["objects"]] == list(range(len(scene["objects"])))
        for obj, vis in zip(scene["objects"], W.visible_masks(scene), strict=True):
            x, y, w, h = obj["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert obj["visible"] >= 1 - params.max_occlusion
            full = W.shape_mask(obj["shape"], obj["bbox"], SIZE)
            assert obj["visible"] == pytest.approx(vis.sum() / full.sum(), abs=1e-4)
            ys, xs = np.nonzero(full)  # the bbox is the tight box of the full shape
            assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == obj["bbox"]
            assert obj["shape"] in params.shapes and obj["color"] in params.colors
            assert obj["size"] in params.sizes and obj["texture"] in params.textures


def test_rendered_object_pixels_have_its_colour() -> None:
    params = _scene_params(texture_prob=0.5)
    # Each palette colour and its texture shade both count as that colour.
    bright = np.array([W.PALETTE[c] for c in params.colors], dtype=np.float64)  # (C, 3)
    palette = np.concatenate([bright, bright * W._TEXTURE_DARKEN])  # (2C, 3)
    names = [*params.colors, *params.colors]
    checked = 0
    for scene, img in _scenes(params, 30):
        for obj, vis in zip(scene["objects"], W.visible_masks(scene), strict=True):
            # Drop anti-aliased border pixels, which blend with what lies underneath.
            core = cv2.erode(vis.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if core.sum() < 4:
                continue
            pixels = img[core].astype(np.float64)  # (P, 3) BGR
            nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(axis=2).argmin(axis=1)  # (P,)
            votes = Counter(names[k] for k in nearest)
            assert votes.most_common(1)[0][0] == obj["color"], (scene["img_id"], obj, votes)
            assert votes[obj["color"]] >= 0.8 * len(pixels), (scene["img_id"], obj, votes)
            checked += 1
    assert checked > 60


def test_sizes_are_clearly_distinct() -> None:
    sides: dict[str, list[int]] = {"small": [], "large": []}
    for scene, _ in _scenes(_scene_params(), 40):
        for obj in scene["objects"]:
            sides[obj["size"]].append(max(obj["bbox"][2:]))
    assert sides["small"] and sides["large"]
    assert min(sides["large"]) >= 1.4 * max(sides["small"])


def test_counts_of_a_kind_are_balanced() -> None:
    params = _scene_params()
    max_color = Counter()
    for i in range(300):
        scene = W.sample_scene(params, W.image_id("train", i), "train", W.image_rngs(3, "train", i)[0])
        counts = Counter(o["color"] for o in scene["objects"])
        max_color[min(max(counts.values()), 4)] += 1
    # Without the repeat bias 4+ objects of one colour would be ~1% of scenes.
    for k in (1, 2, 3, 4):
        assert max_color[k] >= 0.08 * 300, max_color


def test_clutter_and_noise_are_present() -> None:
    params = _scene_params()
    quiet = _scene_params(noise_std=0.0, clutter=0)
    scene, img = _scenes(params, 1)[0]
    clean = W.render_scene(scene, quiet, W.image_rngs(0, "train", 0)[1])
    background = ~np.any([W.shape_mask(o["shape"], o["bbox"], SIZE) for o in scene["objects"]], axis=0)
    assert img[background].std(axis=0).mean() > clean[background].std(axis=0).mean() + 2


def test_scene_and_render_deterministic_per_image() -> None:
    params = _scene_params()
    a = _scenes(params, 5, seed=7)
    b = _scenes(params, 5, seed=7)
    c = _scenes(params, 5, seed=8)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert [s for s, _ in a] != [s for s, _ in c]
    # Image 3 alone comes out the same as when generated after images 0-2.
    assert _scenes(params, 4, seed=7)[3][0] == a[3][0]


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ParamsError, match="world.scene.colors"):
        W.sample_scene(
            _scene_params(colors=[*_scene_params().colors, "mauve"]), "x", "train", np.random.default_rng(0)
        )
    with pytest.raises(ValidationError, match="min_objects"):
        _scene_params(min_objects=5, max_objects=3)
    with pytest.raises(ValidationError, match="plain"):
        _scene_params(textures=["striped"])


def test_read_scenes_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"img_id": "a"')
    with pytest.raises(InputError, match="malformed JSON"):
        W.read_scenes(bad)
    scene = _scenes(_scene_params(), 1)[0][0]
    scene["objects"][0]["bbox"] = [1, 2, 3]
    write_json(bad, [scene])
    with pytest.raises(InputError, match="bbox"):
        W.read_scenes(bad)


def test_coco_instances_match_scenes() -> None:
    params = _scene_params()
    scenes = [s for s, _ in _scenes(params, 10, split="val")]
    coco = W.scenes_to_coco(scenes, params)
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(params.shapes) + 1))
    assert len({a["id"] for a in coco["annotations"]}) == sum(len(s["objects"]) for s in scenes)
    assert W.image_int_id("world_val_000007") == 2000007


# ------------------------------------------------------------------------------ generate_world


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Three tiny worlds: seed 0 twice and seed 1."""
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = tmp_path_factory.mktemp(f"world_{name}")
        out[name] = (root, W.generate_world(_world_params(seed), root))
    return out


def test_generate_world_is_byte_deterministic(worlds: dict[str, tuple[Path, dict]]) -> None:
    (a, ma), (b, mb), (c, _) = worlds["a"], worlds["b"], worlds["c"]
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db and ma == mb
    assert da.keys() == dc.keys()
    differing = [k for k in da if da[k] != dc[k]]
    assert "images/world_train_000000.png" in differing and "scenes/train.json" in differing


def test_generate_world_layout_and_coco(worlds: dict[str, tuple[Path, dict]]) -> None:
    root, metrics = worlds["a"]
    params = _world_params(0)
    sizes = {"train": 20, "val": 8, "test": 8}
    assert {k: v["images"] for k, v in metrics["counts"].items()} == sizes
    splits = read_json(root / "splits.json")
    assert splits == {s: [W.image_id(s, i) for i in range(n)] for s, n in sizes.items()}
    for split in ("train", "val", "test"):
        hidden = split == "test"
        scenes = W.read_scenes(root / ("hidden/scenes_test.json" if hidden else f"scenes/{split}.json"))
        coco = COCO(str(root / ("hidden/instances_test.json" if hidden else f"instances_{split}.json")))
        assert (
            len(coco.getAnnIds())
            == sum(len(s["objects"]) for s in scenes)
            == metrics["counts"][split]["objects"]
        )
        assert len(coco.getImgIds()) == sizes[split]
        for img in coco.loadImgs(coco.getImgIds()):
            png = cv2.imread(str(root / img["file_name"]))
            assert png is not None and png.shape == (img["height"], img["width"], 3) == (SIZE, SIZE, 3)
        ann = coco.loadAnns(coco.getAnnIds())[0]
        assert set(ann["attributes"]) == {"color", "size", "texture"} and ann["iscrowd"] == 0
        assert coco.loadCats(ann["category_id"])[0]["name"] in params.scene.shapes
    assert not (root / "scenes" / "test.json").exists() and not (root / "instances_test.json").exists()
    meta = read_json(root / "meta.json")
    assert meta["image_size"] == SIZE and meta["seed"] == 0 and meta["shapes"] == params.scene.shapes


# ------------------------------------------------------------------------------------- preview


def _mini_world(root: Path, n: int) -> list[dict]:
    params = _scene_params()
    (root / "images").mkdir(parents=True)
    scenes = []
    for scene, img in _scenes(params, n, split="val"):
        cv2.imwrite(str(root / "images" / f"{scene['img_id']}.png"), img)
        scenes.append(scene)
    write_json(root / "scenes" / "val.json", scenes)
    return scenes


def test_preview_writes_readable_png(tmp_path: Path) -> None:
    scenes = _mini_world(tmp_path / "w", 5)
    out = tmp_path / "preview" / "sheet.png"
    write_preview(tmp_path / "w", 5, out)
    sheet = cv2.imread(str(out))
    assert sheet is not None
    assert sheet.shape[0] > 2 * SIZE * 4 and sheet.shape[1] > 4 * SIZE * 4  # 2 rows x 4 upscaled tiles
    # With Karpathy captions present, the captions (not the scene descriptions) are drawn.
    caps = {"images": [{"filename": f"{s['img_id']}.png", "sentences": [{"raw": "x " * 60}]} for s in scenes]}
    write_json(tmp_path / "w" / "karpathy" / "dataset_coco.json", caps)
    out2 = tmp_path / "sheet2.png"
    write_preview(tmp_path / "w", 5, out2)
    assert out.read_bytes() != out2.read_bytes()


def test_describe_scene_counts_kinds() -> None:
    obj = {"size": "small", "color": "red", "texture": "plain", "shape": "cross"}
    scene = {"objects": [obj, obj, {**obj, "shape": "star", "texture": "striped", "size": "large"}]}
    assert describe_scene(scene) == "two small red crosses and a large red striped star."


def test_preview_reports_missing_image(tmp_path: Path) -> None:
    scenes = _mini_world(tmp_path / "w", 2)
    (tmp_path / "w" / "images" / f"{scenes[1]['img_id']}.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot be decoded"):
        write_preview(tmp_path / "w", 2, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
