"""Error types that carry the offending file, so the CLI can print one clear line."""

from __future__ import annotations

from pathlib import Path


class VlpipeError(Exception):
    """A user-facing error: bad input file, bad params, mismatched checkpoint.

    The CLI prints ``str(err)`` and exits non-zero; no traceback is shown.
    """


class InputError(VlpipeError):
    """A file we were asked to read is missing, malformed or inconsistent."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
