"""GQA (Hudson & Manning, 2019) as LXMERT fine-tunes it: answer-table classification,
exact-match accuracy, EvalAI submission ``submit_predict.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlpipe.data.answers import top_answer
from vlpipe.data.formats.gqa import read_gqa, read_gqa_hidden
from vlpipe.errors import InputError
from vlpipe.eval.gqa import gqa_accuracy
from vlpipe.io import read_json, write_json
from vlpipe.tasks.base import Example
from vlpipe.tasks.vqa import AnswerTableTask


class GqaTask(AnswerTableTask):
    name = "gqa"
    folder = "gqa"
    submission_name = "submit_predict.json"

    def examples(self, split: str) -> list[Example]:
        path = self.world_dir / "gqa" / f"{split}.json"
        return [
            Example(key=r["question_id"], img_ids=(r["img_id"],), sent=r["sent"], target=r.get("label"))
            for r in read_gqa(path, labelled=split != "test")
        ]

    def metric(self, predictions: dict[Any, str], split: str) -> dict[str, Any]:
        gt = {ex.key: top_answer(ex.target) for ex in self.examples(split)}
        return gqa_accuracy(predictions, gt)

    def hidden_ground_truth(self) -> dict[str, str]:
        return read_gqa_hidden(self.world_dir / "hidden" / "gqa_test.json")

    def score(self, predictions: dict[Any, str], ground_truth: Any) -> dict[str, Any]:
        return gqa_accuracy(predictions, ground_truth)

    def write_submission(self, predictions: dict[Any, str], out_dir: Path) -> Path:
        path = self.submission_path(out_dir)
        rows = [{"questionId": str(q), "prediction": a} for q, a in sorted(predictions.items())]
        write_json(path, rows, indent=None)
        return path

    def read_submission(self, path: Path) -> dict[str, str]:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise InputError(path, "expected a list of {questionId, prediction}")
        out: dict[str, str] = {}
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or set(r) != {"questionId", "prediction"}:
                raise InputError(path, f"entry {i}: expected keys questionId, prediction; got {r!r}")
            if not isinstance(r["questionId"], str) or not isinstance(r["prediction"], str):
                raise InputError(path, f"entry {i}: questionId and prediction must be strings")
            if r["questionId"] in out:
                raise InputError(path, f"entry {i}: duplicate questionId {r['questionId']}")
            out[r["questionId"]] = r["prediction"]
        return out
