"""The local leaderboard: scores a submission file against data/world/hidden/.

This module is the only reader of the hidden test answers, as an evaluation server would
be: stages write official submission files, the leaderboard reads them back (validating the
format) and scores them with the task's official metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlpipe.errors import InputError


def score_submission(task: Any, path: Path) -> dict[str, Any]:
    """Official test metrics of the submission at ``path`` for ``task``.

    Every hidden test example needs a prediction; predictions for unknown ids are an error
    (a submission for the wrong split or task), as on the evaluation servers.
    """
    predictions = task.read_submission(path)
    ground_truth = task.hidden_ground_truth()
    gt_keys = {str(k) for k in ground_truth}
    unknown = [k for k in predictions if str(k) not in gt_keys]
    if unknown:
        raise InputError(path, f"{len(unknown)} predictions for ids not in the test split, e.g. {unknown[:3]}")
    missing = len(gt_keys) - len(predictions)
    if missing:
        raise InputError(path, f"{missing} of {len(gt_keys)} test examples have no prediction")
    # Keys travel as JSON strings in some formats: align prediction keys to the ground truth's type.
    by_str = {str(k): v for k, v in predictions.items()}
    aligned = {k: by_str[str(k)] for k in ground_truth}
    return {"test": task.score(aligned, ground_truth), "submission": Path(path).name, "count": len(aligned)}
