"""Downstream tasks as small objects (head, loss, predict, metric, submission).

``TASKS`` maps the task names used in params.yaml (``finetune.<model>-<task>.task``) to
their classes; it is an explicit dict, not a registry filled by import side effects.
"""

from __future__ import annotations

from vlpipe.tasks.base import Example, Task, TaskModel
from vlpipe.tasks.gqa import GqaTask
from vlpipe.tasks.nlvr2 import Nlvr2Task
from vlpipe.tasks.vqa import VqaTask

TASKS: dict[str, type[Task]] = {"vqa": VqaTask, "gqa": GqaTask, "nlvr2": Nlvr2Task}

__all__ = ["TASKS", "Example", "GqaTask", "Nlvr2Task", "Task", "TaskModel", "VqaTask"]
