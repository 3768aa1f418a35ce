"""Scale-out: a training stage re-launches itself under ``torchrun`` when its params ask.

``dvc repro`` runs ``vlpipe finetune lxmert-vqa`` as one process. When the stage's
``train.nproc_per_node`` (or ``train.nnodes``) asks for more than one process, the CLI
replaces itself with ``torchrun ... -m vlpipe finetune lxmert-vqa`` (same arguments), so
DVC still sees one command with one exit status. Under torchrun every rank runs the same
stage: :func:`vlpipe.train.fit` shards the data by rank (the global batch and therefore the
result do not depend on the process count) and :mod:`vlpipe.io` writes outputs from rank 0
only. ``LOCAL_RANK`` in the environment means we already are a torchrun worker.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from vlpipe.config import TrainParams


def torchrun_command(train: TrainParams, argv: Sequence[str], run_id: str) -> list[str] | None:
    """The torchrun command line that runs ``vlpipe *argv`` with ``train``'s processes, or None."""
    if train.nproc_per_node * train.nnodes == 1 or "LOCAL_RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={train.nproc_per_node}"]
    if train.nnodes == 1:
        cmd.append("--standalone")  # a private rendezvous on a free local port
    else:
        cmd += [
            f"--nnodes={train.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={train.rdzv_endpoint}",
            f"--rdzv_id={run_id}",
        ]
    return [*cmd, "-m", "vlpipe", *argv]


def relaunch_if_asked(train: TrainParams, argv: Sequence[str], run_id: str) -> None:
    """Replace this process by torchrun when ``train`` asks for more than one process."""
    cmd = torchrun_command(train, argv, run_id)
    if cmd is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # One thread per process: N processes on N cores must not oversubscribe each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.execv(cmd[0], cmd)
