"""Text-to-image with X-LXMERT ("painting"): mask-predict sampling, generator, scores.

X-LXMERT (Cho et al., EMNLP 2020, §3.4) generates an image from a sentence by sampling the
G x G cluster ids with mask-predict (Ghazvininejad et al., 2019): start with every cell
masked; at step i = 1..T predict each masked cell (its most likely id, or a sample), then
re-mask the int((T - i) / T * G*G) least confident cells; after T steps every cell is
filled. The ids' centroids go through the image generator (:mod:`vlpipe.models.generator`).

Scores on the shapes world, with the world's detector (:mod:`vlpipe.features.detector`)
standing in for the Inception network / object detectors of the reference metrics:

- ``object_recall``: the fraction of a caption's objects (``a <size> <colour> <shape>``
  phrases) found in the painted image with the right shape and colour;
- ``r_precision``: the caption of an image ranked against ``rprecision_candidates - 1``
  captions of other images by the agreement of their objects with the detections (R-precision
  of Xu et al. 2018 with the detector as the scoring model; ties share the credit);
- ``frechet_distance``: Fréchet distance (Heusel et al., 2017) between the Gaussians of the
  detector's RoI features of real and of painted val images (FID with our detector).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from vlpipe.errors import InputError
from vlpipe.io import atomic_file

ObjectKey = tuple[str | None, str]  # (colour or None when the text gives none, shape)

_TILE = 192  # side of an upscaled image on the contact sheet, px
_PAD = 6
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.42
_LINE_H = 15
_BG = (32, 32, 32)
_FG = (235, 235, 235)


# ------------------------------------------------------------------------ mask-predict


def _choose(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, N) and their confidence (the model's probability) from (B, N, K) logits."""
    probs = logits.float().softmax(-1)  # (B, N, K)
    if temperature == 0:
        conf, ids = probs.max(-1)
        return ids, conf
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]  # (B, N, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    flat = scaled.softmax(-1).reshape(-1, scaled.shape[-1])  # (B*N, K)
    ids = torch.multinomial(flat, 1, generator=generator).reshape(logits.shape[:-1])  # (B, N)
    return ids, probs.gather(-1, ids[..., None])[..., 0]


def remask_count(step: int, steps: int, cells: int) -> int:
    """Cells masked again after step ``step`` (1-based) of ``steps``: int((T - i) / T * N)."""
    return int((steps - step) / steps * cells)


@torch.no_grad()
def mask_predict(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    *,
    steps: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample the (B, G*G) cluster ids of sentences (B, L) with an X-LXMERT ``model``.

    The model runs in eval mode (restored afterwards). ``temperature`` 0 takes the most
    likely id of each cell (deterministic); > 0 samples (optionally among the ``top_k``
    likeliest) from ``generator``, so a seeded generator gives the same ids every time.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    was_training = model.training
    model.eval()
    b, n = input_ids.shape[0], model.num_cells
    ids = torch.zeros(b, n, dtype=torch.long, device=input_ids.device)
    conf = torch.zeros(b, n, device=input_ids.device)
    masked = torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
    for step in range(1, steps + 1):
        logits = model(
            input_ids, attention_mask, ids, token_type_ids, visual_mask=masked
        ).cluster_logits  # (B, N, K)
        new_ids, new_conf = _choose(logits, temperature, top_k, generator)
        ids = torch.where(masked, new_ids, ids)  # predictions of kept cells stay as they were
        conf = torch.where(masked, new_conf, conf)
        count = remask_count(step, steps, n)
        masked = torch.zeros_like(masked)
        if count:
            lowest = conf.argsort(dim=1, stable=True)[:, :count]  # (B, count) least confident cells
            masked.scatter_(1, lowest, True)
    model.train(was_training)
    return ids


@torch.no_grad()
def resample_cells(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    ids: torch.Tensor,
    masked: torch.Tensor,
    *,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The (B, N) cluster ids with their ``masked`` (B, N) cells re-drawn by ``model`` from
    the sentences (B, L) and the other cells: one mask-predict step on a known grid, i.e. a
    true grid carrying the painter's own errors (what the generator's painter corruption
    trains on). The model runs in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    logits = model(input_ids, attention_mask, ids, token_type_ids, visual_mask=masked).cluster_logits
    new_ids, _ = _choose(logits, temperature, None, generator)  # (B, N)
    model.train(was_training)
    return torch.where(masked, new_ids, ids)


@dataclass(frozen=True)
class PaintSettings:
    """How sentences are painted: mask-predict steps, sampling, batch size, seed."""

    steps: int = 8
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 64


@torch.no_grad()
def paint(
    model: Any, generator_net: Any, tokenizer: Any, texts: Sequence[str], settings: PaintSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``texts``: (B, G*G) int64 cluster ids and (B, S, S, 3) uint8 BGR images.

    One seeded generator serves all batches, so the result depends only on the texts, the
    models and ``settings``.
    """
    from vlpipe.models.generator import generate

    rng = torch.Generator().manual_seed(settings.seed)
    max_len = int(model.config.max_text_length)
    grid, dim = model.config.grid, model.centroids.shape[1]
    all_ids, images = [], []
    for start in range(0, len(texts), settings.batch_size):
        chunk = list(texts[start : start + settings.batch_size])
        tok = tokenizer(chunk, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        ids = mask_predict(
            model, tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], steps=settings.steps,
            temperature=settings.temperature, top_k=settings.top_k, generator=rng,
        )  # fmt: skip
        grids = F.embedding(ids, model.centroids).reshape(len(chunk), grid, grid, dim)  # (b, G, G, D)
        all_ids.append(ids)
        images.append(generate(generator_net, grids, settings.batch_size))
    return torch.cat(all_ids).numpy(), np.concatenate(images)


# -------------------------------------------------------------------- caption objects


def caption_objects(
    text: str, shapes: Sequence[str], colors: Sequence[str], sizes: Sequence[str]
) -> list[ObjectKey]:
    """The objects a sentence introduces: ``a|an|one [size] [colour] shape`` phrases.

    The world's captions list every object that way (``a small red circle, ...``); phrases
    with ``the`` (relations: ``the small red circle is above ...``) refer back and are not
    counted again. Returns (colour or None, shape) per phrase, in order.
    """
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    pattern = re.compile(
        rf"\b(?:a|an|one)\s+(?:(?:{alt(sizes)})\s+)?(?:({alt(colors)})\s+)?({alt(shapes)})\b", re.IGNORECASE
    )
    return [(c.lower() if c else None, s.lower()) for c, s in pattern.findall(text)]


def found_objects(wanted: Sequence[ObjectKey], detected: Sequence[tuple[str, str]]) -> int:
    """How many ``wanted`` objects a one-to-one matching to ``detected`` (colour, shape) finds:
    objects with a colour need that colour and shape; then colourless ones any of that shape."""
    left = Counter(detected)
    found = 0
    for color, shape in sorted(wanted, key=lambda o: o[0] is None):
        key = (
            (color, shape)
            if color is not None
            else next((k for k in left if k[1] == shape and left[k] > 0), None)
        )
        if key is not None and left[key] > 0:
            left[key] -= 1
            found += 1
    return found


def agreement(detected: Sequence[tuple[str, str]], wanted: Sequence[ObjectKey]) -> float:
    """Dice agreement 2 * found / (|detected| + |wanted|) of a caption with an image's detections."""
    total = len(detected) + len(wanted)
    return 2 * found_objects(wanted, detected) / total if total else 1.0


def r_precision(
    detected: Sequence[Sequence[tuple[str, str]]],
    captions: Sequence[Sequence[ObjectKey]],
    candidates: int,
    seed: int,
) -> float:
    """Mean over images of the credit of its own caption ranked first among ``candidates``
    (itself + captions of other images, drawn with ``seed``) by :func:`agreement`; a tie at
    the top with t others gives 1 / (t + 1)."""
    n = len(captions)
    if n < 2:
        raise ValueError("R-precision needs at least two captions")
    rng = np.random.default_rng(seed)
    credit = 0.0
    for i in range(n):
        others = rng.choice(n - 1, size=min(candidates - 1, n - 1), replace=False)
        others = others + (others >= i)  # skip image i itself
        own = agreement(detected[i], captions[i])
        scores = np.array([agreement(detected[i], captions[j]) for j in others])
        if not (scores > own).any():
            credit += 1.0 / (1 + int((scores == own).sum()))
    return credit / n


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (n, D) and (m, D) feature sets:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (symmetric form, via eigh)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least two feature vectors on each side, got {len(a)} and {len(b)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^1/2
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)  # eigenvalues of S_a^1/2 S_b S_a^1/2
    return float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


# ------------------------------------------------------------------------- detection


@dataclass
class DetectedImages:
    """Per image: the (colour, shape) names of its confident detections; all their RoI features."""

    objects: list[list[tuple[str, str]]]
    features: np.ndarray  # (M, D)


@torch.no_grad()
def detect_objects(
    detector: Any, images: np.ndarray, score_threshold: float, batch_size: int = 64
) -> DetectedImages:
    """Run the world's detector on (B, S, S, 3) uint8 BGR images; keep detections scoring
    >= ``score_threshold``, with the RoI-head feature of each (what the Fréchet distance compares)."""
    from vlpipe.features.detector import decode_detections, rois_of

    shapes, colors = detector.vocab.shapes, detector.vocab.colors
    objects, feats = [], []
    detector.eval()
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(
            np.ascontiguousarray(images[start : start + batch_size].transpose(0, 3, 1, 2))
        )
        sizes = torch.tensor([chunk.shape[2], chunk.shape[3]]).expand(len(chunk), 2)  # (b, 2) h, w
        maps, heat, box = detector(chunk)
        dets = decode_detections(detector, maps, heat, box, sizes, score_threshold)
        feats.append(
            detector.region_features(maps, rois_of([d.boxes for d in dets]), sizes).numpy()
        )  # (n, D)
        for det in dets:
            pairs = zip(det.labels.tolist(), det.attrs["color"].tolist(), strict=True)
            objects.append([(colors[c], shapes[s]) for s, c in pairs])
    return DetectedImages(objects, np.concatenate(feats).astype(np.float32))


def object_recall(
    detected: Sequence[Sequence[tuple[str, str]]], captions: Sequence[Sequence[ObjectKey]]
) -> float:
    """Caption objects found in their images over all caption objects."""
    total = sum(len(c) for c in captions)
    found = sum(found_objects(c, d) for c, d in zip(captions, detected, strict=True))
    return found / max(total, 1)


def image_scores(
    detected: DetectedImages,
    captions: Sequence[Sequence[ObjectKey]],
    real: DetectedImages,
    candidates: int,
    seed: int,
) -> dict[str, float | None]:
    """object_recall, r_precision and frechet_distance (to ``real``) of one set of images;
    the distance is None (JSON null) when fewer than two objects were detected."""
    enough = len(detected.features) >= 2 and len(real.features) >= 2
    fd = frechet_distance(real.features, detected.features) if enough else None
    return {
        "object_recall": object_recall(detected.objects, captions),
        "r_precision": r_precision(detected.objects, captions, candidates, seed),
        "frechet_distance": fd,
        "detections_per_image": sum(len(o) for o in detected.objects) / max(len(detected.objects), 1),
    }


# ---------------------------------------------------------------------- contact sheet


def _wrap(text: str, width_px: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width_px`` wide in the sheet font."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and cv2.getTextSize(candidate, _FONT, _FONT_SCALE, 1)[0][0] > width_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _upscale(img: np.ndarray) -> np.ndarray:
    scale = max(1, _TILE // max(img.shape[:2]))
    return cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def contact_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: int = 2) -> np.ndarray:
    """A BGR sheet of tiles: each tile shows its images side by side over its wrapped text."""
    tiles = []
    for text, imgs in rows:
        strip = np.hstack(
            [np.pad(_upscale(im), ((0, 0), (0, _PAD), (0, 0)), constant_values=_BG[0]) for im in imgs]
        )
        tiles.append((strip, _wrap(text, strip.shape[1] - 8)))
    n_lines = max(len(lines) for _, lines in tiles)
    height = max(s.shape[0] for s, _ in tiles) + n_lines * _LINE_H + _PAD
    width = max(s.shape[1] for s, _ in tiles)
    cols = min(columns, len(tiles))
    sheet = np.full(
        (math.ceil(len(tiles) / cols) * (height + _PAD) + _PAD, cols * (width + _PAD) + _PAD, 3),
        _BG,
        np.uint8,
    )
    for k, (strip, lines) in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = _PAD + r * (height + _PAD), _PAD + c * (width + _PAD)
        sheet[y : y + strip.shape[0], x : x + strip.shape[1]] = strip
        for i, line in enumerate(lines):
            base = y + strip.shape[0] + (i + 1) * _LINE_H - 3
            cv2.putText(sheet, line, (x + 4, base), _FONT, _FONT_SCALE, _FG, 1, cv2.LINE_AA)
    return sheet


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Encode a BGR uint8 image as PNG and write it atomically."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InputError(path, "OpenCV could not encode the image as PNG")
    with atomic_file(path, "wb") as f:
        f.write(buf.tobytes())


# ----------------------------------------------------------------------- one sentence


def paint_text(
    text: str,
    xlxmert_dir: str | Path,
    generator_dir: str | Path,
    tokenizer_dir: str | Path,
    out_png: str | Path,
    *,
    steps: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> Path:
    """Paint one sentence (``vlpipe paint "a large red circle left of a blue square"``) and
    write the image, upscaled, with the sentence under it, to ``out_png``."""
    from vlpipe.data.tokenizer import load_tokenizer
    from vlpipe.models.generator import load_generator
    from vlpipe.models.xlxmert import load_xlxmert

    if not text.strip():
        raise InputError(out_png, "nothing to paint: the sentence is empty")
    model = load_xlxmert(xlxmert_dir)
    gen = load_generator(generator_dir)
    check_compatible(model, gen, Path(generator_dir))
    settings = PaintSettings(steps=steps, temperature=temperature, top_k=top_k, seed=seed, batch_size=1)
    _, images = paint(model, gen, load_tokenizer(Path(tokenizer_dir)), [text], settings)
    write_png(out_png, contact_sheet([(text, [images[0]])], columns=1))
    return Path(out_png)


def check_compatible(model: Any, generator_net: Any, generator_dir: Path) -> None:
    """The generator must have been trained on the codebook of the X-LXMERT model: same grid,
    same centroid dim and the same centroid statistics (its input scaling)."""
    grid, dim = model.config.grid, model.centroids.shape[1]
    if (generator_net.config.grid, generator_net.config.feat_dim) != (grid, dim):
        raise InputError(
            generator_dir,
            f"generator expects a {generator_net.config.grid}x{generator_net.config.grid} grid of "
            f"{generator_net.config.feat_dim}-d centroids, X-LXMERT gives {grid}x{grid} of {dim}-d",
        )
    if not torch.allclose(generator_net.centroid_mean, model.centroids.mean(0), atol=1e-5):
        raise InputError(generator_dir, "generator was trained on another codebook than the X-LXMERT model")
