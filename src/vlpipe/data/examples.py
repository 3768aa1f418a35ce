"""Examples shared by tasks and pre-training: one sentence with one or more images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Example:
    """One task example: ``key`` identifies it in submissions (question_id / identifier)."""

    key: Any
    img_ids: tuple[str, ...]
    sent: str
    target: Any = None  # task-specific ground truth for training (None on test)
    info: dict[str, Any] = field(default_factory=dict)



class ExampleDataset(torch.utils.data.Dataset):
    """A list of examples as a map-style dataset (items are the examples themselves)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]
