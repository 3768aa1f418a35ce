"""NLVR2 (Suhr et al., 2019) as LXMERT fine-tunes it: the sentence is encoded with each of
the two images, the pooled outputs are concatenated (2H) and an MLP classifies true/false.
Metrics: accuracy and consistency; submission ``test_predict.csv`` (``identifier,True``)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlpipe.data.formats.nlvr2 import parse_identifier, read_nlvr2, read_nlvr2_hidden
from vlpipe.errors import InputError
from vlpipe.eval.nlvr2 import nlvr2_metrics
from vlpipe.io import atomic_file
from vlpipe.models.layers import AnswerHead
from vlpipe.tasks.base import Example, Task

_SIDE = re.compile(r"\b(left|right|Left|Right)\b")
_OTHER_SIDE = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def swap_side_words(sentence: str) -> str:
    """``sentence`` with "left" and "right" swapped (either capitalisation): the same claim
    about the pair read from the other image's side."""
    return _SIDE.sub(lambda m: _OTHER_SIDE[m.group(1)], sentence)


def swap_sides(examples: Sequence[Example]) -> list[Example]:
    """Each pair mirrored: images swapped and "left" / "right" swapped in the sentence, which
    keeps its truth value (the label is unchanged). Keys get a ``-swapped`` suffix.

    Exact for the world's templates (where "left" / "right" only name the image); on real
    NLVR2 an occasional "left" inside one image would be mirrored too.
    """
    return [
        replace(ex, key=f"{ex.key}-swapped", img_ids=tuple(reversed(ex.img_ids)),
                sent=swap_side_words(ex.sent))  # fmt: skip
        for ex in examples
    ]


class Nlvr2Task(Task):
    name = "nlvr2"
    num_images = 2
    submission_name = "test_predict.csv"

    def examples(self, split: str) -> list[Example]:
        path = self.world_dir / "nlvr2" / f"{split}.json"
        return [
            Example(key=r["identifier"], img_ids=(r["img0"], r["img1"]), sent=r["sent"], target=r.get("label"))
            for r in read_nlvr2(path, labelled=split != "test")
        ]

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        return torch.tensor([int(ex.target) for ex in examples], dtype=torch.long)  # (B,)

    def build_head(self, hidden_size: int) -> nn.Module:
        # LXMERT's NLVR2 classifier: 2H -> 2H, GeLU, LayerNorm, 2H -> 2.
        return AnswerHead(2 * hidden_size, 2, hidden_dim=2 * hidden_size)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, targets)
        return {"nlvr2_ce": ce, "loss": ce}

    def predict(self, logits: torch.Tensor, examples: Sequence[Example]) -> dict[str, bool]:
        return {ex.key: bool(j) for ex, j in zip(examples, logits.argmax(-1).tolist(), strict=True)}

    def metric(self, predictions: dict[Any, bool], split: str) -> dict[str, Any]:
        return nlvr2_metrics(predictions, {ex.key: bool(ex.target) for ex in self.examples(split)})

    def hidden_ground_truth(self) -> dict[str, bool]:
        return read_nlvr2_hidden(self.world_dir / "hidden" / "nlvr2_test.json")

    def score(self, predictions: dict[Any, bool], ground_truth: Any) -> dict[str, Any]:
        return nlvr2_metrics(predictions, ground_truth)

    def write_submission(self, predictions: dict[Any, bool], out_dir: Path) -> Path:
        path = self.submission_path(out_dir)
        with atomic_file(path, "w", encoding="utf-8", newline="") as f:
            for key, label in sorted(predictions.items()):
                f.write(f"{key},{label}\n")
        return path

    def read_submission(self, path: Path) -> dict[str, bool]:
        if not Path(path).is_file():
            raise InputError(path, "file not found")
        out: dict[str, bool] = {}
        text = Path(path).read_text(encoding="utf-8")
        for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if len(row) != 2 or row[1] not in ("True", "False"):
                raise InputError(path, f"line {n}: expected 'identifier,True' or 'identifier,False', got {row!r}")
            try:
                parse_identifier(row[0])
            except ValueError as e:
                raise InputError(path, f"line {n}: {e}") from None
            if row[0] in out:
                raise InputError(path, f"line {n}: duplicate identifier {row[0]}")
            out[row[0]] = row[1] == "True"
        return out
