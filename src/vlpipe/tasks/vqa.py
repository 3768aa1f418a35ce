"""VQA v2 (Goyal et al., 2017) as LXMERT fine-tunes it: classification over the answer
table with BCE on soft scores (x num_answers, as the reference), official VQA accuracy,
EvalAI submission ``test_predict.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlpipe.data.formats.vqa import read_answer_table, read_vqa, read_vqa_hidden
from vlpipe.errors import InputError
from vlpipe.eval.vqa import vqa_accuracy
from vlpipe.io import read_json, write_json
from vlpipe.models.layers import AnswerHead
from vlpipe.tasks.base import Example, Task


class AnswerTableTask(Task):
    """Shared by VQA and GQA: one image, a fixed answer table, soft-score targets."""

    folder: str

    def __init__(self, world_dir: Path):
        super().__init__(world_dir)
        d = self.world_dir / self.folder
        self.ans2label, self.label2ans = read_answer_table(d / "trainval_ans2label.json", d / "trainval_label2ans.json")

    @property
    def num_answers(self) -> int:
        return len(self.label2ans)

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        t = torch.zeros(len(examples), self.num_answers)  # (B, A) soft scores
        for i, ex in enumerate(examples):
            for ans, score in (ex.target or {}).items():
                if ans in self.ans2label:  # answers outside the table carry no target (reference)
                    t[i, self.ans2label[ans]] = score
        return t

    def build_head(self, hidden_size: int) -> nn.Module:
        return AnswerHead(hidden_size, self.num_answers)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        # LXMERT: BCEWithLogits(mean) x number of answers == sum over answers, mean over batch.
        bce = F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[1]
        return {f"{self.name}_bce": bce, "loss": bce}

    def predict(self, logits: torch.Tensor, examples: Sequence[Example]) -> dict[Any, str]:
        best = logits.argmax(dim=-1).tolist()  # (B,)
        return {ex.key: self.label2ans[j] for ex, j in zip(examples, best, strict=True)}


class VqaTask(AnswerTableTask):
    name = "vqa"
    folder = "vqa"
    submission_name = "test_predict.json"

    def examples(self, split: str) -> list[Example]:
        path = self.world_dir / "vqa" / f"{split}.json"
        return [
            Example(
                key=r["question_id"],
                img_ids=(r["img_id"],),
                sent=r["sent"],
                target=r.get("label"),
                info={"answer_type": r["answer_type"], "answers": r.get("answers")},
            )
            for r in read_vqa(path, labelled=split != "test")
        ]

    def metric(self, predictions: dict[Any, str], split: str) -> dict[str, Any]:
        gt = {}
        for ex in self.examples(split):
            if ex.info["answers"] is None:
                raise InputError(self.world_dir / "vqa" / f"{split}.json", "records lack the 10 raw 'answers'")
            gt[ex.key] = {"answers": ex.info["answers"], "answer_type": ex.info["answer_type"]}
        return vqa_accuracy(predictions, gt)

    def hidden_ground_truth(self) -> dict[int, dict[str, Any]]:
        return read_vqa_hidden(self.world_dir / "hidden" / "vqa_test.json")

    def score(self, predictions: dict[Any, str], ground_truth: Any) -> dict[str, Any]:
        return vqa_accuracy(predictions, ground_truth)

    def write_submission(self, predictions: dict[Any, str], out_dir: Path) -> Path:
        path = self.submission_path(out_dir)
        rows = [{"question_id": int(q), "answer": a} for q, a in sorted(predictions.items())]
        write_json(path, rows, indent=None)
        return path

    def read_submission(self, path: Path) -> dict[int, str]:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise InputError(path, "expected a list of {question_id, answer}")
        out: dict[int, str] = {}
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or set(r) != {"question_id", "answer"}:
                raise InputError(path, f"entry {i}: expected keys question_id, answer; got {r!r}")
            if not isinstance(r["question_id"], int) or not isinstance(r["answer"], str):
                raise InputError(path, f"entry {i}: question_id must be int and answer str")
            if r["question_id"] in out:
                raise InputError(path, f"entry {i}: duplicate question_id {r['question_id']}")
            out[r["question_id"]] = r["answer"]
        return out
