"""Training checkpoints: atomic, checksummed, resumable bit for bit.

One checkpoint is a directory ``<dir>/step_00000042/`` holding

- ``model.safetensors``: the model weights (safetensors; tied tensors stored once);
- ``trainer.pt``: optimizer and scheduler state, the RNG states of every process
  (python, numpy, torch, CUDA) and, when the run averages its weights, the averaged
  weights (:class:`vlpipe.train.loop.WeightAverage`), a torch pickle of plain containers and tensors only,
  read back with ``weights_only=True``;
- ``state.json``: step, data-order position (epoch, step in epoch), run fingerprint;
- ``manifest.json``, written last: SHA-256 of each file above.

The directory is built under a temporary name and renamed into place, and a checkpoint
whose manifest is missing or whose checksums disagree (a torn copy, a full disk) is
skipped with a warning, so resuming always starts from the newest complete one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
PAYLOAD = (MODEL_FILE, TRAINER_FILE, STATE_FILE)
STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk: its directory, step and ``state.json`` content."""

    path: Path
    step: int
    state: dict[str, Any]


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch (and CUDA) RNG states, as weights_only-safe data."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    rng_states: list[dict[str, Any]],
    state: dict[str, Any],
    average: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``<directory>/step_<step>`` atomically and return its path.

    ``model`` is the unwrapped module; ``rng_states`` holds one :func:`capture_rng_state`
    per process (rank order); ``state`` is extra JSON (data-order position, fingerprint);
    ``average`` the run's averaged weights, if it keeps any. Call on one process only (rank 0).
    """
    final = Path(directory) / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states}
        if average is not None:
            trainer["average"] = average
        torch.save(trainer, tmp / TRAINER_FILE)
        write_json(tmp / STATE_FILE, {**state, "step": step})
        for name in PAYLOAD:
            _fsync(tmp / name)
        write_json(tmp / MANIFEST_FILE, {"complete": True, "sha256": {n: _sha256(tmp / n) for n in PAYLOAD}})
    return final


# ---------------------------------------------------------------------------- find


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = read_json(manifest_path)
    except InputError as e:
        return e.problem
    sums = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(sums, dict) or set(sums) != set(PAYLOAD):
        return "manifest lists the wrong files"
    for name, expected in sums.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != expected:
            return f"{name} does not match its checksum (torn or modified)"
    return None


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` directory, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def iter_checkpoints(directory: str | Path, fingerprint: str | None = None) -> Iterator[Checkpoint]:
    """Complete checkpoints (of this run's ``fingerprint`` when given), newest first.

    Lazy, so finding the newest one verifies only the checksums it has to. Incomplete or
    corrupt checkpoints are skipped with a warning naming the directory and the problem.
    """
    for step, path in _step_dirs(Path(directory)):
        problem = checkpoint_problem(path)
        if problem is not None:
            log.warning("skipping checkpoint %s: %s", path, problem)
            continue
        state = read_json(path / STATE_FILE)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            log.warning("skipping checkpoint %s: made with other settings (fingerprint differs)", path)
            continue
        yield Checkpoint(path=path, step=step, state=state)


def load_latest_checkpoint(directory: str | Path, fingerprint: str | None = None) -> Checkpoint | None:
    """The newest complete checkpoint (matching ``fingerprint`` when given), or None."""
    return next(iter_checkpoints(directory, fingerprint), None)


# ------------------------------------------------------------------------- restore


def restore_checkpoint(
    checkpoint: Checkpoint,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    rank: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor] | None:
    """Load weights, optimizer, scheduler and this rank's RNG states from ``checkpoint``;
    return the averaged weights it holds (None when the run kept none).

    When the checkpoint holds no RNG state for ``rank`` (resumed with more processes),
    rank 0's state is used and a warning says the run is no longer bitwise reproducible.
    """
    path = checkpoint.path
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise InputError(path / MODEL_FILE, f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    try:
        trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise InputError(path / TRAINER_FILE, f"optimizer/scheduler state does not load: {e}") from e
    states = trainer["rng"]
    if rank >= len(states):
        log.warning("checkpoint %s has no RNG state for rank %d; using rank 0's", path, rank)
    restore_rng_state(states[min(rank, len(states) - 1)])
    return trainer.get("average")


def prune_checkpoints(directory: str | Path, keep: int, fingerprint: str | None = None) -> None:
    """Keep the ``keep`` newest complete checkpoints of this run; remove every other one.

    Also removes leftovers of interrupted writes (``.step_*.tmp-*``) and checkpoints of
    other settings, so they can never be mistaken for this run's.
    """
    directory = Path(directory)
    kept = {c.path for c in islice(iter_checkpoints(directory, fingerprint), keep)}
    for _, path in _step_dirs(directory):
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in directory.glob(".step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
