"""Atomic file/directory writes and JSON helpers with clear errors.

Every stage writes to a temporary sibling and renames it into place, so a failed
stage never leaves a partial output behind (design.md, conventions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpipe.errors import InputError


def is_writer() -> bool:
    """True on the process that writes outputs: global rank 0 under torchrun, or no torchrun.

    Every output write of vlpipe goes through this module, so a training stage run by
    ``torchrun --nproc_per_node N`` writes its outputs, metrics and meta once, from rank 0;
    the other ranks write into scratch space that is thrown away.
    """
    return int(os.environ.get("RANK", "0")) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` on success.

    On an exception the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if not is_writer():
        scratch = Path(tempfile.mkdtemp(prefix="vlpipe-rank-scratch-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are ordinary directories
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file next to ``final``; rename it over ``final`` on success."""
    final = Path(final)
    if not is_writer():
        fd, scratch = tempfile.mkstemp(prefix="vlpipe-rank-scratch-")
        os.close(fd)
        try:
            with open(scratch, mode, **kwargs) as f:
                yield f
        finally:
            os.unlink(scratch)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON atomically with sorted keys (stable bytes for DVC and diffs)."""
    # json.dumps uses the C encoder; json.dump to a file does not (several times slower).
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON, raising :class:`InputError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text: {e}") from e


# Wall-clock figures differ between two runs of the same stage, so they never go into a DVC
# metrics file (two `dvc repro --force` runs must give byte-identical metrics). They go to
# reports/timing/<same relative path>, which benchmarks/pipeline.py and the report read.
TIMING_KEYS = frozenset({"samples_per_second", "train_seconds", "seconds", "text_assignment_seconds"})


def timing_path(metrics_path: str | Path) -> Path:
    """``<root>/metrics/a/b.json`` -> ``<root>/reports/timing/a/b.json``."""
    path = Path(metrics_path)
    parts = path.parts
    if "metrics" not in parts:
        return path.with_name(path.stem + ".timing.json")
    i = len(parts) - 1 - parts[::-1].index("metrics")
    return Path(*parts[:i], "reports", "timing", *parts[i + 1 :])


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a DVC metrics file: rounded floats so bytes are stable across runs.

    Top-level wall-clock keys (:data:`TIMING_KEYS`) are split off into :func:`timing_path`.
    """
    timing = {k: metrics[k] for k in TIMING_KEYS if k in metrics}
    write_json(path, _round({k: v for k, v in metrics.items() if k not in TIMING_KEYS}))
    if timing:
        timing["processes"] = int(os.environ.get("WORLD_SIZE", "1"))  # throughput depends on it
        write_json(timing_path(path), _round(timing))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read the ``meta.json`` an upstream stage wrote (size facts flow downstream)."""
    return read_json(Path(directory) / "meta.json")


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x
