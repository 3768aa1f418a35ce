"""LXMERT pre-training examples from the reference pre-training JSON (formats.md §2).

Every sentence of every image is one example: captions (``mscoco``/``vg`` sources) and
questions (``vqa``/``gqa``/``visual7w``), the questions with their index-aligned answer
labels, which feed the QA pre-training task over a pre-training answer table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlpipe.data.examples import Example
from vlpipe.data.formats.lxmert import read_lxmert


def pretrain_examples(path: Path) -> list[Example]:
    """One :class:`Example` per sentence; ``target`` is the answer label dict or None."""
    out = []
    for rec in read_lxmert(path):
        labels = rec.get("labelf", {})
        for source in sorted(rec["sentf"]):
            for i, sent in enumerate(rec["sentf"][source]):
                label = labels[source][i] if source in labels else None
                out.append(Example(key=(rec["img_id"], source, i), img_ids=(rec["img_id"],), sent=sent, target=label))
    return out


def pretrain_answer_table(examples: Sequence[Example], min_count: int = 1) -> list[str]:
    """label2ans of the QA pre-training task: answers seen at least ``min_count`` times, sorted
    by frequency then alphabetically (deterministic)."""
    counts = Counter(a for ex in examples if ex.target for a in ex.target)
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


def make_pretrain_collate(
    tokenizer: Any,
    visual: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    ans2label: dict[str, int],
    max_length: int,
    match_sources: Sequence[str] | None = None,
) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """Clean (unmasked) batches; masking happens in the loss function, on the loop's RNG.

    ``match_valid`` (B,) marks the sentences that take part in the matching task: those of
    ``match_sources`` (every sentence when None)."""

    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        text = tokenizer(
            [ex.sent for ex in batch], padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        vis = visual([ex.img_ids[0] for ex in batch])
        qa = torch.zeros(len(batch), len(ans2label))  # (B, A) soft scores
        valid = torch.zeros(len(batch), dtype=torch.bool)  # (B,) example is a question
        for i, ex in enumerate(batch):
            if ex.target is not None:
                valid[i] = True
                for ans, score in ex.target.items():
                    if ans in ans2label:
                        qa[i, ans2label[ans]] = score
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "token_type_ids": text["token_type_ids"],
            **vis,
            "qa_targets": qa,
            "qa_valid": valid,
            "match_valid": torch.tensor(
                [match_sources is None or ex.key[1] in match_sources for ex in batch], dtype=torch.bool
            ),
        }

    return collate
