"""Official metrics of the tasks (VQA, GQA, NLVR2, ...) and the local leaderboard.

Metrics know no model: they take predictions and ground truth as plain dicts.
"""

from vlpipe.eval.gqa import gqa_accuracy
from vlpipe.eval.nlvr2 import nlvr2_metrics
from vlpipe.eval.vqa import vqa_accuracy

__all__ = ["gqa_accuracy", "nlvr2_metrics", "vqa_accuracy"]
