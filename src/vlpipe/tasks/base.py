"""The task contract shared by every model: examples, head, loss, predict, metric, submission.

A task knows its files (reference formats), its head on top of a pooled cross-modal
vector, its loss, how to turn logits into answers, its official metric and its leaderboard
file. It knows no model: an *encoder* is any module ``encoder(**inputs) -> (B, H)`` with a
``hidden_size``, and images arrive through a visual source (``vlpipe.data.visual``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpipe.data.examples import Example, ExampleDataset

__all__ = ["Example", "ExampleDataset", "Task", "TaskModel", "make_collate", "predict_all"]


class Task(abc.ABC):
    """Base of VQA, GQA, NLVR2, ... (see module docstring)."""

    name: str
    num_images: int = 1  # images per example (NLVR2: 2)

    def __init__(self, world_dir: Path):
        self.world_dir = Path(world_dir)

    # ---- data
    @abc.abstractmethod
    def examples(self, split: str) -> list[Example]:
        """Examples of ``split`` (train / val / test); test examples carry no target."""

    @abc.abstractmethod
    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        """Training targets of a batch of examples."""

    # ---- model side
    @abc.abstractmethod
    def build_head(self, hidden_size: int) -> nn.Module:
        """Head on the pooled vector(s): (B, num_images * H) -> (B, C)."""

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named losses plus ``loss`` (their total)."""

    @abc.abstractmethod
    def predict(self, logits: torch.Tensor, examples: Sequence[Example]) -> dict[Any, Any]:
        """``{key: prediction}`` in the submission's value type."""

    # ---- evaluation
    @abc.abstractmethod
    def metric(self, predictions: dict[Any, Any], split: str) -> dict[str, Any]:
        """Official metric on a labelled split (val) from the split's own file."""

    @abc.abstractmethod
    def hidden_ground_truth(self) -> Any:
        """The test answers from ``data/world/hidden`` (read only by the local leaderboard)."""

    @abc.abstractmethod
    def score(self, predictions: dict[Any, Any], ground_truth: Any) -> dict[str, Any]:
        """Official metric of predictions against ground truth (the leaderboard's)."""

    @abc.abstractmethod
    def write_submission(self, predictions: dict[Any, Any], out_dir: Path) -> Path:
        """Write the official leaderboard file under ``out_dir``; return its path."""

    @abc.abstractmethod
    def read_submission(self, path: Path) -> dict[Any, Any]:
        """Read (and validate) a leaderboard file written by :meth:`write_submission`."""

    def submission_path(self, out_dir: Path) -> Path:
        return Path(out_dir) / self.submission_name

    submission_name: str = "test_predict.json"


class TaskModel(nn.Module):
    """Encoder + task head. ``inputs`` hold B * num_images rows (NLVR2: sentence with each image).

    The pooled vectors of an example's images are concatenated, (B, num_images * H), as
    LXMERT does for NLVR2, then the head gives (B, C) logits.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, num_images: int):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.num_images = num_images

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.encoder(**inputs)  # (B * n, H)
        return self.head(pooled.reshape(-1, self.num_images * pooled.shape[-1]))  # (B, C)


def make_collate(
    task: Task,
    tokenizer: Any,
    visual: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    max_length: int,
    with_targets: bool = True,
    mark_sides: bool = False,
) -> Callable[[list[Example]], dict[str, Any]]:
    """Collate examples into ``{"inputs", "targets", "examples"}``.

    Each example contributes ``task.num_images`` rows: its sentence with each of its images.
    ``mark_sides``: the token type of a row's sentence is the index of its image (NLVR2: 0
    left, 1 right), so the encoder knows which image "the left image" of the sentence is.
    An example with ``info["mirror"]`` (:func:`vlpipe.tasks.mirror.mirror_examples`) has its
    boxes reflected across those axes.
    """

    def collate(batch: list[Example]) -> dict[str, Any]:
        sents = [ex.sent for ex in batch for _ in ex.img_ids]
        img_ids = [i for ex in batch for i in ex.img_ids]
        text = tokenizer(sents, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        vis = visual(img_ids)
        pos = vis["visual_pos"]  # (B * n, N, 4)
        if any(ex.info.get("mirror") for ex in batch):
            from vlpipe.tasks.mirror import mirror_positions

            pos = pos.clone()
            for row, axes in enumerate(ex.info.get("mirror") for ex in batch for _ in ex.img_ids):
                if axes:  # a mirrored training copy (params ``mirror``)
                    pos[row] = mirror_positions(pos[row], axes)
        token_types = text["token_type_ids"]  # (B * n, L), zeros
        if mark_sides:
            side = torch.arange(len(sents)) % task.num_images  # rows are (example, image) pairs
            token_types = side[:, None].expand_as(token_types).contiguous()
        inputs = {
            "input_ids": text["input_ids"],  # (B * n, L)
            "attention_mask": text["attention_mask"],
            "token_type_ids": token_types,
            "visual_feats": vis["visual_feats"],  # (B * n, N, D)
            "visual_pos": pos,
        }
        out: dict[str, Any] = {"inputs": inputs, "examples": batch}
        if with_targets:
            out["targets"] = task.targets(batch)
        return out

    return collate


@torch.no_grad()
def predict_all(
    model: TaskModel, task: Task, examples: Sequence[Example], collate: Callable, batch_size: int
) -> dict[Any, Any]:
    """Run ``model`` over ``examples`` (eval mode, in order) and return ``{key: prediction}``."""
    was_training = model.training
    model.eval()
    preds: dict[Any, Any] = {}
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start : start + batch_size]))
        preds.update(task.predict(model(batch["inputs"]), batch["examples"]))
    model.train(was_training)
    return preds
