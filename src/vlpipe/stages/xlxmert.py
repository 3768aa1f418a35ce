"""Stages `pretrain@xlxmert`, `generator` and `paint` (X-LXMERT, Cho et al. 2020).

- ``pretrain@xlxmert`` (params ``pretrain.xlxmert``): X-LXMERT pre-training on the
  captions of ``lxmert/train.json`` with each image's grid of codebook cluster ids
  (``data/codebook``) -> ``models/pretrained/xlxmert`` (HF layout) and val metrics per loss,
  cluster-prediction accuracy and the majority-code baseline beside it.
- ``generator`` (params ``generator``): the SPADE generator trained on the ground-truth
  centroid grids of the training images, a share of their cells re-drawn by the pre-trained
  X-LXMERT (``corrupt_fraction``) -> ``models/generator``.
- ``paint`` (params ``paint``): val captions painted by mask-predict + generator, scored
  with the world's detector -> ``metrics/paint.json`` and ``reports/paint.png``.

Each ``run_*`` reads its params section and hands a typed params object to the function
that does the work (also what tests call).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlpipe.config import GeneratorParams, PaintParams, XlxmertPretrainParams, load_section
from vlpipe.data.examples import Example, ExampleDataset
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, read_json, read_meta, write_json, write_metrics

WORLD = Path("data/world")
TOKENIZER = Path("data/tokenizer")
CODEBOOK = Path("data/codebook")
DETECTOR = Path("models/detector")
PRETRAINED = Path("models/pretrained/xlxmert")
GENERATOR = Path("models/generator")
RUNS = Path("runs")  # persistent checkpoints (DVC `persist: true`) so a killed stage resumes
LIVE = Path("dvclive")
PAINT_SHEET = Path("reports/paint.png")
VAL_SEED = 1234  # masking of the val metrics: fixed, so numbers compare across steps and runs


def _finish(root: Path, name: str) -> None:
    """Delete a finished run's checkpoints: they only exist to resume a killed stage."""
    shutil.rmtree(root / RUNS / name / "checkpoints", ignore_errors=True)


def _codes(root: Path) -> tuple[np.ndarray, Any, int]:
    """(K, D) centroids, the img_id -> ids store and the grid side G of ``data/codebook``."""
    from vlpipe.features.codebook import load_codebook

    centroids, codes = load_codebook(root / CODEBOOK)
    return centroids, codes, int(read_meta(root / CODEBOOK)["grid"])


def cluster_ids(codes: Any, img_ids: Sequence[str]) -> np.ndarray:
    """(B, G*G) int64 cluster ids of ``img_ids``; :class:`InputError` names a missing image."""
    missing = [i for i in img_ids if i not in codes]
    if missing:
        raise InputError(codes.path, f"no cluster ids for img_id {missing[0]!r}")
    return codes.get_many(list(img_ids))["ids"].astype(np.int64)


def majority_code(codes: Any, train_ids: Sequence[str], k: int) -> int:
    """The most frequent cluster id over the training images' cells (the baseline's guess)."""
    return int(np.bincount(cluster_ids(codes, train_ids).reshape(-1), minlength=k).argmax())


# ------------------------------------------------------------------ pre-training


def caption_examples(path: Path, sources: Sequence[str]) -> list[Example]:
    """One example per sentence of ``sources`` (e.g. the ``mscoco`` captions) of an LXMERT
    pre-training JSON; ``key`` is (img_id, source, index)."""
    from vlpipe.data.pretrain import pretrain_examples

    return [ex for ex in pretrain_examples(path) if ex.key[1] in sources]


def make_collate(
    tokenizer: Any, codes: Any, max_length: int
) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """Clean batches: text padded to the batch's longest sentence, cluster_ids (B, G*G)."""

    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        text = tokenizer(
            [ex.sent for ex in batch],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": text["input_ids"],  # (B, L)
            "attention_mask": text["attention_mask"],
            "token_type_ids": text["token_type_ids"],
            "cluster_ids": torch.from_numpy(cluster_ids(codes, [ex.img_ids[0] for ex in batch])),  # (B, N)
        }

    return collate


def run_pretrain(params_path: Path, root: Path) -> None:
    """Stage `pretrain@xlxmert` (params ``pretrain.xlxmert``)."""
    pretrain_xlxmert(load_section("pretrain", params_path).xlxmert, root)


def pretrain_xlxmert(p: XlxmertPretrainParams, root: Path) -> dict[str, Any]:
    """Pre-train X-LXMERT; write the model, its meta.json and ``metrics/pretrain/xlxmert.json``."""
    from vlpipe.data.tokenizer import load_tokenizer
    from vlpipe.models.convert import load_reference_checkpoint
    from vlpipe.models.xlxmert import build_xlxmert, save_xlxmert, task_inputs
    from vlpipe.train.loop import fit, seed_everything

    tok = load_tokenizer(root / TOKENIZER)
    centroids, codes, grid = _codes(root)
    train_ex = caption_examples(root / WORLD / "lxmert/train.json", p.sources)
    val_ex = caption_examples(root / WORLD / "lxmert/val.json", p.sources)[: p.val_max_examples]
    if not train_ex or not val_ex:
        raise InputError(
            root / WORLD / "lxmert", f"no sentences of sources {p.sources} in train.json / val.json"
        )
    majority = majority_code(codes, sorted({ex.img_ids[0] for ex in train_ex}), len(centroids))

    seed_everything(p.train.seed)
    model = build_xlxmert(p.model, vocab_size=len(tok), centroids=centroids, grid=grid)
    if p.init:
        # An LXMERT checkpoint gives the encoder and text heads; the visual side is X-LXMERT's own.
        load_reference_checkpoint(
            model, p.init, allow_missing=("visual_embedding.", "cluster_head.", "task_step"),
            allow_unexpected=("obj_predict_head.", "answer_head."),
        )  # fmt: skip
    collate = make_collate(tok, codes, p.model.max_text_length)
    mask_kw = {
        "mask_token_id": tok.mask_token_id,
        "special_token_ids": tok.all_special_ids,
        "vocab_size": len(tok),
    }

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        task = getattr(m, "module", m).next_task(p.train.grad_accum)  # round-robin, one task per step
        return m(**task_inputs(batch, task, p.model, **mask_kw)).losses

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return pretrain_val_metrics(m, val_ex, collate, p, mask_kw, majority)

    fingerprint = json.dumps({"model": p.model.model_dump(mode="json"), "init": p.init, "sources": p.sources})
    result = fit(
        model, loss_fn, ExampleDataset(train_ex), collate, p.train, root / RUNS / "pretrain-xlxmert",
        eval_fn=eval_fn, live_dir=root / LIVE / "pretrain-xlxmert", fingerprint=fingerprint,
    )  # fmt: skip
    with atomic_dir(root / PRETRAINED) as tmp:
        save_xlxmert(result.model, tmp)
        write_json(tmp / "meta.json", {
            "model": "xlxmert", "feature_kind": "grid", "num_clusters": len(centroids),
            "grid": grid, "feat_dim": int(centroids.shape[1]),
        })  # fmt: skip
    metrics = {
        "val": result.eval_metrics, "train": result.losses, "steps": result.step,
        "train_examples": len(train_ex), "samples_per_second": result.samples_per_second,
        "majority_code": majority,
    }  # fmt: skip
    write_metrics(root / "metrics/pretrain/xlxmert.json", metrics)
    _finish(root, "pretrain-xlxmert")
    return metrics


class _Tally:
    """Running sums of the val metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: float, count: int = 1) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + count

    def means(self) -> dict[str, float]:
        return {k: v / max(self.counts[k], 1) for k, v in self.sums.items()}


def _cluster_hits(logits: torch.Tensor, labels: torch.Tensor, majority: int) -> tuple[int, int, int]:
    """(right, baseline right, masked cells): argmax vs the majority code on cells with a label."""
    sel = labels != -100  # (B, N)
    truth = labels[sel]
    return int((logits.argmax(-1)[sel] == truth).sum()), int((truth == majority).sum()), int(sel.sum())


@torch.no_grad()
def pretrain_val_metrics(
    model: Any,
    examples: list[Example],
    collate: Callable,
    p: XlxmertPretrainParams,
    mask_kw: dict,
    majority: int,
) -> dict[str, float]:
    """Each task's loss on val and its accuracy: masked-LM accuracy, matching accuracy,
    cluster-prediction accuracy on uniformly masked cells and on fully masked grids (text
    only: where painting starts), each beside the majority-code baseline on the same cells.
    Masking comes from a fixed generator, so the numbers compare across steps and runs."""
    from vlpipe.models.xlxmert import task_inputs

    gen = torch.Generator().manual_seed(VAL_SEED)
    tally = _Tally()
    for start in range(0, len(examples), p.eval_batch_size):
        batch = collate(examples[start : start + p.eval_batch_size])
        for task in dict.fromkeys(p.model.tasks):
            inputs = task_inputs(batch, task, p.model, generator=gen, **mask_kw)
            out = model(**inputs)
            name = {"mlm": "mlm", "visual": "cluster", "matched": "matched"}[task]
            tally.add(f"loss_{name}", float(out.losses[name]))
            if task == "mlm":
                sel = inputs["mlm_labels"] != -100
                tally.add(
                    "mlm_accuracy",
                    int((out.mlm_logits.argmax(-1)[sel] == inputs["mlm_labels"][sel]).sum()),
                    int(sel.sum()),
                )
            elif task == "matched":
                right = int((out.match_logits.argmax(-1) == inputs["matched_label"]).sum())
                tally.add("matched_accuracy", right, len(inputs["matched_label"]))
            else:
                right, base, n = _cluster_hits(out.cluster_logits, inputs["cluster_labels"], majority)
                tally.add("cluster_accuracy", right, n)
                tally.add("cluster_majority_baseline", base, n)
        ids = batch["cluster_ids"]  # (B, N): every cell masked, the text alone decides
        full = model(batch["input_ids"], batch["attention_mask"], ids, batch["token_type_ids"],
                     visual_mask=torch.ones_like(ids, dtype=torch.bool))  # fmt: skip
        right, base, n = _cluster_hits(full.cluster_logits, ids, majority)
        tally.add("cluster_accuracy_full_mask", right, n)
        tally.add("cluster_majority_baseline_full_mask", base, n)
    return tally.means()


# ------------------------------------------------------------------ generator


def _images(root: Path, img_ids: Sequence[str]) -> np.ndarray:
    """(B, S, S, 3) uint8 BGR world images; :class:`InputError` on a missing or corrupt file."""
    from vlpipe.data.images import read_image

    imgs = [read_image(root / WORLD / "images" / f"{i}.png") for i in img_ids]
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise InputError(root / WORLD / "images", f"images differ in size: {sorted(shapes)[:3]}")
    return np.stack(imgs)


class GridImages:
    """Images with their centroid grids, as batches for the generator: ``collate(indices)`` ->
    ``images`` (B, 3, S, S) in [-1, 1] and ``grids`` (B, G, G, D). With ``corrupt``
    (``corrupt(index (B,), ids (B, G*G)) -> ids``) the grids of a batch are corrupted, not the images."""

    def __init__(
        self, images: np.ndarray, ids: np.ndarray, centroids: np.ndarray, grid: int,
        corrupt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):  # fmt: skip
        self.images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # (M, 3, S, S) uint8
        self.ids = torch.from_numpy(ids)  # (M, G*G)
        self.centroids = torch.from_numpy(centroids)  # (K, D)
        self.grid = grid
        self.corrupt = corrupt

    def __len__(self) -> int:
        return len(self.images)

    def grids(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = self.ids[torch.as_tensor(index)]  # (B, N)
        return self.centroids[ids].reshape(len(ids), self.grid, self.grid, -1)  # (B, G, G, D)

    def collate(self, index: list[int]) -> dict[str, torch.Tensor]:
        from vlpipe.data.images import normalise_batch

        idx = torch.as_tensor(index)
        if self.corrupt is None:
            return {"images": normalise_batch(self.images[idx]), "grids": self.grids(idx)}
        ids = self.corrupt(idx, self.ids[idx])  # (B, G*G)
        grids = self.centroids[ids].reshape(len(idx), self.grid, self.grid, -1)  # (B, G, G, D)
        return {"images": normalise_batch(self.images[idx]), "grids": grids}


class PainterCorruption:
    """Training grids with the painter's own errors (generator params ``corrupt_fraction``,
    ``corrupt_temperature``): per grid f ~ U(0, max_fraction); each cell is masked with
    probability f and re-drawn by the pre-trained X-LXMERT from one of the image's captions
    (drawn at random) and the other cells (:func:`vlpipe.tasks.paint.resample_cells`).

    X-LXMERT trains its generator on true grids only, but painted grids are sampled cell by
    cell and their cells do not fit together as a real image's do: a generator that has seen
    such cells, with the real image as target, draws more of the caption's objects from them
    (README). Randomness comes from the global torch RNG, which the training loop seeds and
    checkpoints, so a resumed run draws the same corruption.
    """

    def __init__(
        self, model: Any, tokenizer: Any, captions: Sequence[Sequence[str]], max_fraction: float,
        temperature: float,
    ):  # fmt: skip
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.captions = tokenizer, captions
        self.max_fraction, self.temperature = max_fraction, temperature
        self.max_length = int(model.config.max_text_length)

    def __call__(self, index: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from vlpipe.tasks.paint import resample_cells

        texts = [self.captions[i][int(torch.randint(len(self.captions[i]), ()))] for i in index.tolist()]
        tok = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        frac = torch.rand(len(ids), 1) * self.max_fraction  # (B, 1)
        masked = torch.rand(ids.shape) < frac  # (B, G*G)
        return resample_cells(
            self.model, tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], ids, masked,
            temperature=self.temperature,
        )  # fmt: skip


def painter_corruption(
    p: GeneratorParams, root: Path, img_ids: Sequence[str], centroids: np.ndarray
) -> PainterCorruption:
    """The :class:`PainterCorruption` of the training images ``img_ids``: the pre-trained
    X-LXMERT (its codebook must be ``data/codebook``'s), the tokenizer and each image's
    ``mscoco`` captions of ``lxmert/train.json``."""
    from vlpipe.data.formats.lxmert import read_lxmert
    from vlpipe.data.tokenizer import load_tokenizer
    from vlpipe.models.xlxmert import load_xlxmert

    model = load_xlxmert(root / PRETRAINED)
    if tuple(model.centroids.shape) != centroids.shape or not torch.allclose(
        model.centroids.float(), torch.from_numpy(centroids).float()
    ):
        raise InputError(
            root / PRETRAINED,
            f"its {tuple(model.centroids.shape)} centroids are not those of {root / CODEBOOK} "
            f"{centroids.shape}: re-run pretrain@xlxmert on this codebook",
        )
    path = root / WORLD / "lxmert/train.json"
    sentences = {rec["img_id"]: rec["sentf"].get("mscoco", []) for rec in read_lxmert(path)}
    captions = [sentences.get(i, []) for i in img_ids]
    bare = [i for i, c in zip(img_ids, captions, strict=True) if not c]
    if bare:
        raise InputError(path, f"no 'mscoco' caption for training image {bare[0]!r} (painter corruption)")
    return PainterCorruption(
        model, load_tokenizer(root / TOKENIZER), captions, p.corrupt_fraction, p.corrupt_temperature
    )


def run_generator(params_path: Path, root: Path) -> None:
    """Stage `generator` (params ``generator``)."""
    train_generator_stage(load_section("generator", params_path), root)


def _grid_images(
    root: Path,
    split: str,
    codes: Any,
    centroids: np.ndarray,
    grid: int,
    limit: int | None = None,
    corrupt_with: GeneratorParams | None = None,
) -> GridImages:
    """The split's images and true grids; ``corrupt_with`` (params with corrupt_fraction > 0):
    batches carry the painter corruption."""
    ids = read_json(root / WORLD / "splits.json")[split][:limit]
    corrupt = painter_corruption(corrupt_with, root, ids, centroids) if corrupt_with is not None else None
    return GridImages(_images(root, ids), cluster_ids(codes, ids), centroids, grid, corrupt)


def train_generator_stage(p: GeneratorParams, root: Path) -> dict[str, Any]:
    """Train the generator on the training images' centroid grids (ground truth, with the
    painter corruption when ``corrupt_fraction`` > 0); write ``models/generator`` and
    ``metrics/generator.json`` (val L1 / PSNR of reconstructions of the true grids)."""
    from vlpipe.data.images import normalise_batch
    from vlpipe.models.generator import GanPair, build_generator, save_generator
    from vlpipe.train.loop import fit, seed_everything

    centroids, codes, grid = _codes(root)
    train = _grid_images(
        root, "train", codes, centroids, grid, corrupt_with=p if p.corrupt_fraction > 0 else None
    )
    val = _grid_images(root, "val", codes, centroids, grid, p.val_max_images)
    seed_everything(p.train.seed)
    gen = build_generator(p, centroids, grid=grid, image_size=train.images.shape[-1])
    pair = GanPair(gen, p, perceptual_net(root) if p.perceptual_weight > 0 else None)
    mean_image = normalise_batch(train.images).mean(0)  # (3, S, S): the blind baseline

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return m(batch["images"], batch["grids"])

    def eval_fn(m: torch.nn.Module, step: int) -> dict[str, float]:
        return reconstruction_metrics(m.generator, val, p.eval_batch_size, mean_image)

    fingerprint = json.dumps({"generator": p.model_dump(mode="json", exclude={"train"}), "k": len(centroids)})
    result = fit(
        pair, loss_fn, list(range(len(train))), train.collate, p.train, root / RUNS / "generator",
        eval_fn=eval_fn, live_dir=root / LIVE / "generator", fingerprint=fingerprint,
    )  # fmt: skip
    save_generator(result.model.generator, root / GENERATOR)
    metrics = {"val": result.eval_metrics, "train": result.losses, "steps": result.step,
               "train_images": len(train), "samples_per_second": result.samples_per_second}  # fmt: skip
    write_metrics(root / "metrics/generator.json", metrics)
    _finish(root, "generator")
    return metrics


def perceptual_net(root: Path) -> torch.nn.Module:
    """The world detector's backbone (input: images normalised to [-1, 1], as the generator's),
    the perceptual network of the generator loss: the only trained CNN we have offline."""
    from vlpipe.features.detector import load_detector

    return load_detector(root / DETECTOR).backbone


@torch.no_grad()
def reconstruction_metrics(
    gen: Any, data: GridImages, batch_size: int, mean_image: torch.Tensor
) -> dict[str, float]:
    """Val L1 and PSNR (on [-1, 1] pixels, peak-to-peak 2) of the generator's images from the
    ground-truth grids, and the L1 of the mean training image (what a generator ignoring its
    input would reach)."""
    l1 = base = sq = 0.0
    for start in range(0, len(data), batch_size):
        batch = data.collate(list(range(start, min(start + batch_size, len(data)))))
        fake = gen(batch["grids"])  # (B, 3, S, S)
        l1 += float((fake - batch["images"]).abs().mean(dim=(1, 2, 3)).sum())
        sq += float(((fake - batch["images"]) ** 2).mean(dim=(1, 2, 3)).sum())
        base += float((mean_image - batch["images"]).abs().mean(dim=(1, 2, 3)).sum())
    n = max(len(data), 1)
    return {"l1": l1 / n, "psnr": float(10 * np.log10(4.0 / max(sq / n, 1e-12))), "l1_mean_image": base / n}


# ------------------------------------------------------------------ paint


def val_captions(root: Path, limit: int | None) -> list[tuple[str, str]]:
    """(img_id, first caption) of each val image of ``lxmert/val.json``, in file order."""
    from vlpipe.data.formats.lxmert import read_lxmert

    path = root / WORLD / "lxmert/val.json"
    out = [
        (rec["img_id"], rec["sentf"]["mscoco"][0]) for rec in read_lxmert(path) if rec["sentf"].get("mscoco")
    ]
    if len(out) < 2:
        raise InputError(path, "fewer than two val images with an 'mscoco' caption to paint")
    return out[:limit]


def run_paint(params_path: Path, root: Path) -> None:
    """Stage `paint` (params ``paint``)."""
    paint_val(load_section("paint", params_path), root)


def paint_val(p: PaintParams, root: Path) -> dict[str, Any]:
    """Paint val captions; score painted images, generator reconstructions of the true grids
    and the real images with the detector; write ``metrics/paint.json`` and the sheet."""
    from vlpipe.data.tokenizer import load_tokenizer
    from vlpipe.features.detector import load_detector
    from vlpipe.models.generator import generate, load_generator
    from vlpipe.models.xlxmert import load_xlxmert
    from vlpipe.tasks.paint import (
        PaintSettings,
        caption_objects,
        check_compatible,
        contact_sheet,
        detect_objects,
        image_scores,
        paint,
        write_png,
    )  # fmt: skip

    model, gen = load_xlxmert(root / PRETRAINED), load_generator(root / GENERATOR)
    check_compatible(model, gen, root / GENERATOR)
    detector = load_detector(root / DETECTOR)
    threshold = p.score_threshold if p.score_threshold is not None else detector.config.score_threshold
    pairs = val_captions(root, p.num_captions)
    img_ids, texts = [i for i, _ in pairs], [t for _, t in pairs]
    vocab = detector.vocab
    wanted = [caption_objects(t, vocab.shapes, vocab.colors, vocab.sizes) for t in texts]

    settings = PaintSettings(p.steps, p.temperature, p.top_k, p.seed, p.batch_size)
    ids, painted = paint(model, gen, load_tokenizer(root / TOKENIZER), texts, settings)
    _, codes, grid = _codes(root)
    true_ids = cluster_ids(codes, img_ids)
    grids = model.centroids[torch.from_numpy(true_ids)].reshape(len(img_ids), grid, grid, -1)
    recon = generate(gen, grids, p.batch_size)
    real = _images(root, img_ids)

    found = {name: detect_objects(detector, imgs, threshold, p.batch_size)
             for name, imgs in (("real", real), ("reconstructed", recon), ("painted", painted))}  # fmt: skip
    metrics: dict[str, Any] = {
        name: image_scores(found[name], wanted, found["real"], p.rprecision_candidates, p.seed)
        for name in ("painted", "reconstructed", "real")
    }
    metrics["real"].pop("frechet_distance")  # 0 by definition
    metrics.update(
        captions=len(texts), caption_objects=sum(len(w) for w in wanted), steps=p.steps,
        cell_agreement_with_truth=float((ids == true_ids).mean()),
    )  # fmt: skip
    n = min(p.sheet_size, len(texts))
    rows = [(texts[i], [real[i], recon[i], painted[i]]) for i in range(n)]
    write_png(root / PAINT_SHEET, contact_sheet(rows, columns=2))
    write_metrics(root / "metrics/paint.json", metrics)
    return metrics


def paint_caption(caption: str, out_png: Path, params_path: Path, root: Path) -> Path:
    """`vlpipe paint "SENTENCE"`: one sentence painted with the pipeline's X-LXMERT and
    generator and the ``paint`` params (steps, temperature, top_k, seed)."""
    from vlpipe.tasks.paint import paint_text

    p: PaintParams = load_section("paint", params_path)
    return paint_text(
        caption, root / PRETRAINED, root / GENERATOR, root / TOKENIZER, out_png,
        steps=p.steps, temperature=p.temperature, top_k=p.top_k, seed=p.seed,
    )  # fmt: skip
