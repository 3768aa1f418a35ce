"""Image captioning on the Karpathy split (formats.md §4), scored as COCO captions.

The task reads ``karpathy/dataset_coco.json``: training examples are its train captions
(one :class:`Example` per caption), validation and test examples its images (one per image,
its references as target). Image ids are the Karpathy ``cocoid`` ints, what results files
``[{"image_id": int, "caption": str}]`` carry. Validation is scored against a COCO-format
ground truth built from the Karpathy file, test (the local leaderboard) against
``hidden/captions_test.json``; both with the official metrics of :mod:`vlpipe.eval.caption`.

Captioning is generation, not classification: this task provides the data, collates,
decoding of a batch of images into text and the official metric/submission methods that the
local leaderboard (:func:`vlpipe.eval.leaderboard.score_submission`) calls; it has no
classification head, so it is not a :class:`vlpipe.tasks.base.Task`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlpipe.data.examples import Example
from vlpipe.data.formats.coco_captions import captions_by_image, check_caption_gt, read_caption_gt
from vlpipe.data.formats.karpathy import read_karpathy
from vlpipe.errors import InputError
from vlpipe.eval.caption import caption_metrics, read_results
from vlpipe.io import write_json

Visual = Callable[[Sequence[str]], dict[str, torch.Tensor]]


class CaptionTask:
    """Karpathy-split captioning of the world (or of COCO, given its files in the same layout)."""

    name = "caption"
    submission_name = "captions_test_results.json"

    def __init__(self, world_dir: Path):
        self.world_dir = Path(world_dir)
        self.karpathy_path = self.world_dir / "karpathy" / "dataset_coco.json"
        self._images = read_karpathy(self.karpathy_path)["images"]

    # ---- data
    def _split_images(self, split: str) -> list[dict]:
        # Karpathy's "restval" images are training images (the usual 113K-image training set).
        splits = ("train", "restval") if split == "train" else (split,)
        images = [im for im in self._images if im["split"] in splits]
        if not images:
            raise InputError(self.karpathy_path, f"no images of split {split!r}")
        return images

    def caption_examples(self, split: str) -> list[Example]:
        """One example per reference caption (training data): key (image_id, k), sent = caption."""
        return [
            Example(key=(im["cocoid"], k), img_ids=(Path(im["filename"]).stem,), sent=s["raw"],
                    info={"image_id": im["cocoid"]})  # fmt: skip
            for im in self._split_images(split)
            for k, s in enumerate(im["sentences"])
        ]

    def image_examples(self, split: str) -> list[Example]:
        """One example per image: key = image_id, target = its reference captions (empty on test)."""
        return [
            Example(key=im["cocoid"], img_ids=(Path(im["filename"]).stem,), sent="",
                    target=tuple(s["raw"] for s in im["sentences"]))  # fmt: skip
            for im in self._split_images(split)
        ]

    def ground_truth(self, split: str) -> dict[str, list[dict]]:
        """COCO-format caption ground truth ``{"images", "annotations"}`` of a labelled split."""
        images, annotations = [], []
        for im in self._split_images(split):
            images.append({"id": im["cocoid"], "file_name": f"{im['filepath']}/{im['filename']}"})
            for s in im["sentences"]:
                annotations.append({"image_id": im["cocoid"], "id": len(annotations) + 1, "caption": s["raw"]})
        gt = {"images": images, "annotations": annotations}
        check_caption_gt(self.karpathy_path, gt)
        refs = captions_by_image(gt)
        if unlabelled := [im["id"] for im in images if im["id"] not in refs]:
            raise InputError(self.karpathy_path, f"split {split!r}: image {unlabelled[0]} has no sentences")
        return gt

    def references(self, split: str) -> dict[int, list[str]]:
        """``{image_id: [reference captions]}`` of a labelled split (val)."""
        return captions_by_image(self.ground_truth(split))

    def image_ids(self, split: str) -> list[int]:
        return [im["cocoid"] for im in self._split_images(split)]

    # ---- evaluation
    def metric(
        self, predictions: dict[int, str], split: str, *, meteor: bool = True, spice: bool = True
    ) -> dict[str, Any]:
        """Official caption metrics on a labelled split, against the Karpathy file's captions.

        ``predictions`` may cover a subset of the split's images (e.g. ``val_max_images``).
        """
        refs = self.references(split)
        if unknown := sorted(set(predictions) - set(refs)):
            raise ValueError(f"predictions for image ids not in split {split!r}: {unknown[:5]}")
        return caption_metrics(predictions, {i: refs[i] for i in predictions}, meteor=meteor, spice=spice)

    def hidden_ground_truth(self) -> dict[int, list[str]]:
        """Test references from ``hidden/captions_test.json`` (read only by the local leaderboard)."""
        return captions_by_image(read_caption_gt(self.world_dir / "hidden" / "captions_test.json"))

    def score(self, predictions: dict[int, str], ground_truth: dict[int, list[str]]) -> dict[str, Any]:
        return caption_metrics(predictions, ground_truth)

    # ---- submission
    def submission_path(self, out_dir: Path) -> Path:
        return Path(out_dir) / self.submission_name

    def write_submission(self, predictions: dict[int, str], out_dir: Path) -> Path:
        path = self.submission_path(out_dir)
        write_results(path, predictions)
        return path

    def read_submission(self, path: Path) -> dict[int, str]:
        """Read a test results file; unknown image ids or missing captions raise InputError."""
        return read_results(path, self.image_ids("test"))


def write_results(path: Path, predictions: dict[int, str]) -> None:
    """COCO results file ``[{"image_id", "caption"}]`` sorted by image id, atomically."""
    write_json(path, [{"image_id": int(i), "caption": c} for i, c in sorted(predictions.items())], indent=None)


# -------------------------------------------------------------------------- collates


def make_caption_collate(tokenizer: Any, visual: Visual, max_length: int) -> Callable[[list[Example]], dict[str, Any]]:
    """Caption examples -> ``input_ids`` / ``attention_mask`` (B, L) ([CLS] caption [SEP], padded
    to the longest in the batch, at most ``max_length``) and the visual inputs of their images."""

    def collate(batch: list[Example]) -> dict[str, Any]:
        text = tokenizer(
            [ex.sent for ex in batch], padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            **visual([ex.img_ids[0] for ex in batch]),
            "examples": batch,
        }

    return collate


def make_image_collate(visual: Visual) -> Callable[[list[Example]], dict[str, Any]]:
    """Image examples -> their visual inputs (and the examples, which carry ids and references)."""

    def collate(batch: list[Example]) -> dict[str, Any]:
        return {**visual([ex.img_ids[0] for ex in batch]), "examples": batch}

    return collate


def captions_text(tokenizer: Any, token_ids: Sequence[Sequence[int]]) -> list[str]:
    """Decoded captions (special tokens dropped, WordPieces joined)."""
    return [
        tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()
        for ids in token_ids
    ]


@torch.no_grad()
def generate_captions(
    model: torch.nn.Module,
    examples: Sequence[Example],
    visual: Visual,
    tokenizer: Any,
    *,
    batch_size: int,
    beam_size: int,
    max_length: int,
    length_penalty: float = 0.0,
) -> dict[int, str]:
    """``{image_id: caption}`` for image examples, decoded in eval mode, in order."""
    from vlpipe.models.vlp import decode

    was_training = model.training
    model.eval()
    out: dict[int, str] = {}
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        vis = visual([ex.img_ids[0] for ex in batch])
        ids = decode(
            model, vis["visual_feats"], vis["visual_pos"], vis.get("visual_attention_mask"),
            beam_size=beam_size, max_length=max_length, length_penalty=length_penalty,
        )  # fmt: skip
        out.update(zip((ex.key for ex in batch), captions_text(tokenizer, ids), strict=True))
    model.train(was_training)
    return out
