"""One short function per DVC stage: read its params section and upstream meta.json,
call the library, write outputs atomically and the stage's metrics file.

Nothing imports this package except the CLI, which asks :func:`stage_runner` which
function runs a stage: explicit tables, no registration by import side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from vlpipe.errors import VlpipeError

# pretrain@<model> -> (module, function(params_path, root))
PRETRAIN = {
    "lxmert": ("lxmert", "run_pretrain"),
    "xlxmert": ("xlxmert", "run_pretrain"),
    "vlp": ("vlp", "run_pretrain"),
    "xvlm": ("xvlm", "run_pretrain"),
}
# (model, task) of a finetune.<key> entry -> (module, finetune fn, submit fn), each fn(key, params_path, root)
FINETUNE = {
    ("lxmert", "vqa"): ("lxmert", "run_finetune", "run_submit"),
    ("lxmert", "gqa"): ("lxmert", "run_finetune", "run_submit"),
    ("lxmert", "nlvr2"): ("lxmert", "run_finetune", "run_submit"),
    ("xlxmert", "vqa"): ("lxmert", "run_finetune", "run_submit"),
    ("xlxmert", "gqa"): ("lxmert", "run_finetune", "run_submit"),
    ("xlxmert", "nlvr2"): ("lxmert", "run_finetune", "run_submit"),
    ("vlp", "vqa"): ("vlp", "run_finetune_task", "run_submit_task"),
    ("vlp", "caption"): ("vlp", "run_finetune_caption", "run_submit_caption"),
    ("xvlm", "retrieval"): ("xvlm", "run_finetune", "run_submit"),
    ("xvlm", "refcoco"): ("xvlm", "run_finetune", "run_submit"),
    ("xvlm", "vqa"): ("xvlm", "run_finetune", "run_submit"),
    ("xvlm", "nlvr2"): ("xvlm", "run_finetune", "run_submit"),
}


def _function(module: str, name: str) -> Callable[..., Any]:
    return getattr(import_module(f"vlpipe.stages.{module}"), name)


def stage_runner(kind: str, key: str, params_path: Path) -> Callable[..., Any]:
    """The function that runs ``pretrain@key``, ``finetune@key`` or ``submit@key``.

    For fine-tuning and submission the ``finetune.<key>`` entry of params.yaml decides (its
    model and task), so a user can add e.g. ``finetune.lxmert-vqa-lr3`` and run it.
    """
    if kind == "pretrain":
        if key not in PRETRAIN:
            raise VlpipeError(f"unknown model {key!r}; expected one of {sorted(PRETRAIN)}")
        return _function(*PRETRAIN[key])
    from vlpipe.config import load_section

    section = load_section("finetune", params_path)
    if key not in section:
        raise VlpipeError(f"{params_path}: no finetune entry {key!r} (have: {', '.join(sorted(section))})")
    entry = section[key]
    module, finetune_fn, submit_fn = FINETUNE[(entry.model, entry.task)]
    return _function(module, finetune_fn if kind == "finetune" else submit_fn)
