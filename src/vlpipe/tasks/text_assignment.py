"""Text assignment (TA): the NLVR2 domain pre-training of ALBEF (Li et al., NeurIPS 2021, §5)
that X-VLM (Zeng et al., ICML 2022) inherits (``XVLMForNLVRPretraining``).

NLVR2 reads one sentence against two images, which image-text pre-training never does. Before
fine-tuning on NLVR2 the two-image model is therefore trained for a while on captions: given a
caption and two images, is it about the first image (label 0), the second (1) or neither (2)?
The encoder and its two-image fusion carry over to NLVR2; the 3-way head does not.

This is a training objective, not a leaderboard task: it has examples, targets, a head, a
loss and an accuracy, but no official metric or submission, so it is not in ``TASKS``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vlpipe.data.examples import Example
from vlpipe.models.layers import AnswerHead

FIRST, SECOND, NEITHER = 0, 1, 2


def text_assignment_examples(captions: Sequence[tuple[str, str]], seed: int) -> list[Example]:
    """One example per (img_id, caption): labels cycle first / second / neither over a seeded
    shuffle (a third each); the other image(s) are drawn from the images of ``captions``, never
    the caption's own. Needs captions of at least 3 images."""
    images = sorted({img for img, _ in captions})
    if len(images) < 3:
        raise ValueError(f"text assignment needs captions of at least 3 images, got {len(images)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(captions))
    out = []
    for n, i in enumerate(order.tolist()):
        img, sent = captions[i]
        label = n % 3
        others: list[str] = []
        while len(others) < 2:  # two distinct images, neither of them the caption's
            o = images[int(rng.integers(len(images)))]
            if o != img and o not in others:
                others.append(o)
        pair = {FIRST: (img, others[0]), SECOND: (others[0], img), NEITHER: (others[0], others[1])}[label]
        out.append(Example(key=f"ta-{i}", img_ids=pair, sent=sent, target=label))
    return out


class TextAssignment:
    """Targets, head and loss of TA, shaped like a task for ``TaskModel`` and the collates
    (two rows per example: the caption with each image)."""

    name = "ta"
    num_images = 2

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        return torch.tensor([int(ex.target) for ex in examples], dtype=torch.long)  # (B,)

    def build_head(self, hidden_size: int) -> nn.Module:
        # As the NLVR2 head, over the two pooled vectors: 2H -> 2H, GeLU, LayerNorm, 2H -> 3.
        return AnswerHead(2 * hidden_size, 3, hidden_dim=2 * hidden_size)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, targets)  # logits (B, 3)
        return {"ta_ce": ce, "loss": ce}

    def predict(self, logits: torch.Tensor, examples: Sequence[Example]) -> dict[str, int]:
        return {ex.key: j for ex, j in zip(examples, logits.argmax(-1).tolist(), strict=True)}

    def metric(self, predictions: dict[str, int], examples: Sequence[Example]) -> dict[str, float]:
        """Accuracy, overall and per label."""
        out = {"accuracy": float(np.mean([predictions[ex.key] == ex.target for ex in examples]))}
        for label, name in ((FIRST, "first"), (SECOND, "second"), (NEITHER, "neither")):
            hits = [predictions[ex.key] == label for ex in examples if ex.target == label]
            out[f"accuracy_{name}"] = float(np.mean(hits)) if hits else 0.0
        return out
