"""Strict typed models of params.yaml.

params.yaml is the single source of settings. Every section is a pydantic model with
``extra="forbid"`` and strict types, so an unknown key, a wrong type or an out-of-range
value fails with the key path and the file named (e.g.
``params.yaml: world.scene.n_train: Input should be a valid integer``).

Each stage reads only its own section (``load_section``); sizes decided upstream
(feature dim, vocab, answers, codebook size) are *not* here: they come from the
upstream stage's ``meta.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlpipe.errors import VlpipeError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(VlpipeError):
    """params.yaml is missing, malformed, or fails validation."""


class Strict(BaseModel):
    """Base of every params model: unknown keys and type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- world


class SceneParams(Strict):
    """How scenes of the synthetic shapes world are sampled and rendered."""

    image_size: int = Field(64, ge=32, le=512, description="square image side in pixels")
    n_train: int = Field(3000, ge=1, description="training images")
    n_val: int = Field(500, ge=1, description="validation images")
    n_test: int = Field(500, ge=1, description="test images (answers hidden)")
    min_objects: int = Field(2, ge=1, le=12, description="fewest objects in a scene")
    max_objects: int = Field(6, ge=1, le=12, description="most objects in a scene")
    shapes: list[str] = Field(
        default_factory=lambda: ["circle", "square", "triangle", "star", "hexagon", "cross"],
        min_length=6,
        description="object categories (>= 6)",
    )
    colors: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"],
        min_length=8,
        description="object colours (>= 8)",
    )
    sizes: list[str] = Field(default_factory=lambda: ["small", "large"], min_length=2)
    textures: list[str] = Field(default_factory=lambda: ["plain", "striped"], min_length=1)
    texture_prob: float = Field(0.3, ge=0.0, le=1.0, description="chance an object is textured")
    noise_std: float = Field(8.0, ge=0.0, description="std of Gaussian pixel noise (0-255 scale)")
    clutter: int = Field(3, ge=0, description="max number of clutter strokes per image")
    max_occlusion: float = Field(0.4, ge=0.0, lt=1.0, description="max hidden fraction of any object")


class TextParams(Strict):
    """How questions, captions, sentences and referring expressions are generated."""

    questions_per_image: int = Field(6, ge=1, description="VQA questions per image")
    gqa_per_image: int = Field(4, ge=1, description="GQA-style compositional questions per image")
    annotators: int = Field(10, ge=10, le=10, description="simulated VQA annotators (VQA uses 10)")
    annotator_noise: float = Field(0.15, ge=0.0, lt=1.0, description="chance one annotator answers wrongly")
    captions_per_image: int = Field(5, ge=1, description="Karpathy captions per image")
    nlvr2_sentences: dict[str, int] = Field(
        default_factory=lambda: {"train": 1500, "val": 300, "test": 300},
        description="NLVR2 sentences per split",
    )
    nlvr2_pairs_per_sentence: int = Field(4, ge=2, description="image pairs per NLVR2 sentence")
    refs_per_image: int = Field(2, ge=1, description="referring expressions per image")


class WorldParams(Strict):
    """Stage ``world``: the seeded synthetic shapes world."""

    seed: int = Field(0, description="master seed; same seed gives the same bytes")
    scene: SceneParams = Field(default_factory=SceneParams)
    text: TextParams = Field(default_factory=TextParams)


# ----------------------------------------------------------------------- tokenizer


class TokenizerParams(Strict):
    """Stage ``tokenizer``: train a BERT WordPiece vocab, or copy a local one."""

    source: Literal["train", "copy"] = "train"
    path: str | None = Field(None, description="with source=copy: a local tokenizer directory")
    vocab_size: int = Field(1000, ge=100, description="target WordPiece vocab size")
    min_frequency: int = Field(1, ge=1)
    lowercase: bool = True


# ------------------------------------------------------------------------ features


class DetectorParams(Strict):
    """Stage ``detector``: a small anchor-free detector trained on the world's instances."""

    seed: int = 0
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    feature_dim: int = Field(128, ge=8, description="dimension of pooled RoI / grid features")
    roi_size: int = Field(4, ge=1, description="RoIAlign output side before pooling")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    score_threshold: float = Field(0.2, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_train_images: int | None = Field(None, ge=1, description="cap on training images")


class RegionFeatureParams(Strict):
    """Stage ``features@region``: exactly ``num_boxes`` boxes per image (LXMERT: 36)."""

    num_boxes: int = Field(36, ge=1)
    score_threshold: float = Field(0.2, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    batch_size: int = Field(64, ge=1)


class GridFeatureParams(Strict):
    """Stage ``features@grid``: a ``grid`` x ``grid`` RoIAligned grid (X-LXMERT: 8x8)."""

    grid: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)


class FeaturesParams(Strict):
    region: RegionFeatureParams = Field(default_factory=RegionFeatureParams)
    grid: GridFeatureParams = Field(default_factory=GridFeatureParams)


class CodebookParams(Strict):
    """Stage ``codebook``: faiss k-means over training grid vectors (X-LXMERT)."""

    k: int = Field(256, ge=2, description="number of centroids (X-LXMERT: 10000)")
    iterations: int = Field(20, ge=1)
    sample_size: int | None = Field(None, ge=1, description="grid vectors sampled for training")
    seed: int = 0


# -------------------------------------------------------------------------- all


class Params(Strict):
    """The whole params.yaml. Later issues add their sections here."""

    world: WorldParams = Field(default_factory=WorldParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    detector: DetectorParams = Field(default_factory=DetectorParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    codebook: CodebookParams = Field(default_factory=CodebookParams)


S = TypeVar("S", bound=BaseModel)


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        if e["type"] != "extra_forbidden" and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        lines.append(f"{path}: {loc}: {msg}")
    return "\n".join(lines)


def read_params_file(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: malformed YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Validate the whole params file; raise :class:`ParamsError` naming file and key."""
    path = Path(path)
    raw = read_params_file(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(path, e)) from None


def load_section(name: str, path: str | Path = DEFAULT_PARAMS) -> Any:
    """Validate params.yaml and return one top-level section (what a stage reads)."""
    params = load_params(path)
    if name not in Params.model_fields:
        raise ParamsError(f"{path}: no params section {name!r}")
    return getattr(params, name)


def dump_defaults() -> dict[str, Any]:
    """The default params as plain data (used to write params.yaml and tiny test params)."""
    return Params().model_dump(mode="json")
